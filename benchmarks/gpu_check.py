"""The paper's setting on one GPU in one call that stops itself: speed, memory, AutoAttack, goals.

Every recipe is timed as ``config/config.yaml`` (``--config``) trains it: its method, knobs and
resolved optimiser recipe (batch per GPU = recipe batch / the GPUs its training job asks for), its
precision (``train.amp``, ``train.channels_last``, the training attacks in bf16 with the default
``train.attack_precision``), its architecture and the teacher the config names (WRN-28-10 for
CIFAR-10), each method told it is in its last epoch (``begin_epoch``), so AWP's weight perturbation
is on and FAT's tau at its largest. Phases, most wanted first; the JSON (``--out``) is rewritten
after every row, so whatever finished before the time limit (``--time-limit-s``, 480 s) is kept:

1. ``goals``: the WRN-34-10 MixACM step beside a bare bf16 student step (forward, backward, SGD)
   and the teacher's forward, and the training loader's images/s; prints the issue's goals:
   MixACM >= 3,000 img/s, MixACM / (bare step + teacher forward) <= 1.10, loader / MixACM >= 1.
2. ``train``: every CIFAR-10 recipe, in the precision the config gives it.
3. ``autoattack``: a robust model (``--aa-model``: any file ``mixacm.checkpoint.load_any_model``
   reads, e.g. a RobustBench model imported with ``mixacm teacher --robustbench NAME``; else
   ``--aa-train-steps`` AT steps on the real training images of ``--data-root``; without either it
   is skipped: a random net looks 100 % robust), then clean, PGD-20, APGD-CE + APGD-T and standard
   AutoAttack on ``--aa-n`` points with the evaluation's own batch rule, each with its wall time.
4. ``imagenet``: the ImageNet recipes' steps (ResNet-50, 224 px, their precision).
5. ``fp32``: MixACM and AT again with autocast and channels_last off (fp32, TF32 where torch
   allows it: recorded), for the bf16 speed-up; the other recipes if time is left.
6. ``ddp``: where two GPUs exist, MixACM and AT steps in a 2-process NCCL run.

``--phases`` runs a subset (e.g. ``goals``). ``estimate`` (always, last): GPU-hours of every job of the config from the rows measured, each
training run at the speed of its own precision; a figure that was not measured leaves its total
open rather than guessed.

    python benchmarks/gpu_check.py --data-root /data/cifar10                  # one GPU, <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --dry-run                     # the same code, tiny, on a CPU

``tests/test_gpu_check.py`` runs the dry mode and the estimate arithmetic (no GPU needed).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mixacm.config import (check_pipeline_recipe, evaluated_runs, experiment_runs, method_class,  # noqa: E402
                           method_knobs, resolve_recipe, training_gpus, validate)
from mixacm.data import load_dataset  # noqa: E402
from mixacm.distributed import cpus_per_rank  # noqa: E402
from mixacm.loader import make_train_loader  # noqa: E402
from mixacm.models import build_model  # noqa: E402
from mixacm.provenance import compute_precision, provenance  # noqa: E402
from mixacm.train import graphs_wanted, training_step  # noqa: E402
from mixacm.utils import atomic_json_dump, load_yaml, parse_eps, seed_everything  # noqa: E402

IMAGES = {"cifar10": (50_000, 10_000, 32), "imagenet": (1_281_167, 50_000, 224)}  # train, test, side
GOALS = {"mixacm_images_per_s": 3000.0, "mixacm_over_bare_plus_teacher": 1.10, "loader_over_mixacm": 1.0}
FP32 = {"amp": "none", "channels_last": False}
PHASES = ("goals", "train", "autoattack", "imagenet", "fp32", "ddp")


class TimeUp(Exception):
    """The time limit was reached; the JSON holds what finished."""


class Report:
    """The one JSON of this check, rewritten (atomically) after every row and on a timeout."""

    def __init__(self, path: Path, args: argparse.Namespace, device: torch.device) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.limit = float(args.time_limit_s)
        self.data: dict[str, Any] = {
            "provenance": provenance(device), "args": {k: str(v) for k, v in vars(args).items()},
            "goals": {}, "train": [], "autoattack": {}, "imagenet": [], "ddp": None, "estimate": None,
            "skipped": [], "completed": False, "stopped": None}

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.t0)

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        print(json.dumps({section: row}), flush=True)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        atomic_json_dump(self.data, self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.preserve_format


def _batch(n: int, side: int, classes: int, device: torch.device, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g).to(device).contiguous(memory_format=_fmt(channels_last))
    return x, torch.randint(0, classes, (n,), generator=g).to(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int, max_s: float) -> tuple[int, float]:
    """``(calls, seconds)`` of up to ``steps`` calls of ``fn`` after ``warmup`` (cuDNN's algorithm
    search happens there), stopping early after ``max_s`` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, n = time.perf_counter(), 0
    while n < steps and (n == 0 or time.perf_counter() - t0 < max_s):
        fn()
        n += 1
    _sync(device)
    return n, time.perf_counter() - t0


