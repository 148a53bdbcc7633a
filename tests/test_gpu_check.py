"""benchmarks/gpu_check.py without a GPU: its estimate arithmetic, its jobs built as the config
says, its time limit, and (slow) its whole dry run."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from mixacm.data import CIFAR_CLASSES

CIFAR10_NAMES = CIFAR_CLASSES["cifar10"]  # the class folders a CIFAR-10 image folder must have

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

BF16 = {"amp": "bf16", "channels_last": True}


@pytest.fixture(scope="module")
def pipeline():
    return gpu_check.load_pipeline(REPO / "config" / "config.yaml")


def test_every_student_of_the_paper_config_is_timed_in_bf16_with_channels_last(pipeline):
    for dataset in ("cifar10", "imagenet"):
        jobs = gpu_check.config_recipes(pipeline, dataset)
        assert jobs and all((j["amp"], j["channels_last"]) == ("bf16", True) for j in jobs), dataset
    assert pipeline["teachers"]["cifar10"]["arch"] == "wrn-28-10"


def test_estimate_of_the_paper_config_from_measured_speeds(pipeline):
    speeds = {"mixacm": 3000.0, "at": 600.0, "trades": 500.0, "free_at": 2400.0, "awp_trades": 420.0,
              "awp_at": 520.0, "fat_trades": 800.0, "igam": 1100.0, "ard": 580.0, "rslad": 500.0,
              "mixacm_acm": 3100.0, "mixacm_acm_kd": 3050.0, "mixacm_acm_mixup": 3050.0, "mixacm_kd": 3050.0}
    rows = [{"recipe": r, "dataset": "cifar10", **BF16, "images_per_s": v} for r, v in speeds.items()]
    rows += [{"recipe": r, "dataset": "imagenet", **BF16, "images_per_s": 700.0}
             for r in ("mixacm_imagenet", "free_at_imagenet", "fast_at_imagenet")]
    per_point = {"cifar10/clean_pgd": 0.001, "cifar10/autoattack-apgd": 0.01, "cifar10/autoattack": 0.03}
    est = gpu_check.estimate_config_hours(pipeline, rows, per_point)
    jobs = {j["run"]: j for j in est["jobs"]}
    # Runs shared by tables are trained once: cifar10 (8 recipes, MixACM and AT with 3 seeds) and
    # the transfer table's ARD and RSLAD; less_data (MixACM and AT at 3 more fractions, the
    # fixed-steps pair at those 3); ablation (4 more recipes x 3 seeds, the full one shared);
    # ImageNet's 3 recipes.
    assert len(jobs) == (8 + 2 + 2) + 2 + (6 + 6) + 4 * 3 + 3
    fixed = jobs["cifar10/at_fixed_steps/frac0.1/seed0"]  # the full-data run's 200 x 382 steps on 10 %
    assert (fixed["epochs"], fixed["train_images"]) == (2011, 2011 * 38 * 128)
    # its step is AT's (only the budget differs): timed once, priced at AT's speed
    assert fixed["train_gpu_hours"] == pytest.approx(2011 * 38 * 128 / 600 / 3600)
    timed = [j["recipe"] for j in gpu_check.config_recipes(pipeline, "cifar10")]
    assert "at" in timed and not any(r.endswith("_fixed_steps") for r in timed)
    at = jobs["cifar10/at/frac1.0/seed0"]
    assert (at["epochs"], at["amp"], at["train_images"]) == (200, "bf16", (50_000 - 1000) * 200)
    assert at["train_gpu_hours"] == pytest.approx(49_000 * 200 / 600 / 3600)
    # A main-table run: clean + PGD-20, APGD-CE + APGD-T and the standard version on 10,000 points.
    assert at["eval_clean_pgd_gpu_hours"] == pytest.approx(10_000 * 0.001 / 3600)
    assert at["eval_autoattack_gpu_hours"] == pytest.approx(10_000 * 0.01 / 3600)
    assert at["eval_autoattack_standard_gpu_hours"] == pytest.approx(10_000 * 0.03 / 3600)
    # A less-data run: APGD-CE + APGD-T only.
    small = jobs["cifar10/at/frac0.1/seed0"]
    assert small["train_images"] == 4900 * 200 and small["eval_autoattack_standard_gpu_hours"] == 0.0
    free = jobs["cifar10/free_at/frac1.0/seed0"]
    assert free["epochs"] == 25  # 200 / 8 replays; the replays are inside its images/s
    imagenet = jobs["imagenet/mixacm_imagenet/frac1.0/seed0"]
    assert imagenet["gpus"] == 4 and imagenet["train_gpu_hours"] == pytest.approx(1_281_167 * 90 / 700 / 3600)
    totals = est["totals"]
    assert totals["cifar10/all_gpu_hours"] == pytest.approx(sum(
        v for j in est["jobs"] if j["run"].startswith("cifar10/") for k, v in j.items() if k.endswith("_gpu_hours")))
    # ImageNet's evaluations were not measured: their totals, and the grand total, stay open.
    assert totals["imagenet/eval_clean_pgd_gpu_hours"] is None and totals["all_gpu_hours"] is None
    # A recipe measured only in another precision than the config's has no speed.
    fp32_only = [dict(r, amp="none", channels_last=False) if r["recipe"] == "at" else r for r in rows]
    assert gpu_check.estimate_config_hours(pipeline, fp32_only, per_point)["totals"]["cifar10/train_gpu_hours"] is None


def test_steps_are_built_as_the_last_epoch_of_the_config(pipeline):
    """AWP's weight perturbation is on and FAT's tau at its largest in the timed steps."""
    args = gpu_check.parse_args(["--device", "cpu", "--dry-run"])
    args.teacher_arch = {"cifar10": "wrn-28-10"}
    for recipe, check in (("awp_trades", lambda m: m._active), ("fat", lambda m: m.tau == 2)):
        job = gpu_check.recipe_run(pipeline, "cifar10", recipe, "wrn-34-10")
        method, step, batch = gpu_check.build_step(job, {"amp": "none", "channels_last": False}, args,
                                                   torch.device("cpu"))
        assert check(method), recipe
    job = gpu_check.recipe_run(pipeline, "cifar10", "free_at", "wrn-34-10")
    assert job["cfg"]["method"]["replays"] == 8 and job["resolved"]["epochs"] == 25


def test_without_cuda_it_says_so(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "g.json").exists()


def test_it_stops_itself_at_the_time_limit_and_keeps_what_finished(tmp_path):
    out = tmp_path / "g.json"
    t0 = time.perf_counter()
    # Rows of 1.5 s: the MixACM row finishes, the goals phase's next timings are cut off at 4 s.
    rc = gpu_check.main(["--device", "cpu", "--dry-run", "--time-limit-s", "4", "--steps", "100000",
                         "--max-seconds-per-row", "1.5", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 1 and data["stopped"] == "time limit of 4 s reached" and not data["completed"]
    assert time.perf_counter() - t0 < 15 and data["estimate"]["jobs"]
    # What finished before the limit is kept, in order; the goals phase was cut before its ratios
    # (on a loaded machine even the MixACM row may not finish in 4 s).
    assert [r["recipe"] for r in data["train"]] in ([], ["mixacm"]) and "ratios" not in data["goals"]


def _image_folder(root: Path) -> Path:
    from torchvision.io import write_png

    for split, n in (("train", 4), ("test", 2)):
        for c in range(10):
            (root / split / CIFAR10_NAMES[c]).mkdir(parents=True)
            for i in range(n):
                write_png((torch.rand(3, 32, 32) * 255).to(torch.uint8), str(root / split / CIFAR10_NAMES[c] / f"{i}.png"))
    return root


@pytest.mark.slow
def test_dry_run_writes_every_phase(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--dry-run", "--data-root", str(_image_folder(tmp_path / "data")),
                         "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["completed"] and data["skipped"] == []
    recipes = [r["recipe"] for r in data["train"]]
    assert recipes[0] == "mixacm" and {"at", "awp_trades", "awp_at", "fat_trades", "igam", "ard", "rslad"} <= set(recipes)
    rows = {r["recipe"]: r for r in data["train"]}
    assert rows["awp_trades"]["last_metrics"]["awp"] == 1.0 and rows["fat_trades"]["last_metrics"]["tau"] == 3.0
    assert [r["recipe"] for r in data["imagenet"]] == ["mixacm_imagenet", "free_at_imagenet", "fast_at_imagenet"]
    goals = data["goals"]
    assert goals["loader"]["images_per_s"] > 0 and goals["bare_and_teacher"]["teacher"] == "tiny"
    assert set(goals["ratios"]["met"]) == {"mixacm_images_per_s", "mixacm_over_bare_plus_teacher", "loader_over_mixacm"}
    aa = data["autoattack"]
    assert {"clean_pgd", "autoattack-apgd", "autoattack"} <= set(aa) and aa["clean_pgd"]["n"] == 8
    assert "PGD-AT steps" in aa["model"]["source"]
    assert data["ddp"] == {"skipped": "not on CUDA"}
    assert data["estimate"]["totals"]["cifar10/eval_autoattack_gpu_hours"] > 0
