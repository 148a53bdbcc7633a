"""The one training loop: every method, every schedule, checkpoints, resume, logs and DDP.

A method only computes one step's loss (``mixacm.methods``); this loop owns the rest:

* data: the training split minus a class-balanced holdout (``dataset.holdout``, taken first so
  it does not depend on the fraction), then a class-balanced ``dataset.fraction`` of the rest;
  the order of each epoch is a function of (seed, epoch) (``mixacm.data.make_train_loader``);
* SGD over the model's and the method's extra parameters (MixACM's transformations), with the
  learning rate set every optimiser step by ``LRSchedule`` (step / cosine / cyclic / constant,
  optional linear warmup);
* Free-AT's replays: each minibatch is stepped ``method.replays`` times, ``after_backward``
  after each backward;
* optional autocast (bf16, or fp16 with a GradScaler) and channels_last;
* every epoch: one JSON line in ``metrics.jsonl`` and ``state.pt`` written atomically (model,
  extra modules, method state, optimiser, scheduler, RNG states, config hash, best-so-far);
  a run restarted on the same ``out_dir`` resumes from it and, on the CPU, ends with exactly the
  weights of an uninterrupted run;
* a NaN or inf loss raises ``TrainingDiverged`` before the step is taken and before anything is
  written, so the last good checkpoint stays as it was;
* at the end ``model.pt`` (model-file format; the selected epoch: the last one, or the best
  PGD-10 accuracy on the holdout) and ``train_summary.json``.

Distributed runs (torchrun / srun) go through ``mixacm.distributed``: rank 0 writes every file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mixacm import distributed as ddp
from mixacm.checkpoint import load_model_file, model_spec, save_model_file
from mixacm.config import ConfigError, load_run_config, method_class, method_knobs, resolve_recipe, run_config_hash
from mixacm.data import balanced_subset, dataset_labels, dataset_source, holdout_split, load_dataset, make_train_loader
from mixacm.models import build_model
from mixacm.provenance import provenance
from mixacm.utils import atomic_json_dump, atomic_torch_save, atomic_write, rng_state, seed_everything, set_rng_state, sha256_file

log = logging.getLogger("mixacm.train")

STATE_FORMAT = "mixacm-train-state"
STATE_VERSION = 1
SELECTION_ATTACK = "pgd10"  # PGD-10, step eps/4, random start: Rice et al.'s early stopping
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; nothing of the failing epoch was written."""


class ResumeError(RuntimeError):
    """``state.pt`` in the output folder belongs to another run (or is not a training state)."""


# ----------------------------------------------------------------------------- schedule


class LRSchedule:
    """Learning-rate factor of optimiser step ``t`` (0-based) out of ``total`` steps.

    * ``step``: ``gamma ** (number of milestones reached)``, milestone ``m`` reached at step
      ``round(m * total)``; with milestones on epoch boundaries this is MultiStepLR;
    * ``cosine``: ``(1 + cos(pi * t / total)) / 2``;
    * ``cyclic``: one triangle from 0 up to 1 at 2/5 of training and back to 0 at the end,
      evaluated at ``t + 1`` so the first step already moves (Fast-AT, Wong et al. 2020);
    * ``constant``: 1.
    A linear warmup over ``warmup_steps`` multiplies the factor by ``min(1, (t + 1) / warmup)``.
    A callable object, so ``LambdaLR`` checkpoints it with the scheduler.
    """

    PEAK = 0.4

    def __init__(self, schedule: str, total: int, milestones: list[float] = (), gamma: float = 0.1,
                 warmup_steps: int = 0) -> None:
        if schedule not in ("step", "cosine", "cyclic", "constant"):
            raise ConfigError(f"optim.schedule: unknown schedule {schedule!r}; valid: step, cosine, cyclic, constant")
        self.schedule, self.total, self.gamma = schedule, max(1, int(total)), float(gamma)
        self.milestone_steps = sorted(round(float(m) * self.total) for m in milestones)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, t: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(t >= m for m in self.milestone_steps)
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(t, self.total) / self.total))
        elif self.schedule == "cyclic":
            factor = float(np.interp((t + 1) / self.total, [0.0, self.PEAK, 1.0], [0.0, 1.0, 0.0]))
        else:
            factor = 1.0
        if self.warmup_steps > 0:
            factor *= min(1.0, (t + 1) / self.warmup_steps)
        return factor


def make_schedule(recipe: Mapping[str, Any], steps_per_epoch: int) -> LRSchedule:
    """The schedule of a resolved recipe for ``steps_per_epoch`` optimiser steps an epoch."""
    return LRSchedule(
        recipe["schedule"], recipe["epochs"] * steps_per_epoch, recipe.get("milestones", []),
        recipe.get("gamma", 0.1), round(recipe.get("warmup_epochs", 0) * steps_per_epoch),
    )


