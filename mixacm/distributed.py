"""Data-parallel training with ``torch.distributed`` (DDP), launched by torchrun or srun.

``init_from_env`` reads the launcher's environment: torchrun's ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` (with ``MASTER_ADDR``/``MASTER_PORT``), else SLURM's ``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID``. It picks NCCL for CUDA devices and gloo on the CPU. Without
a multi-process launcher it returns a single-process context and nothing else changes.

What stays the same as one process with the global batch ``B``: every rank draws from the same
seeds, reads a disjoint ``B / world_size`` shard of each global batch (``mixacm.data``'s
sampler), and gradients are averaged across ranks, so the averaged gradient of the per-rank mean
losses is the gradient of the mean loss over the global batch. What differs: batch statistics
(BatchNorm normalises per rank, as in torchvision's reference scripts) and per-batch random draws
that depend on the batch (mixup partners are permuted within each rank's shard).

The model is wrapped in ``DistributedDataParallel``; a method's extra trainable modules (MixACM's
transformations) are called by the method directly, not through a DDP wrapper, so their
gradients are averaged by ``all_reduce_grads`` after each backward. The frozen teacher is never
wrapped. Checkpoints, logs and progress bars are rank 0's job (``DistContext.is_main``).

CPU cores: each rank gets ``cpus_per_rank()`` of the cores this job was given on its node
(``DistContext.cpus``: data-loading workers are sized from it), and no more OpenMP threads than
that: torchrun leaves ``OMP_NUM_THREADS`` as the job set it, which would give each of 4 ranks all
of the job's cores.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mixacm.utils import resolve_device


class DistributedError(RuntimeError):
    """A launcher environment that cannot start a process group."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "none"  # none | torchrun | slurm
    owns_group: bool = False  # this process created the group (and destroys it at the end)
    cpus: int = 1  # CPU cores of this rank (cpus_per_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedError(f"environment variable {key}={env[key]!r} is not an integer") from None


# (launcher, rank, world size, local rank) variables, in order of precedence.
_LAUNCHER_VARS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def launcher_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Rank, world size, local rank, master address/port and launcher from the environment.

    torchrun's variables win over SLURM's, so ``srun torchrun ...`` works too.
    """
    env = os.environ if env is None else env
    for launcher, rank, world, local in _LAUNCHER_VARS:
        if rank in env and world in env:
            info = {
                "launcher": launcher,
                "rank": _int_env(env, rank),
                "world_size": _int_env(env, world),
                "local_rank": _int_env(env, local) if local in env else 0,
            }
            break
    else:
        return {"launcher": "none", "rank": 0, "world_size": 1, "local_rank": 0}
    if not 0 <= info["rank"] < info["world_size"]:
        raise DistributedError(f"rank {info['rank']} is outside [0, world size {info['world_size']})")
    if info["world_size"] > 1:
        info["master_addr"], info["master_port"] = _master(env, info["launcher"])
    return info


def _master(env: Mapping[str, str], launcher: str) -> tuple[str, str]:
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if launcher == "slurm" and env.get("SLURM_NNODES", "1") == "1":
        # One node: every task can meet on localhost; the port follows the job id so two jobs
        # sharing a node do not collide.
        addr = addr or "127.0.0.1"
        port = port or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    if not addr or not port:
        raise DistributedError(
            f"{launcher} started {env.get('WORLD_SIZE') or env.get('SLURM_NTASKS')} processes but "
            "MASTER_ADDR/MASTER_PORT are not set; on SLURM export e.g. "
            "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) MASTER_PORT=29500"
        )
    return addr, port


def cpus_per_rank(env: Mapping[str, str] | None = None, available: int | None = None) -> int:
    """CPU cores for one rank of this job on its node (at least 1).

    The cores this process may run on (``available``, default ``len(os.sched_getaffinity(0))``,
    where SLURM's CPU binding and cgroup show), at most ``SLURM_CPUS_PER_TASK`` (SLURM's cores per
    task, which holds without binding too), divided among the ranks that share them: torchrun's
    ranks on this node (``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``) share its task's cores; each
    task of an ``srun`` launch has its own, unless no ``--cpus-per-task`` was given (then the
    node's tasks, ``SLURM_NTASKS_PER_NODE``, share them).
    """
    env = os.environ if env is None else env
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    cores = min(available, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else available
    info = launcher_env(env)
    if info["launcher"] == "torchrun":
        sharing = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else info["world_size"]
    elif info["launcher"] == "slurm" and not per_task:
        sharing = _int_env(env, "SLURM_NTASKS_PER_NODE") if "SLURM_NTASKS_PER_NODE" in env else 1
    else:
        sharing = 1
    return max(1, cores // max(1, sharing))


def _limit_threads(cpus: int) -> None:
    """No more intra-op (OpenMP) threads than the rank's cores; never raises a lower setting."""
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)


def _rank_device(device: str | torch.device | None, local_rank: int, world_size: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            # One GPU per process: the launcher's local rank picks it (modulo, for launchers that
            # already restrict each task to its own GPU with CUDA_VISIBLE_DEVICES).
            index = local_rank % torch.cuda.device_count() if world_size > 1 else torch.cuda.current_device()
            dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)  # needs an explicit index
    return dev


def init_from_env(device: str | torch.device | None = "auto", *, timeout_s: float = 1800) -> DistContext:
    """Join (or create) the process group the launcher describes; single process otherwise.

    An already initialised default group is reused (e.g. a test that set it up itself).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        info = launcher_env()
        local = info["local_rank"] if info["world_size"] == world else rank
        dev = _rank_device(device, local, world)
        cpus = cpus_per_rank()
        _limit_threads(cpus)
        return DistContext(rank, world, local, dist.get_backend(), dev, info["launcher"], owns_group=False,
                           cpus=cpus)

    info = launcher_env()
    dev = _rank_device(device, info["local_rank"], info["world_size"])
    cpus = cpus_per_rank()
    _limit_threads(cpus)
    if info["world_size"] == 1:
        return DistContext(device=dev, launcher=info["launcher"], cpus=cpus)
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed support")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{info['master_addr']}:{info['master_port']}",
        rank=info["rank"],
        world_size=info["world_size"],
        timeout=_dt.timedelta(seconds=timeout_s),
    )
    return DistContext(info["rank"], info["world_size"], info["local_rank"], backend, dev,
                       info["launcher"], owns_group=True, cpus=cpus)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if this context created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model.

    Methods read model attributes (``feature_names``, ``feature_channels()``) and call
    ``model(x, features=...)``; with this wrapper they work unchanged on a DDP model.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrap ``model`` when running distributed (weights broadcast from rank 0); else as is."""
    if not ctx.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return _DDP(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (modules not wrapped in DDP)."""
    if ctx.enabled:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params: Iterable[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of parameters outside DDP across ranks (one flat all-reduce)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(ctx.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for convenience)."""
    if ctx.enabled:
        dist.all_reduce(values)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()
