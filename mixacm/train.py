"""The one training loop: every method, every schedule, checkpoints, resume, logs and DDP.

A method only computes one step's loss (``mixacm.methods``); this loop owns the rest:

* data: the training split minus a class-balanced holdout (``dataset.holdout``, taken first so
  it does not depend on the fraction), then a class-balanced ``dataset.fraction`` of the rest;
  the loader is built once (``mixacm.loader.make_train_loader``: cached images batched and
  augmented on the device, image folders decoded by worker processes) and each epoch's batches
  are a function of (seed, epoch, rank);
* SGD over the model's and the method's extra parameters (MixACM's transformations), with the
  learning rate set every optimiser step by one of torch's schedulers (``make_lr_scheduler``:
  MultiStepLR / CosineAnnealingLR / CyclicLR / ConstantLR, optional LinearLR warmup);
* Free-AT's replays: each minibatch is stepped ``method.replays`` times, ``after_backward``
  after each backward;
* optional autocast (bf16, or fp16 with a GradScaler) and channels_last; the training attacks
  follow a bf16 autocast unless ``train.attack_precision: fp32`` (``mixacm.attacks.attack_autocast``);
* every epoch: one JSON line in ``metrics.jsonl`` and ``state.pt`` written atomically (model,
  extra modules, method state, optimiser, scheduler, RNG states, config hash, best-so-far);
  a run restarted on the same ``out_dir`` resumes from it and, on the CPU, ends with exactly the
  weights of an uninterrupted run. The two files are written on a background thread from a CPU
  copy taken at the end of the epoch, so the next epoch does not wait for the disk; each write
  waits for the previous one, and the run waits for the last before it ends (or fails);
* a step reads nothing back to the host: its loss and metrics are summed on the device
  (``StepMeter``) and read once every ``train.log_every`` optimiser steps and at the end of the
  epoch; a NaN or inf loss raises ``TrainingDiverged`` at that read, before anything is written,
  so the last good checkpoint stays as it was (``mixacm.hostreads`` counts reads in the tests);
* at the end ``model.pt`` (model-file format; the selected epoch: the last one, or the best
  PGD-10 accuracy on the holdout) and ``train_summary.json``; with a holdout and ``last``
  selection, the last epoch is scored on the holdout (a holdout search of the main protocol);
* ``optim.steps`` (instead of ``epochs``): a budget in optimiser steps, turned into epochs of
  this run's training set (a less-data run then takes the full-data run's steps).

Distributed runs (torchrun / srun) go through ``mixacm.distributed``: rank 0 writes every file.

The parts, each on a screen: ``setup`` builds a ``Run`` (data, model, method, optimiser,
scheduler); ``TrainState`` is the progress that ``state.pt`` saves and ``restore`` reloads;
``train_epoch`` runs one epoch; ``score_epoch`` / ``select_model`` do checkpoint selection;
``_train`` strings them together and ``_finish`` writes the model file and the summary.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mixacm import distributed as ddp
from mixacm.checkpoint import load_model_file, model_spec, save_model_file
from mixacm.config import (ConfigError, load_run_config, method_class, method_knobs, recipe_record, resolve_recipe,
                           run_config_hash)
from mixacm.data import balanced_subset, dataset_labels, dataset_source, holdout_split, load_dataset
from mixacm.loader import TrainLoader, make_train_loader
from mixacm.models import build_model
from mixacm.attacks import attack_precision, resolve_attack_precision
from mixacm.provenance import compute_precision, provenance
from mixacm.utils import (BackgroundWriter, atomic_json_dump, atomic_torch_save, atomic_write, cpu_snapshot,
                          remove_stale_temporaries, rng_state, seed_everything, set_rng_state, sha256_file)

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

SCHEDULES = ("step", "cosine", "cyclic", "piecewise", "constant")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, recipe: Mapping[str, Any],
                      steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's scheduler for a resolved recipe, stepped once per optimiser step.

    ``T = epochs * steps_per_epoch`` optimiser steps; the recipe's ``lr`` is the peak.

    * ``step``: ``MultiStepLR``, lr times ``gamma`` at optimiser step ``round(m * T)`` for each
      milestone fraction ``m`` (milestones on epoch boundaries drop at the first step of that epoch);
    * ``cosine``: ``CosineAnnealingLR`` from lr to 0 over ``T`` steps;
    * ``cyclic``: ``CyclicLR``, one triangle 0 -> lr -> 0 peaking at ``lr_peak`` of training and
      stepped after every batch as in Fast-AT's official CIFAR-10 code (Wong et al. 2020: peak 0.5,
      so step 0 trains at lr 0);
    * ``piecewise``: ``LambdaLR`` linear between ``lr_points`` ([fraction of training, factor]),
      evaluated at ``t + 1`` as Fast-AT's ImageNet code does (``epoch + (i + 1) / len``); torch has
      no piecewise-linear scheduler, so the factor is a small picklable callable;
    * ``constant``: ``ConstantLR`` with factor 1.
    ``warmup_epochs`` chains a ``LinearLR`` from lr / W up to lr over the first ``W`` steps
    (factor ``min(1, (t + 1) / W)``, multiplied into the schedule).
    """
    schedule = recipe["schedule"]
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    sched = torch.optim.lr_scheduler
    total = max(1, int(recipe["epochs"] * steps_per_epoch))
    milestones = sorted(float(m) for m in recipe.get("milestones", []))
    if schedule == "step":
        main = sched.MultiStepLR(optimizer, [round(m * total) for m in milestones], gamma=recipe.get("gamma", 0.1))
    elif schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    elif schedule == "cyclic":
        up = max(1.0, float(recipe.get("lr_peak", 0.5)) * total)
        main = sched.CyclicLR(optimizer, base_lr=0.0, max_lr=recipe["lr"], step_size_up=up,
                              step_size_down=max(1.0, total - up), cycle_momentum=False)
    elif schedule == "piecewise":
        main = sched.LambdaLR(optimizer, PiecewiseLinear(recipe["lr_points"], total))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    warmup = round(recipe.get("warmup_epochs", 0) * steps_per_epoch)
    if warmup <= 1:
        return main
    if schedule == "cyclic":
        raise ConfigError("optim.warmup_epochs: the cyclic schedule already starts from 0; drop the warmup")
    # LinearLR's factor at step t is start + (1 - start) * t / (W - 1) = (t + 1) / W for t < W.
    ramp = sched.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.ChainedScheduler([main, ramp], optimizer)