def _memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- the config's jobs


def load_pipeline(path: str | os.PathLike) -> dict:
    """The workflow config at ``path``, validated and completed as the Snakefile does."""
    config = load_yaml(path)
    validate(config, load_yaml(REPO / "workflow" / "schemas" / "config.schema.yaml"),
             what="pipeline config")
    return config


def recipe_run(pipeline: dict, dataset: str, recipe: str, arch: str) -> dict:
    """What the workflow's training job of ``recipe`` runs: the run config, the resolved
    recipe, the GPUs of the job and its precision."""
    cfg = check_pipeline_recipe(pipeline, recipe, dataset=dataset, arch=arch, teacher="teacher.pt")
    gpus = training_gpus(pipeline, dataset)
    return {"recipe": recipe, "dataset": dataset, "arch": arch, "cfg": cfg, "resolved": resolve_recipe(cfg),
            "gpus": gpus, "amp": cfg["train"]["amp"], "channels_last": cfg["train"]["channels_last"],
            "cuda_graphs": cfg["train"]["cuda_graphs"]}


def step_key(job: dict) -> tuple:
    """What decides a training job's images/s: dataset, architecture, method and knobs, batch
    and precision. Recipes that differ only in their budget (epochs, steps) share it."""
    return (job["dataset"], job["arch"], json.dumps(job["cfg"]["method"], sort_keys=True),
            job["resolved"]["batch_size"], job["amp"], job["channels_last"], job["cuda_graphs"])


def recipe_runs(pipeline: dict, dataset: str) -> dict[str, dict]:
    """recipe -> ``recipe_run`` of every recipe the experiments of ``dataset`` train, in the
    config's order (the first experiment's architecture for a recipe in several)."""
    runs: dict[str, dict] = {}
    for exp in pipeline["experiments"].values():
        if exp["dataset"] == dataset:
            for recipe in exp["recipes"]:
                if recipe not in runs:
                    runs[recipe] = recipe_run(pipeline, dataset, recipe, exp["arch"])
    return runs


def distinct_steps(jobs: Iterable[dict]) -> list[dict]:
    """The first job of each ``step_key`` (a budget-only variant such as ``mixacm_fixed_steps``
    is timed as its base)."""
    seen: dict[tuple, dict] = {}
    for job in jobs:
        seen.setdefault(step_key(job), job)
    return list(seen.values())


def config_recipes(pipeline: dict, dataset: str) -> list[dict]:
    """Every distinct training step the experiments of ``dataset`` run, in the config's order,
    each once."""
    return distinct_steps(recipe_runs(pipeline, dataset).values())


# ----------------------------------------------------------------------------- training steps


