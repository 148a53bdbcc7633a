"""Model files: round trips, foreign files, TorchScript, and every way a file can be bad."""
from __future__ import annotations

import errno
import re
import warnings
from pathlib import Path

import pytest
import torch

import mixacm.utils
from mixacm.checkpoint import (
    CheckpointError,
    build_from_spec,
    load_any_model,
    load_foreign_state_dict,
    load_model_file,
    model_spec,
    save_model_file,
)
from mixacm.models import build_model
from mixacm.utils import WriteFailed

from mixacm.data import CIFAR_CLASSES

CIFAR10_NAMES = CIFAR_CLASSES["cifar10"]  # the class folders a CIFAR-10 image folder must have

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_file(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=10)
    # Non-default BN statistics, so a file that dropped buffers would give different outputs.
    model.train()
    model(torch.rand(8, 3, 32, 32))
    model.eval()
    path = save_model_file(model, model_spec("tiny"), tmp_path / "m.pt", {"seed": 3, "dir": tmp_path})
    return model, path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_gives_identical_outputs_and_metadata(tiny_file) -> None:
    model, path = tiny_file
    loaded, info = load_model_file(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert info["format"] == "mixacm-model" and info["version"] == 1
    assert info["model"] == {"name": "tiny", "num_classes": 10, "kwargs": {}}
    # The Path in meta was stored as plain text, so the file loads with weights_only=True.
    assert info["meta"] == {"seed": 3, "dir": str(path.parent)}
    assert "state_dict" not in info
    assert set(torch.load(path, weights_only=True)) == {"format", "version", "model", "state_dict", "meta"}


def test_spec_kwargs_are_rebuilt(tmp_path: Path) -> None:
    spec = model_spec("tiny", num_classes=7, widths=(4, 8, 16))
    model = build_from_spec(spec)
    loaded, _ = load_model_file(save_model_file(model, spec, tmp_path / "w.pt"))
    assert loaded.fc.out_features == 7 and loaded.feature_channels()["layer3"] == 16


def test_dataparallel_wrapper_is_saved_as_the_bare_model(tmp_path: Path) -> None:
    model = build_model("tiny")
    path = save_model_file(torch.nn.DataParallel(model), model_spec("tiny"), tmp_path / "dp.pt")
    assert not any(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])


def test_load_any_model_reads_a_mixacm_file(tiny_file) -> None:
    model, path = tiny_file
    loaded, info = load_any_model(path)
    x = torch.rand(2, 3, 32, 32)
    assert info["model"]["name"] == "tiny" and torch.equal(model(x), loaded(x))


def test_load_any_model_reads_torchscript(tiny_file, tmp_path: Path) -> None:
    model, _ = tiny_file
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, x).save(str(tmp_path / "ts.pt"))
    loaded, info = load_any_model(tmp_path / "ts.pt")
    assert info["format"] == "torchscript"
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


# --- bad files: each raises CheckpointError naming the file and the cause ---------------------

def test_missing_file(tmp_path: Path) -> None:
    for load in (load_model_file, load_any_model):
        with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
            load(tmp_path / "nope.pt")


def test_garbage_and_truncated_files(tiny_file, tmp_path: Path) -> None:
    _, good = tiny_file
    (tmp_path / "text.pt").write_text("these are not weights\n")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("text.pt", "cut.pt", "empty.pt"):
        for load in (load_model_file, load_any_model):
            with pytest.raises(CheckpointError, match=rf"{name}: not a readable torch file"):
                load(tmp_path / name)


def test_pickled_code_is_refused_naming_the_global_in_plain_text(tmp_path: Path) -> None:
    torch.save({"format": "mixacm-model", "obj": Path("x")}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"code\.pt: torch.load\(weights_only=True\) refuses this file: "
                       r"it pickles the global pathlib\.(_local\.)?PosixPath") as info:
        load_model_file(tmp_path / "code.pt")
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)
    assert "re-save its weights as a plain state dict" in str(info.value)


def test_raw_state_dict_is_not_a_model_file(tmp_path: Path) -> None:
    torch.save({"state_dict": build_model("tiny").state_dict()}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"raw\.pt: not a mixacm-model file.*load_foreign_state_dict"):
        load_model_file(tmp_path / "raw.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a mixacm-model file \(format: 'list'\)"):
        load_model_file(tmp_path / "list.pt")


def _edited(path: Path, out: Path, edit) -> Path:
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, out)
    return out


def test_wrong_version_and_missing_entries(tiny_file, tmp_path: Path) -> None:
    _, good = tiny_file
    bad = _edited(good, tmp_path / "v2.pt", lambda b: b.update(version=2))
    with pytest.raises(CheckpointError, match=r"v2\.pt: unsupported mixacm-model version 2"):
        load_model_file(bad)
    bad = _edited(good, tmp_path / "nometa.pt", lambda b: b.pop("meta"))
    with pytest.raises(CheckpointError, match=r"nometa\.pt: .*lacks the 'meta' entry"):
        load_model_file(bad)


