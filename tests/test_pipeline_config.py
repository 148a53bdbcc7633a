"""The pipeline config -> run config boundary (mixacm.config.pipeline_run_config): defaults come
from the workflow schema only, every recipe of every shipped config reads as `mixacm train` reads
it, and a bad recipe is reported under the pipeline config's key."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from mixacm.config import ConfigError, check_pipeline_recipe, load_run_config, pipeline_run_config, run_config_hash

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def pipeline(name: str = "ci", schema: Path = SCHEMA) -> dict:
    cfg = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    validate(cfg, str(schema))  # as the Snakefile does; fills in the schema's defaults
    return cfg


def test_run_config_of_a_ci_student():
    cfg = pipeline()
    run = pipeline_run_config(cfg, dataset="cifar10", recipe="at", arch="tiny", fraction=0.5, seed=3, name="x")
    assert run == {
        "name": "x", "seed": 3, "device": "cpu",
        "dataset": {"name": "cifar10", "root": None, "download": False, "fraction": 0.5, "subset_seed": 0,
                    "holdout": 0, "cache": True, "augment": True},
        "model": {"name": "tiny", "kwargs": {}}, "teacher": None,
        "method": {"name": "at", "eps": "2/255", "steps": 1, "step_size": "2/255"},
        "optim": {"epochs": 1, "batch_size": 64}, "train": {"progress": False, "max_steps_per_epoch": 4},
    }
    # The keys are written in this order into run.yaml (a change of the text re-runs training).
    assert list(run["dataset"]) == ["name", "root", "download", "fraction", "subset_seed", "holdout", "cache",
                                    "augment"]


def test_data_defaults_come_from_the_workflow_schema_only(tmp_path):
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["definitions"]["data_source"]["properties"]["holdout"]["default"] = 7
    schema["definitions"]["data_source"]["properties"]["cache"]["default"] = False
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    run = pipeline_run_config(pipeline("ci", tmp_path / "schema.yaml"), dataset="cifar10", recipe="mixacm", arch="tiny")
    assert run["dataset"]["holdout"] == 7 and run["dataset"]["cache"] is False
    unfilled = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    with pytest.raises(KeyError):  # no fallback values of its own: an unvalidated config is refused
        pipeline_run_config(unfilled, dataset="cifar10", recipe="mixacm", arch="tiny")


@pytest.mark.parametrize("name", ["ci", "quick", "config", "cifar10_cpu"])
def test_every_trained_recipe_of_every_config_reads_as_train_reads_it(name):
    cfg = pipeline(name)
    pairs = {(r, e["dataset"], e["arch"]) for e in cfg["experiments"].values() for r in e["recipes"]}
    assert pairs
    for recipe, dataset, arch in sorted(pairs):
        run = check_pipeline_recipe(cfg, recipe, dataset=dataset, arch=arch, teacher="teacher.pt")
        assert run == load_run_config(pipeline_run_config(cfg, dataset=dataset, recipe=recipe, arch=arch,
                                                          teacher="teacher.pt"))
        assert len(run_config_hash(run)) == 16


@pytest.mark.parametrize(
    "where, value, message",
    [
        (("knobs", "eps"), 8, r"^recipes\.at\.knobs: knob 'eps' of method 'at': .*8/255"),
        (("knobs", "stepz"), 1, r"^recipes\.at\.knobs: unknown knob\(s\) \['stepz'\]"),
        (("optim", "lr"), -1, r"^recipes\.at\.optim\.lr: -1 is less than the minimum of 0"),
        (("train", "selection_eps"), "300/255", r"^recipes\.at\.train\.selection_eps: eps '300/255' is outside"),
        (("train", "selection"), "best_pgd", r"^recipes\.at\.train\.selection: best_pgd .*holdout"),
    ],
)
def test_bad_recipes_name_the_pipeline_key(where, value, message):
    cfg = copy.deepcopy(pipeline())
    cfg["recipes"]["at"].setdefault(where[0], {})[where[1]] = value
    with pytest.raises(ConfigError, match=message):
        check_pipeline_recipe(cfg, "at", dataset="cifar10", arch="tiny")


def test_a_distilling_recipe_needs_its_teacher():
    with pytest.raises(ConfigError, match=r"recipes\.mixacm \(cifar10, tiny\): teacher: .*needs a teacher"):
        check_pipeline_recipe(pipeline(), "mixacm", dataset="cifar10", arch="tiny")