def build_step(job: dict, precision: dict, args, device: torch.device) -> tuple[Any, Callable[[], Any], int]:
    """``(method, step, images per step)`` of one recipe, as ``mixacm.train.setup`` builds it."""
    cfg, dataset = job["cfg"], job["dataset"]
    classes, side = (1000 if dataset == "imagenet" else 10), _side(dataset, args)
    seed_everything(0)
    fmt = _fmt(precision["channels_last"])
    model = build_model(_arch(job["arch"], args), classes).to(device, memory_format=fmt).train()
    cls = method_class(cfg)
    teacher = None
    if cls.needs_teacher:
        teacher = build_model(_arch(args.teacher_arch[dataset], args), classes).to(device, memory_format=fmt)
        teacher = teacher.eval().requires_grad_(False)
    method = cls(model, teacher=teacher, dataset=dataset, **method_knobs(cfg))
    if device.type == "cuda" and graphs_wanted(cfg["train"]["cuda_graphs"], device, job["gpus"]):  # as mixacm.train.setup
        method.use_cuda_graphs()
    recipe = resolve_recipe(cfg, method)
    method.recipe = {**getattr(method, "recipe", {}), **recipe}
    method.begin_epoch(recipe["epochs"] - 1, recipe["epochs"])  # AWP on, FAT's tau at its largest
    extra = list(method.extra_modules().to(device).parameters())
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision["amp"] == "fp16")
    batch = _per_gpu_batch(recipe["batch_size"], job["gpus"], args)
    x, y = _batch(batch, side, classes, device, precision["channels_last"])
    state = {}

    def step():
        state["out"] = training_step(method, opt, scaler, x, y, amp=precision["amp"], extra_params=extra)

    step.state = state
    return method, step, batch


def _side(dataset: str, args) -> int:
    return 32 if args.dry_run else IMAGES[dataset][2]


def _arch(arch: str, args) -> str:
    return "tiny" if args.dry_run else arch


def _per_gpu_batch(batch: int, gpus: int, args) -> int:
    return min(16, batch // gpus) if args.dry_run else batch // gpus


def time_recipe(job: dict, precision: dict, args, device: torch.device) -> dict:
    """Images/s and peak memory of one recipe's steps in ``precision``."""
    method, step, batch = build_step(job, precision, args, device)
    replays = int(getattr(method, "replays", 1))
    steps, seconds = time_calls(step, device, args.warmup, args.steps, args.max_seconds_per_row)
    loss, metrics = step.state["out"]
    read = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}  # one read, after
    amp = None if precision["amp"] == "none" else precision["amp"]
    row = {"recipe": job["recipe"], "method": method.name, "dataset": job["dataset"], "arch": _arch(job["arch"], args),
           **precision, "precision": compute_precision(device, amp)["label"], "attacks": _attack_label(job, precision),
           "cuda_graphs": method.graphs is not None,
           "batch_per_gpu": batch, "gpus_of_job": job["gpus"], "replays": replays, "steps": steps, "seconds": seconds,
           # Free-AT's optimiser steps replay one minibatch m times: images/s counts new images.
           "images_per_s": steps * batch / replays / seconds, "step_ms": 1000 * seconds / steps,
           "last_loss": float(loss), "last_metrics": read, "max_memory_allocated_gib": _memory_gib(device)}
    del method, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _attack_label(job: dict, precision: dict) -> str:
    from mixacm.attacks import resolve_attack_precision

    return resolve_attack_precision(precision["amp"], job["cfg"]["train"]["attack_precision"])


# ----------------------------------------------------------------------------- the goals


