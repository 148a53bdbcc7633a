"""The recipe key ``weight_decay_exempt``: the official codes that leave BatchNorm parameters (and
biases) out of weight decay, resolved through the one recipe path and built into the loop's SGD."""
from __future__ import annotations

import pytest
import torch
from test_train import make_image_folder, one_thread  # noqa: F401 (autouse fixture)

from mixacm import distributed as ddp
from mixacm.config import ConfigError, load_run_config, resolve_recipe
from mixacm.models import build_model
from mixacm.train import setup, sgd_param_groups


def names(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_split_batchnorm_and_biases():
    model = build_model("tiny")  # BatchNorm layers and a linear layer with a bias
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
          for n in (f"{n}.weight", f"{n}.bias")}
    everything = {n for n, _ in model.named_parameters()}

    (only,) = sgd_param_groups([model], [])
    assert names(model, only) == everything and "weight_decay" not in only

    decay, no_decay = sgd_param_groups([model], ["batchnorm"])
    assert names(model, no_decay) == bn and no_decay["weight_decay"] == 0.0
    assert "fc.bias" in names(model, decay)  # Fast-AT's ImageNet code decays the classifier's bias

    decay, no_decay = sgd_param_groups([model], ["batchnorm", "bias"])
    assert names(model, no_decay) == bn | {"fc.bias"}
    assert all(n.endswith("weight") and not n.startswith(("layer1.bn", "bn")) for n in names(model, decay))


def test_recipes_declare_the_official_exemptions():
    def exempt(method: str, dataset: str) -> list[str]:
        cfg = {"dataset": {"name": dataset}, "method": {"name": method}}
        if method == "igam":
            cfg["teacher"] = "t.pt"
        return resolve_recipe(load_run_config(cfg))["weight_decay_exempt"]

    assert exempt("fast_at", "imagenet") == ["batchnorm"]  # main_fast.py: BatchNorm in a group with wd 0
    assert exempt("free_at", "cifar10") == ["batchnorm", "bias"]  # TensorFlow: wd on the DW kernels only
    assert exempt("igam", "cifar10") == ["batchnorm", "bias"]
    assert exempt("at", "cifar10") == [] and exempt("fast_at", "cifar10") == []
    with pytest.raises(ConfigError, match="optim.weight_decay_exempt"):
        load_run_config({"method": {"name": "at"}, "optim": {"weight_decay_exempt": ["conv"]}})


def test_the_loop_leaves_exempt_parameters_out_of_weight_decay(tmp_path):
    """With zero gradients, one SGD step of the run's optimiser shrinks every decayed parameter
    by lr x weight_decay and leaves the exempt ones exactly as they were."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    cfg = load_run_config({
        "device": "cpu", "dataset": {"name": "cifar10", "root": str(root), "cache": False},
        "model": {"name": "tiny"}, "method": {"name": "standard"},
        "optim": {"epochs": 1, "batch_size": 4, "lr": 0.5, "weight_decay": 0.1, "momentum": 0.0,
                  "weight_decay_exempt": ["batchnorm", "bias"]},
        "train": {"progress": False},
    })
    run = setup(cfg, tmp_path / "out", ddp.init_from_env("cpu"))
    assert [g["weight_decay"] for g in run.optimizer.param_groups] == [0.1, 0.0]
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for p in run.model.parameters():
        p.grad = torch.zeros_like(p)
    run.optimizer.step()
    for n, p in run.model.named_parameters():
        if n.endswith("bias") or ".bn" in n or n.startswith("bn."):
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1)), n
