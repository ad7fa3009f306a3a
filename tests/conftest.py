"""Tests run offline on CPU with generated data and tiny models."""

import os
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: fail at once instead of retrying the network, and never find a
# developer's real cache (which would make "no weights available" untestable).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="skinclf-hf-home-")
os.environ.setdefault("WANDB_MODE", "disabled")
# Under pytest-xdist (make test runs one worker per core) each worker computes on one thread, and so do the scripts
# the tests start: two workers with two busy-waiting threads each took longer than one worker alone.
PARALLEL_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if PARALLEL_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if PARALLEL_WORKER else min(2, os.cpu_count() or 1))

from data.synthetic_lesions import generate_dataset  # noqa: E402

# A GroupNorm EfficientNet: BatchNorm running statistics of a tiny model lag far behind its weights after a few
# dozen steps, which makes a 2-epoch test measure BN lag rather than learning.
TINY_MODEL = "test_efficientnet_gn"


def pytest_addoption(parser):
    parser.addoption("--browser", action="store_true",
                     help="also run the tests that drive headless Chromium (make test-browser)")
    parser.addoption("--cpu-without-vnni", action="store_true",
                     help="this CPU is an emulated one without VNNI (make test-avx2: qemu -cpu Haswell), whose "
                          "/proc/cpuinfo is still the host's: treat its INT8 kernels as saturating")


def pytest_configure(config):
    if config.getoption("--cpu-without-vnni"):
        import utils.cpu

        utils.cpu.int8_pairs_saturate = lambda: True  # before the test modules import it


def pytest_collection_modifyitems(config, items):
    """Browser tests run only when asked: a fresh machine has no browser, and they must fail, not skip, without one."""
    if config.getoption("--browser"):
        return
    kept = [item for item in items if "browser" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "browser" in item.keywords])
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output as it would reach a terminal: a file name that is not UTF-8 (lone surrogates, logged by the
    hostile-name tests) is escaped, since pytest-xdist's workers send each report to the main process as UTF-8."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for title, text in report.sections]


@pytest.fixture(scope="session")
def lesion_dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("lesions") / "demo_dataset", n_train=64, n_test=16,
                            img_size=64, seed=0)


def train_args(data_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--data_name", "demo", "--model_name", TINY_MODEL,
            "--pre_trained", "False", "--epochs", "2", "--img_size", "64", "--batch_size", "16",
            "--lr_ae", "0.005", "--num_workers", "0", "--save_dir", str(save_dir), "--refit", "False", *extra]


def interrupt_after_checkpoint(monkeypatch, when) -> None:
    """Make training stop with KeyboardInterrupt (as Ctrl-C would) right after writing a checkpoint for which
    ``when(path, state)`` holds; ``monkeypatch.undo()`` restores normal saving."""
    from torch_trainer import phase

    real_save = phase.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        if when(path, state):
            raise KeyboardInterrupt

    monkeypatch.setattr(phase, "save_checkpoint", save_then_interrupt)


@pytest.fixture(scope="session")
def tiny_run(lesion_dataset, tmp_path_factory) -> Path:
    """A finished run folder of the tiny model, shared by the tests that read run folders back."""
    import main

    result = main.main(main.parse_args(train_args(lesion_dataset, tmp_path_factory.mktemp("tiny_run"))))
    return Path(result["run_dir"])


# --- every error or warning a script gives names only flags that script accepts (tests/error_hints.py) ------------------
import logging  # noqa: E402

from tests import error_hints  # noqa: E402
from utils.errors import UserError  # noqa: E402

_hints_said: list[tuple[str, str]] = []


def _record_user_error(self, *args) -> None:
    Exception.__init__(self, *args)
    script = error_hints.caller_script()
    if script is not None:
        _hints_said.append((script, str(self)))


class _HintRecorder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        script = error_hints.outermost_script(sys._getframe(1))
        if script is not None and record.levelno >= logging.WARNING:
            _hints_said.append((script, record.getMessage()))


UserError.__init__ = _record_user_error


@pytest.fixture(autouse=True)
def every_hint_names_a_flag_of_its_own_script():
    handler = _HintRecorder(logging.WARNING)
    logging.getLogger().addHandler(handler)
    del _hints_said[:]
    yield
    logging.getLogger().removeHandler(handler)
    wrong = [(script, sorted(error_hints.foreign_flags(script, message)), message) for script, message in _hints_said]
    wrong = [entry for entry in wrong if entry[1]]
    del _hints_said[:]
    if wrong:
        pytest.fail("a message advises a flag its script rejects: "
                    + "; ".join(f"{script}.py names {flags} in {message!r}" for script, flags, message in wrong))