class PiecewiseLinear:
    """lr factor of optimiser step ``t``: linear between ``points`` ([fraction of training,
    factor], fractions from 0 to 1), evaluated at ``(t + 1) / total``. A callable object rather
    than a lambda, so ``LambdaLR.state_dict`` stores it and resume continues it."""

    def __init__(self, points: list[list[float]], total: int) -> None:
        self.xs = [float(f) for f, _ in points]
        self.ys = [float(v) for _, v in points]
        self.total = int(total)

    def __call__(self, t: int) -> float:
        return float(np.interp((t + 1) / self.total, self.xs, self.ys))


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


def _autocast(device: torch.device, amp: str, cache: bool = True):
    """The step's autocast; ``cache=False`` recasts the weights at every use (CUDA graphs need it:
    a cached cast would be captured once and go stale after the first optimiser step)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp], cache_enabled=cache)


_SINGLE = ddp.DistContext()


def training_step(method: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
                  y: torch.Tensor, *, amp: str = "none", extra_params: list[torch.Tensor] = (),
                  ctx: ddp.DistContext = _SINGLE) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimiser step of ``method`` on ``(x, y)``; returns the detached loss and the method's
    metrics (device tensors or Python numbers), without reading anything back to the host.

    ``after_backward`` runs between backward and step (Free-AT's perturbation update), and the
    gradients of parameters outside DDP (``extra_params``) are averaged across ranks. A NaN or
    inf loss is not checked here (that would stall the device every step): ``StepMeter`` notes
    it on the device and the loop raises ``TrainingDiverged`` at its next read, before anything
    is written. (A ``GradScaler`` for fp16 reads its inf check back itself; bf16 needs none.)
    """
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x.device, amp, cache=getattr(method, "graphs", None) is None):
        loss, metrics = method.loss(x, y)
    scaler.scale(loss).backward()
    method.after_backward()
    ddp.all_reduce_grads(extra_params, ctx)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), metrics


