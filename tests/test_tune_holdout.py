"""scripts/tune_holdout.py: the paper-scale grid reads as `mixacm train` reads it, and --devices
trains one candidate on each device at a time."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import yaml

from mixacm.config import load_run_config, resolve_recipe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import tune_holdout  # noqa: E402

sys.path.pop(0)


def test_the_paper_grid_is_the_main_protocol_with_one_knob_changed_a_candidate():
    grid = yaml.safe_load((REPO / "config" / "tuning" / "paper.yaml").read_text())
    paper = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert grid["base"]["model"]["name"] == paper["experiments"]["cifar10"]["arch"]
    for name, cand in grid["candidates"].items():
        cfg = load_run_config(tune_holdout.merge(grid["base"], cand))
        recipe = resolve_recipe(cfg)
        # the paper's recipe, its last epoch kept (the main runs' protocol), never the test split
        assert (recipe["epochs"], recipe["batch_size"], cfg["train"]["selection"]) == (200, 128, "last"), name
        assert cfg["dataset"]["holdout"] == 5000 and cfg["method"]["name"] == paper["recipes"]["mixacm"]["method"]


def test_devices_train_one_candidate_on_each_device_at_a_time(tmp_path, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": {"device": "cpu", "method": {"name": "mixacm"}},
                                    "candidates": {f"c{i}": {"optim": {"lr": i}} for i in range(6)}}))
    busy: dict[str, str] = {}
    seen, lock = [], threading.Lock()

    def fake_run_one(name, cfg, out_dir, threads):
        with lock:
            assert cfg["device"] not in busy, f"{cfg['device']} runs {busy} already"
            busy[cfg["device"]] = name
            seen.append((name, cfg["device"]))
        time.sleep(0.05)
        with lock:
            del busy[cfg["device"]]
        return {"candidate": name, "status": "trained"}

    monkeypatch.setattr(tune_holdout, "run_one", fake_run_one)
    tune_holdout.main([str(grid), "--csv", str(tmp_path / "out.csv"), "--devices", "cuda:0", "cuda:1"])
    assert sorted(n for n, _ in seen) == [f"c{i}" for i in range(6)]
    assert {d for _, d in seen} == {"cuda:0", "cuda:1"}
    # without --devices the grid's own device, --jobs at a time
    seen.clear()
    tune_holdout.main([str(grid), "--csv", str(tmp_path / "out.csv"), "--jobs", "1"])
    assert {d for _, d in seen} == {"cpu"} and len(seen) == 6
