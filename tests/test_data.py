"""Data: subsets, the decoded-image cache, augmentations, error messages (the loader: test_loader.py)."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, write_file

from mixacm import data
from mixacm.loader import make_train_loader

# The helpers write and read images with torchvision.io, which warns about TorchCodec on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- helpers


def make_folder(root: Path, classes: list[str], per_class: dict[str, int], size=(32, 32), fmt="png",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Write random RGB images as train/ and test/ image folders; returns the written pixels by path."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    for split, n_scale in (("train", 1), ("test", 1)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[cls] * n_scale):
                img = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
                path = d / f"{i:04d}.{fmt}"
                write_file(str(path), encode_png(img) if fmt == "png" else encode_jpeg(img, quality=90))
                written[str(path)] = img
    return written


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    # Each test decodes afresh: no folder from another test in this process's memory cache.
    monkeypatch.setattr(data, "_MEMORY", {})
    return tmp_path / "cache"


def to_bytes(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def labels_of(n_per_class: list[int]) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    return np.random.default_rng(123).permutation(labels)


# ----------------------------------------------------------------------------- subsets


def test_balanced_subset_takes_the_same_fraction_of_every_class_deterministically():
    labels = labels_of([100, 60, 40, 200])
    idx = data.balanced_subset(labels, 0.25, seed=3)
    assert np.array_equal(idx, data.balanced_subset(labels, 0.25, seed=3))
    assert not np.array_equal(idx, data.balanced_subset(labels, 0.25, seed=4))
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.bincount(labels[idx]).tolist() == [25, 15, 10, 50]
    assert np.array_equal(data.balanced_subset(labels, 1.0, seed=3), np.arange(len(labels)))


def test_balanced_subsets_of_one_seed_are_nested():
    labels = labels_of([50] * 10)
    small, large = data.balanced_subset(labels, 0.1, 7), data.balanced_subset(labels, 0.5, 7)
    assert set(small) < set(large)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_balanced_subset_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="dataset.fraction"):
        data.balanced_subset(labels_of([10, 10]), fraction, 0)


def test_holdout_split_is_disjoint_complete_and_balanced():
    labels = labels_of([50] * 10)
    train, held = data.holdout_split(labels, 25, seed=0)
    assert len(held) == 25 and len(train) == 475
    assert not set(train) & set(held)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(500))
    assert sorted(np.bincount(labels[held], minlength=10).tolist()) == [2] * 5 + [3] * 5
    again_train, again_held = data.holdout_split(labels, 25, seed=0)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert len(data.holdout_split(labels, 0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="dataset.holdout"):
        data.holdout_split(labels, 500, seed=0)


def test_balanced_first_n_takes_the_first_images_of_each_class():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 2, 1])
    # 6 points, 3 classes: the first two of each class, in dataset order.
    assert data.balanced_first_n(labels, 6).tolist() == [0, 1, 2, 3, 4, 6]
    # 7 points: the extra one goes to the lowest label.
    assert np.bincount(labels[data.balanced_first_n(labels, 7)]).tolist() == [3, 2, 2]
    # A class too small to give its share is filled up from the others.
    short = np.array([0] * 10 + [1] * 1 + [2] * 10)
    assert np.bincount(short[data.balanced_first_n(short, 9)]).tolist() == [4, 1, 4]
    assert len(data.balanced_first_n(labels, None)) == len(labels)
    with pytest.raises(ValueError, match="13"):
        data.balanced_first_n(labels, 13)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_reads_exact_pixels_and_alphabetical_labels(tmp_path, cache_dir):
    written = make_folder(tmp_path / "d", ["b_cls", "a_cls", "c_cls"], {"a_cls": 2, "b_cls": 3, "c_cls": 1})
    ds = data.load_dataset("imagefolder", "train", root=tmp_path / "d", cache_dir=cache_dir)
    assert ds.classes == ["a_cls", "b_cls", "c_cls"]
    assert ds.targets == [0, 0, 1, 1, 1, 2]
    x, y = ds[2]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 1
    # PNG is lossless: the float image gives back exactly the written bytes.
    expected = written[str(tmp_path / "d" / "train" / "b_cls" / "0000.png")]
    assert torch.equal(to_bytes(x), expected) and torch.allclose(x, expected / 255, atol=1e-7)
    assert data.dataset_source(ds) == "image folder d"
    assert data.dataset_source(ds, detail=True) == f"image folder {tmp_path / 'd'}"


def test_cache_equals_uncached_decoding_and_a_second_process_skips_decoding(tmp_path, cache_dir, monkeypatch):
    make_folder(tmp_path / "d", CIFAR10_CLASSES, dict.fromkeys(CIFAR10_CLASSES, 3), fmt="jpg")
    uncached = data.load_dataset("cifar10", "test", root=tmp_path / "d", cache=False)
    cached = data.load_dataset("cifar10", "test", root=tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(uncached.images, cached.images) and uncached.targets == cached.targets
    files = list(cache_dir.glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "d").rglob("*.pt"))
    # A new process (empty memory cache) reads the persisted tensor and never decodes a file.
    monkeypatch.setattr(data, "_MEMORY", {})
    monkeypatch.setattr(data, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    again = data.load_dataset("cifar10", "test", root=tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(again.images, cached.images)


def test_cache_key_follows_the_file_list_and_a_corrupt_cache_is_rebuilt(tmp_path, cache_dir, monkeypatch):
    make_folder(tmp_path / "d", ["x", "y"], {"x": 2, "y": 2})
    first = data.load_dataset("imagefolder", "train", root=tmp_path / "d", cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.pt")
    cache_file.write_bytes(b"truncated")
    monkeypatch.setattr(data, "_MEMORY", {})
    rebuilt = data.load_dataset("imagefolder", "train", root=tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(rebuilt.images, first.images)
    write_file(str(tmp_path / "d" / "train" / "y" / "9999.png"), encode_png(torch.zeros(3, 32, 32, dtype=torch.uint8)))
    grown = data.load_dataset("imagefolder", "train", root=tmp_path / "d", cache_dir=cache_dir)
    assert len(grown) == 5 and len(list(cache_dir.glob("*.pt"))) == 2


def test_source_says_jpeg_copy_only_for_a_jpeg_cifar_folder(tmp_path, cache_dir):
    make_folder(tmp_path / "jpg", CIFAR10_CLASSES, dict.fromkeys(CIFAR10_CLASSES, 1), fmt="jpg")
    make_folder(tmp_path / "png", CIFAR10_CLASSES, dict.fromkeys(CIFAR10_CLASSES, 1), fmt="png")
    jpg = data.load_dataset("cifar10", "test", root=tmp_path / "jpg", cache_dir=cache_dir)
    png = data.load_dataset("cifar10", "test", root=tmp_path / "png", cache_dir=cache_dir)
    assert data.dataset_source(jpg) == "CIFAR-10 (JPEG copy)"
    assert data.dataset_source(jpg, detail=True) == f"CIFAR-10 (JPEG copy, image folder {tmp_path / 'jpg'})"
    assert data.dataset_source(Subset(png, [0, 1])) == "CIFAR-10 (image folder)"
    assert data.dataset_labels(Subset(png, [3, 1])).tolist() == [3, 1]


def test_a_cifar10_folder_with_the_wrong_class_count_is_an_error(tmp_path, cache_dir):
    make_folder(tmp_path / "d", ["a", "b"], {"a": 1, "b": 1})
    with pytest.raises(data.DataError, match="2 class folders, but CIFAR-10 has 10"):
        data.load_dataset("cifar10", "train", root=tmp_path / "d", cache_dir=cache_dir)


def test_env_var_points_at_the_data(tmp_path, cache_dir, monkeypatch):
    make_folder(tmp_path / "d", CIFAR10_CLASSES, dict.fromkeys(CIFAR10_CLASSES, 1))
    monkeypatch.setenv("MIXACM_DATA_CIFAR10", str(tmp_path / "d"))
    assert len(data.load_dataset("cifar10", "train", cache_dir=cache_dir)) == 10


# ----------------------------------------------------------------------------- errors


def test_missing_root_names_the_config_key_the_env_var_and_download(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError) as err:
        data.load_dataset("cifar10", "train", root=missing, download=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for needle in (str(missing), "dataset.root", "data.cifar10.root", "MIXACM_DATA_CIFAR10",
                   "dataset.download: true"):
        assert needle in msg
    # torchvision's sentence ends with a full stop before ours begins
    assert "download it. Point the pipeline" in msg
    assert not missing.exists()  # looking wrote nothing


def test_missing_env_root_says_it_came_from_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXACM_DATA_CIFAR100", str(tmp_path / "gone"))
    with pytest.raises(data.DataError, match=r"from \$MIXACM_DATA_CIFAR100"):
        data.load_dataset("cifar100", "test")


def test_failed_download_is_a_data_error_about_internet(tmp_path, monkeypatch):
    class offline:  # torchvision's CIFAR10 without a network
        base_folder = "cifar-10-batches-py"

        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setitem(data._TORCHVISION, "cifar10", offline)
    with pytest.raises(data.DataError, match="internet"):
        data.load_dataset("cifar10", "train", root=tmp_path / "dl", download=True)


def test_imagefolder_without_root_and_unknown_names_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXACM_DATA_HOME", str(tmp_path))
    with pytest.raises(data.DataError, match="MIXACM_DATA_IMAGEFOLDER"):
        data.load_dataset("imagefolder", "train")
    with pytest.raises(ValueError, match="dataset.name"):
        data.load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("cifar10", "validation")


# ----------------------------------------------------------------------------- augmentations


def test_cifar_augment_is_a_padded_shift_or_flip_of_the_image():
    torch.manual_seed(0)
    img = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    aug = data.cifar_transform(augment=True)
    outs = [aug(img) for _ in range(40)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1
        out = to_bytes(out)
        candidates = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in candidates)
    assert len({o.sum().item() for o in outs}) > 5  # it is random
    assert torch.equal(to_bytes(data.cifar_transform(augment=False)(img)), img)


def test_imagenet_transforms_give_224_crops_in_0_1():
    img = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8)
    for augment in (True, False):
        out = data.imagenet_transform(augment)(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1


def test_imagenet_folder_streams_large_images(tmp_path, cache_dir):
    make_folder(tmp_path / "inet", ["n01", "n02"], {"n01": 1, "n02": 1}, size=(96, 120))
    (tmp_path / "inet" / "test").rename(tmp_path / "inet" / "val")
    ds = data.load_dataset("imagenet", "test", root=tmp_path / "inet", cache_dir=cache_dir)
    x, y = ds[1]
    assert x.shape == (3, 224, 224) and y == 1 and data.dataset_source(ds) == "ImageNet (image folder)"
    assert isinstance(data.load_dataset("imagefolder", "val", root=tmp_path / "inet"), data.FolderDataset)
    assert not cache_dir.exists()  # large images are never cached


# ----------------------------------------------------------------------------- the shared JPEG copy


def test_shared_jpeg_copy_test_split(cifar10_jpeg_root):
    ds = data.load_dataset("cifar10", "test", root=cifar10_jpeg_root)
    assert len(ds) == 10_000 and ds.classes == CIFAR10_CLASSES
    assert np.bincount(data.dataset_labels(ds)).tolist() == [1000] * 10
    assert data.dataset_source(ds) == "CIFAR-10 (JPEG copy)"
    x, y = ds[data.dataset_labels(ds).tolist().index(3)]
    ref = decode_image(str(cifar10_jpeg_root / "test" / "cat" / "0000.jpg"), mode=ImageReadMode.RGB)
    assert y == 3 and torch.equal(to_bytes(x), ref)


@pytest.mark.slow
def test_shared_jpeg_copy_train_split_and_an_augmented_epoch(cifar10_jpeg_root):
    ds = data.load_dataset("cifar10", "train", root=cifar10_jpeg_root, augment=True)
    assert len(ds) == 50_000 and np.bincount(data.dataset_labels(ds)).tolist() == [5000] * 10
    n = sum(len(y) for _, y in make_train_loader(ds, 500, seed=0))
    assert n == 50_000


def test_decoded_image_cache_defaults_to_the_user_cache_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIXACM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "mixacm" / "decoded"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "mixacm" / "decoded"
    assert not data.default_cache_dir().is_relative_to(tmp_path)
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "mine"))
    assert data.default_cache_dir() == tmp_path / "mine"
