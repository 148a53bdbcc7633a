"""The pre-activation residual block shared by the tiny net, PreAct ResNet-18 and WideResNet.

He et al. 2016 ("Identity Mappings in Deep Residual Networks"): with ``a = relu(bn1(x))``,
``out = conv2(relu(bn2(conv1(a)))) + s`` where ``s = x`` when the shape is unchanged, else a 1x1
strided projection of ``a``. WideResNet (Zagoruyko & Komodakis 2016, as RobustBench defines it)
adds dropout between ``relu(bn2(.))`` and ``conv2``. The blocks differ across upstream code only
in the projection's state-dict key, so that key is a parameter and upstream checkpoints load
unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PreActBlock(nn.Module):
    """``shortcut_key``: attribute (state-dict key) of the 1x1 projection; ``wrap_shortcut`` puts
    it inside an ``nn.Sequential`` (key ``<shortcut_key>.0``), as in Rice et al.'s PreAct ResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0,
                 shortcut_key: str = "shortcut", wrap_shortcut: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut_key = shortcut_key
        proj: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            proj = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            proj = nn.Sequential(proj) if wrap_shortcut else proj
        setattr(self, shortcut_key, proj)

    def activate(self, x: Tensor) -> Tensor:
        """The block's pre-activation ``relu(bn1(x))``: what its convolutions receive."""
        return F.relu(self.bn1(x))

    def forward(self, x: Tensor, a: Tensor | None = None) -> Tensor:
        """``a``: ``activate(x)`` when the caller has already computed it (the network's forward
        does, to hand the activated map to MixACM without a second BatchNorm pass)."""
        if a is None:
            a = self.activate(x)
        proj = getattr(self, self.shortcut_key)
        # The projection sees the activated input; the identity path carries the raw input.
        skip = proj(a) if proj is not None else x
        out = F.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


def preact_blocks(group: nn.Module) -> list[PreActBlock]:
    """The blocks of a residual group: a single block, an ``nn.Sequential`` of them, or a module
    holding one as ``layer`` (WideResNet's ``NetworkBlock``)."""
    if isinstance(group, PreActBlock):
        return [group]
    seq = getattr(group, "layer", group)
    blocks = list(seq)
    assert all(isinstance(b, PreActBlock) for b in blocks), type(group).__name__
    return blocks


def run_preact_groups(out: Tensor, names: tuple[str, ...], groups: list[nn.Module], final_bn: nn.BatchNorm2d,
                      want: frozenset[str], feats: dict[str, Tensor], activated: bool) -> Tensor:
    """Run pre-activation residual groups after the stem output ``out`` (feature ``names[0]``).

    The map each named feature is activated with is the next unit's ``relu(bn1(.))`` (for the
    last group the final ``relu(final_bn(.))``): computed once here and handed to that unit, so
    with ``activated=True`` the features are exactly what the network's next layer receives.
    Returns the activated output of the last group (input of pooling).
    """
    for i, name in enumerate(names):
        if i + 1 < len(names):
            blocks = preact_blocks(groups[i])
            a = blocks[0].activate(out)
        else:
            blocks, a = [], F.relu(final_bn(out))
        if name in want:
            feats[name] = a if activated else out
        if blocks:
            out = blocks[0](out, a)
            for block in blocks[1:]:
                out = block(out)
    return a
