"""No host reads in a training step: every registered method trains 20 optimiser steps through
the loop's own ``train_epoch`` while ``mixacm.hostreads.HostReadCounter`` counts every operation
that would make the host wait for a GPU (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
``nonzero``, boolean-mask indexing, ...). The loop reads the metrics once per logging interval
(``train.log_every``), so 20 steps with ``log_every: 10`` allow 2 reads in all. The batches are
counted too: the loader makes them on the device (``mixacm.loader.DeviceBatchLoader``)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from mixacm import distributed as ddp
from mixacm.checkpoint import model_spec, save_model_file
from mixacm.config import load_run_config
from mixacm.hostreads import HostReadCounter
from mixacm.loader import DeviceBatchLoader
from mixacm.methods import METHODS
from mixacm.models import build_model
from mixacm.train import TrainState, setup, train_epoch

from mixacm.data import CIFAR_CLASSES

CIFAR10_NAMES = CIFAR_CLASSES["cifar10"]  # the class folders a CIFAR-10 image folder must have

STEPS, LOG_EVERY, BATCH = 20, 10, 8
KNOBS = {"igam": {"ce_only_fraction": 0.0}}  # the IGAM phase from the first step


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", STEPS * BATCH // 10), ("test", 2)):
        for c in range(10):
            folder = root / split / CIFAR10_NAMES[c]
            folder.mkdir(parents=True)
            for i in range(n):
                write_png((torch.rand(3, 32, 32, generator=g) * 80 + 16 * c).to(torch.uint8), str(folder / f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_model_file(build_model("tiny"), model_spec("tiny"), path, {"role": "test teacher"})
    return path


def test_the_counter_sees_each_kind_of_read():
    x = torch.randn(6)
    with HostReadCounter() as reads:
        x.sum().item(), float(x[0]), bool(x[1] > 0), x.tolist()
        x[x > 0], x.nonzero()
        torch.where(x > 0, x, 0.0).sum()  # no read
    assert reads.count == 6, reads.summary()


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_twenty_steps_read_the_host_once_per_logging_interval(name, data_root, teacher_file, tmp_path):
    torch.set_num_threads(1)
    cls = METHODS.get(name)
    cfg = load_run_config({
        "name": f"reads/{name}", "seed": 0, "device": "cpu",
        "dataset": {"name": "cifar10", "root": str(data_root), "cache": True, "augment": True},
        "model": {"name": "tiny"}, "teacher": str(teacher_file) if cls.needs_teacher else None,
        "method": {"name": name, **KNOBS.get(name, {})}, "optim": {"epochs": 2, "batch_size": BATCH, "lr": 0.01},
        "train": {"progress": False, "log_every": LOG_EVERY},
    })
    run = setup(cfg, tmp_path, ddp.DistContext())
    run.steps_per_epoch = math.ceil(STEPS / run.replays)  # 20 optimiser steps whatever the replays
    state = TrainState(epoch=1)  # the second epoch: AWP's and FAT's epoch-dependent parts are on
    assert isinstance(run.loader, DeviceBatchLoader)  # the batches are made inside the count
    with HostReadCounter() as counter:
        line = train_epoch(run, state)
    steps = run.steps_per_epoch * run.replays
    assert line["step"] == steps and math.isfinite(line["loss"])
    assert counter.count <= math.ceil(steps / LOG_EVERY), f"{name}: {counter.summary()}"