def bare_and_teacher(job: dict, args, device: torch.device) -> dict[str, Callable[[], None]]:
    """``{"bare": a bare bf16 + channels_last student step (CE forward, backward, SGD step),
    "teacher": the teacher's bf16 forward}`` at the MixACM recipe's batch: what MixACM's step
    should cost."""
    side, batch = _side("cifar10", args), _per_gpu_batch(job["resolved"]["batch_size"], job["gpus"], args)
    x, y = _batch(batch, side, 10, device, True)
    seed_everything(0)
    student = build_model(_arch(job["arch"], args), 10).to(device, memory_format=torch.channels_last).train()
    teacher = build_model(_arch(args.teacher_arch["cifar10"], args), 10).to(device, memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    bf16 = _precision(job, device)["amp"] == "bf16"  # as the MixACM row runs

    def bare():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(student(x), y)
        loss.backward()
        opt.step()

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            teacher(x)

    return {"bare": bare, "teacher": teacher_forward}


def time_bare_and_teacher(job: dict, args, device: torch.device) -> dict:
    """Milliseconds of ``bare_and_teacher``'s two calls."""
    fns = bare_and_teacher(job, args, device)
    out = {"batch": _per_gpu_batch(job["resolved"]["batch_size"], job["gpus"], args),
           "student": _arch(job["arch"], args), "teacher": _arch(args.teacher_arch["cifar10"], args)}
    for name, fn in (("bare_step", fns["bare"]), ("teacher_forward", fns["teacher"])):
        n, s = time_calls(fn, device, args.warmup, args.steps, args.max_seconds_per_row)
        out[f"{name}_ms"] = 1000 * s / n
    return out


def time_loader(job: dict, args, device: torch.device) -> dict:
    """Images/s of the training loader as the loop gets its batches (``make_train_loader``,
    augmentation on, batches moved to the device), over ``--loader-batches`` batches."""
    if not args.data_root:
        return {"skipped": "no --data-root"}
    data = load_dataset("cifar10", "train", root=args.data_root, augment=True, cache=True)
    batch = _per_gpu_batch(job["resolved"]["batch_size"], job["gpus"], args)
    workers = job["cfg"]["train"]["num_workers"]
    workers = max(0, cpus_per_rank() - 1) if workers == "auto" else workers
    t_build = time.perf_counter()
    loader = make_train_loader(data, batch, 0, epoch=0, device=device, num_workers=workers)  # built once a run
    _sync(device)
    t0, images = time.perf_counter(), 0
    for i, (x, y) in enumerate(loader):  # batches arrive on the device, augmented, as the loop gets them
        x = x.contiguous(memory_format=torch.channels_last)
        images += len(x)
        if i + 1 >= args.loader_batches:
            break
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "batch": batch,
            "build_s": t0 - t_build, "num_workers": workers, "training_images": len(data)}


def goal_ratios(goals: dict) -> dict:
    """The issue's three goals from the measured figures (None where one is missing)."""
    mix, bare = goals.get("mixacm"), goals.get("bare_and_teacher")
    loader = goals.get("loader", {})
    out: dict[str, Any] = {"goals": GOALS}
    if mix:
        out["mixacm_images_per_s"] = mix["images_per_s"]
    if mix and bare:
        out["mixacm_over_bare_plus_teacher"] = mix["step_ms"] / (bare["bare_step_ms"] + bare["teacher_forward_ms"])
    if mix and loader.get("images_per_s"):
        out["loader_over_mixacm"] = loader["images_per_s"] / mix["images_per_s"]
    out["met"] = {k: (out[k] >= v if k != "mixacm_over_bare_plus_teacher" else out[k] <= v)
                  for k, v in GOALS.items() if k in out}
    return out


def goals_phase(pipeline: dict, args, device: torch.device, report: Report) -> None:
    job = recipe_run(pipeline, "cifar10", "mixacm", args.model)
    goals = report.data["goals"]
    goals["mixacm"] = time_recipe(job, _precision(job, device), args, device)
    report.add("train", goals["mixacm"])
    goals["bare_and_teacher"] = time_bare_and_teacher(job, args, device)
    report.write()
    goals["loader"] = time_loader(job, args, device)
    goals["ratios"] = goal_ratios(goals)
    report.write()
    print(json.dumps({"goals": goals["ratios"]}), flush=True)


def _precision(job: dict, device: torch.device) -> dict:
    """The recipe's own precision; a CPU runs it without autocast (bf16 there is emulated)."""
    if device.type != "cuda":
        return {"amp": "none", "channels_last": job["channels_last"]}
    return {"amp": job["amp"], "channels_last": job["channels_last"]}


# ----------------------------------------------------------------------------- AutoAttack


