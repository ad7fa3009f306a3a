"""A worked example of an own model: a small plain CNN registered with timm as ``small_cnn``.

What a model needs so every script handles it:
- a ``@register_model`` function that takes ``pretrained`` and timm's keyword arguments (``num_classes``,
  ``drop_rate``, and the ``pretrained_cfg``/``cache_dir`` keys timm passes to every entry point);
- ``num_classes`` outputs (logits), and ``get_classifier()`` so a local ``--pretrained_path`` file can get a new head;
- ``feature_info`` naming the last spatial feature module, where Grad-CAM looks;
- only operators ONNX exports (convolutions, batch norm, ReLU, pooling, linear): INT8 export then works too.

    python main.py --data_dir data/demo_dataset --model_name small_cnn --pre_trained False
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: int = 32, drop_rate: float = 0.0):
        super().__init__()
        layers, channels = [], in_chans
        for out in (width, width * 2, width * 4, width * 8):  # four stride-2 stages: 1/16 of the input side
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.num_classes = num_classes
        self.feature_info = [{"num_chs": channels, "reduction": 16, "module": "features"}]
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(channels, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.global_pool(self.features(x)).flatten(1)))


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    if pretrained:
        raise RuntimeError("small_cnn has no ImageNet weights")  # main.py turns this into advice (--pre_trained False)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm passes these to every entry point
        kwargs.pop(key, None)
    return SmallCNN(**kwargs)
