"""config/config.yaml end to end on the CPU: smaller in size, identical in wiring (slow).

The paper config runs through its whole DAG as a user with GPUs starts it (``snakemake
--configfile config/config.yaml``, the default profile included, with ``--config`` overrides
below and two jobs at a time): both teachers
loaded by their RobustBench names (Carmon2019Unlabeled, a WRN-28-10; Salman2020Do_R50, a
ResNet-50) from checkpoints of their real architectures placed in RobustBench's model folder;
every student of every table with its official recipe; the ImageNet students through torchrun
(four gloo processes, the config's four GPUs); every evaluation (clean, PGD-20, the standard
AutoAttack, the robustness audit); every table, figure and the report. The SLURM profile's
resources for the same config are checked by a dry run.

The ``--config`` overrides are of the kinds in ALLOWED_OVERRIDES only, and the test checks every
key it passes against that list:

* budgets: epochs (or the fixed-steps recipes' steps), batch sizes, steps per epoch, test and
  audit points, the holdout and the best-PGD selection size, attack iterations and restarts of
  the audit, the teacher check's size;
* size within the architecture family: the CIFAR-10 students WRN-34-10 -> WRN-10-1 (the same
  WideResNet code and pre-activation feature path), the ImageNet students ResNet-50 -> ResNet-26
  (the same bottleneck blocks, stage widths and feature shapes); checked by building both.

The placed checkpoints hold random weights of the entries' own architectures (nothing can be
downloaded here). The teachers' accuracy check runs on the test data and records what it
measured; config/config.yaml states no accuracy for them to compare with, so nothing is refused.

AutoAttack keeps its standard version everywhere. Seeds, fractions, recipes, knobs, resources:
all as config/config.yaml has them. Two jobs run at a time with one thread each (``--cores 2
--max-threads 1``, an execution setting like ``--cores``): most of a job here is the start of its
interpreter, and the config's thread counts would make every job take both cores in turn.

One run is shared by every test of this module (``paper_run``, session-scoped; the tests run on one
xdist worker as the group "paper").
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from snakemake.utils import validate

from mixacm import cost
from mixacm.checkpoint import load_model_file
from mixacm.config import experiment_runs
from mixacm.methods.base import phase_start
from mixacm.methods.igam import IGAMKnobs
from mixacm.models import build_model
from mixacm.report.figures import FIGURE_NAMES

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("paper")]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TABLES = ["cifar10", "imagenet", "less_data", "ablation", "transfer"]
# (kind, dotted config key pattern): every key the test passes must match one of these.
ALLOWED_OVERRIDES = [
    ("budget", "recipes.*.optim.epochs"),
    ("budget", "recipes.*.optim.steps"),
    ("budget", "recipes.*.optim.batch_size"),
    ("budget", "recipes.*.train.max_steps_per_epoch"),
    ("budget", "recipes.*.train.selection_n"),
    ("budget", "data.cifar10.holdout"),
    ("budget", "evaluation.*.clean_pgd.n"),
    ("budget", "evaluation.*.autoattack.n"),
    ("budget", "evaluation.*.autoattack_standard.n"),
    ("budget", "evaluation.*.audit.n"),
    ("budget", "evaluation.*.audit.subset_n"),
    ("budget", "evaluation.*.audit.pgd_steps"),
    ("budget", "evaluation.*.audit.pgd_restarts"),
    ("budget", "evaluation.*.audit.square_queries"),
    ("budget", "evaluation.*.audit.sweep_steps"),
    ("budget", "teachers.*.check.n"),
    ("size", "experiments.*.arch"),
]
# The smaller member of each student family (mixacm.models).
SMALLER = {"wrn-34-10": "wrn-10-1", "resnet50": "resnet26"}
# The recipe fields a budget may change (mixacm.config records the optim keys a config overrides).
BUDGET_OPTIM_KEYS = {"epochs", "steps", "batch_size"}


def least_epochs(recipe: dict) -> int:
    """1, or for a method whose loss starts late (IGAM's ``ce_only_fraction``, the official 0.875
    unless the recipe sets it) the fewest epochs that leave one epoch of its later phase, so the
    run trains with the method's own loss (8 for 0.875)."""
    if recipe["method"] != "igam":
        return 1
    fraction = recipe.get("knobs", {}).get("ce_only_fraction", IGAMKnobs.ce_only_fraction)
    return next(e for e in range(1, 1000) if phase_start(fraction, e) < e)