def test_unknown_architecture_lists_valid_names(tiny_file, tmp_path: Path) -> None:
    _, good = tiny_file
    bad = _edited(good, tmp_path / "arch.pt", lambda b: b["model"].update(name="resnet9000"))
    with pytest.raises(CheckpointError, match=r"arch\.pt: cannot build .*'resnet9000'.*valid names:.*tiny"):
        load_model_file(bad)
    bad = _edited(good, tmp_path / "spec.pt", lambda b: b["model"].pop("kwargs"))
    with pytest.raises(CheckpointError, match=r"spec\.pt: cannot build .*missing keys \['kwargs'\]"):
        load_model_file(bad)


def test_missing_unexpected_and_misshapen_keys_are_listed(tiny_file, tmp_path: Path) -> None:
    _, good = tiny_file
    bad = _edited(good, tmp_path / "miss.pt", lambda b: b["state_dict"].pop("fc.weight"))
    with pytest.raises(CheckpointError, match=r"miss\.pt: weights do not match .*1 missing keys: fc\.weight"):
        load_model_file(bad)
    bad = _edited(good, tmp_path / "extra.pt", lambda b: b["state_dict"].update(extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"extra\.pt: .*1 unexpected keys: extra"):
        load_model_file(bad)
    # Weights for 10 classes under a spec that says 5.
    bad = _edited(good, tmp_path / "shape.pt", lambda b: b["model"].update(num_classes=5))
    with pytest.raises(CheckpointError, match=r"shape\.pt: .*shape mismatches: fc\.weight: file \(10, 64\) vs model \(5, 64\)"):
        load_model_file(bad)


def test_long_key_lists_are_shortened(tiny_file, tmp_path: Path) -> None:
    _, good = tiny_file
    bad = _edited(good, tmp_path / "many.pt", lambda b: b["model"].update(name="resnet2b"))
    with pytest.raises(CheckpointError, match=r"missing keys: (\S+, ){4}\S+ \.\.\. and \d+ more") as err:
        load_model_file(bad)
    assert "conv1.weight" in str(err.value)


# --- saving: invalid input writes nothing ----------------------------------------------------

def test_save_with_mismatched_spec_writes_nothing(tmp_path: Path) -> None:
    model = build_model("tiny", num_classes=10)
    with pytest.raises(CheckpointError, match=r"not saving .*bad\.pt.*shape mismatches: fc\.weight"):
        save_model_file(model, model_spec("tiny", num_classes=100), tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="valid names"):
        save_model_file(model, {"name": "nope", "num_classes": 10, "kwargs": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected keys \\['arch'\\]"):
        save_model_file(model, {"name": "tiny", "num_classes": 10, "kwargs": {}, "arch": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="kwarg 'widths' = .* is not plain data"):
        save_model_file(model, {"name": "tiny", "num_classes": 10, "kwargs": {"widths": {1, 2}}}, tmp_path / "bad.pt")
    assert _files(tmp_path) == []


def test_failed_write_leaves_old_file_and_no_temporary(tiny_file, monkeypatch) -> None:
    model, path = tiny_file
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mixacm.utils.torch, "save", broken_save)
    with pytest.raises(WriteFailed, match=rf"cannot write {re.escape(str(path))}: No space left on device"):
        save_model_file(model, model_spec("tiny"), path)
    assert path.read_bytes() == before
    assert _files(path.parent) == ["m.pt"]


# --- foreign state dicts ---------------------------------------------------------------------

def test_foreign_state_dict_layouts(tmp_path: Path) -> None:
    src = build_model("tiny", num_classes=10).eval()
    raw = {k: v for k, v in src.state_dict().items() if k not in ("mean", "std")}
    torch.save(raw, tmp_path / "bare.pt")
    torch.save({"net": {f"module.{k}": v for k, v in raw.items()}}, tmp_path / "wrapped.pt")
    x = torch.rand(2, 3, 32, 32)
    for name, key in (("bare.pt", None), ("wrapped.pt", "net")):
        model = load_foreign_state_dict(tmp_path / name, "tiny", key=key)
        assert not model.training and torch.equal(model(x), src(x))
    with pytest.raises(CheckpointError, match=r"wrapped\.pt: no 'state_dict' entry .*found: \['net'\]"):
        load_foreign_state_dict(tmp_path / "wrapped.pt", "tiny")
    with pytest.raises(CheckpointError, match=r"bare\.pt: unknown model 'nope'; valid names"):
        load_foreign_state_dict(tmp_path / "bare.pt", "nope", key=None)
    with pytest.raises(CheckpointError, match=r"bare\.pt: .*shape mismatches: fc\.weight"):
        load_foreign_state_dict(tmp_path / "bare.pt", "tiny", num_classes=100, key=None)


def test_shared_teachers_convert_to_model_files(shared_models: Path, tmp_path: Path) -> None:
    x = torch.rand(2, 3, 32, 32)
    for arch in ("resnet2b", "resnet4b"):
        teacher = load_foreign_state_dict(shared_models / f"{arch}.pth", arch)
        path = save_model_file(teacher, model_spec(arch), tmp_path / f"{arch}.pt", {"source": arch})
        loaded, info = load_model_file(path)
        assert torch.equal(loaded(x), teacher(x)) and info["meta"] == {"source": arch}
    with pytest.raises(CheckpointError, match=r"resnet4b\.pth: weights do not match architecture 'resnet2b'"):
        load_foreign_state_dict(shared_models / "resnet4b.pth", "resnet2b")



# --- the training state, written in the background ---------------------------------------------

def test_cpu_snapshot_shares_nothing_and_keeps_mapping_types() -> None:
    from collections import Counter

    from mixacm.utils import cpu_snapshot

    model = build_model("tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5])
    original = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    snap = cpu_snapshot(original)
    before = {k: v.clone() for k, v in snap["model"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.step()
    opt.param_groups[0]["lr"] = 7.0
    assert all(torch.equal(snap["model"][k], before[k]) for k in before)
    assert snap["opt"]["param_groups"][0]["lr"] == 0.1
    # MultiStepLR keeps its milestones in a Counter: rebuilt from pairs it would count the pairs.
    assert isinstance(snap["sched"]["milestones"], Counter) and snap["sched"]["milestones"] == Counter([3, 5])
    assert snap["model"]._metadata == original["model"]._metadata


def test_background_writer_writes_in_order_and_reraises_errors(tmp_path: Path) -> None:
    import threading

    from mixacm.utils import BackgroundWriter

    order, release = [], threading.Event()

    def slow(i):
        release.wait(5)
        order.append(i)

    writer = BackgroundWriter()
    writer.submit(slow, 1)
    assert order == []  # submit returned while the write waits
    release.set()
    writer.submit(slow, 2)  # waits for write 1 first
    assert order == [1]
    writer.wait()
    assert order == [1, 2]

    def broken():
        raise OSError("disk full")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_a_kill_during_background_writes_leaves_a_complete_state(tmp_path: Path) -> None:
    """SIGKILL at several moments of a loop of 16 MB state writes: ``state.pt`` always loads and
    holds one whole version (the atomic rename), and the next run removes the temporary file."""
    import signal
    import subprocess
    import sys
    import time

    from mixacm.utils import remove_stale_temporaries

    path = tmp_path / "state.pt"
    child = (
        "import sys, torch\n"
        "from mixacm.utils import BackgroundWriter, atomic_torch_save\n"
        "w = BackgroundWriter()\n"
        "for i in range(1, 10**6):\n"
        "    w.submit(atomic_torch_save, {'version': i, 'data': torch.full((4_000_000,), float(i))}, sys.argv[1])\n"
    )
    versions, mid_write = [], 0
    for attempt in range(5):  # kill while a temporary file exists: a write in flight (timing permitting)
        proc = subprocess.Popen([sys.executable, "-c", child, str(path)], cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert path.exists(), "the child wrote nothing in 60 s"
            while time.monotonic() < deadline and not any(p.name != "state.pt" for p in tmp_path.iterdir()):
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["data"], torch.full((4_000_000,), float(state["version"])))
        versions.append(state["version"])
        mid_write += bool(remove_stale_temporaries(path))  # the kill hit a write in flight
        assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
        path.unlink()
        if mid_write and attempt >= 1:
            break
    assert all(v >= 1 for v in versions) and mid_write >= 1, (versions, mid_write)


def test_training_goes_on_while_the_state_is_written(tmp_path: Path, monkeypatch) -> None:
    """``TrainState.save`` returns while its write is still blocked; the run waits for it at the
    end, and the files then hold the last epoch."""
    import threading

    import mixacm.train as train_mod

    real_save, gate, returned = train_mod.atomic_torch_save, threading.Event(), []

    def gated_save(obj, path):
        gate.wait(30)
        return real_save(obj, path)

    real_epochs = train_mod.train_epoch

    def watching_epoch(run, state, **kw):
        # Epoch 2 starts while epoch 1's state write is still blocked.
        if state.epoch == 1:
            returned.append(not (run.state_path).exists())
            gate.set()
        return real_epochs(run, state, **kw)

    monkeypatch.setattr(train_mod, "atomic_torch_save", gated_save)
    monkeypatch.setattr(train_mod, "train_epoch", watching_epoch)
    from torchvision.io import write_png

    data = tmp_path / "data"
    for split, n in (("train", 4), ("test", 1)):
        for c in range(10):
            (data / split / CIFAR10_NAMES[c]).mkdir(parents=True)
            for i in range(n):
                write_png((torch.rand(3, 32, 32) * 255).to(torch.uint8), str(data / split / CIFAR10_NAMES[c] / f"{i}.png"))
    cfg = {"device": "cpu", "dataset": {"name": "cifar10", "root": str(data), "cache": False},
           "model": {"name": "tiny"}, "method": {"name": "standard"},
           "optim": {"epochs": 2, "batch_size": 20, "lr": 0.05}, "train": {"progress": False}}
    summary = train_mod.train(cfg, tmp_path / "run")
    assert returned == [True] and summary["epochs"] == 2
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "metrics.jsonl", "model.pt", "state.pt", "train_summary.json"]
