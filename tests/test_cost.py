"""The GPU-hour and disk estimate (mixacm.cost): hand-computed jobs, the precision each job's
config sets, every registered method priced, the jobs the workflow plans, and the table in
docs/benchmarks.md."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from mixacm import cost
from mixacm.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pipeline(name: str = "config") -> dict:
    cfg = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def test_forward_flops_and_parameters_are_counted_from_the_networks():
    # gpu facts: WRN-34-10 13.3 GFLOP, WRN-28-10 10.5 at 32 px; ResNet-50 4.1 GMACs at 224 px
    flops, params, family = cost.network_size("wrn-34-10", "cifar10")
    assert (round(flops / 1e9, 1), params, family) == (13.3, 46_160_474, "WideResNet")
    assert round(cost.network_size("wrn-28-10", "cifar10")[0] / 1e9, 1) == 10.5
    flops, params, family = cost.network_size("resnet50", "imagenet")
    assert (round(flops / 2e9, 2), params, family) == (4.09, 25_557_032, "TorchvisionResNet")


def test_a_mixacm_run_by_hand():
    a = cost.assumptions()
    job = cost.train_job(pipeline(), "cifar10", "mixacm", "wrn-34-10", 1.0, 0)
    # 200 epochs of floor(49,000 / 128) = 382 steps of 128 images (1,000 held out for AT's selection)
    images = 200 * 382 * 128
    student, teacher = (cost.network_size(arch, "cifar10")[0] for arch in ("wrn-34-10", "wrn-28-10"))
    work = images * (3 * student + 1 * teacher)  # a step on the mixed batch + the teacher's forward
    seconds = work / (a["device"]["peak_tflops"]["bf16"] * 1e12 * a["utilisation"]["WideResNet"])
    assert job.precision == "bf16" and job.gpus == 1  # config/config.yaml trains its students in bf16
    assert job.gpu_hours == pytest.approx(seconds / 3600)
    assert job.disk_gb == pytest.approx(46_160_474 * 4 * 3 / 1e9)  # model.pt + model and momentum in state.pt


def test_each_job_is_priced_at_the_precision_its_config_sets():
    cfg = pipeline()
    bf16 = cost.train_job(cfg, "cifar10", "at", "wrn-34-10", 1.0, 0)
    cfg["recipes"]["at"]["train"]["amp"] = "none"
    fp32 = cost.train_job(cfg, "cifar10", "at", "wrn-34-10", 1.0, 0)
    peak = cost.assumptions()["device"]["peak_tflops"]
    assert (fp32.precision, bf16.precision) == ("tf32", "bf16")
    assert bf16.gpu_hours == pytest.approx(fp32.gpu_hours * peak["tf32"] / peak["bf16"])
    # the config's ImageNet MixACM and Fast-AT recipes set bf16, its Free-AT does not
    jobs = {j.run.split("/")[1]: j for j in cost.pipeline_jobs(pipeline()) if j.kind == "train" and j.dataset == "imagenet"}
    assert {name: j.precision for name, j in jobs.items()} == {
        name: {"none": "tf32", "bf16": "bf16"}[cfg["recipes"][name]["train"].get("amp", "none")]
        for name in cfg["experiments"]["imagenet"]["recipes"]}
    assert all(j.gpus == 4 and j.wall_hours == pytest.approx(j.gpu_hours / 4) for j in jobs.values())


def test_attack_steps_best_pgd_and_replays_scale_the_work():
    cfg = pipeline()
    at = cost.train_job(cfg, "cifar10", "at", "wrn-34-10", 1.0, 0)
    # PGD-10 (2 units a step) + the step: 23 units; AT's best-PGD selection adds 22 units on
    # 1,000 held-out images each of its 200 epochs, and the best model to its state
    images = 200 * 382 * 128
    std = copy.deepcopy(cfg)
    std["recipes"]["at"] = {**cfg["recipes"]["at"], "method": "standard", "knobs": {}, "train": {**cfg["recipes"]["at"]["train"]}}
    plain = cost.train_job(std, "cifar10", "at", "wrn-34-10", 1.0, 0)
    assert at.gpu_hours / plain.gpu_hours == pytest.approx((images * 23 + 200 * 1000 * 22) / (images * 3 + 200 * 1000 * 22))
    assert at.disk_gb == pytest.approx(46_160_474 * 4 * 4 / 1e9)
    # Free-AT: epochs = budget / m, each minibatch replayed m times: the same work for m = 8 or 4
    free = [cost.train_job(cfg, "cifar10", "free_at", "wrn-34-10", 1.0, 0)]
    cfg["recipes"]["free_at"]["knobs"]["replays"] = 4
    free.append(cost.train_job(cfg, "cifar10", "free_at", "wrn-34-10", 1.0, 0))
    assert free[0].gpu_hours == pytest.approx(free[1].gpu_hours)
    assert free[0].gpu_hours == pytest.approx(plain.gpu_hours - cost.gpu_hours(200 * 1000 * 22, "wrn-34-10", "cifar10", at.precision))


def test_fixed_steps_and_fractions():
    cfg = pipeline()
    cfg["recipes"]["fixed"] = {**cfg["recipes"]["mixacm"], "optim": {"steps": 200 * 382}}
    full = cost.train_job(cfg, "cifar10", "mixacm", "wrn-34-10", 1.0, 0)
    tenth = cost.train_job(cfg, "cifar10", "mixacm", "wrn-34-10", 0.1, 0)
    fixed = cost.train_job(cfg, "cifar10", "fixed", "wrn-34-10", 0.1, 0)
    assert tenth.gpu_hours == pytest.approx(full.gpu_hours * 38 / 382)  # floor(4,900 / 128) steps an epoch
    assert fixed.gpu_hours == pytest.approx(full.gpu_hours * (2011 * 38) / (200 * 382))  # round(76,400 / 38) epochs


def test_every_registered_method_has_its_work_per_image():
    for name in METHODS.names():
        student, teacher, attack, replays = cost.method_work(name, METHODS.get(name).resolve({}))
        assert student >= 3 and attack >= 0 and replays >= 1, name
        assert (teacher > 0) == METHODS.get(name).needs_teacher, name
    with pytest.raises(KeyError, match="no work per image for method 'nope'"):
        cost.method_work("nope", None)


def test_autoattack_work_per_point():
    a, ds = cost.assumptions()["autoattack"], cost.assumptions()["datasets"]["cifar10"]
    # APGD-CE on the clean-correct points, then APGD-T and FAB-T on 9 targets and Square's 5,000
    # queries on the points still robust
    standard = 1 + 200 * ds["clean_share"] + (9 * 200 + 9 * 200 + 5000) * ds["robust_share"]
    assert cost.autoattack_work("autoattack", "cifar10") == pytest.approx(standard)
    assert cost.autoattack_work("autoattack-apgd", "cifar10") == pytest.approx(1 + 200 * 0.85 + 1800 * 0.55)
    assert a["square_queries"] == 5000
    with pytest.raises(ValueError):
        cost.autoattack_work("autoattack-x", "cifar10")


def test_only_configs_that_ask_for_gpus_print_a_price_and_the_plan_matches_the_estimate(tmp_path, robustbench_extra):
    """One dry run of config/config.yaml: the price comes before the plan, and the estimator's
    jobs are the GPU jobs Snakemake plans (training, every evaluation, the audits)."""
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "environment.yml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--configfile", "config/config.yaml"], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    price = out.index("estimated cost of this config")
    assert price < out.index("Job stats")
    assert re.search(r"\): [\d,.]+ GPU-hours \(cifar10 [\d,.]+ training \+ [\d,.]+ evaluation; imagenet ", out)
    assert re.search(r"  disk: [\d,.]+ GB", out)
    jobs = cost.pipeline_jobs(pipeline())
    planned = set(re.findall(r"^\s+output: results/(\S+)/(model|eval_\w+)\.(?:pt|json)", out, re.M))
    # (imported teachers' model files are no GPU jobs; a teacher trained in the DAG would be)
    planned = {(run, "train" if what == "model" else what[len("eval_"):]) for run, what in planned
               if what != "model" or not run.startswith("teachers/") or run.endswith("/trained")}
    assert planned == {(j.run, j.kind) for j in jobs}
    # quick.yaml asks for no GPU: no price
    quick = subprocess.run([str(BIN / "snakemake"), "-n", "--configfile", "config/quick.yaml"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0 and "estimated cost" not in quick.stdout + quick.stderr


def test_the_table_in_docs_benchmarks_is_the_estimators():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_hours import replace_section
    finally:
        sys.path.pop(0)
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    table = cost.markdown_table(pipeline())
    assert replace_section(doc, "config/config.yaml", table) == doc, \
        "regenerate it: python scripts/gpu_hours.py config/config.yaml --write docs/benchmarks.md"
    total = sum(j.gpu_hours for j in cost.pipeline_jobs(pipeline()))
    assert f"**{total:.1f}**" in table


def _total(cfg: dict) -> float:
    return sum(j.gpu_hours for j in cost.pipeline_jobs(cfg))


def lesson_prices() -> dict[str, float]:
    """GPU-hours of each of config.yaml's "beyond the paper's protocol" lessons: what the ON ones
    add to the config, what the OFF one (the holdout search) costs on its own."""
    cfg = pipeline()
    no_seeds = copy.deepcopy(cfg)
    for name in ("cifar10", "transfer"):
        del no_seeds["experiments"][name]["recipe_seeds"]
    del no_seeds["experiments"]["ablation"]["seeds"]
    no_fixed = copy.deepcopy(cfg)
    less = no_fixed["experiments"]["less_data"]
    less["recipes"] = [r for r in less["recipes"] if not r.endswith("_fixed_steps")]
    del less["recipe_fractions"]
    grid = yaml.safe_load((REPO / "config" / "tuning" / "paper.yaml").read_text())
    tuning = copy.deepcopy(cfg)
    tuning["data"]["cifar10"]["holdout"] = grid["base"]["dataset"]["holdout"]
    search = 0.0
    for cand in grid["candidates"].values():
        tuning["recipes"]["mixacm"]["knobs"] = {k: v for k, v in cand["method"].items() if k != "name"}
        search += cost.train_job(tuning, "cifar10", "mixacm", grid["base"]["model"]["name"], 1.0, 0).gpu_hours
    return {"seeds": _total(cfg) - _total(no_seeds), "fixed steps": _total(cfg) - _total(no_fixed), "search": search}


def test_the_config_states_the_estimated_price_of_its_lessons_and_in_total():
    text = (REPO / "config" / "config.yaml").read_text()
    prices = lesson_prices()
    stated = [float(x) for x in re.findall(r"^#\s+\d\. (?:ON|OFF): .*?: \+(\d+) GPU-hours", text, re.M | re.S)]
    assert stated == [round(prices[k]) for k in ("seeds", "fixed steps", "search")], prices
    cfg = pipeline()
    jobs = cost.pipeline_jobs(cfg)
    total, disk = re.search(r"about ([\d,]+) GPU-hours of an H200 as configured here, ([\d,]+) GB of disk", text).groups()
    assert (int(total.replace(",", "")), int(disk)) == (round(_total(cfg)), round(cost.disk_gb(cfg, jobs))), \
        (_total(cfg), cost.disk_gb(cfg, jobs))
    # the grid file's own price line
    grid = (REPO / "config" / "tuning" / "paper.yaml").read_text()
    assert f": {round(prices['search'])} GPU-hours" in grid


def test_time_limits_cover_the_estimated_wall_time_of_every_job():
    cfg = pipeline()
    for job in cost.pipeline_jobs(cfg):
        limit_h = cfg["resources"][job.dataset][cost.JOB_RESOURCES[job.kind]]["runtime"] / 60
        assert limit_h <= 48, (job.kind, job.dataset, "beyond most clusters' MaxTime")
        assert job.wall_hours * 2 <= limit_h, (job, limit_h)


def test_the_utilisation_benchmark_runs(capsys):
    # benchmarks/bench_utilisation.py measured cost.yaml's utilisations on a GPU; a smoke run here
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_utilisation
    finally:
        sys.path.pop(0)
    bench_utilisation.main(["--device", "cpu", "--archs", "tiny", "--batch", "4", "--steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1] for row in rows] == ["bf16 + channels_last", "fp32 (TF32)"]