def budget_overrides(cfg: dict) -> dict[str, object]:
    """Dotted key -> value: one epoch of one step a recipe (IGAM: least_epochs; ImageNet: one image a rank of its four),
    a handful of test points, small audit and teacher-check samples, the smaller students."""
    imagenet = {r for e in cfg["experiments"].values() if e["dataset"] == "imagenet" for r in e["recipes"]}
    out: dict[str, object] = {}
    for name, recipe in cfg["recipes"].items():
        out[f"recipes.{name}.optim.{'steps' if recipe.get('optim', {}).get('steps') else 'epochs'}"] = \
            least_epochs(recipe)
        out[f"recipes.{name}.optim.batch_size"] = 4 if name in imagenet else 2
        out[f"recipes.{name}.train.max_steps_per_epoch"] = 1
        if recipe.get("train", {}).get("selection") == "best_pgd":
            out[f"recipes.{name}.train.selection_n"] = 4
    out["data.cifar10.holdout"] = 8
    for ds in ("cifar10", "imagenet"):
        out[f"evaluation.{ds}.clean_pgd.n"] = 2 if ds == "cifar10" else 1
        out[f"evaluation.{ds}.autoattack.n"] = 1
        if "autoattack_standard" in cfg["evaluation"][ds]:
            out[f"evaluation.{ds}.autoattack_standard.n"] = 1
        out[f"teachers.{ds}.check.n"] = 8
    audit = {"n": 2, "subset_n": 1, "pgd_steps": 2, "pgd_restarts": 1, "square_queries": 10, "sweep_steps": 2}
    out.update({f"evaluation.cifar10.audit.{k}": v for k, v in audit.items()})
    for name, exp in cfg["experiments"].items():
        out[f"experiments.{name}.arch"] = SMALLER[exp["arch"]]
    return out


def override_kind(key: str) -> str | None:
    return next((kind for kind, pattern in ALLOWED_OVERRIDES if fnmatch.fnmatchcase(key, pattern)), None)


def nested(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def same_family(big: str, small: str, num_classes: int) -> None:
    """The smaller student is built by the same code: the same module types, fewer parameters."""
    with torch.device("meta"):
        a, b = build_model(big, num_classes), build_model(small, num_classes)
    assert {type(m) for m in a.modules()} == {type(m) for m in b.modules()}, (big, small)
    assert a.feature_names == b.feature_names and getattr(a, "preactivation", False) == getattr(b, "preactivation", False)
    assert sum(p.numel() for p in b.parameters()) < sum(p.numel() for p in a.parameters())


def merged(cfg: dict, over: dict) -> dict:
    """``cfg`` with the nested ``over`` applied key by key, as the workflow applies --config."""
    out = dict(cfg)
    for key, value in over.items():
        out[key] = merged(cfg.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="session")
def paper_run(tmp_path_factory, cifar10_jpeg_root, place_robustbench_checkpoint, make_imagenet_folder):
    """config/config.yaml run to report/paper_tables.html with the overrides of ALLOWED_OVERRIDES.
    Returns (workflow folder, the config as run: validated, overrides applied; the overrides;
    snakemake's output; the RobustBench model folder)."""
    tmp = tmp_path_factory.mktemp("paper")
    wf = tmp / "wf"
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, wf / folder)
    shutil.copy(REPO / "environment.yml", wf / "environment.yml")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    flat = budget_overrides(cfg)
    args = [f"{key}={json.dumps(value)}" for key, value in nested(flat).items()]
    ran = merged(cfg, nested(flat))
    validate(ran, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))

    model_dir = tmp / "robustbench"
    for seed, ds in enumerate(("cifar10", "imagenet")):
        assert cfg["teachers"][ds]["source"] == "robustbench"
        place_robustbench_checkpoint(model_dir, ds, cfg["teachers"][ds]["name"], seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               MIXACM_DATA_CIFAR10=str(cifar10_jpeg_root),
               # the RobustBench teacher has ImageNet's 1000 outputs: 1000 classes, one image each
               MIXACM_DATA_IMAGENET=str(make_imagenet_folder(tmp / "imagenet", 1000, 1, 1, size=64)),
               MIXACM_ROBUSTBENCH_DIR=str(model_dir),
               MIXACM_CACHE_DIR=os.environ.get("MIXACM_CACHE_DIR", str(tmp / "cache")))
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "2", "--max-threads", "1", "--configfile",
                           "config/config.yaml", "--config", *args], cwd=wf, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return wf, ran, flat, proc.stdout, model_dir


