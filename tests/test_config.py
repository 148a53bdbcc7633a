"""The run config: defaults, errors that name the key, recipe resolution, the config hash."""
from __future__ import annotations

import math

import pytest

from mixacm.config import ConfigError, load_run_config, resolve_recipe, run_config_hash, run_config_schema


def test_defaults_are_filled_and_the_name_derived():
    cfg = load_run_config({"teacher": "t.pt"})
    assert cfg["seed"] == 0 and cfg["device"] == "auto" and cfg["teacher"] == "t.pt"
    assert cfg["dataset"] == {"name": "cifar10", "root": None, "download": False, "fraction": 1.0,
                              "subset_seed": 0, "holdout": 0, "cache": True, "augment": True}
    assert cfg["model"] == {"name": "tiny", "kwargs": {}}
    assert cfg["method"] == {"name": "mixacm"} and cfg["optim"] == {}
    assert cfg["train"]["amp"] == "none" and cfg["train"]["selection"] == "last"
    assert cfg["train"]["selection_eps"] == pytest.approx(8 / 255)
    assert cfg["name"] == "cifar10/mixacm/tiny/seed0"


def test_yaml_file_with_fraction_eps(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: at, eps: 8/255}\ntrain: {selection_eps: 2/255}\nseed: 4\n")
    cfg = load_run_config(path)
    assert cfg["train"]["selection_eps"] == 2 / 255 and cfg["seed"] == 4 and cfg["name"].endswith("seed4")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"optim": {"lr": -1}}, r"^optim\.lr: -1 is less than the minimum of 0$"),
        ({"epochs": 3}, r"^epochs: unknown key"),
        ({"train": {"progres": False}}, r"^train\.progres: unknown key.*progress"),
        ({"seed": "0"}, r"^seed: '0' is not of type 'integer'"),
        ({"train": {"channels_last": "yes"}}, r"^train\.channels_last: 'yes' is not of type 'boolean'"),
        ({"dataset": {"fraction": 0}}, r"^dataset\.fraction: 0 is less than or equal to the minimum of 0"),
        ({"dataset": {"fraction": 1.5}}, r"^dataset\.fraction: 1\.5 is greater than the maximum of 1"),
        ({"train": {"selection_eps": 8}}, r"^train\.selection_eps: .*did you mean 8/255"),
        ({"train": {"amp": "fp8"}}, r"^train\.amp: 'fp8' is not one of"),
        ({"optim": {"schedule": "linear"}}, r"^optim\.schedule: 'linear' is not one of"),
        ({"train": {"selection": "best_pgd"}}, r"^train\.selection: best_pgd .*dataset\.holdout"),
        ({"model": {"name": "resnet9000"}}, r"^model\.name: unknown model 'resnet9000'; valid: .*tiny"),
        ({"method": {"name": "magic"}}, r"^method\.name: unknown method 'magic'; valid: .*standard"),
        ({"method": {"name": "at", "epz": 0.1}}, r"^method: unknown knob.*'epz'"),
        ({"method": {"name": "at", "eps": 8}}, r"^method: knob 'eps' of method 'at'.*8/255"),
        ({"method": {"name": "mixacm"}}, r"^teacher: method 'mixacm' needs a teacher"),
    ],
)
def test_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(cfg)


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_run_config({"dataset": {"fraction": 2, "bogus": 1}, "seed": -1})
    text = str(err.value)
    assert "dataset.bogus: unknown key" in text and "dataset.fraction" in text and "seed: -1" in text


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read run config"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_run_config(tmp_path / "list.yaml")


def test_every_object_in_the_schema_rejects_unknown_keys():
    # Only the two open-ended places (method knobs, model kwargs) are checked by their owners.
    open_ended = {"method", "kwargs"}
    seen = []

    defs = run_config_schema()["$defs"]

    def walk(node, name):
        if "$ref" in node:  # "#/$defs/<name>"
            node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
        if node.get("type") == "object":
            seen.append(name)
            if name not in open_ended:
                assert node.get("additionalProperties") is False, name
        for key, sub in node.get("properties", {}).items():
            walk(sub, key)

    walk(run_config_schema(), "(top level)")
    assert {"(top level)", "dataset", "model", "optim", "train"} <= set(seen)


def test_recipe_is_the_methods_own_with_optim_overrides():
    trades = resolve_recipe(load_run_config({"method": {"name": "trades"}}))
    assert (trades["epochs"], trades["weight_decay"], trades["lr"]) == (76, 2e-4, 0.1)
    assert trades["milestones"] == [pytest.approx(74 / 76)]
    at = resolve_recipe(load_run_config({"method": {"name": "at"}, "optim": {"epochs": 4, "batch_size": 32}}))
    assert (at["epochs"], at["batch_size"], at["weight_decay"], at["milestones"]) == (4, 32, 5e-4, [0.5, 0.75])
    assert at["warmup_epochs"] == 0 and at["nesterov"] is False  # filled-in defaults

    # Free-AT's recipe depends on its knobs: epochs = ceil(budget / replays).
    free = resolve_recipe(load_run_config({"method": {"name": "free_at", "replays": 3, "budget_epochs": 10}}))
    assert free["epochs"] == math.ceil(10 / 3) and "replays" not in free


def test_recipe_keys_nobody_sets_take_the_schemas_defaults(monkeypatch):
    from mixacm.methods import METHODS

    bare = {"epochs": 2, "batch_size": 8, "lr": 0.1}
    monkeypatch.setitem(METHODS.get("standard").recipes, "cifar10", {**bare, "source": "test", "knobs": {}})
    recipe = resolve_recipe(load_run_config({"method": {"name": "standard"}, "optim": {"nesterov": True}}))
    defaults = {k: v["default"] for k, v in run_config_schema()["$defs"]["recipe"]["properties"].items()}
    assert recipe == {**bare, **defaults, "nesterov": True}
    assert defaults == {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "schedule": "step",
                        "milestones": [], "gamma": 0.1, "lr_peak": 0.5, "lr_points": [], "warmup_epochs": 0,
                        "weight_decay_exempt": []}
    with pytest.raises(ConfigError, match=r"^optim\.momentum: 1 is greater than or equal to the maximum of 1"):
        resolve_recipe(load_run_config({"method": {"name": "standard"}, "optim": {"momentum": 1}}))


def test_config_hash_follows_what_is_trained():
    base = load_run_config({"method": {"name": "standard"}})
    same = load_run_config({"method": {"name": "standard"}, "name": "other", "device": "cpu",
                            "train": {"progress": False, "selection_eps": 0.03137254901960784}})
    assert run_config_hash(base) == run_config_hash(same)
    other = load_run_config({"method": {"name": "standard"}, "optim": {"lr": 0.01}})
    assert run_config_hash(base) != run_config_hash(other)
