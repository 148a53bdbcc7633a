"""The paper's setting on one GPU in one call that stops itself: speed, memory, AutoAttack, DDP.

Writes one JSON file (``--out``, default ``gpu_check.json``), rewritten after every phase, so
whatever finished before the time limit (``--time-limit-s``, default 480 s = 8 minutes) is kept:

1. ``train``: WRN-34-10 training steps through the loop's own ``training_step`` for each method
   (default MixACM with a WRN-34-10 teacher forward, AT with PGD-10, TRADES, Free-AT, standard;
   MixACM and AT first), each with bf16 autocast + channels_last on and with both off: images/s
   and ``torch.cuda.max_memory_allocated``. Random weights cost what trained ones do.
2. ``autoattack``: a briefly trained model (``--aa-train-steps`` AT steps on CIFAR-10 training
   images with ``--data-root``, random images otherwise), then clean, PGD-20 and standard
   AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on ``--aa-n`` (200) points, each with its wall time.
3. ``ddp``: where two GPUs exist, one 2-process NCCL DDP run of MixACM and AT steps (images/s
   over both GPUs); otherwise recorded as skipped.
4. ``estimate``: GPU-hours of ``config/config.yaml``'s CIFAR-10 jobs (every training run and
   its evaluations, per job and in total), derived from the figures above; ImageNet jobs are
   listed as not measured (ResNet-50 at 224 px is not timed here).

    python benchmarks/gpu_check.py --data-root /data/cifar10              # one GPU, <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --dry-run                  # the same code, tiny, on a CPU

Never part of the test suite's GPU-free runs: ``tests/test_gpu_check.py`` runs only the dry mode
and the estimate arithmetic.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mixacm.data import CachedImageDataset, cifar_transform, load_dataset  # noqa: E402
from mixacm.methods import METHODS  # noqa: E402
from mixacm.models import build_model  # noqa: E402
from mixacm.provenance import provenance  # noqa: E402
from mixacm.train import training_step  # noqa: E402
from mixacm.utils import atomic_json_dump, parse_eps, seed_everything  # noqa: E402

PRECISIONS = ({"amp": "bf16", "channels_last": True}, {"amp": "none", "channels_last": False})
CIFAR_TRAIN_IMAGES = 50_000
CIFAR_TEST_IMAGES = 10_000


class TimeUp(Exception):
    """The time limit was reached; the JSON holds what finished."""


class Report:
    """The one JSON of this check, rewritten (atomically) after every phase and on a timeout."""

    def __init__(self, path: Path, args: argparse.Namespace, device: torch.device) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.limit = float(args.time_limit_s)
        self.data: dict[str, Any] = {"provenance": provenance(device), "args": {k: str(v) for k, v in vars(args).items()},
                                     "train": [], "autoattack": None, "ddp": None, "estimate": None,
                                     "completed": False, "stopped": None}

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        atomic_json_dump(self.data, self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(n: int, device: torch.device, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g).to(device)


def _method(name: str, model, teacher, dataset: str = "cifar10"):
    cls = METHODS.get(name)
    return cls(model, teacher=teacher if cls.needs_teacher else None, dataset=dataset)


def time_method(name: str, precision: dict, args, device: torch.device, report: Report) -> dict:
    """Images/s and peak memory of ``--steps`` timed steps (after ``--warmup``) of one method."""
    seed_everything(0)
    fmt = torch.channels_last if precision["channels_last"] else torch.preserve_format
    model = build_model(args.model).to(device, memory_format=fmt).train()
    teacher = None
    if METHODS.get(name).needs_teacher:
        teacher = build_model(args.teacher or args.model).to(device, memory_format=fmt).eval().requires_grad_(False)
    method = _method(name, model, teacher)
    extra = list(method.extra_modules().to(device).parameters())
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x, y = _batch(args.batch_size, device, precision["channels_last"])
    replays = int(getattr(method, "replays", 1))

    def step() -> float:
        return training_step(method, opt, scaler, x, y, amp=precision["amp"], extra_params=extra)[0]

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    steps = 0
    # Stops early when the phase would eat the time the later phases need.
    while steps < args.steps and (steps == 0 or time.perf_counter() - t0 < args.max_seconds_per_config):
        loss = step()
        steps += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    del method, model, teacher, opt
    return {
        "method": name, **precision, "steps": steps, "batch_size": args.batch_size, "seconds": seconds,
        # Free-AT's optimiser steps replay one minibatch m times: images/s counts new images.
        "replays": replays, "images_per_s": steps * args.batch_size / replays / seconds,
        "steps_per_s": steps / seconds, "last_loss": loss,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def brief_model(args, device: torch.device) -> tuple[torch.nn.Module, str]:
    """``--aa-train-steps`` AT steps (bf16, channels_last on a GPU): a model that is not constant."""
    seed_everything(1)
    gpu = device.type == "cuda"
    fmt = torch.channels_last if gpu else torch.preserve_format
    model = build_model(args.model).to(device, memory_format=fmt).train()
    method = _method("at", model, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if args.data_root:
        data = load_dataset("cifar10", "train", root=args.data_root, augment=True)
        source = "cifar10 train"
    else:
        data, source = None, "random"
    g = torch.Generator().manual_seed(2)
    for i in range(args.aa_train_steps):
        if data is not None:
            idx = torch.randint(0, len(data), (args.batch_size,), generator=g).tolist()
            xs, ys = zip(*(data[j] for j in idx))
            x, y = torch.stack(xs).to(device, memory_format=fmt), torch.tensor(ys).to(device)
        else:
            x, y = _batch(args.batch_size, device, gpu, seed=100 + i)
        training_step(method, opt, scaler, x, y, amp="bf16" if gpu else "none")
    return model.eval(), source


def autoattack_check(args, device: torch.device) -> dict:
    from mixacm.evaluate import evaluate

    t0 = time.perf_counter()
    model, train_source = brief_model(args, device)
    out: dict[str, Any] = {"train_steps": args.aa_train_steps, "train_data": train_source,
                           "train_seconds": time.perf_counter() - t0}
    if args.data_root:
        data, test_source = load_dataset("cifar10", "test", root=args.data_root), "cifar10 test"
    else:
        g = torch.Generator().manual_seed(3)
        images = (torch.rand(args.aa_n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
        labels = torch.randint(0, 10, (args.aa_n,), generator=g)
        data = CachedImageDataset(images, labels, [str(c) for c in range(10)], source="random images",
                                  source_detail="random images (gpu_check)", transform=cifar_transform(False))
        test_source = "random"
    out["test_data"] = test_source
    for attack in ("clean", "pgd20", args.aa_attack):
        t = time.perf_counter()
        res = evaluate(model, data, [attack], args.eps, n=args.aa_n, batch_size=args.aa_batch, seed=0,
                       device=device, progress=False)
        m = res["metrics"][attack]
        out[attack] = {"accuracy_pct": m["accuracy_pct"], "n": res["n"], "seconds": time.perf_counter() - t,
                       "package": m.get("attack", {}).get("package"), "version": m.get("attack", {}).get("version")}
    return out


def _ddp_worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    from mixacm import distributed as ddp

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = ddp.init_from_env("cuda")
    try:
        rows = []
        for name in ("mixacm", "at"):
            seed_everything(0)
            model = build_model(args.model).to(ctx.device, memory_format=torch.channels_last).train()
            teacher = None
            if METHODS.get(name).needs_teacher:
                teacher = build_model(args.model).to(ctx.device, memory_format=torch.channels_last).eval()
                teacher.requires_grad_(False)
            net = ddp.wrap_model(model, ctx)
            method = _method(name, net, teacher)
            extra = method.extra_modules().to(ctx.device)
            ddp.broadcast_module(extra, ctx)
            params = list(extra.parameters())
            opt = torch.optim.SGD([*model.parameters(), *params], lr=0.01, momentum=0.9)
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            x, y = _batch(args.batch_size // world, ctx.device, True, seed=rank)
            for _ in range(args.warmup):
                training_step(method, opt, scaler, x, y, amp="bf16", extra_params=params, ctx=ctx)
            torch.cuda.synchronize(ctx.device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.ddp_steps):
                training_step(method, opt, scaler, x, y, amp="bf16", extra_params=params, ctx=ctx)
            torch.cuda.synchronize(ctx.device)
            dist.barrier()
            seconds = time.perf_counter() - t0
            rows.append({"method": name, "world_size": world, "global_batch": args.batch_size, "steps": args.ddp_steps,
                         "seconds": seconds, "images_per_s": args.ddp_steps * args.batch_size / seconds})
            del net, method, model, teacher, opt
        if rank == 0:
            queue.put(rows)
    finally:
        ddp.shutdown(ctx)


def ddp_check(args) -> dict:
    n = torch.cuda.device_count()
    if n < 2:
        return {"skipped": f"{n} GPU(s) visible; the DDP step needs 2"}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, args, queue), nprocs=2, start_method="spawn", join=True)
    return {"backend": "nccl", "rows": queue.get()}


# ----------------------------------------------------------------------------- the estimate


def _recipe(method: str, knobs: dict, optim: dict) -> dict:
    from mixacm.config import load_run_config, resolve_recipe

    cfg = {"dataset": {"name": "cifar10", "holdout": 0}, "method": {"name": method, **knobs}, "optim": dict(optim)}
    if METHODS.get(method).needs_teacher:
        cfg["teacher"] = "teacher.pt"
    recipe = resolve_recipe(load_run_config(cfg))
    recipe["replays"] = int(getattr(METHODS.get(method).resolve(knobs, dataset="cifar10"), "replays", 1))
    return recipe


def estimate_config_hours(config: dict, img_per_s: dict[str, float], eval_s_per_point: dict[str, float]) -> dict:
    """GPU-hours of a workflow config's CIFAR-10 jobs from measured speeds.

    ``img_per_s``: training images per second per method (new images; Free-AT's replays are
    inside its figure); ``eval_s_per_point``: seconds per test point of ``pgd20`` (clean + PGD-20
    job) and of ``autoattack``. Each (recipe, fraction, seed) run is trained once however many
    tables use it, as the workflow does. Returns per-job rows and totals; jobs of other datasets
    are listed as not measured.
    """
    seeds = config.get("seeds", [0])
    holdout = config.get("data", {}).get("cifar10", {}).get("holdout", 0) or 0
    runs: dict[tuple, dict] = {}
    unmeasured = []
    for exp_name, exp in config["experiments"].items():
        for recipe_name in exp["recipes"]:
            if exp["dataset"] != "cifar10":
                unmeasured.append(f"{exp['dataset']}/{recipe_name}")
                continue
            for fraction in exp.get("recipe_fractions", {}).get(recipe_name, exp.get("fractions", [1.0])):
                for seed in exp.get("recipe_seeds", {}).get(recipe_name, exp.get("seeds", seeds)):
                    runs.setdefault((recipe_name, float(fraction), int(seed)), {"tables": []})["tables"].append(exp_name)
    ev = config["evaluation"]["cifar10"]
    n_pgd = ev["clean_pgd"].get("n") or CIFAR_TEST_IMAGES
    n_aa = ev["autoattack"].get("n") or CIFAR_TEST_IMAGES
    jobs = []
    for (recipe_name, fraction, seed), info in sorted(runs.items()):
        spec = config["recipes"][recipe_name]
        method = spec["method"]
        recipe = _recipe(method, spec.get("knobs", {}), spec.get("optim", {}))
        n_train = math.floor((CIFAR_TRAIN_IMAGES - holdout) * fraction)
        if recipe.get("steps"):  # a budget in steps: as many epochs of these images as it takes (mixacm.train)
            steps_per_epoch = n_train // recipe["batch_size"]
            recipe["epochs"] = max(1, round(recipe["steps"] / steps_per_epoch))
            n_train = steps_per_epoch * recipe["batch_size"]
        images = n_train * recipe["epochs"]
        speed = img_per_s.get(method)
        train_h = images / speed / 3600 if speed else None
        pgd_h = n_pgd * eval_s_per_point["pgd20"] / 3600 if eval_s_per_point.get("pgd20") else None
        aa_h = n_aa * eval_s_per_point["autoattack"] / 3600 if eval_s_per_point.get("autoattack") else None
        jobs.append({"run": f"cifar10/{recipe_name}/frac{fraction}/seed{seed}", "method": method,
                     "epochs": recipe["epochs"], "replays": recipe["replays"], "train_images": images,
                     "train_gpu_hours": train_h, "eval_clean_pgd_gpu_hours": pgd_h, "eval_autoattack_gpu_hours": aa_h,
                     "tables": sorted(set(info["tables"]))})
    def total(key):
        vals = [j[key] for j in jobs]
        return None if any(v is None for v in vals) else sum(vals)

    totals = {k: total(k) for k in ("train_gpu_hours", "eval_clean_pgd_gpu_hours", "eval_autoattack_gpu_hours")}
    totals["all_gpu_hours"] = None if None in totals.values() else sum(totals.values())
    return {"jobs": jobs, "totals": totals, "not_measured": sorted(set(unmeasured)),
            "assumptions": f"{CIFAR_TRAIN_IMAGES} - holdout {holdout} training images x fraction x epochs at the "
                           f"measured bf16 + channels_last speed; evaluation on {n_pgd} / {n_aa} test points at the "
                           "measured seconds per point of the briefly trained model (AutoAttack's cost depends on how "
                           "many points stay robust: a robust model costs more)"}


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu only with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model, 2 steps, 8 AutoAttack points (APGD only): checks the code on a CPU in seconds")
    p.add_argument("--model", default="wrn-34-10")
    p.add_argument("--teacher", default=None, help="teacher architecture (default: the student's)")
    # Every method config/config.yaml trains, MixACM and AT first (the order survives the time limit).
    p.add_argument("--methods", nargs="+", default=["mixacm", "at", "trades", "free_at", "standard", "awp_trades",
                                                    "awp_at", "fat", "igam", "ard", "rslad"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per method and precision")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-seconds-per-config", type=float, default=12.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--aa-n", type=int, default=200, help="AutoAttack points")
    p.add_argument("--aa-batch", type=int, default=200)
    p.add_argument("--aa-attack", default="autoattack", help="autoattack (standard) | autoattack-apgd")
    p.add_argument("--aa-train-steps", type=int, default=200, help="AT steps of the briefly trained model")
    p.add_argument("--ddp-steps", type=int, default=20)
    p.add_argument("--data-root", default=None, help="CIFAR-10 root (train/test); random images without it")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"), help="workflow config to estimate")
    p.add_argument("--time-limit-s", type=float, default=480.0)
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.steps, args.warmup, args.batch_size = "tiny", 2, 1, 16
        args.aa_n, args.aa_batch, args.aa_attack, args.aa_train_steps, args.ddp_steps = 8, 8, "autoattack-apgd", 2, 2
    return args


def main(argv=None) -> int:
    import yaml

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device is visible here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, "
              "or pass --device cpu --dry-run.", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
    args.eps = parse_eps(args.eps)
    report = Report(Path(args.out), args, device)

    def on_alarm(signum, frame):
        raise TimeUp

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_limit_s)))
    # bf16 autocast on a CPU is an emulation (tens of times slower): a CPU dry run varies only
    # the memory format.
    precisions = PRECISIONS if device.type == "cuda" else [{**p, "amp": "none"} for p in PRECISIONS]
    try:
        order = sorted(args.methods, key=lambda m: (m not in ("mixacm", "at"), args.methods.index(m)))
        for precision in precisions:
            for name in order:
                if report.left() < 60 and report.data["train"]:
                    report.data.setdefault("skipped", []).append(f"train {name} {precision}: time")
                    continue
                row = time_method(name, precision, args, device, report)
                report.data["train"].append(row)
                print(json.dumps(row), flush=True)
                report.write()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        report.data["autoattack"] = autoattack_check(args, device)
        print(json.dumps({"autoattack": report.data["autoattack"]}), flush=True)
        report.write()
        report.data["ddp"] = ddp_check(args) if device.type == "cuda" else {"skipped": "not on CUDA"}
        report.write()
        report.data["completed"] = True
    except TimeUp:
        report.data["stopped"] = f"time limit of {args.time_limit_s:.0f} s reached"
    finally:
        signal.alarm(0)
        fast = {r["method"]: r["images_per_s"] for r in report.data["train"] if r["channels_last"]}
        aa = report.data.get("autoattack") or {}
        per_point = {k: aa[a]["seconds"] / aa[a]["n"] for k, a in (("pgd20", "pgd20"), ("autoattack", args.aa_attack))
                     if a in aa}
        # clean + PGD-20 evaluate together in the workflow's job.
        if "pgd20" in per_point and "clean" in aa:
            per_point["pgd20"] += aa["clean"]["seconds"] / aa["clean"]["n"]
        try:
            config = yaml.safe_load(Path(args.config).read_text())
            report.data["estimate"] = estimate_config_hours(config, fast, per_point)
        except Exception as exc:  # noqa: BLE001 - the estimate must not lose the measured figures
            report.data["estimate"] = {"error": f"{type(exc).__name__}: {exc}"}
        report.write()
        print(f"gpu_check.py: wrote {report.path} ({report.data['elapsed_s']:.0f} s; "
              f"{'completed' if report.data['completed'] else report.data['stopped'] or 'failed'})", file=sys.stderr)
    return 0 if report.data["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