class StepMeter:
    """Sums of the per-step metrics of a method, kept on the device between host reads.

    ``add`` (every optimiser step) stacks the loss and the metrics (tensors, or Python numbers
    such as FAT's epoch-level tau, filled in on the device) into one vector and adds it to a
    float64 sum on the device; it also keeps the metrics of the first step whose loss is not
    finite. ``read`` (once per logging interval, and at the end of the epoch) sums over DDP
    ranks and reads everything back in one transfer. A method reports the same metric names at
    every step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.keys: list[str] | None = None  # "loss" first, then the metrics' names sorted
        self.sums: torch.Tensor | None = None
        self.bad_at: torch.Tensor | None = None  # 1-based step of this meter's first bad loss; 0 = none
        self.bad_vals: torch.Tensor | None = None
        self.steps = 0

    def _value(self, v: Any) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.detach().reshape(()).double()
        return torch.full((), float(v), dtype=torch.float64, device=self.device)  # no transfer: a fill

    def add(self, loss: torch.Tensor, metrics: Mapping[str, Any]) -> None:
        names = sorted(k for k in metrics if k != "loss")
        if self.keys is None:
            self.keys = ["loss", *names]
            self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
            self.bad_at = torch.zeros((), dtype=torch.int64, device=self.device)
            self.bad_vals = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        elif names != self.keys[1:]:
            raise ValueError(f"metric names changed between steps: {self.keys[1:]} -> {names}")
        self.steps += 1
        vec = torch.stack([self._value(loss), *(self._value(metrics[k]) for k in names)])
        self.sums += vec
        first = ~torch.isfinite(vec[0]) & (self.bad_at == 0)
        self.bad_at = torch.where(first, self.steps, self.bad_at)
        self.bad_vals = torch.where(first, vec, self.bad_vals)

    def read(self, ctx: ddp.DistContext) -> dict[str, Any]:
        """One host read, then reset: ``{"steps", "sums", "any_bad"}`` summed over ranks, and
        this rank's first non-finite step ``bad_at`` with its metrics ``bad`` when it had one."""
        if self.keys is None:
            return {"steps": 0, "sums": {}, "any_bad": False}
        counts = torch.stack([torch.full((), float(self.steps), dtype=torch.float64, device=self.device),
                              (self.bad_at > 0).double()])
        packed = ddp.all_reduce_sum(torch.cat([self.sums, counts]), ctx)
        values = torch.cat([packed, self.bad_at.double().reshape(1), self.bad_vals]).tolist()  # the one read
        n = len(self.keys)
        out = {"steps": int(values[n]), "any_bad": values[n + 1] > 0, "sums": dict(zip(self.keys, values[:n]))}
        if values[n + 2] > 0:
            out["bad_at"] = int(values[n + 2])
            out["bad"] = dict(zip(self.keys, values[n + 3:]))
        self._reset()
        return out


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _write_metrics(path: Path, history: list[dict]) -> None:
    # Rewritten whole from the checkpoint's history, so the log always matches state.pt
    # (no duplicated or missing lines after a kill between the two writes).
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in history)))


# ----------------------------------------------------------------------------- the run's parts


@dataclass
class Run:
    """Everything one training run acts on, built once by ``setup`` (fresh, or from a state)."""

    cfg: dict
    cfg_hash: str
    ctx: ddp.DistContext
    out: Path
    train_set: Dataset
    holdout: Dataset | None
    source: str  # the dataset's provenance label
    spec: dict  # the model file's architecture entry
    model: nn.Module  # the bare model (``net`` is its DDP wrapper, or the model itself)
    net: nn.Module
    method: Any
    extra: nn.ModuleDict
    recipe: dict
    local_batch_size: int
    loader: TrainLoader  # this rank's batches, on the device; ``set_epoch`` before each epoch
    steps_per_epoch: int  # minibatches an epoch (each replayed ``method.replays`` times)
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    @property
    def replays(self) -> int:
        return int(getattr(self.method, "replays", 1))

    @property
    def extra_params(self) -> list[torch.Tensor]:
        return list(self.extra.parameters())


