"""Inputs that lie: data folders, models, configs and result files checked before they can bend a
number. One test (or one parametrised case) per instance: each builds the lying input itself and
checks the one-line refusal (exit 2 from the command line, nothing half-written), or that the
input is read as what it really is.

Kinds: 1 a data folder that is not what it says; 2 a model or an API input the evaluation would
misread; 3 a config that repeats or contradicts a setting; 4 a runtime failure (disk full, a
refused pickle, an eps of 1); 5 a result file that contradicts itself.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torchvision.io import encode_jpeg, encode_png, write_file

import mixacm.utils
from mixacm import data
from mixacm.checkpoint import CheckpointError, load_any_model, model_spec, save_model_file
from mixacm.cli import main
from mixacm.config import ConfigError, check_recipe_label, load_run_config, parse_run_config, resolve_recipe
from mixacm.evaluate import EvaluationStateError, ModelCheckError, evaluate
from mixacm.models import build_model
from mixacm.report import ResultFileError, collect_costs, collect_results, load_paper_numbers
from mixacm.utils import MAX_LINF_EPS, WriteFailed, YAMLFileError, load_yaml, parse_linf_eps
from test_model_check import Blobs, trained_net  # the tests' 10-class blobs and a net trained on them

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CIFAR10 = list(data.CIFAR_CLASSES["cifar10"])


# ----------------------------------------------------------------------------- helpers


def rgb(seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_image(path: Path, img: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = encode_jpeg(img, quality=95) if path.suffix == ".jpg" else encode_png(img)
    write_file(str(path), blob)
    return path


def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG (colour type 2, bit depth 16) of an H x W x 3 uint16 array, written by
    hand: neither torchvision nor Pillow writes 16-bit RGB."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def pil_image(path: Path, mode: str, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (32, 32), value).save(path)
    return path


def cifar_folder(root: Path, per_class: int = 2, fmt: str = "png", seed: int = 0) -> Path:
    """A CIFAR-10-shaped image folder (train/ and test/, CIFAR-10's class names) of random images,
    every image different."""
    k = seed * 10_000
    for split in ("train", "test"):
        for cls in CIFAR10:
            for i in range(per_class):
                k += 1
                write_image(root / split / cls / f"{i:04d}.{fmt}", rgb(k))
    return root


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """Each test decodes afresh, into its own cache folder."""
    monkeypatch.setattr(data, "_MEMORY", {})
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mixacm {command}: error: "), err
    assert "\x1b" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model_file(build_model("tiny"), model_spec("tiny"), path, {"role": "test"})


def evaluate_cli(model: Path, root: Path, out: Path, *extra: str, dataset: str = "cifar10") -> int:
    return main(["evaluate", "--checkpoint", str(model), "--dataset", dataset, "--data-root", str(root),
                 "--eps", "2/255", "--attacks", "clean", "--device", "cpu", "--no-progress",
                 "--out", str(out), *extra])


# ============================================================================= kind 1: data folders


def test_a_truncated_jpeg_is_named_in_one_line_and_nothing_is_written(tmp_path, tiny_model_file, capsys):
    root = cifar_folder(tmp_path / "d", fmt="jpg")
    bad = root / "test" / "cat" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "res" / "r.json"
    assert evaluate_cli(tiny_model_file, root, out) == 2
    err = one_line_error(capsys, "evaluate")
    assert f"{bad}: not a decodable image (Image is incomplete or truncated)" in err
    assert not out.exists() and not out.parent.exists() and not list(Path(os.environ["MIXACM_CACHE_DIR"]).glob("*"))


def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_cut_to_their_low_byte(tmp_path):
    root = tmp_path / "d"
    expected = {}
    for split in ("train", "test"):
        for c, cls in enumerate(CIFAR10):
            img = rgb(100 + c)
            expected[(split, c)] = img
            # v * 257 is the exact 16-bit value of an 8-bit v; +-100 is noise below half a step (128.5)
            v = img.permute(1, 2, 0).numpy().astype(np.int64)
            png16(root / split / cls / "0.png", (v * 257 + np.where(v < 255, 100, -100)).astype(np.uint16))
    ds = data.load_dataset("cifar10", "test", root=root)
    for c in range(10):
        assert torch.equal(ds.images[c], expected[("test", c)])
    # the last step rounds: 65535 -> 255, 128 -> 0 (128 * 255 / 65535 = 0.498), 129 -> 1 (0.502)
    px = np.zeros((32, 32, 3), np.uint16)
    px[0, 0], px[0, 1], px[0, 2] = (65535, 128, 129), (257, 256, 385), (0, 0, 0)
    decoded = data.decode_files([png16(tmp_path / "one.png", px)])[0]
    assert decoded[:, 0, 0].tolist() == [255, 0, 1] and decoded[:, 0, 1].tolist() == [1, 1, 1]


def test_resuming_an_evaluation_against_other_images_is_refused(tmp_path, tiny_model_file, monkeypatch):
    a, b = cifar_folder(tmp_path / "a", seed=1), cifar_folder(tmp_path / "b", seed=2)
    model = load_any_model(tiny_model_file)[0]
    state = tmp_path / "eval.state.json"
    kw = dict(eps="2/255", n=20, batch_size=10, progress=False, device="cpu", state_path=state)

    calls = {"n": 0}

    def stop_after_first_batch(*_):  # 4 forwards of the model check, then one a batch
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(stop_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data.load_dataset("cifar10", "test", root=a), ["clean"], **kw)
    handle.remove()
    assert state.is_file()
    # same layout, same file names, same labels: only the pixels differ
    with pytest.raises(EvaluationStateError, match="data_sha256: state has '[0-9a-f]{64}', this run has"):
        evaluate(model, data.load_dataset("cifar10", "test", root=b), ["clean"], **kw)
    resumed = evaluate(model, data.load_dataset("cifar10", "test", root=a), ["clean"], **kw)
    assert resumed["data"] == data.data_digest(data.load_dataset("cifar10", "test", root=a), range(20))


def test_the_data_identity_follows_pixels_labels_and_class_names_not_the_path(tmp_path):
    a = cifar_folder(tmp_path / "a", seed=1)
    shutil.copytree(a, tmp_path / "copy")
    digest = data.data_digest(data.load_dataset("cifar10", "test", root=a))
    assert digest["images"] == 20 and digest["of"].startswith("uint8 pixels")
    assert data.data_digest(data.load_dataset("cifar10", "test", root=tmp_path / "copy")) == digest
    write_image(tmp_path / "copy" / "test" / "dog" / "0000.png", rgb(999))
    assert data.data_digest(data.load_dataset("cifar10", "test", root=tmp_path / "copy")) != digest
    # a subset's identity is the identity of its images
    ds = data.load_dataset("cifar10", "test", root=a)
    sub = torch.utils.data.Subset(ds, [3, 5])
    assert data.data_digest(sub) == data.data_digest(ds, [3, 5]) != data.data_digest(ds, [5, 3])
    # a streamed folder hashes its files' bytes, a plain dataset its float images
    assert data.data_digest(torch.utils.data.TensorDataset(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1])))["of"] \
        .startswith("float32 images")


@pytest.mark.parametrize("make_bad, match", [
    (lambda d: pil_image(d / "test" / "cat" / "0000.png", "L", 128),
     r"cat/0000\.png is a grayscale image, but CIFAR-10 images are RGB \(3 channels\)"),
    (lambda d: pil_image(d / "test" / "cat" / "0000.png", "RGBA", (10, 20, 30, 128)),
     r"cat/0000\.png has a transparent alpha channel \(lowest alpha 128/255\)"),
    (lambda d: pil_image(d / "test" / "cat" / "0000.jpg", "CMYK", (10, 20, 30, 40)),
     r"cat/0000\.jpg is a CMYK image, but CIFAR-10 images are RGB"),
    (lambda d: write_image(d / "test" / "cat" / "0000.png", rgb(5, size=28)),
     r"cat/0000\.png is 28 x 28 pixels, but CIFAR-10 images are 32 x 32"),
    (lambda d: (d / "test" / "cat" / "x.png").write_bytes(b"not a png"),
     r"cat/x\.png: not a decodable image"),
    (lambda d: pil_image(d / "test" / "cat" / "extra.bmp", "RGB", (1, 2, 3)),
     r"cat/extra\.bmp: \.bmp images are not read .* or the dataset silently loses it"),
    (lambda d: (d / "test" / "cat" / "0000.png").write_bytes((d / "test" / "cat" / "0000.png").read_bytes()[:100]),
     r"cat/0000\.png: not a decodable image"),
], ids=["grayscale", "translucent-rgba", "cmyk-jpeg", "28px", "not-an-image", "bmp-skipped", "truncated-png"])
def test_every_image_is_checked_when_the_cache_is_built(tmp_path, make_bad, match):
    root = cifar_folder(tmp_path / "d", per_class=1)
    make_bad(root)
    with pytest.raises(data.DataError, match=match) as info:
        data.load_dataset("cifar10", "test", root=root)
    assert "\n" not in str(info.value)


def test_an_opaque_alpha_channel_is_dropped_and_a_generic_folder_converts_grayscale(tmp_path):
    root = cifar_folder(tmp_path / "d", per_class=1)
    pil_image(root / "test" / "cat" / "0000.png", "RGBA", (10, 20, 30, 255))
    ds = data.load_dataset("cifar10", "test", root=root)
    assert ds.images[CIFAR10.index("cat")][:, 0, 0].tolist() == [10, 20, 30]
    # an image folder of any other dataset converts grayscale to RGB (ImageNet has some)
    gray = tmp_path / "g"
    pil_image(gray / "train" / "a" / "0.png", "L", 77)
    pil_image(gray / "test" / "a" / "0.png", "L", 77)
    assert data.load_dataset("imagefolder", "test", root=gray).images[0][:, 0, 0].tolist() == [77, 77, 77]


@pytest.mark.parametrize("rename, match", [
    ({c: str(i) for i, c in enumerate(CIFAR10)}, r"class folders 0, 1, 2, 3, 4 and 5 more are not CIFAR-10 class names"),
    ({"airplane": "aeroplane"}, r"class folders aeroplane are not CIFAR-10 class names \(missing: airplane\)"),
    ({"truck": "Truck"}, r"class folders Truck are not CIFAR-10 class names"),
], ids=["numbered", "misspelt", "capitalised"])
def test_cifar_class_folders_must_carry_cifars_names(tmp_path, rename, match):
    root = cifar_folder(tmp_path / "d", per_class=1)
    for split in ("train", "test"):
        for old, new in rename.items():
            (root / split / old).rename(root / split / new)
    with pytest.raises(data.DataError, match=match):
        data.load_dataset("cifar10", "test", root=root)


def test_splits_with_other_class_folders_and_empty_class_folders_are_refused(tmp_path):
    root = tmp_path / "d"
    for k, (split, c) in enumerate([("train", "a"), ("train", "b"), ("train", "c"), ("test", "a"), ("test", "c")]):
        write_image(root / split / c / "0.png", rgb(k))
    # test/ lacks b: its c images would get label 1, train/'s c images label 2
    with pytest.raises(data.DataError, match=r"hold different class folders \(only in test/: none; only in train/: b\)"):
        data.load_dataset("imagefolder", "test", root=root)
    write_image(root / "test" / "b" / "0.png", rgb(7))
    (root / "train" / "b" / "0.png").unlink()
    with pytest.raises(data.DataError, match=r"train/b is an empty class folder"):
        data.load_dataset("imagefolder", "train", root=root)


def test_a_truncated_image_in_a_streamed_folder_is_named(tmp_path):
    root = tmp_path / "inet"
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            write_image(root / split / c / "0.jpg", rgb(3, size=96))
    write_image(root / "test" / "unlabelled.jpg", rgb(4, size=96))  # ImageNet's test/: no class folders
    bad = root / "val" / "n02" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = data.load_dataset("imagenet", "val", root=root)
    ds[0]
    with pytest.raises(data.DataError, match=rf"{bad}: not a decodable image"):
        ds[1]


def test_a_cache_written_before_the_checks_is_not_read(tmp_path, fresh_cache):
    root = cifar_folder(tmp_path / "d", per_class=1)
    ds = data.load_dataset("cifar10", "test", root=root)
    (cache_file,) = fresh_cache.glob("*.pt")
    blob = torch.load(cache_file, weights_only=True)
    torch.save({k: v for k, v in blob.items() if k != "cache_version"}, cache_file)  # an old cache
    assert data._read_cache(cache_file, len(ds)) is None


def test_verify_dataset_refuses_a_test_split_leaked_into_training(tmp_path):
    root = cifar_folder(tmp_path / "d", per_class=2)
    report = data.verify_dataset("cifar10", root)
    assert report["test_images_in_train"] == 0 and report["images_under_two_labels"] == 0
    assert report["test"]["images"] == 20 and len(report["test"]["data"]["sha256"]) == 64
    # one test image copied over a train image: 1 of 20 is above 1 %
    shutil.copy(root / "test" / "dog" / "0001.png", root / "train" / "dog" / "0000.png")
    data._MEMORY.clear()
    with pytest.raises(data.DataError, match=r"1 of 20 test images are also in the train split, pixel for pixel "
                                             r"\(e\.g\. test/dog/0001\.png = train/dog/0000\.png\)"):
        data.verify_dataset("cifar10", root)


def test_verify_dataset_refuses_one_image_under_two_labels(tmp_path):
    root = cifar_folder(tmp_path / "d", per_class=2)
    shutil.copy(root / "train" / "cat" / "0000.png", root / "train" / "dog" / "0001.png")
    with pytest.raises(data.DataError, match=r"1 images appear under two labels"):
        data.verify_dataset("cifar10", root)


def test_verify_dataset_refuses_unbalanced_cifar_classes(tmp_path):
    root = cifar_folder(tmp_path / "d", per_class=3)
    (root / "test" / "frog" / "0002.png").unlink()
    with pytest.raises(data.DataError, match=r"the test split holds 2 frog images but 3 airplane images; "
                                             r"CIFAR-10's classes are balanced"):
        data.verify_dataset("cifar10", root)


def test_the_pipeline_check_names_the_data_key(tmp_path):
    from mixacm.inputs import PipelineInputError, check_pipeline_data

    root = cifar_folder(tmp_path / "d", per_class=1)
    cfg = load_yaml(REPO / "config" / "ci.yaml")
    cfg["data"]["cifar10"]["root"] = str(root)
    check_pipeline_data(cfg)
    pil_image(root / "train" / "ship" / "0000.png", "L", 3)
    data._MEMORY.clear()
    with pytest.raises(PipelineInputError, match=r"data\.cifar10\.root: .*ship/0000\.png is a grayscale image"):
        check_pipeline_data(cfg)


# ============================================================================= kind 2: the model check


@pytest.fixture(scope="module")
def blob_net() -> nn.Module:
    return trained_net(10)


class NoisyInput(nn.Module):
    """A randomised defence: Gaussian noise on the input at every forward."""

    def __init__(self, net: nn.Module, sigma: float = 0.05) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def test_a_randomised_defence_is_told_from_batch_dependence(blob_net, tmp_path):
    kw = dict(eps=0.1, n=10, batch_size=10, progress=False, device="cpu")
    with pytest.raises(ModelCheckError, match=r"the model is randomised: two passes over the same batch differ") as info:
        evaluate(NoisyInput(blob_net), Blobs(), ["clean", "pgd5"], state_path=tmp_path / "s.json", **kw)
    assert "BatchNorm" not in str(info.value) and "--attacks clean,autoattack-rand" in str(info.value)
    assert not (tmp_path / "s.json").exists()
    # clean accuracy of a random model: one seeded draw per (attack, batch), the same every run
    first = evaluate(NoisyInput(blob_net), Blobs(), ["clean"], **kw)
    assert first["model_check"]["randomised"] and first["model_check"]["batch_dependence_max_abs"] is None
    assert evaluate(NoisyInput(blob_net), Blobs(), ["clean"], **kw)["metrics"] == first["metrics"]


def test_autoattack_rand_evaluates_a_randomised_defence(blob_net):
    pytest.importorskip("pyautoattack")
    result = evaluate(NoisyInput(blob_net), Blobs(), ["clean", "autoattack-rand"], eps=0.1, n=10, batch_size=10,
                      progress=False, device="cpu")
    m = result["metrics"]["autoattack-rand"]
    assert m["attack"]["aa_version"] == "rand" and m["n"] == 10 and m["correct"] <= 10
    assert result["model_check"]["randomised"]


class BatchCentred(nn.Module):
    """Batch statistics that ``.eval()`` does not switch off: a sample depends on the others."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True) + 0.5)


def test_batch_dependence_is_still_called_batch_dependence(blob_net):
    with pytest.raises(ModelCheckError, match=r"depend on the rest of the batch .* so this is not randomness"):
        evaluate(BatchCentred(blob_net), Blobs(), ["clean"], eps=0.1, n=10, batch_size=10, progress=False, device="cpu")


def test_a_model_that_returns_probabilities_is_refused(blob_net):
    softmax = nn.Sequential(blob_net, nn.Softmax(dim=1))
    with pytest.raises(ModelCheckError, match=r"model outputs are probabilities .*\(drop the final softmax\)"):
        evaluate(softmax, Blobs(), ["clean", "pgd5"], eps=0.1, n=10, batch_size=10, progress=False, device="cpu")
    # log-probabilities are logits up to a shift per row: attacked as they are
    log_softmax = nn.Sequential(blob_net, nn.LogSoftmax(dim=1))
    assert evaluate(log_softmax, Blobs(), ["clean"], eps=0.1, n=10, batch_size=10, progress=False,
                    device="cpu")["metrics"]["clean"]["n"] == 10


@pytest.mark.parametrize("transform, match", [
    (lambda x: (x - 0.5) / 0.25, r"range over \[-[0-9.]+, [0-9.]+\], outside \[0, 1\] \(normalised images\?"),
    (lambda x: (x * 255).round().to(torch.uint8), r"are uint8 \(0-255 pixels\? scale them: x.float\(\) / 255\)"),
    (lambda x: x * 255, r"outside \[0, 1\] \(0-255 pixels\? scale them to \[0, 1\]\)"),
], ids=["normalised", "uint8", "float-0-255"])
def test_the_python_api_refuses_images_outside_0_1_before_any_attack(blob_net, transform, match):
    class Shifted(Blobs):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return transform(x), y

    calls = []
    handle = blob_net.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            evaluate(blob_net, Shifted(), ["clean", "pgd5"], eps=0.1, n=20, batch_size=10, progress=False, device="cpu")
    finally:
        handle.remove()
    assert calls == []  # refused before the model saw anything


def test_the_python_api_refuses_labels_out_of_range_and_an_augmented_test_set(blob_net):
    class OffByOne(Blobs):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, y + 1

    class Augmented(Blobs):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x + 0.01 * torch.rand_like(x)).clamp(0, 1), y

    kw = dict(eps=0.1, n=20, batch_size=10, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"labels of the first batch span \[1, 10\]; expected integers in \[0, 10\)"):
        evaluate(blob_net, OffByOne(), ["clean"], **kw)
    with pytest.raises(ValueError, match="returns another image for the same index"):
        evaluate(blob_net, Augmented(), ["clean"], **kw)


