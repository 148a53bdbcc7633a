"""The small residual networks of the certified-training literature (``resnet2b``, ``resnet4b``).

These are the architectures of the two robust CIFAR-10 teachers in ``../shared/models`` (published by
the alpha-beta-CROWN project), written from the architecture description in that folder's README so
that their state dicts load with strict key matching. No batch norm; every conv and linear layer has
a bias. A block computes ``relu(conv2(relu(conv1(x))) + shortcut(x))`` where the shortcut is the
identity or, when the stride or channel count changes, a 1x1 conv (key ``shortcut.0``). After the
residual groups the feature map is flattened into two linear layers (``linear1`` -> ReLU ->
``linear2``), so the input size is fixed (32x32).

Features: ``stem`` = relu(conv1(x)), ``layer1`` (and ``layer2`` for resnet4b) = outputs of the
residual groups, i.e. already activated maps.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.models.base import FeatureClassifier
from mixacm.models.registry import MODELS


class CertBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=True)
        # A Sequential so the checkpoint key is ``shortcut.0``; an empty one is the identity.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class CertResNet(FeatureClassifier):
    """conv1 (stride 2) -> residual groups (first block of each has stride 2) -> 2 linear layers.

    ``stem_width`` is conv1's channel count, ``group_widths`` one entry per residual group,
    ``blocks`` the blocks per group, ``hidden`` the width of ``linear1``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        stem_width: int = 16,
        group_widths: Sequence[int] = (32, 32),
        blocks: int = 2,
        hidden: int = 100,
        image_size: int = 32,
        **norm,
    ) -> None:
        super().__init__(**norm)
        self.feature_names = ("stem",) + tuple(f"layer{i + 1}" for i in range(len(group_widths)))
        self.conv1 = nn.Conv2d(3, stem_width, 3, 2, 1, bias=True)
        c_in, size = stem_width, (image_size + 1) // 2
        for i, width in enumerate(group_widths):
            group = [CertBlock(c_in, width, 2)] + [CertBlock(width, width, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*group))
            c_in, size = width, (size + 1) // 2
        self.linear1 = nn.Linear(c_in * size * size, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor]) -> Tensor:
        stages = [lambda t: F.relu(self.conv1(t))] + [getattr(self, n) for n in self.feature_names[1:]]
        out = self._run_stages(z, stages, want, feats)
        return self.linear2(F.relu(self.linear1(out.flatten(1))))


@MODELS.register("resnet2b")
def resnet2b(num_classes: int = 10, **kwargs) -> CertResNet:
    """conv1 3->8, one group of two 16-channel blocks, 1024 -> 100 -> classes (112,006 params)."""
    return CertResNet(num_classes, stem_width=8, group_widths=(16,), blocks=2, **kwargs)


@MODELS.register("resnet4b")
def resnet4b(num_classes: int = 10, **kwargs) -> CertResNet:
    """conv1 3->16, two groups of two 32-channel blocks, 512 -> 100 -> classes (105,238 params)."""
    return CertResNet(num_classes, stem_width=16, group_widths=(32, 32), blocks=2, **kwargs)