# ----------------------------------------------------------------------------- data


def build_datasets(cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(train_set, holdout or None, full training split)`` as the config describes.

    The holdout is drawn first (class-balanced, ``subset_seed``) and scored without
    augmentation; the fraction subset is then drawn from the rest, so every fraction of the
    less-data curve is selected on the same holdout.
    """
    d = cfg["dataset"]
    kw = {"root": d["root"], "download": d["download"], "cache": d["cache"]}
    full = load_dataset(d["name"], "train", augment=d["augment"], **kw)
    labels = dataset_labels(full)
    idx = np.arange(len(labels))
    holdout = None
    if d["holdout"] > 0:
        try:
            idx, held = holdout_split(labels, d["holdout"], d["subset_seed"])
        except ValueError as err:
            raise ConfigError(f"dataset.holdout: {err}") from None
        plain = load_dataset(d["name"], "train", augment=False, **kw) if d["augment"] else full
        holdout = Subset(plain, held.tolist())
    if d["fraction"] < 1.0:
        idx = idx[balanced_subset(labels[idx], d["fraction"], d["subset_seed"])]
    train_set = full if len(idx) == len(labels) else Subset(full, idx.tolist())
    return train_set, holdout, full


# ----------------------------------------------------------------------------- the loop


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


class NonFiniteLoss(ArithmeticError):
    """Raised by ``training_step`` (on every rank) before a NaN/inf loss is back-propagated."""

    def __init__(self, value: float, metrics: Mapping[str, float]) -> None:
        super().__init__(f"loss is {value}")
        self.value, self.metrics = value, dict(metrics)


_SINGLE = ddp.DistContext()


def training_step(method: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
                  y: torch.Tensor, *, amp: str = "none", extra_params: list[torch.Tensor] = (),
                  ctx: ddp.DistContext = _SINGLE) -> tuple[float, dict[str, float]]:
    """One optimiser step of ``method`` on ``(x, y)``; returns the loss value and its metrics.

    The loss is checked before the backward pass (across ranks, so every rank stops together);
    ``after_backward`` runs between backward and step (Free-AT's perturbation update), and the
    gradients of parameters outside DDP (``extra_params``) are averaged across ranks.
    """
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x.device, amp):
        loss, metrics = method.loss(x, y)
    value = float(loss.detach())
    if ddp.any_rank(not math.isfinite(value), ctx):
        raise NonFiniteLoss(value, metrics)
    scaler.scale(loss).backward()
    method.after_backward()
    ddp.all_reduce_grads(extra_params, ctx)
    scaler.step(optimizer)
    scaler.update()
    return value, metrics


def _load_state(path: Path, cfg_hash: str) -> dict:
    try:
        # Our own file, holding RNG states (numpy arrays, Python tuples): not weights-only data.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ResumeError(f"{path}: cannot read the training state ({err}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{path} is not a mixacm training state; delete it or use another out_dir")
    if state["config_hash"] != cfg_hash:
        raise ResumeError(
            f"{path} was written by a run with config hash {state['config_hash']}, but this config "
            f"hashes to {cfg_hash}: resuming would mix two runs. Use another out_dir, or delete "
            f"{path.name} to start this config from scratch"
        )
    return state


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _write_metrics(path: Path, history: list[dict]) -> None:
    # Rewritten whole from the checkpoint's history, so the log always matches state.pt
    # (no duplicated or missing lines after a kill between the two writes).
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in history)))


def _score_holdout(model: nn.Module, holdout: Dataset, cfg: Mapping[str, Any], device: torch.device) -> dict:
    from mixacm.evaluate import evaluate  # the selection is an ordinary (non-resumable) evaluation

    t = cfg["train"]
    res = evaluate(model, holdout, ["clean", SELECTION_ATTACK], t["selection_eps"], n=min(t["selection_n"], len(holdout)),
                   batch_size=256, seed=cfg["seed"], device=device, state_path=None, progress=False)
    return {"holdout_clean_pct": res["metrics"]["clean"]["accuracy_pct"],
            "holdout_pgd_pct": res["metrics"][SELECTION_ATTACK]["accuracy_pct"],
            "holdout_n": res["n"]}


def train(cfg: Mapping[str, Any], out_dir: str | Path, *, stop_after_steps: int | None = None) -> dict:
    """Train one run; return the training summary (also written to ``out_dir/train_summary.json``).

    ``cfg`` is a run config (a dict or a YAML path; validated and completed here). A
    ``state.pt`` already in ``out_dir`` is resumed from when its config hash matches.
    ``stop_after_steps`` stops after that many optimiser steps of this call without writing
    anything (as a kill would); the returned dict then has ``"completed": False``.
    """
    cfg = load_run_config(cfg)
    out = Path(out_dir)
    ctx = ddp.init_from_env(cfg["device"])
    try:
        return _train(cfg, out, ctx, stop_after_steps)
    finally:
        ddp.shutdown(ctx)


def _train(cfg: dict, out: Path, ctx: ddp.DistContext, stop_after_steps: int | None) -> dict:
    device, tcfg = ctx.device, cfg["train"]
    cfg_hash = run_config_hash(cfg)
    state_path = out / "state.pt"
    # No folder is made up front: the first atomic write creates it, so a run that fails while
    # setting up (missing data or teacher, bad knob) leaves nothing behind.
    state = _load_state(state_path, cfg_hash) if state_path.is_file() else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_everything(cfg["seed"])  # identical on every rank: same init, same random draws
    train_set, holdout, full = build_datasets(cfg)
    num_classes = full.num_classes
    spec = model_spec(cfg["model"]["name"], num_classes, **cfg["model"]["kwargs"])
    try:
        model = build_model(spec["name"], spec["num_classes"], **spec["kwargs"]).to(device)
    except TypeError as err:  # an unknown or missing keyword of the model's builder
        raise ConfigError(f"model.kwargs: {spec['name']}: {err}") from None
    memory_format = torch.channels_last if tcfg["channels_last"] else torch.preserve_format
    model = model.to(memory_format=memory_format)
    if state is not None:
        model.load_state_dict(state["model"])
    teacher = None
    cls = method_class(cfg)
    if cls.needs_teacher:
        teacher, _ = load_model_file(cfg["teacher"], device=device)
        teacher = teacher.to(memory_format=memory_format).eval().requires_grad_(False)
    net = ddp.wrap_model(model, ctx)
    try:
        method = cls(net, teacher=teacher, **method_knobs(cfg))
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    extra = method.extra_modules().to(device)
    if state is not None:
        extra.load_state_dict(state["extra"])
        method.load_state_dict(state["method"])
    ddp.broadcast_module(extra, ctx)
    recipe = resolve_recipe(cfg, method)

    world = ctx.world_size
    if recipe["batch_size"] % world:
        raise ConfigError(f"optim.batch_size: {recipe['batch_size']} does not split evenly over {world} processes")
    local_bs = recipe["batch_size"] // world
    try:
        n_batches = len(make_train_loader(train_set, local_bs, cfg["seed"], 0, rank=ctx.rank, world_size=world))
    except ValueError as err:
        raise ConfigError(f"optim.batch_size: {err}") from None
    steps_per_epoch = min(n_batches, tcfg["max_steps_per_epoch"] or n_batches)
    replays = int(getattr(method, "replays", 1))
    schedule = make_schedule(recipe, steps_per_epoch * replays)

    extra_params = list(extra.parameters())
    optimizer = torch.optim.SGD(
        [*model.parameters(), *extra_params], lr=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"], nesterov=recipe["nesterov"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg["amp"] == "fp16")

    epoch, global_step, history, best = 0, 0, [], None
    totals = {"train_time_s": 0.0, "wall_time_s": 0.0, "images": 0}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, global_step, history, best = state["epoch"], state["global_step"], state["history"], state["best"]
        totals = state["totals"]
        set_rng_state(state["rng"])
        if ctx.is_main:
            _write_metrics(out / "metrics.jsonl", history)
            log.info("resuming %s from epoch %d (step %d)", cfg["name"], epoch, global_step)
    resumed_from = epoch
    del state

    show = tcfg["progress"] and ctx.is_main
    steps_this_call = 0
    while epoch < recipe["epochs"]:
        t_epoch = time.perf_counter()
        method.begin_epoch(epoch, recipe["epochs"])
        loader = make_train_loader(train_set, local_bs, cfg["seed"], epoch, rank=ctx.rank, world_size=world,
                                   num_workers=tcfg["num_workers"], pin_memory=device.type == "cuda")
        net.train()
        sums: dict[str, float] = defaultdict(float)
        n_steps = images = 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{recipe['epochs']}", unit="batch",
                   disable=not show, leave=False)
        t_loop = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            for _ in range(replays):
                try:
                    value, metrics = training_step(method, optimizer, scaler, x, y, amp=tcfg["amp"],
                                                   extra_params=extra_params, ctx=ctx)
                except NonFiniteLoss as bad:
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in bad.metrics.items())
                    raise TrainingDiverged(
                        f"{cfg['name']}: loss is {bad.value} at epoch {epoch + 1}, step {i + 1} of the epoch "
                        f"(optimiser step {global_step + 1}); loss terms: {terms or 'none reported'}. "
                        f"Nothing of this epoch was written; {state_path} holds the last good epoch ({epoch})"
                    ) from None
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                global_step += 1
                steps_this_call += 1
                n_steps += 1
                sums["loss"] += value
                for k, v in metrics.items():
                    if k != "loss":
                        sums[k] += float(v)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    bar.close()
                    return {"completed": False, "epoch": epoch, "global_step": global_step}
            images += len(x)
            bar.update(1)
            if show and i % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
        bar.close()
        train_time = time.perf_counter() - t_loop

        # Averages over every step of every rank (all ranks report the same keys).
        keys = sorted(sums)
        packed = ddp.all_reduce_sum(torch.tensor([n_steps, images] + [sums[k] for k in keys], dtype=torch.float64,
                                                 device=device), ctx).tolist()
        total_steps, total_images = packed[0], int(packed[1])
        line = {"epoch": epoch + 1, "step": global_step, "lr": lr,
                **{k: v / max(total_steps, 1) for k, v in zip(keys, packed[2:])},
                "images_per_s": total_images / train_time if train_time > 0 else None,
                "train_time_s": train_time}
        if holdout is not None and tcfg["selection"] == "best_pgd" and ctx.is_main:
            line.update(_score_holdout(ddp.unwrap(net), holdout, cfg, device))
            if best is None or line["holdout_pgd_pct"] > best["holdout_pgd_pct"]:
                best = {"epoch": epoch + 1, "holdout_pgd_pct": line["holdout_pgd_pct"],
                        "holdout_clean_pct": line["holdout_clean_pct"], "model": _cpu_copy(model)}
        epoch += 1
        totals["train_time_s"] += train_time
        totals["images"] += total_images
        totals["wall_time_s"] += time.perf_counter() - t_epoch
        line["wall_time_s"] = totals["wall_time_s"]
        history.append(line)
        if ctx.is_main:
            atomic_torch_save({
                "format": STATE_FORMAT, "version": STATE_VERSION, "config_hash": cfg_hash, "name": cfg["name"],
                "epoch": epoch, "global_step": global_step, "model": _cpu_copy(model), "extra": _cpu_copy(extra),
                "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "history": history, "best": best, "totals": totals,
            }, state_path)
            _write_metrics(out / "metrics.jsonl", history)
            msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items())
            (tqdm.write if show else log.info)(msg)
        ddp.barrier(ctx)

    summary = _finish(cfg, out, ctx, model, spec, method, recipe, cfg_hash, history, best, totals, resumed_from,
                      global_step, dataset_source(full))
    ddp.barrier(ctx)
    return summary


def _finish(cfg, out, ctx, model, spec, method, recipe, cfg_hash, history, best, totals, resumed_from,
            global_step, source) -> dict:
    tcfg = cfg["train"]
    if tcfg["selection"] == "best_pgd" and best is not None:
        model.load_state_dict(best["model"])
        selection = {"mode": "best_pgd", "epoch": best["epoch"], "holdout_pgd_pct": best["holdout_pgd_pct"],
                     "holdout_clean_pct": best["holdout_clean_pct"], "eps": tcfg["selection_eps"],
                     "attack": SELECTION_ATTACK, "n": history[-1].get("holdout_n")}
    else:
        selection = {"mode": "last", "epoch": len(history)}
    knobs = method.resolved_knobs() if hasattr(method, "resolved_knobs") else method_knobs(cfg)
    prov = provenance(ctx.device)
    d = cfg["dataset"]
    summary = {
        "name": cfg["name"], "config_hash": cfg_hash, "completed": True,
        "method": cfg["method"]["name"], "knobs": knobs, "recipe": recipe,
        "model": spec, "teacher": cfg["teacher"], "seed": cfg["seed"],
        "dataset": {"name": d["name"], "fraction": d["fraction"], "subset_seed": d["subset_seed"],
                    "holdout": d["holdout"], "augment": d["augment"], "source": source},
        "epochs": len(history), "steps": global_step, "resumed_from_epoch": resumed_from,
        "images": totals["images"], "train_time_s": totals["train_time_s"], "wall_time_s": totals["wall_time_s"],
        "images_per_s": totals["images"] / totals["train_time_s"] if totals["train_time_s"] > 0 else None,
        "device": str(ctx.device), "world_size": ctx.world_size,
        "device_hours": totals["wall_time_s"] * ctx.world_size / 3600.0,
        "amp": tcfg["amp"], "channels_last": tcfg["channels_last"],
        "selection": selection, "provenance": prov,
    }
    if ctx.is_main:
        meta = {k: summary[k] for k in ("name", "config_hash", "method", "knobs", "recipe", "seed", "dataset",
                                        "teacher", "selection")}
        if cfg["teacher"]:
            meta["teacher_sha256"] = sha256_file(cfg["teacher"])
        save_model_file(model, spec, out / "model.pt", {**meta, "provenance": prov})
        atomic_json_dump(summary, out / "train_summary.json")
    return summary
