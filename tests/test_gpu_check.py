"""benchmarks/gpu_check.py without a GPU: its estimate arithmetic, and (slow) its dry run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_estimate_of_the_paper_config_from_measured_speeds():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    speeds = {"mixacm": 2000.0, "at": 500.0, "trades": 450.0, "free_at": 2400.0, "awp_trades": 400.0,
              "awp_at": 450.0, "fat": 600.0, "igam": 900.0, "ard": 480.0, "rslad": 470.0}
    est = gpu_check.estimate_config_hours(config, speeds, {"pgd20": 0.001, "autoattack": 0.01})
    jobs = {j["run"]: j for j in est["jobs"]}
    # Runs shared by tables are trained once: cifar10 (8 recipes, MixACM and AT with 3 seeds) and
    # the transfer table's ARD and RSLAD; less_data (MixACM and AT at 3 more fractions, the
    # fixed-steps pair at those 3); ablation (4 more recipes x 3 seeds, the full one shared).
    assert len(jobs) == (8 + 2 + 2) + 2 + (6 + 6) + 4 * 3
    fixed = jobs["cifar10/at_fixed_steps/frac0.1/seed0"]  # the full-data run's 200 x 382 steps on 10 %
    assert (fixed["epochs"], fixed["train_images"]) == (2011, 2011 * 38 * 128)
    at = jobs["cifar10/at/frac1.0/seed0"]
    assert at["epochs"] == 200 and at["train_images"] == (50_000 - 1000) * 200
    assert at["train_gpu_hours"] == pytest.approx(49_000 * 200 / 500 / 3600)
    free = jobs["cifar10/free_at/frac1.0/seed0"]
    assert (free["epochs"], free["replays"]) == (25, 8)  # 200 / 8; the replays are inside its speed
    assert sorted(jobs["cifar10/mixacm/frac1.0/seed0"]["tables"]) == ["ablation", "cifar10", "less_data", "transfer"]
    assert at["eval_autoattack_gpu_hours"] == pytest.approx(10_000 * 0.01 / 3600)
    assert est["totals"]["all_gpu_hours"] == pytest.approx(sum(
        j["train_gpu_hours"] + j["eval_clean_pgd_gpu_hours"] + j["eval_autoattack_gpu_hours"] for j in est["jobs"]))
    assert est["not_measured"] == ["imagenet/fast_at_imagenet", "imagenet/free_at_imagenet", "imagenet/mixacm_imagenet"]
    # A method whose speed was not measured leaves the totals open rather than guessed.
    partial = gpu_check.estimate_config_hours(config, {"mixacm": 2000.0}, {"pgd20": 0.001, "autoattack": 0.01})
    assert partial["totals"]["train_gpu_hours"] is None


def test_without_cuda_it_says_so(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--dry-run", "--methods", "mixacm", "at", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["completed"]
    assert [(r["method"], r["channels_last"]) for r in data["train"]] == [
        ("mixacm", True), ("at", True), ("mixacm", False), ("at", False)]
    assert all(r["images_per_s"] > 0 for r in data["train"])
    aa = data["autoattack"]
    assert {"clean", "pgd20", "autoattack-apgd"} <= set(aa) and aa["pgd20"]["n"] == 8
    assert data["ddp"] == {"skipped": "not on CUDA"}
    assert data["estimate"]["totals"]["eval_autoattack_gpu_hours"] > 0