def test_overrides_are_budgets_and_sizes_only(paper_run):
    _, _, flat, _, _ = paper_run
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert [key for key in flat if override_kind(key) is None] == []
    for key, value in flat.items():
        if override_kind(key) == "size":
            exp = cfg["experiments"][key.split(".")[1]]
            same_family(exp["arch"], value, 1000 if exp["dataset"] == "imagenet" else 10)
    # every recipe of the config is there, trained with its own method, knobs and settings
    assert {k.split(".")[1] for k in flat if k.startswith("recipes.")} == set(cfg["recipes"])


def test_every_table_has_its_reproduced_rows(paper_run):
    wf, cfg, _, _, _ = paper_run
    for table in TABLES:
        exp = cfg["experiments"][table]
        df = pd.read_csv(wf / "results" / f"table_{table}.csv")
        rows = df[df["status"] == "trained"]
        # one row per recipe and fraction (the mean over its seeds), and the transfer table's teacher
        runs = experiment_runs(cfg, table)
        want = len({(r[1], r[3]) for r in runs}) + (table == "transfer")
        assert len(rows) == want, f"{table}: {len(rows)} reproduced rows, want {want}\n{df.to_string()}"
        assert rows["clean_mean"].notna().all() and rows["pgd20_mean"].notna().all(), table
        # AutoAttack as the config asks: APGD-CE + APGD-T for every CIFAR-10 run, the standard
        # version for the runs autoattack_standard lists (the transfer table's teacher: APGD only)
        # and for ImageNet's runs.
        students = rows[rows["method_key"] != "teacher"]
        if exp["dataset"] == "cifar10":
            assert rows["autoattack_apgd_mean"].notna().all(), table
        listed = {cfg["recipes"][r]["method"] for r in exp.get("autoattack_standard", [])}
        standard = students[students["method_key"].isin(listed)] if exp["dataset"] == "cifar10" else students
        if exp["dataset"] == "imagenet" or listed:
            assert len(standard) and standard["autoattack_mean"].notna().all(), table
            assert set(standard["autoattack_version"]) == {"standard"}, table
        seeds = {(r[1], r[3]): 0 for r in runs}
        for r in runs:
            seeds[(r[1], r[3])] += 1
        assert sorted(rows["n_seeds"]) == sorted([*seeds.values(), *[1] * (table == "transfer")]), table
    main = pd.read_csv(wf / "results" / "table_cifar10.csv")
    main = main[main["status"] == "trained"]
    assert main["audited_mean"].notna().all()
    for figure in (*FIGURE_NAMES, "eps_sweep.png"):
        assert (wf / "results" / "figures" / figure).stat().st_size > 0, figure
    html = (wf / "report" / "paper_tables.html").read_text()
    assert "config.yaml" in html


def test_teachers_are_the_robustbench_entries_at_their_real_architectures(paper_run):
    from mixacm.teachers import import_robustbench_load_model

    wf, cfg, _, log, model_dir = paper_run
    load_model = import_robustbench_load_model()
    for ds, size in (("cifar10", 32), ("imagenet", 224)):
        name = cfg["teachers"][ds]["name"]
        ours, info = load_model_file(wf / "results" / "teachers" / ds / "robustbench" / "model.pt")
        assert info["meta"]["teacher_source"]["robustbench"] == name
        assert info["model"]["name"] == cfg["teachers"][ds]["arch"]
        # the same weights as RobustBench's own model of that name: the same logits
        theirs = load_model(model_name=name, model_dir=str(model_dir), dataset=ds, threat_model="Linf").eval()
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-4, atol=1e-4)
        # the accuracy check ran on the test data (no stated accuracy to compare with)
        check = info["meta"]["accuracy_check"]
        assert check["status"] == "measured" and check["n"] == 8, check