def robust_model(args, device: torch.device) -> tuple[torch.nn.Module | None, dict]:
    """The model AutoAttack is timed on: ``--aa-model``, else a briefly AT-trained one on real
    training images, else None (a random or random-data net looks 100 % robust)."""
    from mixacm.checkpoint import load_any_model

    if args.aa_model:
        model, info = load_any_model(args.aa_model, device=device)
        return model, {"source": str(args.aa_model), "model": info.get("model")}
    if not args.data_root:
        return None, {"skipped": "no robust model: pass --aa-model or --data-root (AT on real images)"}
    seed_everything(1)
    gpu = device.type == "cuda"
    fmt = torch.channels_last if gpu else torch.preserve_format
    model = build_model(_arch(args.model, args), 10).to(device, memory_format=fmt).train()
    method = method_class({"method": {"name": "at"}})(model, dataset="cifar10")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=max(2, args.aa_train_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    data = load_dataset("cifar10", "train", root=args.data_root, augment=True, cache=True)
    batch = 16 if args.dry_run else 128
    t0, steps, epoch = time.perf_counter(), 0, 0

    def done() -> bool:  # the step budget, or the time budget (the evaluations need the rest)
        return steps >= args.aa_train_steps or time.perf_counter() - t0 > args.aa_train_seconds

    loader = make_train_loader(data, min(batch, len(data)), 1, device=device)
    while not done():
        loader.set_epoch(epoch)
        for x, y in loader:
            training_step(method, opt, scaler, x.contiguous(memory_format=fmt), y, amp="bf16" if gpu else "none")
            sched.step()
            steps += 1
            if done():
                break
        epoch += 1
    _sync(device)
    return model.eval(), {"source": f"{steps} PGD-AT steps ({'bf16' if gpu else 'fp32'}, one-cycle lr 0.1, batch {batch}) on "
                                    f"{len(data)} training images of {args.data_root}",
                          "train_seconds": time.perf_counter() - t0}


def autoattack_phase(args, device: torch.device, report: Report) -> None:
    from mixacm.evaluate import evaluate

    aa = report.data["autoattack"]
    model, info = robust_model(args, device)
    aa["model"] = info
    report.write()
    if model is None:
        report.data["skipped"].append(f"autoattack: {info['skipped']}")
        return
    test = load_dataset("cifar10", "test", root=args.data_root) if args.data_root else None
    if test is None:
        aa["model"]["skipped"] = "no test images: pass --data-root"
        return
    # One evaluation per job of the workflow: clean + PGD-20 together, then each AutoAttack version.
    for job, attacks in (("clean_pgd", ["clean", "pgd20"]), ("autoattack-apgd", ["autoattack-apgd"]),
                         ("autoattack", ["autoattack"])):
        if report.left() < 30:
            report.data["skipped"].append(f"autoattack {job}: time")
            continue
        t = time.perf_counter()
        res = evaluate(model, test, attacks, args.eps, n=args.aa_n, seed=0, device=device, progress=False)
        aa[job] = {"seconds_per_point": (time.perf_counter() - t) / res["n"], "n": res["n"],
                   "accuracy_pct": {a: res["metrics"][a]["accuracy_pct"] for a in attacks},
                   "batch_size": res["batch_size"], "precision": res["precision"]}
        report.write()
    print(json.dumps({"autoattack": aa}), flush=True)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, jobs: list[dict], args, queue) -> None:
    import torch.distributed as dist

    from mixacm import distributed as ddp

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = ddp.init_from_env("cuda")
    try:
        rows = []
        for job in jobs:
            seed_everything(0)
            cfg = job["cfg"]
            model = build_model(job["arch"], 10).to(ctx.device, memory_format=torch.channels_last).train()
            cls = method_class(cfg)
            teacher = None
            if cls.needs_teacher:
                teacher = build_model(args.teacher_arch["cifar10"], 10).to(ctx.device, memory_format=torch.channels_last)
                teacher.eval().requires_grad_(False)
            net = ddp.wrap_model(model, ctx)
            method = cls(net, teacher=teacher, dataset="cifar10", **method_knobs(cfg))
            extra = method.extra_modules().to(ctx.device)
            ddp.broadcast_module(extra, ctx)
            params = list(extra.parameters())
            opt = torch.optim.SGD([*model.parameters(), *params], lr=0.01, momentum=0.9)
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            batch = job["resolved"]["batch_size"]
            x, y = _batch(batch // world, 32, 10, ctx.device, True, seed=rank)

            step = functools.partial(training_step, method, opt, scaler, x, y, amp=job["amp"], extra_params=params,
                                     ctx=ctx)
            dist.barrier()
            n, seconds = time_calls(step, ctx.device, args.warmup, args.ddp_steps, args.max_seconds_per_row)
            rows.append({"recipe": job["recipe"], "world_size": world, "global_batch": batch, "steps": n,
                         "seconds": seconds, "images_per_s": n * batch / seconds})
            del net, method, model, teacher, opt, step
        if rank == 0:
            queue.put(rows)
    finally:
        ddp.shutdown(ctx)


def ddp_phase(pipeline: dict, args) -> dict:
    n = torch.cuda.device_count()
    if n < 2:
        return {"skipped": f"{n} GPU(s) visible; the DDP step needs 2"}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = [recipe_run(pipeline, "cifar10", r, args.model) for r in ("mixacm", "at")]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, jobs, args, queue), nprocs=2, start_method="spawn", join=True)
    return {"backend": "nccl", "rows": queue.get()}


