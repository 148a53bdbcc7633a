"""WideResNet (Zagoruyko & Komodakis 2016) as RobustBench defines it for CIFAR.

WRN-d-k: a 3x3 conv to 16 channels, three groups of n = (d - 4) / 6 pre-activation blocks with
16k, 32k and 64k channels (strides 1, 2, 2), then BN + ReLU, global average pooling and a linear
layer. Module and parameter names follow RobustBench (``conv1``, ``block1.layer.0.bn1``, ...,
``convShortcut``, ``bn1``, ``fc``) so its CIFAR WideResNet checkpoints (and those of TRADES,
MART, AWP, ...) load with strict key matching; ``sub_block1`` adds the unused extra group that
some of those checkpoints carry. Initialisation follows RobustBench too (conv weights
N(0, 2 / (k*k*out_channels)), linear bias 0).

Features: ``stem`` = conv1's output (the paper's block 1), ``layer1``..``layer3`` = the outputs of
the three groups (blocks 2-4). Blocks are pre-activation, so these maps are not yet ReLU'd (the
next group's first BN + ReLU, or the final BN + ReLU after layer3, activates them);
``model(x, features, activated=True)`` returns those activated maps.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.models.base import FeatureClassifier
from mixacm.models.blocks import PreActBlock, run_preact_groups
from mixacm.models.registry import MODELS


class NetworkBlock(nn.Module):
    """One group of blocks; the ``layer`` attribute gives RobustBench's ``blockN.layer.i`` keys."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout,
                        shortcut_key="convShortcut")
            for i in range(n)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(FeatureClassifier):
    feature_names = ("stem", "layer1", "layer2", "layer3")
    preactivation = True

    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 10,
                 dropout: float = 0.0, sub_block1: bool = False, bias_last: bool = True,
                 **norm) -> None:
        super().__init__(**norm)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1 (e.g. 28, 34, 70), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"wide_resnet widen_factor must be a positive integer, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"wide_resnet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor], activated: bool = False) -> Tensor:
        out = run_preact_groups(self.conv1(z), self.feature_names, [self.block1, self.block2, self.block3],
                                self.bn1, want, feats, activated)
        # RobustBench pools with a fixed 8x8 window, which is global pooling for 32x32 inputs.
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Also drops ``sub_block1.*`` when this model has none: that group is never used in the
        forward pass (RobustBench's Carmon2019Unlabeled, Zhang2019Theoretically carry it), so the
        logits are those of the checkpoint's own network."""
        sd = super().adapt_state_dict(state_dict)
        if not hasattr(self, "sub_block1"):
            sd = {k: v for k, v in sd.items() if not k.startswith("sub_block1.")}
        return sd


@MODELS.register("wide_resnet")
def wide_resnet(num_classes: int = 10, depth: int = 28, widen_factor: int = 10, **kwargs) -> WideResNet:
    return WideResNet(num_classes=num_classes, depth=depth, widen_factor=widen_factor, **kwargs)


def _register_preset(depth: int, widen_factor: int) -> None:
    def preset(num_classes: int = 10, **kwargs) -> WideResNet:
        return WideResNet(num_classes=num_classes, depth=depth, widen_factor=widen_factor, **kwargs)

    preset.__doc__ = f"WRN-{depth}-{widen_factor} (RobustBench's WideResNet)."
    MODELS.register(f"wrn-{depth}-{widen_factor}")(preset)


# The robust-training sizes, and WRN-10-1 (one block a group, widths 16/32/64; 0.08 M parameters):
# the same code and feature path at a size a CPU test can train.
for _depth, _width in ((10, 1), (28, 10), (34, 10), (34, 20), (70, 16)):
    _register_preset(_depth, _width)
