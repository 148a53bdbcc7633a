"""A tiny pre-activation ResNet (16/32/64 channels, one block a stage, ~0.08 M parameters).

For tests and CPU runs: about 1,000 training images/s on two CPU threads.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.models.base import FeatureClassifier
from mixacm.models.blocks import PreActBlock, run_preact_groups
from mixacm.models.registry import MODELS


class TinyResNet(FeatureClassifier):
    feature_names = ("stem", "layer1", "layer2", "layer3")
    preactivation = True

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64), **norm) -> None:
        super().__init__(**norm)
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(widths[0], widths[0], 1)
        self.layer2 = PreActBlock(widths[0], widths[1], 2)
        self.layer3 = PreActBlock(widths[1], widths[2], 2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor], activated: bool = False) -> Tensor:
        groups = [self.layer1, self.layer2, self.layer3]
        out = run_preact_groups(self.stem(z), self.feature_names, groups, self.bn, want, feats, activated)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("tiny")
def tiny(num_classes: int = 10, **kwargs) -> TinyResNet:
    return TinyResNet(num_classes=num_classes, **kwargs)