def _export(net: nn.Module, path: Path, batch: int = 64, **dim) -> Path:
    x = torch.rand(batch, 3, 32, 32)
    shapes = ({0: torch.export.Dim("batch", **dim)},) if dim else None
    torch.export.save(torch.export.export(net.eval(), (x,), dynamic_shapes=shapes), str(path))
    return path


def test_a_torch_export_file_with_a_fixed_batch_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_model("tiny")
    root = cifar_folder(tmp_path / "d", per_class=1)
    fixed = _export(net, tmp_path / "fixed.pt2")
    out = tmp_path / "r.json"
    args = ["evaluate", "--dataset", "cifar10", "--data-root", str(root), "--eps", "2/255", "--attacks", "clean",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main([*args, "--model-file", str(fixed)]) == 2
    err = one_line_error(capsys, "evaluate")
    assert "accepts only batches of exactly 64 images" in err and "dynamic_shapes=({0: torch.export.Dim('batch', min=1)},)" in err
    bounded = _export(net, tmp_path / "bounded.pt2", batch=4, min=1, max=8)
    assert main([*args, "--model-file", str(bounded), "--batch-size", "10"]) == 2
    assert "accepts batches of 1 to 8 images, not 10; use --batch-size within that range" in one_line_error(capsys, "evaluate")
    assert not out.exists()
    assert main([*args, "--model-file", str(bounded), "--batch-size", "8"]) == 0


# ============================================================================= kind 3: configs


def run_config_text(root: Path) -> str:
    return f"""\
seed: 0
device: cpu
dataset: {{name: cifar10, root: {root}, cache: false}}
model: {{name: tiny}}
method: {{name: at}}
optim: {{epochs: 1, batch_size: 10, lr: 0.05}}
train: {{progress: false}}
"""


def test_a_run_config_with_a_key_twice_is_refused_naming_both_lines(tmp_path, capsys):
    text = run_config_text(tmp_path / "data") + "method: {name: standard}\n"
    (tmp_path / "run.yaml").write_text(text)
    out = tmp_path / "out"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out-dir", str(out)]) == 2
    err = one_line_error(capsys, "train")
    assert f"run config {tmp_path / 'run.yaml'}: key method is given twice (lines 5 and 8)" in err
    assert not out.exists()


@pytest.mark.parametrize("text, match", [
    ("a: 1\nb:\n  c: 2\n  c: 3\n", r"key b\.c is given twice \(lines 3 and 4\)"),
    ("recipes:\n  at: {method: at}\n  trades: {method: trades}\n  at:\n    method: standard\n",
     r"key recipes\.at is given twice \(lines 2 and 4\)"),
    ("l:\n  - {x: 1, x: 2}\n", r"key l\[0\]\.x is given twice \(lines 2 and 2\)"),
    ("true: 1\nyes: 2\n", r"key True is given twice \(lines 1 and 2\)"),
], ids=["nested", "recipe-block", "flow-mapping-in-list", "yaml-1.1-booleans"])
def test_the_one_loader_refuses_every_duplicate_key(text, match):
    with pytest.raises(YAMLFileError, match=f"f.yaml: {match}"):
        load_yaml("f.yaml", text=text)


def test_merge_keys_may_still_override_and_plain_yaml_loads_as_safe_load():
    text = "base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\nlist: [1, 2]\nempty:\n"
    assert load_yaml("f.yaml", text=text) == yaml.safe_load(text) == {
        "base": {"x": 1, "y": 2}, "run": {"x": 3, "y": 2}, "list": [1, 2], "empty": None}
    assert load_yaml("f.yaml", text="") is None


def test_every_yaml_the_project_ships_loads_with_the_strict_loader():
    files = [p for d in ("config", "workflow", "mixacm") for p in (REPO / d).rglob("*.yaml")]
    files += [REPO / "environment.yml"]
    assert len(files) > 10
    for path in files:
        load_yaml(path)


def test_paper_numbers_and_tuning_grids_refuse_a_key_twice(tmp_path, capsys, monkeypatch):
    text = (REPO / "mixacm" / "report" / "paper_numbers.yaml").read_text()
    (tmp_path / "paper.yaml").write_text(text + "tables: {}\n")
    with pytest.raises(ResultFileError, match=r"paper\.yaml: key tables is given twice \(lines \d+ and \d+\)"):
        load_paper_numbers(tmp_path / "paper.yaml")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import tune_holdout

    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {seed: 0}\ncandidates:\n  a: {}\n  a: {method: {name: at}}\n")
    with pytest.raises(SystemExit) as exc:
        tune_holdout.main([str(grid), "--csv", str(tmp_path / "t.csv")])
    assert exc.value.code == 2
    assert "key candidates.a is given twice (lines 3 and 4)" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


def test_set_twice_and_a_duplicate_inside_set_are_refused(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(run_config_text(tmp_path / "data"))
    base = ["train", "--config", str(tmp_path / "run.yaml"), "--out-dir", str(tmp_path / "out")]
    assert main([*base, "--set", "optim.epochs=2", "--set", "optim.epochs=3"]) == 2
    assert "--set optim.epochs is given twice ('optim.epochs=2' and 'optim.epochs=3')" in one_line_error(capsys, "train")
    assert main([*base, "--set", "method={name: at, name: trades}"]) == 2
    assert "--set method: key name is given twice" in one_line_error(capsys, "train")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("optim, match", [
    ({"schedule": "cosine", "milestones": [0.5]}, r"optim\.milestones: only the step schedule reads it, and this run's schedule is 'cosine'"),
    ({"schedule": "cosine", "gamma": 0.2}, r"optim\.gamma: only the step schedule reads it"),
    ({"lr_peak": 0.3}, r"optim\.lr_peak: only the cyclic schedule reads it, and this run's schedule is 'step'"),
    ({"lr_points": [[0, 1], [1, 0]]}, r"optim\.lr_points: only the piecewise schedule reads it"),
    ({"epochs": 3, "steps": 100}, r"optim\.epochs: optim\.steps is set too"),
    ({"milestones": [0.5, 0.5]}, r"optim\.milestones: \[0\.5, 0\.5\] has non-unique elements"),
], ids=["milestones-cosine", "gamma-cosine", "lr-peak-step", "lr-points-step", "epochs-and-steps", "milestone-twice"])
def test_a_run_config_setting_the_run_would_drop_is_refused(tmp_path, optim, match):
    cfg = parse_run_config(run_config_text(tmp_path / "data"), "run.yaml")
    cfg["optim"] = {"batch_size": 10, "lr": 0.05, **optim}
    with pytest.raises(ConfigError, match=match):
        resolve_recipe(load_run_config(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["method"].update(eps=1), r"method: knob 'eps' of method 'at': eps 1 is 255/255 of the pixel range, "
                                          r"above the sane L-inf bound 64/255 \(did you mean 1/255\?\); configs stay"),
    (lambda c: c["method"].update(step_size=0.5), r"knob 'step_size' of method 'at': eps 0\.5 is 0\.5 of the pixel range"),
    (lambda c: c["train"].update(selection_eps=4), r"train\.selection_eps: eps 4 is outside \(0, 1\]: .*did you mean 4/255\?"),
    (lambda c: c["train"].update(selection_eps="1"), r"train\.selection_eps: eps '1' is 255/255 .*did you mean 1/255\?"),
], ids=["method-eps-1", "step-size-0.5", "selection-eps-4", "selection-eps-1"])
def test_a_run_config_eps_above_the_sane_bound_is_refused(tmp_path, edit, match):
    cfg = parse_run_config(run_config_text(tmp_path / "data"), "run.yaml")
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        load_run_config(cfg)


def test_a_recipe_label_must_not_contradict_its_ablation():
    cfg = load_yaml(REPO / "config" / "quick.yaml")
    for name in cfg["recipes"]:
        check_recipe_label(cfg, name)  # the shipped labels agree
    cfg["recipes"]["mixacm_acm"]["variant"] = "full"
    with pytest.raises(ConfigError, match=r"recipes\.mixacm_acm\.variant: 'full' labels its rows, but knobs\.ablation is 'acm'"):
        check_recipe_label(cfg, "mixacm_acm")
    cfg["recipes"]["mixacm_acm"]["variant"] = "ACM+KD"
    with pytest.raises(ConfigError, match="knobs.ablation is 'acm'"):
        check_recipe_label(cfg, "mixacm_acm")
    cfg["recipes"]["mixacm_acm"]["variant"] = "tuned"  # a free label over an ablation preset
    with pytest.raises(ConfigError, match="'tuned' labels its rows"):
        check_recipe_label(cfg, "mixacm_acm")
    cfg["recipes"]["mixacm_acm"]["variant"] = "acm"
    check_recipe_label(cfg, "mixacm_acm")


def _workflow_copy(dest: Path) -> Path:
    shutil.copytree(REPO / "workflow", dest / "workflow")
    shutil.copytree(REPO / "config", dest / "config")
    shutil.copy(REPO / "environment.yml", dest / "environment.yml")
    return dest


def _quick_with(edit) -> str:
    cfg = load_yaml(REPO / "config" / "quick.yaml")
    edit(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


_QUICK = (REPO / "config" / "quick.yaml").read_text()
_RECIPES_LINE = _QUICK.split("\n").index("recipes:") + 1  # 1-based: the inserted key is on the next line


@pytest.mark.parametrize("config_text, expected", [
    (_QUICK.replace("\nrecipes:\n", "\nrecipes:\n  at: {method: standard}\n", 1),
     rf"invalid config: \S*bad\.yaml: key recipes\.at is given twice \(lines {_RECIPES_LINE + 1} and \d+\)"),
    pytest.param(_quick_with(lambda c: c.update(seeds=[0, 1, 0])),
                 r"invalid config: key seeds: \[0, 1, 0\] has non-unique elements", marks=pytest.mark.slow),
    (_quick_with(lambda c: c["recipes"].update(at_copy=dict(c["recipes"]["at"])) or
                 c["experiments"]["cifar10"]["recipes"].append("at_copy")),
     r"config key recipes\.at_copy: trains the same tiny run on cifar10 as recipes\.at "),
    pytest.param(_quick_with(lambda c: c["evaluation"]["cifar10"].update(eps=1)),
                 r"config key evaluation\.cifar10\.eps: eps 1 is 255/255 of the pixel range, above the sane "
                 r"L-inf bound 64/255 \(did you mean 1/255\?\)", marks=pytest.mark.slow),
], ids=["yaml-key-twice", "seed-twice", "recipe-twice", "eps-1"])
def test_the_workflow_refuses_a_config_that_says_a_thing_twice(tmp_path, config_text, expected):
    wf = _workflow_copy(tmp_path / "wf")
    (wf / "bad.yaml").write_text(config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", "bad.yaml"], cwd=wf,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert re.search(expected, proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-2000:]
    assert "Building DAG" not in proc.stdout + proc.stderr


# ============================================================================= kind 4: runtime failures


def _disk_full_after(limit: int):
    """A ``torch.save`` that writes ``limit`` bytes into its file, then hits a full disk (ENOSPC)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:limit])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_disk_full_while_writing_a_teacher_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "weights.pt"
    torch.save(build_model("tiny").state_dict(), src)
    out = tmp_path / "teachers" / "cifar10" / "t.pt"
    monkeypatch.setattr(mixacm.utils.torch, "save", _disk_full_after(100))
    assert main(["teacher", "--path", str(src), "--arch", "tiny", "--out", str(out)]) == 2
    err = one_line_error(capsys, "teacher")
    assert f"cannot write {out}: No space left on device (ENOSPC): the disk is full" in err
    assert not (tmp_path / "teachers").exists()


def test_disk_full_while_writing_a_training_checkpoint_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    root = cifar_folder(tmp_path / "data", per_class=2)
    (tmp_path / "run.yaml").write_text(run_config_text(root).replace("method: {name: at}", "method: {name: standard}"))
    out = tmp_path / "runs" / "r"
    monkeypatch.setattr(mixacm.utils.torch, "save", _disk_full_after(1000))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out-dir", str(out)]) == 2
    err = one_line_error(capsys, "train")
    assert f"cannot write {out / 'state.pt'}: No space left on device (ENOSPC)" in err
    assert not (tmp_path / "runs").exists()


def test_atomic_write_turns_file_system_errors_into_one_line_and_removes_its_folders(tmp_path):
    def fail(_):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with pytest.raises(WriteFailed, match=r"cannot write .*/a/b/c\.json: Read-only file system \(EROFS\)$"):
        mixacm.utils.atomic_write(tmp_path / "a" / "b" / "c.json", fail)
    assert list(tmp_path.iterdir()) == []

    def bug(_):  # not a file-system error: raised as it is
        raise KeyError("x")

    with pytest.raises(KeyError):
        mixacm.utils.atomic_write(tmp_path / "d.json", bug)


@pytest.mark.parametrize("blob, refused", [
    ({"state_dict": None, "args": argparse.Namespace(lr=0.1)}, "argparse.Namespace"),
    ({"state_dict": None, "best_acc": np.float64(0.5)}, "numpy._core.multiarray.scalar"),
    (None, "mixacm.models.tiny.TinyResNet"),
], ids=["namespace", "numpy-scalar", "whole-module"])
def test_a_pickled_checkpoint_names_the_refused_global_in_plain_text(tmp_path, capsys, blob, refused):
    model = build_model("tiny")
    path = tmp_path / "ckpt.pth"
    torch.save(model if blob is None else {**blob, "state_dict": model.state_dict()}, path)
    out = tmp_path / "t.pt"
    assert main(["teacher", "--path", str(path), "--arch", "tiny", "--out", str(out)]) == 2
    err = one_line_error(capsys, "teacher")
    assert f"torch.load(weights_only=True) refuses this file: it pickles the global {refused}" in err
    assert "re-save its weights as a plain state dict" in err and not out.exists()
    assert main(["evaluate", "--checkpoint", str(path), "--dataset", "cifar10", "--eps", "2/255",
                 "--out", str(out)]) == 2
    assert refused in one_line_error(capsys, "evaluate")


def test_an_eps_of_1_asks_whether_1_255_was_meant_and_large_eps_needs_the_flag(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "r.json"
    base = ["evaluate", "--checkpoint", str(tiny_model_file), "--dataset", "cifar10", "--out", str(out)]
    assert main([*base, "--eps", "1"]) == 2
    assert "eps '1' is 255/255 of the pixel range, above the sane L-inf bound 64/255 (did you mean 1/255?); " \
           "to attack at it anyway, pass --allow-large-eps" in one_line_error(capsys, "evaluate")
    assert main([*base, "--eps", "0.3"]) == 2
    assert "above the sane L-inf bound 64/255; to attack" in one_line_error(capsys, "evaluate")
    assert main([*base, "--eps", "8"]) == 2
    assert "did you mean 8/255?" in one_line_error(capsys, "evaluate")
    assert not out.exists()
    assert parse_linf_eps("64/255") == pytest.approx(MAX_LINF_EPS)
    assert parse_linf_eps("1", allow_large=True) == 1.0
    root = cifar_folder(tmp_path / "d", per_class=1)
    assert evaluate_cli(tiny_model_file, root, out) == 0  # 2/255 needs no flag
    assert main(["evaluate", "--checkpoint", str(tiny_model_file), "--dataset", "cifar10", "--data-root",
                 str(root), "--eps", "1", "--allow-large-eps", "--attacks", "clean", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["eps_text"] == "255/255"


# ============================================================================= kind 5: result files


@pytest.fixture
def result_file(tmp_path, tiny_model_file) -> Path:
    root = cifar_folder(tmp_path / "d", per_class=4)
    out = tmp_path / "result.json"
    info = json.dumps({"method": "at", "data_fraction": 1.0, "seed": 0})
    assert evaluate_cli(tiny_model_file, root, out, "--n", "40", "--run-info", info) == 0
    collect_results([out])  # a real result is consistent
    return out


def _edited(path: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    bad = path.with_name("bad.json")
    bad.write_text(json.dumps(doc))
    return bad


def _set_clean(**values):
    return lambda d: d["metrics"]["clean"].update(values)


@pytest.mark.parametrize("edit, match", [
    (_set_clean(accuracy_pct=99.0, correct=30, n=40),
     r"metrics\.clean\.accuracy_pct = 99\.0, but correct / n = 30 / 40 = 75 %$"),
    (_set_clean(accuracy_pct=0.75, correct=30, n=40),
     r"metrics\.clean\.accuracy_pct = 0\.75, but correct / n = 30 / 40 = 75 % \(a fraction where a percentage belongs\?\)"),
    (_set_clean(correct=None), r"metrics\.clean\.correct = None is not an integer in \[0, n = 40\]"),
    (_set_clean(n=50, correct=10, accuracy_pct=20.0), r"metrics\.clean\.n = 50, but the result is over n = 40 points"),
    (lambda d: d.update(schema=3), r"schema is 3; this code reads schema 1 or 2"),
    (lambda d: d.pop("provenance"), r"provenance is missing"),
    (lambda d: d["provenance"].pop("git_commit"), r"provenance\.git_commit is missing"),
    (lambda d: d.update(eps_text="8/255"), r"eps_text = '8/255' is 0\.0313725, but eps = 0\.00784"),
    (lambda d: d.pop("data"), r"data\.sha256 is missing: the identity of the evaluated images \(schema 2\)"),
    (lambda d: d["data"].update(images=39), r"data\.images = 39, but the result is over n = 40 points"),
    (lambda d: d["run"].update(data_source="CIFAR-100 (torchvision)"),
     r"run\.data_source = 'CIFAR-100 \(torchvision\)' is not CIFAR-10, but run\.dataset = 'cifar10'"),
    (lambda d: d["model_check"].update(num_classes=100), r"model_check\.num_classes = 100, but CIFAR-10 has 10 classes"),
], ids=["pct-vs-counts", "fraction", "no-counts", "metric-n", "schema", "no-provenance", "no-commit", "eps-text",
        "no-data-identity", "data-images", "data-source", "model-classes"])
def test_a_result_file_that_contradicts_itself_is_refused(result_file, capsys, edit, match):
    bad = _edited(result_file, edit)
    with pytest.raises(ResultFileError, match=rf"result file {bad}: {match}"):
        collect_results([bad])
    out = bad.with_name("table.csv")
    assert main(["table", "--table", "cifar10", "--results", str(bad), "--out", str(out)]) == 2
    one_line_error(capsys, "table")
    assert not out.exists()


def test_a_json_key_written_twice_and_a_pgd_eps_other_than_the_results_are_refused(result_file, tmp_path):
    text = result_file.read_text().replace('"accuracy_pct":', '"accuracy_pct": 99.0, "accuracy_pct":', 1)
    (tmp_path / "twice.json").write_text(text)
    with pytest.raises(ResultFileError, match=r"twice\.json: key 'accuracy_pct' is given twice in one object"):
        collect_results([tmp_path / "twice.json"])
    bad = _edited(result_file, lambda d: d["metrics"].update(
        pgd20={"accuracy_pct": 50.0, "correct": 20, "n": 40,
               "attack": {"name": "pgd", "eps": 8 / 255, "package": "mixacm"}}))
    with pytest.raises(ResultFileError, match=r"metrics\.pgd20\.attack\.eps = 0\.0313.*, but the result's eps = 0\.0078"):
        collect_results([bad])


def test_results_over_the_same_points_of_two_data_folders_are_not_mixed(result_file, tmp_path, tiny_model_file):
    other = cifar_folder(tmp_path / "other", per_class=4, seed=3)  # the same layout, other images
    info = json.dumps({"method": "trades", "data_fraction": 1.0, "seed": 0})
    out = tmp_path / "other.json"
    assert evaluate_cli(tiny_model_file, other, out, "--n", "40", "--run-info", info) == 0
    with pytest.raises(ResultFileError, match=rf"result files {result_file} and {out} evaluate 40 cifar10 test "
                                              r"points, but on different images"):
        collect_results([result_file, out])
    assert evaluate_cli(tiny_model_file, other, out, "--n", "20", "--run-info", info) == 0
    assert len(collect_results([result_file, out])) == 2  # other points: nothing to compare


def test_a_training_summary_whose_costs_disagree_is_refused(tmp_path):
    good = {"config_hash": "h", "name": "r", "wall_time_s": 7200.0, "world_size": 2, "device_hours": 4.0,
            "images": 1000, "train_time_s": 100.0, "images_per_s": 10.0, "device": "cuda:0"}
    (tmp_path / "good.json").write_text(json.dumps(good))
    # The cost counts the training loop: a GPU run's loop time x its GPUs.
    assert collect_costs([tmp_path / "good.json"]).iloc[0]["device_hours"] == pytest.approx(100.0 * 2 / 3600)
    for key, value, match in (("device_hours", 0.4, r"device_hours = 0\.4, but wall_time_s x world_size / 3600 = 4"),
                              ("images_per_s", 100.0, r"images_per_s = 100\.0, but images / train_time_s = 10"),
                              ("wall_time_s", -1.0, r"wall_time_s = -1\.0 is not a non-negative number")):
        (tmp_path / "bad.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ResultFileError, match=rf"training summary {tmp_path / 'bad.json'}: {match}"):
            collect_costs([tmp_path / "bad.json"])


def test_every_published_result_and_summary_is_consistent():
    from mixacm.report.results import check_train_summary, read_json, read_result_file

    published = REPO / "docs" / "results"
    results = sorted(published.rglob("eval_*.json"))
    summaries = sorted(published.rglob("train_summary.json"))
    assert results and summaries
    for path in results:
        read_result_file(path)
    for path in summaries:
        check_train_summary(read_json(path, "training summary"), path)


# ============================================================================= on a GPU (-m gpu)


@pytest.mark.gpu
def test_on_cuda_randomness_is_told_apart_and_seeded_and_an_export_keeps_its_range(tmp_path, blob_net):
    """cuDNN's rounding in a deterministic CNN must not read as randomness (tolerance 1e-3 of the
    largest logit); a randomised model's draws are seeded on the device; an exported program
    moved to the GPU keeps its batch range and its counts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mixacm.evaluate import check_model

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cnn = build_model("tiny").to(dev).eval()
    x = torch.rand(512, 3, 32, 32, device=dev)
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        record = check_model(cnn, x, 10)[1]
        assert not record["randomised"] and record["batch_dependence_max_abs"] < 1e-3
    torch.backends.cudnn.benchmark = False

    images = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ds = torch.utils.data.TensorDataset(images, torch.arange(200) % 10)
    ds.targets = (torch.arange(200) % 10).tolist()
    noisy = NoisyInput(cnn.cpu()).to(dev)
    kw = dict(eps="2/255", n=200, batch_size=50, progress=False, device=dev)
    with pytest.raises(ModelCheckError, match="the model is randomised"):
        evaluate(noisy, ds, ["clean", "pgd3"], **kw)
    assert evaluate(noisy, ds, ["clean"], **kw)["metrics"] == evaluate(noisy, ds, ["clean"], **kw)["metrics"]

    bounded = _export(cnn.cpu(), tmp_path / "bounded.pt2", batch=4, min=1, max=64)
    model = load_any_model(bounded, device=dev)[0]
    assert model.batch_sizes == (1, 64)
    kw = dict(eps="2/255", n=128, batch_size=64, progress=False, device=dev)
    exported = evaluate(model, ds, ["clean", "pgd3"], **kw)["metrics"]
    module = evaluate(cnn, ds, ["clean", "pgd3"], **kw)["metrics"]
    assert {k: m["correct"] for k, m in exported.items()} == {k: m["correct"] for k, m in module.items()}
    with pytest.raises(CheckpointError, match="accepts batches of 1 to 64 images, not 128"):
        evaluate(model, ds, ["clean"], **{**kw, "batch_size": 128})


def test_the_audit_does_not_use_an_autoattack_result_that_contradicts_itself(result_file, tiny_model_file, capsys):
    bad = _edited(result_file, lambda d: d["metrics"].update(
        autoattack={"accuracy_pct": 0.5, "correct": 20, "n": 40,
                    "attack": {"name": "autoattack", "eps": d["eps"], "package": "pyautoattack"}}))
    out = bad.with_name("audit.json")
    assert main(["audit", "--checkpoint", str(tiny_model_file), "--dataset", "cifar10", "--eps", "2/255",
                 "--autoattack-result", str(bad), "--out", str(out)]) == 2
    assert (f"--autoattack-result {bad}: metrics.autoattack.accuracy_pct = 0.5, but correct / n = 20 / 40 = 50 % "
            "(a fraction where a percentage belongs?)") in one_line_error(capsys, "audit")
    assert not out.exists()
