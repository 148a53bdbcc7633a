"""Foreign checkpoints in the key layouts real wrappers write, read by one rule.

Each layout is made by the real wrapper where it can be built here (``nn.DataParallel``, whose
``module.`` prefix DDP shares; ``torch.compile``'s ``_orig_mod.``; RobustBench's
``Sequential(normalize, model)``) and in combination; the loaded model must compute exactly what
the wrapped network computes. A file that still does not fit is refused with the file, the
unmatched keys and how to re-save the weights.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from mixacm.checkpoint import CheckpointError, load_foreign_state_dict
from mixacm.models import build_model
from mixacm.models.base import CIFAR10_MEAN, CIFAR10_STD, unwrap_state_dict


class ImageNormalizer(nn.Module):
    """RobustBench's normaliser: buffers ``mean`` / ``std`` of shape 1 x 3 x 1 x 1."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def bare_net() -> nn.Module:
    """A resnet2b whose normalisation is folded away (raw [0, 1] input), as foreign code has it."""
    torch.manual_seed(0)
    return build_model("resnet2b", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()


RB_MEAN, RB_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def robustbench(net):
    return nn.Sequential(OrderedDict(normalize=ImageNormalizer(RB_MEAN, RB_STD), model=net))


def compiled(net):
    return torch.compile(net)  # lazy: nothing is compiled until called


LAYOUTS = {
    "plain": (lambda n: n, None),
    "dataparallel": (nn.DataParallel, "module."),
    "compile": (compiled, "_orig_mod."),
    "compile(dataparallel)": (lambda n: compiled(nn.DataParallel(n)), "_orig_mod.module."),
    "dataparallel(compile)": (lambda n: nn.DataParallel(compiled(n)), "module._orig_mod."),
    "robustbench": (robustbench, "model."),
    "dataparallel(robustbench)": (lambda n: nn.DataParallel(robustbench(n)), "module.model."),
    "compile(robustbench)": (lambda n: compiled(robustbench(n)), "_orig_mod.model."),
}


def own_state(net: nn.Module) -> dict:
    # The foreign network: its own weights without this project's normalisation buffers.
    return {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_wrapper_layout_loads_to_the_same_function(tmp_path, layout):
    wrap, prefix = LAYOUTS[layout]
    net = bare_net()
    wrapped = wrap(net)
    # The foreign network has no mean/std of this project's own (only RobustBench's normaliser).
    sd = {k: v for k, v in wrapped.state_dict().items() if k.split(".")[-1] not in ("mean", "std") or "normalize" in k}
    if prefix:
        assert all(k.startswith(prefix) or "normalize" in k for k in sd), list(sd)[:3]
    path = tmp_path / "w.pth"
    torch.save({"state_dict": sd, "test_acc": 0.5}, path)
    rb = "robustbench" in layout
    kwargs = {} if rb else {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    model = load_foreign_state_dict(path, "resnet2b", **kwargs)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = robustbench(net)(x) if rb else net(x)
        assert torch.allclose(model(x), expected, atol=1e-6)
    if rb:  # the file's normalisation is the model's
        assert torch.equal(model.mean.flatten(), torch.tensor(RB_MEAN))
    else:
        _, stripped = unwrap_state_dict(sd, model.state_dict().keys())
        assert "".join(stripped) == (prefix or "")


def test_default_normalisation_is_added_where_the_file_has_none(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(own_state(bare_net()), path)
    model = load_foreign_state_dict(path, "resnet2b", key=None)
    assert torch.allclose(model.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.allclose(model.std.flatten(), torch.tensor(CIFAR10_STD))


def test_prefix_the_model_itself_uses_is_kept():
    # resnet50's own keys live under ``model.``: a plain torchvision dict gains it, a wrapped one keeps it.
    model = build_model("resnet50", num_classes=10)
    own = model.state_dict().keys()
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    out, stripped = unwrap_state_dict(sd, own)
    assert stripped == ["module."] and set(out) == set(own) - {"mean", "std"}


def test_unmatched_keys_are_refused_with_file_keys_and_resave_advice(tmp_path):
    # A DataParallel file whose head is named differently: the prefix goes, the head cannot match.
    sd = {f"module.{k.replace('linear2', 'classifier')}": v for k, v in own_state(bare_net()).items()}
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_foreign_state_dict(path, "resnet2b")
    msg = str(err.value)
    assert str(path) in msg and "wrapper prefix 'module.'" in msg
    assert "2 missing keys: linear2.weight, linear2.bias" in msg
    assert "2 unexpected keys: classifier.weight, classifier.bias" in msg
    assert "torch.save(net.state_dict()" in msg and "model._orig_mod" in msg


def test_any_shared_wrapper_name_is_removed():
    # Not a list of known names: whatever single segment wraps every key goes.
    sd = {f"ema.backbone.{k}": v for k, v in own_state(bare_net()).items()}
    out, stripped = unwrap_state_dict(sd, bare_net().state_dict().keys())
    assert stripped == ["ema.", "backbone."] and set(out) == set(own_state(bare_net()))