def test_students_ran_their_official_recipes_at_the_smaller_size(paper_run):
    wf, cfg, _, _, _ = paper_run
    runs = {run for name in cfg["experiments"] for run in experiment_runs(cfg, name)}
    assert len(runs) == sum(1 for _ in (wf / "results").glob("*/*/*/frac*/seed*/train_summary.json"))
    for ds, recipe, arch, fraction, seed in runs:
        assert arch in SMALLER.values()
        run = wf / "results" / ds / recipe / arch / f"frac{fraction!r}" / f"seed{seed}"
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["model"]["name"] == arch, run
        assert set(summary["recipe"]["overrides"]) <= BUDGET_OPTIM_KEYS, (run, summary["recipe"]["overrides"])
        assert summary["recipe"]["source"] and summary["recipe"]["dataset"] == ds, run


def test_disk_estimate_matches_the_files_the_runs_keep(paper_run):
    """mixacm.cost's disk per run (the networks of model.pt and state.pt) against the files of
    the smaller students, WRN-10-1 and ResNet-26, at the recipes' settings (best-PGD keeps one
    more copy). A method's own trainable modules (MixACM's maps between feature widths, IGAM's
    discriminator) are not counted: under 1 % of a WRN-34-10 run, a large share of a WRN-10-1's."""
    wf, cfg, _, log, _ = paper_run
    assert "estimated cost of this config" in log  # the config asks for GPUs: its price was printed
    for job in cost.pipeline_jobs(cfg):
        if job.kind != "train":
            continue
        run = wf / "results" / job.run
        size = ((run / "model.pt").stat().st_size + (run / "state.pt").stat().st_size) / 1e9
        assert size >= 0.95 * job.disk_gb, (job.run, size, job.disk_gb)
        state = torch.load(run / "state.pt", map_location="cpu", weights_only=False, mmap=True)  # our own file
        if not state["extra"] and not state["method"]:  # no trainable modules of the method's own
            assert size <= 1.1 * job.disk_gb + 2e-4, (job.run, size, job.disk_gb)


def test_imagenet_students_trained_through_torchrun_on_four_processes(paper_run):
    wf, cfg, _, log, _ = paper_run
    assert "torchrun --standalone --nproc-per-node 4 -m mixacm.cli train" in log
    eps = 4 / 255
    for recipe in cfg["experiments"]["imagenet"]["recipes"]:
        run = wf / "results" / "imagenet" / recipe / "resnet26" / "frac1.0" / "seed0"
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["world_size"] == 4 and summary["recipe"]["dataset"] == "imagenet", run
        method = cfg["recipes"][recipe]["method"]
        if method != "mixacm":
            assert summary["knobs"]["eps"] == pytest.approx(eps)
        if method == "free_at":  # one minibatch, m = 4 replays (its ImageNet recipe)
            assert summary["knobs"]["replays"] == 4 and summary["steps"] == 4
        for kind in ("clean_pgd", "autoattack"):
            assert json.loads((run / f"eval_{kind}.json").read_text())["eps"] == pytest.approx(eps)


def test_slurm_profile_resources_in_a_dry_run(paper_run, robustbench_extra):
    """The config's resources as the SLURM profile submits them (no overrides: a user's dry run)."""
    wf, _, _, _, _ = paper_run
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--forceall", "--profile", "workflow/profiles/slurm",
                           "--configfile", "config/config.yaml"], cwd=wf, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:]
    seen = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        if not head or not resources or head.group(1) != "train_student":
            continue
        res = dict(kv.split("=", 1) for kv in resources.group(1).split(", "))
        ds = "imagenet" if "dataset=imagenet" in block else "cifar10"
        want = cfg["resources"][ds]["train"]
        assert (int(res["gpu"]), int(res["runtime"]), int(res["mem_mb"]), int(res["nodes"])) == (
            want["gpu"], want["runtime"], want["mem_mb"], 1), (ds, res)
        assert res["slurm_partition"] == "gpu" and "slurm_account" in res, res
        seen.add(ds)
    assert seen == {"cifar10", "imagenet"}
