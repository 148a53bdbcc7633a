"""Choose hyperparameters on held-out training data, never on the test set.

Each candidate is a run config (``mixacm train``) with ``dataset.holdout`` training images held
out (class-balanced). With ``train.selection: last`` (the main runs' protocol) the last epoch is
scored on the holdout; with ``best_pgd`` every epoch is (clean and PGD-10 at
``train.selection_eps``). The script trains the candidates of a grid file, two at a time by
default, and writes one CSV row per candidate: its method, knobs, teacher, learning rate and
epochs, the holdout scores of the model the protocol keeps, and its training time. The test split
is never loaded.

    python scripts/tune_holdout.py config/tuning/cifar10_cpu.yaml --out-dir results/tuning \
        --csv docs/results/cifar10_cpu/tuning.csv

On GPUs, ``--devices cuda:0 cuda:1 ...`` trains one candidate on each device at a time (the
device replaces the grid's ``device``); config/tuning/paper.yaml is the paper-scale grid.

The grid file has ``base`` (a run config shared by all candidates) and ``candidates``
(``{name: overrides}``, merged into ``base`` key by key at the top level sections).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

from mixacm.methods import METHODS
from mixacm.utils import YAMLFileError, load_yaml


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def run_one(name: str, cfg: dict, out_dir: Path, threads: int) -> dict:
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({**cfg, "name": f"tuning/{name}"}, sort_keys=False))
    method = {k: v for k, v in cfg["method"].items() if k != "name"}
    row = {
        "candidate": name,
        "method": cfg["method"]["name"],
        "knobs": json.dumps(method, sort_keys=True),
        "teacher": Path(cfg["teacher"]).name if cfg.get("teacher") and METHODS.get(cfg["method"]["name"]).needs_teacher else "",
        "lr": cfg.get("optim", {}).get("lr"),
        "epochs": cfg.get("optim", {}).get("epochs"),
    }
    if not (run_dir / "train_summary.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(run_dir / "train.log", "w") as log:
            done = subprocess.run([sys.executable, "-m", "mixacm.cli", "train", "--config", str(cfg_path),
                                   "--out-dir", str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:  # e.g. a diverged candidate: a row that says so, not a crash
            last = [l for l in (run_dir / "train.log").read_text().splitlines() if l.strip()][-1:]
            return {**row, "status": f"failed: {last[0][:200] if last else 'exit ' + str(done.returncode)}"}
    summary = json.loads((run_dir / "train_summary.json").read_text())
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    selection = summary["selection"]
    scored = [l for l in lines if "holdout_pgd_pct" in l]
    # the kept model's scores: the last epoch (last selection) or the best one (best_pgd)
    last = next(l for l in scored if l["epoch"] == selection["epoch"])
    return {
        **row,
        "status": "trained",
        "selection": f"{selection['mode']} (epoch {selection['epoch']})",
        "holdout_clean_pct": last["holdout_clean_pct"],
        "holdout_pgd10_pct": last["holdout_pgd_pct"],
        "holdout_n": last["holdout_n"],
        "train_time_s": round(summary["train_time_s"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("--out-dir", type=Path, default=Path("results/tuning"))
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="candidates trained at once")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per candidate")
    ap.add_argument("--devices", nargs="+",
                    help="train one candidate on each of these devices at a time (e.g. cuda:0 cuda:1); "
                         "replaces the grid's device and --jobs")
    args = ap.parse_args(argv)

    try:
        grid = load_yaml(args.grid)
    except YAMLFileError as err:  # a key given twice names both lines
        print(f"tune_holdout.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    names = args.only or list(grid["candidates"])
    cfgs = {n: merge(grid["base"], grid["candidates"][n] or {}) for n in names}
    free: queue.Queue[str | None] = queue.Queue()
    for device in args.devices or [None] * args.jobs:
        free.put(device)

    def on_a_free_device(name: str) -> dict:
        device = free.get()
        try:
            cfg = cfgs[name] if device is None else {**cfgs[name], "device": device}
            return run_one(name, cfg, args.out_dir, args.threads)
        finally:
            free.put(device)

    with ThreadPoolExecutor(free.qsize()) as pool:
        rows = list(pool.map(on_a_free_device, names))
    table = pd.DataFrame(rows)
    if args.csv.is_file():  # keep the rows of candidates not rerun now
        old = pd.read_csv(args.csv)
        table = pd.concat([old[~old["candidate"].isin(table["candidate"])], table], ignore_index=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
