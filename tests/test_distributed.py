"""Distributed training: the launcher environment, and two gloo processes on the CPU ending on the
weights of one process with the same global batch.

Why the two runs can agree: each rank reads a disjoint half of every global batch (same
(seed, epoch) permutation), the per-rank mean losses' gradients are averaged, which is the
gradient of the mean over the global batch, and every rank starts from the same weights. The
student is ``resnet2b``, which has no BatchNorm (per-rank batch statistics would differ from the
global batch's), augmentation is on (an image's crop and flip are drawn from (seed, epoch) by its
position in the dataset, whichever rank reads it), and MixACM runs its ``acm+kd`` ablation
(without mixup, whose partners are permuted within each rank's shard).
What remains is float summation order, hence a tolerance.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mixacm import distributed as ddp
from mixacm.distributed import DistributedError, cpus_per_rank, launcher_env
from mixacm.models import build_model
from mixacm.train import train
from mixacm.utils import seed_everything
from test_train import make_image_folder, make_teacher, one_thread  # noqa: F401 (autouse fixture)


def test_single_process_without_a_launcher():
    assert launcher_env({}) == {"launcher": "none", "rank": 0, "world_size": 1, "local_rank": 0}


def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert launcher_env(env) == {"launcher": "torchrun", "rank": 3, "world_size": 4, "local_rank": 1,
                                 "master_addr": "node1", "master_port": "29500"}


def test_slurm_single_node_meets_on_localhost():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "12345"}
    info = launcher_env(env)
    assert (info["launcher"], info["rank"], info["world_size"], info["local_rank"]) == ("slurm", 1, 2, 1)
    assert info["master_addr"] == "127.0.0.1" and info["master_port"] == str(20000 + 12345 % 20000)


def test_slurm_multi_node_needs_a_master_address():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}
    with pytest.raises(DistributedError, match="MASTER_ADDR.*scontrol show hostnames"):
        launcher_env(env)
    with pytest.raises(DistributedError, match="rank 5 is outside"):
        launcher_env({"RANK": "5", "WORLD_SIZE": "2"})


def test_each_rank_gets_its_share_of_the_jobs_cores():
    # torchrun's 4 ranks share the 32 cores of the one SLURM task that runs torchrun.
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n", "MASTER_PORT": "1"}
    assert cpus_per_rank({**torchrun, "SLURM_CPUS_PER_TASK": "32"}, available=128) == 8
    # The CPU affinity counts when SLURM says nothing (or more).
    assert cpus_per_rank(torchrun, available=32) == 8
    assert cpus_per_rank({**torchrun, "SLURM_CPUS_PER_TASK": "64"}, available=32) == 8
    # Two nodes: the ranks on this node share it.
    assert cpus_per_rank({**torchrun, "WORLD_SIZE": "8"}, available=32) == 8
    # srun: each task has its own --cpus-per-task; without it the node's tasks share the cores.
    srun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "1"}
    assert cpus_per_rank({**srun, "SLURM_CPUS_PER_TASK": "8"}, available=8) == 8
    assert cpus_per_rank({**srun, "SLURM_NTASKS_PER_NODE": "4"}, available=64) == 16
    assert cpus_per_rank({}, available=2) == 2 and cpus_per_rank(torchrun, available=2) == 1


def test_a_rank_runs_no_more_threads_than_its_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(ddp, "cpus_per_rank", lambda: 1)
        assert ddp.init_from_env("cpu").cpus == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(ddp, "cpus_per_rank", lambda: 8)  # never raises a lower setting
        assert ddp.init_from_env("cpu").cpus == 8 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, jobs: list[tuple[dict, str, int]]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for cfg, out, port in jobs:
        os.environ["MASTER_PORT"] = str(port)
        train(cfg, out)


def _config(data_root, method, teacher=None, lr=0.05) -> dict:
    return {
        "seed": 5, "device": "cpu", "teacher": str(teacher) if teacher else None,
        "dataset": {"name": "cifar10", "root": str(data_root), "cache": False, "augment": True},
        "model": {"name": "resnet2b"}, "method": method,
        "optim": {"epochs": 1, "batch_size": 16, "lr": lr},
        "train": {"progress": False},
    }


def test_two_gloo_processes_equal_one_process(tmp_path):
    data_root = make_image_folder(tmp_path / "data")
    teacher = make_teacher(tmp_path / "teacher.pt", name="resnet4b")
    configs = {
        "standard": _config(data_root, {"name": "standard"}),
        # A random teacher's KD and ACM terms are large: a smaller lr keeps the student finite.
        "mixacm": _config(data_root, {"name": "mixacm", "ablation": "acm+kd"}, teacher, lr=0.01),
    }
    jobs = [(cfg, str(tmp_path / f"ddp-{name}"), _free_port()) for name, cfg in configs.items()]
    mp.spawn(_worker, args=(2, jobs), nprocs=2, join=True)

    for name, cfg in configs.items():
        single = train(cfg, tmp_path / f"single-{name}")
        ddp_dir, one_dir = tmp_path / f"ddp-{name}", tmp_path / f"single-{name}"
        ddp_state = torch.load(ddp_dir / "state.pt", weights_only=False)
        one_state = torch.load(one_dir / "state.pt", weights_only=False)
        assert ddp_state["global_step"] == single["steps"] == 5  # 80 images, global batch 16
        for part in ("model", "extra"):  # MixACM's transformation is averaged across ranks too
            for k, v in one_state[part].items():
                assert torch.allclose(ddp_state[part][k], v, rtol=1e-4, atol=1e-6), f"{name}: {part}.{k}"
        # Not a vacuous match: training moved the weights far more than the two runs differ.
        seed_everything(5)
        init = build_model("resnet2b").state_dict()
        moved = max((one_state["model"][k] - init[k]).abs().max().item() for k in init)
        gap = max((one_state["model"][k] - ddp_state["model"][k]).abs().max().item() for k in init)
        assert moved > 1000 * gap, (moved, gap)
        if name == "mixacm":
            assert one_state["extra"], "mixacm should train a student-to-teacher transformation"
        # The logged losses are global averages in both runs.
        assert [h["loss"] for h in ddp_state["history"]] == pytest.approx([h["loss"] for h in one_state["history"]],
                                                                          rel=1e-4)
        assert '"world_size": 2' in (ddp_dir / "train_summary.json").read_text()