# ----------------------------------------------------------------------------- the estimate


def planned_evaluations(pipeline: dict) -> dict[tuple, set[str]]:
    """The evaluation jobs the workflow plans for each (dataset, recipe, fraction, seed) run:
    ``clean_pgd``, ``autoattack`` (the version of evaluation.<dataset>.autoattack) and
    ``autoattack_standard``, from the workflow's own run lists (``mixacm.config.experiment_runs``
    / ``evaluated_runs``: seeds, fractions and per-recipe lists as the DAG has them), each file
    once however many tables use the run."""
    runs: dict[tuple, set[str]] = {}
    for name, exp in pipeline["experiments"].items():
        with_aa = set(evaluated_runs(pipeline, name, "autoattack"))
        standard = set(exp.get("autoattack_standard", []))
        for run in experiment_runs(pipeline, name):
            dataset, recipe, _, fraction, seed = run
            kinds = runs.setdefault((dataset, recipe, float(fraction), int(seed)), set())
            kinds.add("clean_pgd")
            if run in with_aa:
                kinds.add("autoattack")
            if recipe in standard:
                kinds.add("autoattack_standard")
    return runs


def train_images(job: dict, n_train: int) -> tuple[int, int]:
    """``(epochs, new images)`` of a run on ``n_train`` training images: the recipe's epochs, or
    a budget in ``steps`` turned into epochs of this training set as ``mixacm.train.setup`` does
    (then each epoch's last partial batch is dropped)."""
    recipe = job["resolved"]
    if recipe.get("steps"):
        per_epoch = n_train // recipe["batch_size"]
        epochs = max(1, round(recipe["steps"] / per_epoch))
        return epochs, per_epoch * recipe["batch_size"] * epochs
    return recipe["epochs"], n_train * recipe["epochs"]


def _speed(rows: list[dict], job: dict, timed: dict[tuple, str]) -> float | None:
    """Measured images/s of ``job``'s recipe, or of the timed recipe with the same step
    (``timed``: step_key -> recipe); None where neither was measured at the job's precision."""
    names = {job["recipe"], timed.get(step_key(job))}
    for row in rows:
        if row["recipe"] in names and (row["dataset"], row["amp"], row["channels_last"]) == (
                job["dataset"], job["amp"], job["channels_last"]):
            return row["images_per_s"]
    return None


def _eval_seconds(pipeline: dict, dataset: str, kind: str, per_point: dict[str, float]) -> float | None:
    """Seconds of one evaluation job; ``per_point`` is keyed clean_pgd / autoattack-apgd / autoattack."""
    ev = pipeline["evaluation"][dataset]
    test_images = IMAGES[dataset][1]
    if kind == "clean_pgd":
        key, n = "clean_pgd", ev["clean_pgd"]["n"]
    elif kind == "autoattack":
        key, n = ev["autoattack"]["version"], ev["autoattack"]["n"]
    else:
        key, n = "autoattack", ev.get("autoattack_standard", {}).get("n")
    rate = per_point.get(f"{dataset}/{key}")
    return None if rate is None else (n or test_images) * rate


