"""PreAct ResNet-18 (He et al. 2016) in the form used by Wong et al. 2020 and Rice et al. 2020.

A 3x3 conv to 64 channels, four groups of two pre-activation blocks (64, 128, 256, 512 channels,
strides 1, 2, 2, 2; projections keyed ``shortcut.0``), then BN + ReLU (``bn``), global average
pooling and ``linear``: the key names of those papers' checkpoints. 11,171,146 parameters for 10
classes. Features: ``stem`` = conv1's output, ``layer1``..``layer4`` = the groups' outputs
(pre-activation: the final ``bn`` + ReLU follows layer4).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.models.base import FeatureClassifier
from mixacm.models.blocks import PreActBlock, run_preact_groups
from mixacm.models.registry import MODELS


class PreActResNet(FeatureClassifier):
    feature_names = ("stem", "layer1", "layer2", "layer3", "layer4")
    preactivation = True

    def __init__(self, num_classes: int = 10, blocks: tuple[int, ...] = (2, 2, 2, 2), **norm) -> None:
        super().__init__(**norm)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"preact_resnet blocks must be four positive counts, got {blocks}")
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        c_in = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            group = [PreActBlock(c_in if j == 0 else width, width, stride if j == 0 else 1, wrap_shortcut=True)
                     for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*group))
            c_in = width
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor], activated: bool = False) -> Tensor:
        groups = [getattr(self, n) for n in self.feature_names[1:]]
        out = run_preact_groups(self.conv1(z), self.feature_names, groups, self.bn, want, feats, activated)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("preact_resnet18")
def preact_resnet18(num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet(num_classes=num_classes, blocks=(2, 2, 2, 2), **kwargs)
