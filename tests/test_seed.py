import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.seed import seed_epoch, seed_everything, seed_worker


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_makes_all_generators_repeat():
    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


class _Noise(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([np.random.rand(), random.random(), float(torch.rand(1))])


def _epoch(seed, epoch):
    loader = DataLoader(_Noise(), batch_size=2, shuffle=True, num_workers=2, worker_init_fn=seed_worker,
                        generator=seed_epoch(seed, epoch, torch.Generator()))
    return torch.cat(list(loader))


def test_workers_get_distinct_streams_per_worker_and_epoch_and_repeat_on_rerun():
    epoch0, epoch0_again, epoch1 = _epoch(3, 0), _epoch(3, 0), _epoch(3, 1)
    assert torch.equal(epoch0, epoch0_again)
    assert not torch.equal(epoch0, epoch1)
    # numpy draws differ between samples (a worker's numpy stream is not a copy of another's)
    assert len(set(epoch0[:, 0].tolist())) == len(epoch0)


def test_seed_epoch_reseeds_the_loaders_generator_in_place_and_the_global_streams():
    generator = torch.Generator()
    assert seed_epoch(5, 2, generator) is generator  # the loader and sampler keep the same object
    first = (torch.randint(0, 10**6, (3,), generator=generator).tolist(), draw())
    seed_epoch(5, 2, generator)
    assert (torch.randint(0, 10**6, (3,), generator=generator).tolist(), draw()) == first
    seed_epoch(5, 3, generator)
    assert torch.randint(0, 10**6, (3,), generator=generator).tolist() != first[0]