def setup(cfg: dict, out: Path, ctx: ddp.DistContext, state: Mapping[str, Any] | None = None) -> Run:
    """Data, model, teacher, method, optimiser and LR scheduler of a run.

    With a training ``state`` (``TrainState.read``), the model, the method's extra modules and
    its own state are loaded before the model is wrapped for DDP; the optimiser, scheduler,
    scaler and RNG are ``TrainState.restore``'s job. Random draws happen in the same order with or
    without a state, so a fresh run is a function of the seed alone.
    """
    device, tcfg = ctx.device, cfg["train"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg["seed"])  # identical on every rank: same init, same random draws
    train_set, holdout, full = build_datasets(cfg)
    spec = model_spec(cfg["model"]["name"], full.num_classes, **cfg["model"]["kwargs"])
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
        method = cls(net, teacher=teacher, dataset=cfg["dataset"]["name"], **method_knobs(cfg))
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    if graphs_wanted(tcfg["cuda_graphs"], device, ctx.world_size):
        use_cuda_graphs(method, ctx)
    extra = method.extra_modules().to(device)
    if state is not None:
        extra.load_state_dict(state["extra"])
        method.load_state_dict(state["method"])
    ddp.broadcast_module(extra, ctx)
    recipe = resolve_recipe(cfg, method)
    # The method sees the recipe as run (optim overrides included; Free-AT records its budget).
    method.recipe = {**getattr(method, "recipe", {}), **recipe}

    world = ctx.world_size
    if recipe["batch_size"] % world:
        raise ConfigError(f"optim.batch_size: {recipe['batch_size']} does not split evenly over {world} processes")
    local_bs = recipe["batch_size"] // world
    workers = max(0, ctx.cpus - 1) if tcfg["num_workers"] == "auto" else tcfg["num_workers"]
    try:
        loader = make_train_loader(train_set, local_bs, cfg["seed"], rank=ctx.rank, world_size=world, device=device,
                                   num_workers=workers)
    except ValueError as err:
        raise ConfigError(f"optim.batch_size: {err}") from None
    except TypeError as err:  # an augmentation the device loader has no batched version of
        raise ConfigError(f"dataset.augment: {err}") from None
    steps_per_epoch = min(len(loader), tcfg["max_steps_per_epoch"] or len(loader))
    if recipe.get("steps"):  # a budget in steps: as many epochs of this training set as that takes
        recipe["epochs"] = max(1, round(recipe["steps"] / steps_per_epoch))
        method.recipe["epochs"] = recipe["epochs"]
    optimizer = torch.optim.SGD(
        sgd_param_groups([model, extra], recipe["weight_decay_exempt"]), lr=recipe["lr"],
        momentum=recipe["momentum"], weight_decay=recipe["weight_decay"], nesterov=recipe["nesterov"],
    )
    replays = int(getattr(method, "replays", 1))
    scheduler = make_lr_scheduler(optimizer, recipe, steps_per_epoch * replays)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg["amp"] == "fp16")
    return Run(cfg=cfg, cfg_hash=run_config_hash(cfg), ctx=ctx, out=out, train_set=train_set, holdout=holdout,
               source=dataset_source(full), spec=spec, model=model, net=net, method=method, extra=extra,
               recipe=recipe, local_batch_size=local_bs, loader=loader, steps_per_epoch=steps_per_epoch,
               memory_format=memory_format, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def graphs_wanted(setting: bool | str, device: torch.device, world_size: int) -> bool:
    """Whether a run with ``train.cuda_graphs: setting`` uses CUDA graphs: always for ``true``
    (``use_cuda_graphs`` then refuses a CPU or a DDP run), for ``auto`` on one CUDA process."""
    return setting is True or (setting == "auto" and device.type == "cuda" and world_size == 1)


def use_cuda_graphs(method: Any, ctx: ddp.DistContext) -> None:
    """``train.cuda_graphs``: the method's network calls replayed from CUDA graphs
    (``mixacm.graphs``). ConfigError off CUDA, under DDP, or for a method without support."""
    if ctx.device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs: needs a CUDA device, this run is on {ctx.device}")
    if ctx.world_size > 1:
        raise ConfigError(f"train.cuda_graphs: one process only (DDP's gradient hooks are not captured); "
                          f"this run has {ctx.world_size}")
    try:
        method.use_cuda_graphs()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def sgd_param_groups(modules: list[nn.Module], exempt: list[str]) -> list[dict]:
    """The parameters of ``modules`` as SGD parameter groups: one group when ``exempt`` is empty
    (everything decays, PyTorch's ``SGD(model.parameters())``), else the decayed parameters and a
    group with ``weight_decay`` 0 holding those ``exempt`` names: ``"batchnorm"`` (parameters of
    BatchNorm layers, as Fast-AT's ImageNet code groups them by module type) and ``"bias"``
    (every parameter named ``bias``; with ``batchnorm`` this is the TensorFlow codes' decay of
    convolution and linear kernels only)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            batchnorm = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            for name, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                skip = ("batchnorm" in exempt and batchnorm) or ("bias" in exempt and name == "bias")
                (no_decay if skip else decay).append(p)
    if not exempt:
        return [{"params": decay}]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# ----------------------------------------------------------------------------- training state


def _new_totals() -> dict:
    return {"train_time_s": 0.0, "train_cpu_time_s": 0.0, "wall_time_s": 0.0, "images": 0}


@dataclass
class TrainState:
    """A run's progress: with the run's weights, optimiser, scheduler, scaler and RNG states it is
    ``state.pt``, written atomically after every epoch and read back to resume."""

    epoch: int = 0  # epochs done
    global_step: int = 0  # optimiser steps done
    history: list[dict] = field(default_factory=list)  # one metrics line an epoch
    best: dict | None = None  # the best holdout epoch so far (best_pgd selection), with its weights
    totals: dict = field(default_factory=_new_totals)
    resumed_from: int = 0  # the epoch this process started from
    _writer: BackgroundWriter | None = field(default=None, repr=False, compare=False)  # rank 0's file writes

    @staticmethod
    def read(path: Path, cfg_hash: str) -> dict:
        """The raw state in ``path``; refuses a file of another run or another format."""
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

    @classmethod
    def restore(cls, run: Run, state: Mapping[str, Any]) -> "TrainState":
        """Load the optimiser, scheduler, scaler and RNG of ``state`` into ``run`` (its modules
        were loaded by ``setup``) and return the progress it records."""
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return cls(epoch=state["epoch"], global_step=state["global_step"], history=state["history"],
                   best=state["best"], totals=state["totals"], resumed_from=state["epoch"])

    def save(self, run: Run) -> None:
        """Write ``state.pt`` and ``metrics.jsonl`` (rank 0 only), each replaced atomically, on a
        background thread from a CPU copy of everything taken now: the next epoch trains while
        they are written. Waits first for the previous epoch's write (and re-raises its error).
        A process killed mid-write leaves the previous ``state.pt`` (the rename is atomic), and
        the temporary file it leaves is removed by the next run's first save."""
        if not run.ctx.is_main:
            return
        if self._writer is None:
            remove_stale_temporaries(run.state_path)
            remove_stale_temporaries(run.out / "metrics.jsonl")
            self._writer = BackgroundWriter("mixacm-checkpoint")
        self._writer.wait()  # the previous write is complete before this copy is taken
        snapshot = cpu_snapshot({
            "format": STATE_FORMAT, "version": STATE_VERSION, "config_hash": run.cfg_hash, "name": run.cfg["name"],
            "epoch": self.epoch, "global_step": self.global_step, "model": run.model.state_dict(),
            "extra": run.extra.state_dict(), "method": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "rng": rng_state(),
            "history": self.history, "best": self.best, "totals": self.totals,
        })
        self._writer.submit(_write_state, snapshot, run.state_path, run.out / "metrics.jsonl")

    def finish_writes(self) -> None:
        """Wait for the file writes in flight (re-raising their error); call before the run ends."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def _write_state(snapshot: dict, state_path: Path, metrics_path: Path) -> None:
    atomic_torch_save(snapshot, state_path)
    _write_metrics(metrics_path, snapshot["history"])  # after state.pt: the log never runs ahead of it


# ----------------------------------------------------------------------------- one epoch


class _Stopped(Exception):
    """``stop_after_steps`` was reached (a simulated kill: nothing of the epoch is written)."""


def train_epoch(run: Run, state: TrainState, *, step_budget: int | None = None, show: bool = False) -> dict:
    """One epoch of optimiser steps; advances ``state.global_step`` and returns the epoch's
    metrics line (averages over every step of every rank, and ``share_<term>`` for each weighted
    loss term a method reports: ``term_shares``). The host reads
    the metrics once every ``train.log_every`` optimiser steps and at the end of the epoch.
    Raises ``TrainingDiverged`` on a NaN / inf loss (at that read) and ``_Stopped`` after
    ``step_budget`` steps, both before anything is written.
    """
    cfg, ctx, device, epoch = run.cfg, run.ctx, run.ctx.device, state.epoch
    run.method.begin_epoch(epoch, run.recipe["epochs"])  # per-epoch knobs (AWP warm-up, FAT's tau, ...)
    run.loader.set_epoch(epoch)
    run.net.train()
    meter, log_every = StepMeter(device), cfg["train"]["log_every"]
    totals: dict[str, float] = defaultdict(float)
    n_steps = images = 0
    lr = run.optimizer.param_groups[0]["lr"]
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{run.recipe['epochs']}", unit="batch",
               disable=not show, leave=False)
    step0, t_loop, cpu_loop = state.global_step, time.perf_counter(), time.process_time()
    try:
        for x, y in itertools.islice(run.loader, run.steps_per_epoch):  # batches already on the device
            x = x.contiguous(memory_format=run.memory_format)
            for _ in range(run.replays):
                loss, metrics = training_step(run.method, run.optimizer, run.scaler, x, y, amp=cfg["train"]["amp"],
                                              extra_params=run.extra_params, ctx=ctx)
                meter.add(loss, metrics)
                lr = run.optimizer.param_groups[0]["lr"]
                run.scheduler.step()
                state.global_step += 1
                n_steps += 1
                if n_steps % log_every == 0:
                    _read_meter(run, meter, totals, step0, epoch, bar)
                if step_budget is not None and n_steps >= step_budget:
                    raise _Stopped
            images += len(x)
            bar.update(1)
        _read_meter(run, meter, totals, step0, epoch, bar)  # also waits for the device: the time is real
    finally:
        bar.close()
    train_time, train_cpu_time = time.perf_counter() - t_loop, time.process_time() - cpu_loop
    images_all = images * ctx.world_size  # every rank takes the same number of full batches
    steps_all = max(totals.pop("steps"), 1)
    means = {k: v / steps_all for k, v in totals.items()}
    return {"epoch": epoch + 1, "step": state.global_step, "lr": lr, **means, **term_shares(means),
            "images_per_s": images_all / train_time if train_time > 0 else None,
            "train_time_s": train_time, "train_cpu_time_s": train_cpu_time, "images": images_all}


def term_shares(means: Mapping[str, float]) -> dict[str, float]:
    """``share_<name>`` = |mean of ``term_<name>``| / sum over the terms of |mean term|: each
    weighted loss term's part of the loss, in [0, 1] even where a term is negative (IGAM's
    student maximises its discriminator's loss), so a term of size 1e-6 shows as ~0."""
    terms = {k[len("term_"):]: abs(v) for k, v in means.items() if k.startswith("term_")}
    total = sum(terms.values())
    return {f"share_{k}": v / total for k, v in terms.items()} if total > 0 else {}


def _read_meter(run: Run, meter: StepMeter, totals: dict[str, float], step0: int, epoch: int, bar: tqdm) -> None:
    """Read the meter into the epoch's ``totals``; raise ``TrainingDiverged`` on a bad loss."""
    got = meter.read(run.ctx)
    if got["any_bad"]:
        _diverged(run, got, totals, step0, epoch)
    totals["steps"] += got["steps"]
    for k, v in got["sums"].items():
        totals[k] += v
    if got["steps"]:
        bar.set_postfix(loss=f"{got['sums']['loss'] / got['steps']:.3f}",
                        lr=f"{run.optimizer.param_groups[0]['lr']:.3g}")


def _diverged(run: Run, got: dict, totals: dict[str, float], step0: int, epoch: int) -> None:
    name, state_path = run.cfg["name"], run.state_path
    if "bad_at" not in got:
        raise TrainingDiverged(f"{name}: the loss became NaN or inf on another rank at epoch {epoch + 1}. Nothing of "
                               f"this epoch was written; {state_path} holds the last good epoch ({epoch})")
    step_in_epoch = int(totals.get("steps", 0)) // run.ctx.world_size + got["bad_at"]
    bad = got["bad"]
    terms = ", ".join(f"{k}={v:.4g}" for k, v in bad.items() if k != "loss")
    raise TrainingDiverged(
        f"{name}: loss is {bad['loss']} at epoch {epoch + 1}, step {(step_in_epoch - 1) // run.replays + 1} of the "
        f"epoch (optimiser step {step0 + step_in_epoch}); loss terms: {terms or 'none reported'}. "
        f"Nothing of this epoch was written; {state_path} holds the last good epoch ({epoch})"
    )


# ----------------------------------------------------------------------------- checkpoint selection


def _score_holdout(model: nn.Module, holdout: Dataset, cfg: Mapping[str, Any], device: torch.device) -> dict:
    from mixacm.evaluate import evaluate  # the selection is an ordinary (non-resumable) evaluation

    t = cfg["train"]
    res = evaluate(model, holdout, ["clean", SELECTION_ATTACK], t["selection_eps"], n=min(t["selection_n"], len(holdout)),
                   batch_size=256, seed=cfg["seed"], device=device, state_path=None, progress=False)
    return {"holdout_clean_pct": res["metrics"]["clean"]["accuracy_pct"],
            "holdout_pgd_pct": res["metrics"][SELECTION_ATTACK]["accuracy_pct"],
            "holdout_n": res["n"]}


def score_epoch(run: Run, state: TrainState, line: dict) -> None:
    """Score the holdout (clean and PGD-10 at ``train.selection_eps``) into ``line``: every epoch
    for best_pgd selection, keeping this epoch's weights in ``state.best`` when its PGD-10
    accuracy beats every earlier epoch (ties keep the earlier); with ``last`` selection and a
    holdout, the last epoch only, so a holdout search scores exactly the model its protocol keeps."""
    if run.holdout is None or not run.ctx.is_main:
        return
    best_pgd = run.cfg["train"]["selection"] == "best_pgd"
    if not best_pgd and line["epoch"] < run.recipe["epochs"]:
        return
    line.update(_score_holdout(ddp.unwrap(run.net), run.holdout, run.cfg, run.ctx.device))
    if best_pgd and (state.best is None or line["holdout_pgd_pct"] > state.best["holdout_pgd_pct"]):
        state.best = {"epoch": line["epoch"], "holdout_pgd_pct": line["holdout_pgd_pct"],
                      "holdout_clean_pct": line["holdout_clean_pct"], "model": _cpu_copy(run.model)}


def select_model(run: Run, state: TrainState) -> dict:
    """Load the selected epoch's weights into ``run.model``; return the selection record (with
    the last epoch's holdout scores when ``last`` selection had a holdout to score)."""
    tcfg = run.cfg["train"]
    if tcfg["selection"] == "best_pgd" and state.best is not None:
        best = state.best
        run.model.load_state_dict(best["model"])
        return {"mode": "best_pgd", "epoch": best["epoch"], "holdout_pgd_pct": best["holdout_pgd_pct"],
                "holdout_clean_pct": best["holdout_clean_pct"], "eps": tcfg["selection_eps"],
                "attack": SELECTION_ATTACK, "n": state.history[-1].get("holdout_n")}
    out = {"mode": "last", "epoch": len(state.history)}
    last = state.history[-1] if state.history else {}
    if "holdout_pgd_pct" in last:
        out.update(holdout_pgd_pct=last["holdout_pgd_pct"], holdout_clean_pct=last["holdout_clean_pct"],
                   eps=tcfg["selection_eps"], attack=SELECTION_ATTACK, n=last["holdout_n"])
    return out


# ----------------------------------------------------------------------------- the loop


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
        with attack_precision(cfg["train"]["attack_precision"]):
            return _train(cfg, out, ctx, stop_after_steps)
    finally:
        ddp.shutdown(ctx)


def _train(cfg: dict, out: Path, ctx: ddp.DistContext, stop_after_steps: int | None) -> dict:
    # No folder is made up front: the first atomic write creates it, so a run that fails while
    # setting up (missing data or teacher, bad knob) leaves nothing behind.
    state_path = out / "state.pt"
    saved = TrainState.read(state_path, run_config_hash(cfg)) if state_path.is_file() else None
    run = setup(cfg, out, ctx, saved)
    state = TrainState() if saved is None else TrainState.restore(run, saved)
    del saved
    if state.epoch and ctx.is_main:
        _write_metrics(out / "metrics.jsonl", state.history)
        log.info("resuming %s from epoch %d (step %d)", cfg["name"], state.epoch, state.global_step)

    show = cfg["train"]["progress"] and ctx.is_main
    steps_left = stop_after_steps
    try:
        _epochs(run, state, steps_left, show)
    except _Stopped:
        state.finish_writes()
        return {"completed": False, "epoch": state.epoch, "global_step": state.global_step}
    except BaseException:
        # The last good epoch's write still completes; its own error would hide this one.
        try:
            state.finish_writes()
        except Exception:  # noqa: BLE001 - logged; the error in flight is the one raised
            log.exception("writing the training state failed as well")
        raise
    state.finish_writes()
    summary = _finish(run, state)
    ddp.barrier(ctx)
    return summary


def _epochs(run: Run, state: TrainState, steps_left: int | None, show: bool) -> None:
    """Train the remaining epochs, saving the state after each; ``_Stopped`` at the step budget."""
    ctx = run.ctx
    while state.epoch < run.recipe["epochs"]:
        t_epoch, step0 = time.perf_counter(), state.global_step
        line = train_epoch(run, state, step_budget=steps_left, show=show)
        if steps_left is not None:
            steps_left -= state.global_step - step0
        images = line.pop("images")
        score_epoch(run, state, line)
        state.epoch += 1
        state.totals["train_time_s"] += line["train_time_s"]
        # CPU time of this process in the loop (all its threads): the cost of a CPU run; None
        # after resuming a state written before it was counted
        if state.totals.setdefault("train_cpu_time_s", None) is not None:
            state.totals["train_cpu_time_s"] += line["train_cpu_time_s"]
        state.totals["images"] += images
        state.totals["wall_time_s"] += time.perf_counter() - t_epoch
        line["wall_time_s"] = state.totals["wall_time_s"]
        state.history.append(line)
        state.save(run)
        if ctx.is_main:
            msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items())
            (tqdm.write if show else log.info)(msg)
        ddp.barrier(ctx)