def estimate_config_hours(pipeline: dict, rows: list[dict], per_point: dict[str, float]) -> dict:
    """GPU-hours of every training and evaluation job of a validated workflow config.

    ``rows``: measured training rows (recipe, dataset, amp, channels_last, images_per_s per GPU);
    each run trains at the speed of its recipe's own precision, ``(train images - holdout) x
    fraction x epochs`` new images (Free-AT's replays are inside its images/s), and a job on G
    GPUs costs G x its wall time, i.e. the per-GPU speed decides (linear scaling assumed).
    ``per_point``: seconds per test point of an evaluation job, keyed ``<dataset>/clean_pgd``,
    ``<dataset>/autoattack-apgd``, ``<dataset>/autoattack``. A figure that was not measured
    leaves the job's hours and the totals None.
    """
    jobs_of = {(d, recipe): job for d in ("cifar10", "imagenet") for recipe, job in recipe_runs(pipeline, d).items()}
    timed = {step_key(j): j["recipe"] for j in distinct_steps(jobs_of.values())}
    out = []
    for (dataset, recipe, fraction, seed), kinds in sorted(planned_evaluations(pipeline).items()):
        job = jobs_of[(dataset, recipe)]
        holdout = pipeline["data"][dataset]["holdout"]
        epochs, images = train_images(job, math.floor((IMAGES[dataset][0] - holdout) * fraction))
        speed = _speed(rows, job, timed)
        row = {"run": f"{dataset}/{recipe}/frac{fraction}/seed{seed}", "method": job["cfg"]["method"]["name"],
               "amp": job["amp"], "channels_last": job["channels_last"], "epochs": epochs,
               "gpus": job["gpus"], "train_images": images, "train_gpu_hours": images / speed / 3600 if speed else None}
        for kind in ("clean_pgd", "autoattack", "autoattack_standard"):
            seconds = _eval_seconds(pipeline, dataset, kind, per_point) if kind in kinds else 0.0
            row[f"eval_{kind}_gpu_hours"] = None if seconds is None else seconds / 3600
        out.append(row)
    hour_keys = [k for k in out[0] if k.endswith("_gpu_hours")] if out else []
    totals = {}
    for dataset in sorted({r["run"].split("/")[0] for r in out}):
        mine = [r for r in out if r["run"].startswith(dataset + "/")]
        for k in hour_keys:
            vals = [r[k] for r in mine]
            totals[f"{dataset}/{k}"] = None if None in vals else sum(vals)
    for dataset in sorted({k.split("/")[0] for k in totals}):
        vals = [v for k, v in totals.items() if k.startswith(dataset + "/")]
        totals[f"{dataset}/all_gpu_hours"] = None if None in vals else sum(vals)
    per_dataset = [v for k, v in totals.items() if k.endswith("/all_gpu_hours")]
    totals["all_gpu_hours"] = None if None in per_dataset else sum(per_dataset)
    return {"jobs": out, "totals": totals,
            "assumptions": "each run's speed is the measured per-GPU images/s of its recipe in its own precision "
                           "(random weights cost what trained ones do; FAT's early stop depends on the data); "
                           "evaluation seconds per point were measured on one robust model, and AutoAttack's cost "
                           "grows with the share of points that stay robust; the teachers' own evaluations, "
                           "teacher imports and the report are not counted"}


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu only with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models, 2 steps, 8 AutoAttack points: checks the code on a CPU in seconds")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"), help="workflow config to time and estimate")
    p.add_argument("--model", default="wrn-34-10", help="CIFAR-10 student of the goals and AutoAttack phases")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds-per-row", type=float, default=6.0)
    p.add_argument("--loader-batches", type=int, default=100)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--aa-n", type=int, default=200, help="AutoAttack points")
    p.add_argument("--aa-model", default=None, help="a robust CIFAR-10 model file to time AutoAttack on")
    p.add_argument("--aa-train-steps", type=int, default=400, help="AT steps of the briefly trained model")
    p.add_argument("--aa-train-seconds", type=float, default=100.0, help="at most this long (the lr schedule is cut short)")
    p.add_argument("--ddp-steps", type=int, default=20)
    p.add_argument("--data-root", default=None, help="CIFAR-10 root (train/ and test/): loader and AutoAttack")
    p.add_argument("--time-limit-s", type=float, default=480.0)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    args = p.parse_args(argv)
    args.phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        p.error(f"--phases: unknown {unknown}; valid: {list(PHASES)}")
    if args.dry_run:  # small figures for what the command line left at its default
        dry = {"steps": 2, "warmup": 1, "loader_batches": 2, "aa_n": 8, "aa_train_steps": 2, "ddp_steps": 2}
        for key, value in dry.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def run_phases(pipeline: dict, args, device: torch.device, report: Report) -> None:
    """The phases in the order of the module docstring; a row that would not fit is skipped."""
    def fits(what: str, need_s: float) -> bool:
        if report.left() >= need_s:
            return True
        report.data["skipped"].append(f"{what}: time")
        return False

    on = set(args.phases)
    if "goals" in on:
        goals_phase(pipeline, args, device, report)
    for job in config_recipes(pipeline, "cifar10") if "train" in on else []:
        if job["recipe"] != "mixacm" and fits(f"train {job['recipe']}", 60):
            report.add("train", time_recipe(job, _precision(job, device), args, device))
    if "autoattack" in on and fits("autoattack", 90):
        autoattack_phase(args, device, report)
    for job in config_recipes(pipeline, "imagenet") if "imagenet" in on else []:
        if fits(f"imagenet {job['recipe']}", 45):
            report.add("imagenet", time_recipe(job, _precision(job, device), args, device))
    if device.type == "cuda" and "fp32" in on:
        jobs = config_recipes(pipeline, "cifar10")
        for job in sorted(jobs, key=lambda j: j["recipe"] not in ("mixacm", "at")):
            if fits(f"fp32 {job['recipe']}", 30):
                report.add("train", time_recipe(job, FP32, args, device))
    if "ddp" in on:
        report.data["ddp"] = ddp_phase(pipeline, args) if device.type == "cuda" else {"skipped": "not on CUDA"}
    report.write()


