"""Evaluation on any device: the batch-size rule, the precision the result records, bf16 on request.

No GPU is needed: the GPU branch of the batch-size rule and of the precision record is driven
through torch's own queries (memory, compute capability), replaced here by known values.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mixacm.evaluate as ev
import mixacm.provenance as prov
from mixacm.cli import main as cli_main
from mixacm.evaluate import evaluate, resolve_batch_size

from mixacm.data import CIFAR_CLASSES

CIFAR10_NAMES = CIFAR_CLASSES["cifar10"]  # the class folders a CIFAR-10 image folder must have


class Labelled(TensorDataset):
    """40 random 8x8 images, 4 a class, with ``targets`` as mixacm's datasets have."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        super().__init__(torch.rand(40, 3, 8, 8, generator=g), torch.arange(40) % 10)
        self.targets = (torch.arange(40) % 10).tolist()


def toy():
    data = Labelled()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    return model, data


def test_batch_size_rule_on_the_cpu_and_when_resuming(tmp_path):
    model, data = toy()
    cpu = torch.device("cpu")
    assert resolve_batch_size(64, model, data, torch.arange(40).numpy(), cpu) == (64, {"rule": "given"})
    assert resolve_batch_size("auto", model, data, torch.arange(40).numpy(), cpu)[0] == ev.DEFAULT_BATCH_SIZE == 256
    state = tmp_path / "s.json"
    state.write_text(json.dumps({"key": {"batch_size": 24}}))
    assert resolve_batch_size("auto", model, data, torch.arange(40).numpy(), cpu, state)[0] == 24
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="batch_size"):
            resolve_batch_size(bad, model, data, torch.arange(40).numpy(), cpu)


def test_batch_size_rule_on_a_gpu(monkeypatch):
    """``min(1024, floor(0.5 * free / per_image))`` rounded down to a multiple of 8."""
    model, data = toy()
    gib = 2**30
    monkeypatch.setattr(ev, "_attack_step_bytes_per_image", lambda m, x: 40 * 2**20)  # WRN-34-10-like 40 MiB
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    cuda = torch.device("cuda", 0)
    for free, expected in ((10 * gib, 128), (130 * gib, 1024), (0.1 * gib, 1), (0.7 * gib, 8)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f), 141 * gib))
        size, record = resolve_batch_size("auto", model, data, torch.arange(40).numpy(), cuda)
        assert size == expected, (free, size)
        assert record["per_image_mib"] == 40 and record["rule"].startswith("auto: min(1024, 0.5 x free")


@pytest.fixture()
def tf32_flags():
    """Set torch's TF32 flags (new API) for a test, restored afterwards."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)

    def set_flags(conv_value: str, matmul_value: str) -> None:
        conv.fp32_precision, matmul.fp32_precision = conv_value, matmul_value

    yield set_flags
    conv.fp32_precision, matmul.fp32_precision = before


def test_precision_record_says_tf32_where_it_ran(monkeypatch, tf32_flags):
    cpu = prov.compute_precision("cpu")
    assert cpu == {"label": "fp32", "autocast": None, "fp32_conv": "fp32", "fp32_matmul": "fp32"}
    assert prov.compute_precision("cpu", "bf16")["label"] == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tf32_flags("tf32", "ieee")  # torch's defaults: convolutions in TF32, matrix products not
    hopper = prov.compute_precision("cuda:0")
    assert hopper == {"label": "tf32", "autocast": None, "fp32_conv": "tf32", "fp32_matmul": "fp32"}
    tf32_flags("ieee", "ieee")
    assert prov.compute_precision("cuda:0")["label"] == "fp32"
    tf32_flags("tf32", "tf32")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # Volta: no TF32
    assert prov.compute_precision("cuda:0")["label"] == "fp32"


def test_results_record_precision_and_bf16_runs_only_when_asked():
    model, data = toy()
    dtypes = []
    model.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    fp32 = evaluate(model, data, ["clean", "pgd3"], "8/255", progress=False, device="cpu")
    assert set(dtypes) == {torch.float32}
    assert fp32["precision"] == "fp32" and fp32["precision_detail"]["requested"] == "fp32"
    assert fp32["batch_size"] == 256 and fp32["batch_size_rule"]["rule"].startswith("auto")
    dtypes.clear()
    bf16 = evaluate(model, data, ["clean", "pgd3"], "8/255", progress=False, device="cpu", precision="bf16")
    assert torch.bfloat16 in dtypes and bf16["precision"] == "bf16"
    assert bf16["precision_detail"] == {"label": "bf16", "autocast": "bf16", "fp32_conv": "fp32",
                                        "fp32_matmul": "fp32", "requested": "bf16"}
    assert abs(bf16["metrics"]["clean"]["accuracy_pct"] - fp32["metrics"]["clean"]["accuracy_pct"]) <= 5
    with pytest.raises(ValueError, match="precision 'fp16'"):
        evaluate(model, data, ["clean"], "8/255", progress=False, device="cpu", precision="fp16")


def test_cli_batch_size_auto_and_precision(tmp_path):
    from torchvision.io import write_png

    from mixacm.checkpoint import model_spec, save_model_file
    from mixacm.models import build_model

    for split in ("train", "test"):
        for c in range(10):
            folder = tmp_path / "data" / split / CIFAR10_NAMES[c]
            folder.mkdir(parents=True)
            write_png((torch.rand(3, 32, 32) * 255).to(torch.uint8), str(folder / "0.png"))
    torch.manual_seed(0)
    model_file = save_model_file(build_model("tiny"), model_spec("tiny"), tmp_path / "m.pt")
    out = tmp_path / "r.json"
    rc = cli_main(["evaluate", "--model-file", str(model_file), "--dataset", "cifar10", "--data-root",
                   str(tmp_path / "data"), "--eps", "8/255", "--attacks", "clean", "--device", "cpu",
                   "--precision", "bf16", "--no-progress", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["batch_size"] == 256 and result["precision"] == "bf16"