def _precision_record(tcfg: Mapping[str, Any], device: torch.device) -> dict:
    """What the run computed in: the training step (autocast dtype; fp32 convolutions and matrix
    products in TF32 or not, ``mixacm.provenance.compute_precision``) and its attacks."""
    amp = None if tcfg["amp"] == "none" else tcfg["amp"]
    return {**compute_precision(device, amp), "attack_precision": tcfg["attack_precision"],
            "attacks": resolve_attack_precision(tcfg["amp"], tcfg["attack_precision"])}


def _finish(run: Run, state: TrainState) -> dict:
    """Select the model, then write ``model.pt`` and ``train_summary.json`` (rank 0)."""
    cfg, ctx, tcfg, totals = run.cfg, run.ctx, run.cfg["train"], state.totals
    selection = select_model(run, state)
    knobs = run.method.resolved_knobs() if hasattr(run.method, "resolved_knobs") else method_knobs(cfg)
    prov = provenance(ctx.device)
    d = cfg["dataset"]
    summary = {
        "name": cfg["name"], "config_hash": run.cfg_hash, "completed": True,
        "method": cfg["method"]["name"], "knobs": knobs, "recipe": recipe_record(cfg, run.method, run.recipe),
        "method_details": run.method.run_details(),
        "model": run.spec, "teacher": cfg["teacher"], "seed": cfg["seed"],
        "dataset": {"name": d["name"], "fraction": d["fraction"], "subset_seed": d["subset_seed"],
                    "holdout": d["holdout"], "augment": d["augment"], "source": run.source},
        "epochs": len(state.history), "steps": state.global_step, "resumed_from_epoch": state.resumed_from,
        "images": totals["images"], "train_time_s": totals["train_time_s"], "wall_time_s": totals["wall_time_s"],
        "train_cpu_time_s": totals.get("train_cpu_time_s"),
        "images_per_s": totals["images"] / totals["train_time_s"] if totals["train_time_s"] > 0 else None,
        "device": str(ctx.device), "world_size": ctx.world_size,
        "device_hours": totals["wall_time_s"] * ctx.world_size / 3600.0,
        "amp": tcfg["amp"], "channels_last": tcfg["channels_last"], "cuda_graphs": bool(getattr(run.method.graphs, "replays", 0)),
        "precision": _precision_record(tcfg, ctx.device),
        "selection": selection, "provenance": prov,
    }
    if ctx.is_main:
        meta = {k: summary[k] for k in ("name", "config_hash", "method", "knobs", "recipe", "method_details", "seed",
                                        "dataset", "teacher", "selection")}
        if cfg["teacher"]:
            meta["teacher_sha256"] = sha256_file(cfg["teacher"])
        save_model_file(run.model, run.spec, run.out / "model.pt", {**meta, "provenance": prov})
        atomic_json_dump(summary, run.out / "train_summary.json")
    return summary