def per_point_seconds(report: Report) -> dict[str, float]:
    aa = report.data.get("autoattack") or {}
    return {f"cifar10/{k}": aa[k]["seconds_per_point"] for k in ("clean_pgd", "autoattack-apgd", "autoattack") if k in aa}


def main(argv=None) -> int:
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
    pipeline = load_pipeline(args.config)
    args.teacher_arch = {ds: t.get("arch") or args.model for ds, t in pipeline["teachers"].items()}
    report = Report(Path(args.out), args, device)
    report.data["teacher_arch"] = args.teacher_arch

    def on_alarm(signum, frame):
        raise TimeUp

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_limit_s)))
    try:
        run_phases(pipeline, args, device, report)
        report.data["completed"] = True
    except TimeUp:
        report.data["stopped"] = f"time limit of {args.time_limit_s:.0f} s reached"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        try:
            rows = report.data["train"] + report.data["imagenet"]
            report.data["estimate"] = estimate_config_hours(pipeline, rows, per_point_seconds(report))
        except Exception as exc:  # noqa: BLE001 - the estimate must not lose the measured figures
            report.data["estimate"] = {"error": f"{type(exc).__name__}: {exc}"}
        report.write()
        ratios = report.data["goals"].get("ratios")
        print(f"gpu_check.py: goals {json.dumps(ratios)}", file=sys.stderr)
        print(f"gpu_check.py: wrote {report.path} ({report.data['elapsed_s']:.0f} s; "
              f"{'completed' if report.data['completed'] else report.data['stopped'] or 'failed'})", file=sys.stderr)
    return 0 if report.data["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
