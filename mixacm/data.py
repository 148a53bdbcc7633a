"""Datasets, the decoded-image cache, class-balanced subsets and augmentations.

Every dataset yields ``(image, label)`` with ``image`` a float32 C x H x W tensor in [0, 1]
(models normalise inside) and ``label`` an int.

* ``cifar10`` / ``cifar100``: torchvision's files, or an image folder (``train/<class>/*.jpg``,
  ``test/<class>/...``; alphabetical class folders give CIFAR's label order). Both end up as one
  uint8 N x C x H x W tensor in memory, so an epoch is never bound by file reads or JPEG decoding.
* ``imagenet`` / ``imagefolder``: torchvision's ``ImageFolder`` layout, split folder ``train/`` or
  ``val/`` | ``test/``. Folders of small images (at most 64 px a side) are cached like CIFAR;
  larger images are decoded on the fly.

Root resolution: explicit ``root`` (config ``dataset.root``), else ``$MIXACM_DATA_<NAME>``, else
``$MIXACM_DATA_HOME/<name>`` (default ``~/.cache/mixacm/data/<name>``), where torchvision downloads
when ``download=True``.

Augmentations (torchvision.transforms.v2 on uint8 tensors): CIFAR-style random crop with 4 px of
zero padding + horizontal flip; ImageNet ``RandomResizedCrop(224)`` + flip for training and
``Resize(256)`` + ``CenterCrop(224)`` otherwise. Mixup belongs to the method, not here. These
pipelines transform one image at a time; training batches come from ``mixacm.loader``, which runs
the same steps batched on the device (cached images) or in worker processes (image folders).
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import v2

from mixacm.utils import atomic_torch_save

DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_JPEG = (".jpg", ".jpeg")
# Images at most this many pixels a side are decoded once and held in memory.
SMALL_IMAGE_MAX_SIDE = 64

_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}
_TORCHVISION = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class DataError(FileNotFoundError):
    """Data that cannot be found or read; the message says where it looked and what to set."""


# ----------------------------------------------------------------------------- datasets


class CachedImageDataset(Dataset):
    """Images held in memory as one uint8 N x C x H x W tensor, labels as an int64 tensor."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str], *, source: str,
                 source_detail: str, transform: Callable[[Tensor], Tensor]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets_tensor = torch.as_tensor(targets, dtype=torch.int64)
        self.classes = list(classes)
        self.source = source
        self.source_detail = source_detail
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return self.targets_tensor.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i]), int(self.targets_tensor[i])


class FolderDataset(tv_datasets.ImageFolder):
    """``ImageFolder`` of large images decoded on the fly with ``torchvision.io`` (RGB tensors)."""

    def __init__(self, root: Path, transform: Callable[[Tensor], Tensor], *, source: str,
                 source_detail: str) -> None:
        super().__init__(str(root), transform=transform, loader=_decode_rgb, is_valid_file=_is_image)
        self.source = source
        self.source_detail = source_detail

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


@contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    # torchvision 0.29 warns on every decode call that torchvision.io will move to TorchCodec;
    # the pinned version decodes correctly, and 50k warnings would bury real ones.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def _decode_rgb(path: str) -> Tensor:
    with _quiet_torchvision_io():
        return decode_image(path, mode=ImageReadMode.RGB)


def dataset_source(dataset: Dataset, detail: bool = False) -> str:
    """The human-readable data source recorded in results, e.g. ``"CIFAR-10 (JPEG copy)"``.

    ``detail=True`` adds where the files are (``"CIFAR-10 (JPEG copy, image folder /path)"``).
    Works through ``torch.utils.data.Subset`` wrappers.
    """
    base = _base_dataset(dataset)
    try:
        return base.source_detail if detail else base.source
    except AttributeError:
        raise TypeError(f"{type(base).__name__} was not made by mixacm.data.load_dataset") from None


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels as an int64 array, in dataset order (Subsets are followed down to their base)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, CachedImageDataset):
        return dataset.targets_tensor.numpy()
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, dtype=np.int64)
    raise TypeError(f"{type(dataset).__name__} has no `targets`; cannot read its labels without decoding it")


def _base_dataset(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


# ----------------------------------------------------------------------------- transforms


def cifar_transform(augment: bool, size: int = 32, padding: int = 4) -> Callable[[Tensor], Tensor]:
    """Crop(size, zero padding 4) + horizontal flip when ``augment``; always uint8 -> float [0, 1]."""
    steps: list[Any] = [v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def imagenet_transform(augment: bool, size: int = 224, resize: int = 256) -> Callable[[Tensor], Tensor]:
    """RandomResizedCrop(224) + flip for training; Resize(256) + CenterCrop(224) otherwise."""
    if augment:
        steps: list[Any] = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    # Resizing happens on uint8 images, so the result stays in [0, 1] after scaling.
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


# ----------------------------------------------------------------------------- root resolution


def env_var(name: str) -> str:
    return f"MIXACM_DATA_{name.upper()}"


def default_data_dir(name: str) -> Path:
    home = os.environ.get("MIXACM_DATA_HOME")
    return (Path(home).expanduser() if home else user_cache_dir() / "mixacm" / "data") / name


def resolve_root(name: str, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data folder and where it came from (``dataset.root``, the env var or the default)."""
    _check_name(name)
    if root is not None and str(root) != "":
        return Path(root).expanduser(), "dataset.root"
    env = os.environ.get(env_var(name))
    if env:
        return Path(env).expanduser(), f"${env_var(name)}"
    return default_data_dir(name), "the default download folder"


def user_cache_dir() -> Path:
    """The user's cache folder: ``$XDG_CACHE_HOME``, else ``~/.cache`` (the XDG default)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def default_cache_dir() -> Path:
    """Where decoded images are cached: ``$MIXACM_CACHE_DIR``, else ``<user cache>/mixacm/decoded``.

    Not the working directory: a cache there lands in checkouts and wherever ``mixacm evaluate``
    runs, and is decoded again for each of them."""
    env = os.environ.get("MIXACM_CACHE_DIR")
    return Path(env).expanduser() if env else user_cache_dir() / "mixacm" / "decoded"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (dataset.name); valid: {', '.join(DATASETS)}")


def _is_image_folder(root: Path) -> bool:
    train = root / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def _split_dir(root: Path, split: str) -> Path:
    candidates = {"train": ["train"], "test": ["test", "val"], "val": ["val", "test"]}[split]
    for sub in candidates:
        if (root / sub).is_dir():
            return root / sub
    raise DataError(
        f"image folder {root} has no {' or '.join(s + '/' for s in candidates)} split folder "
        f"(expected {root}/{candidates[0]}/<class>/<image>)"
    )


def _sentence(text: str) -> str:
    """``text`` ending with a full stop (torchvision's messages often lack one)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _not_found(name: str, root: Path, origin: str, download: bool, cause: str = "") -> DataError:
    pretty = _PRETTY.get(name, name)
    files = f" or torchvision's files ({_TORCHVISION[name].base_folder}/)" if name in _TORCHVISION else ""
    how = (
        f"Point the pipeline at local data with the config key `dataset.root` (pipeline config: "
        f"`data.{name}.root`; CLI --data-root) or the environment variable {env_var(name)}"
    )
    if name in _TORCHVISION:
        how += (
            ", or set `dataset.download: true` to let torchvision download it (needs internet)"
            if not download else "; `dataset.download: true` needs internet access"
        )
    return DataError(
        f"{pretty} data not found: looked in {root} (from {origin}) for an image folder "
        f"(train/<class>/<image>, test/ or val/){files}.{(' ' + _sentence(cause)) if cause else ''} {how}."
    )


# ----------------------------------------------------------------------------- loading


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None, download: bool = False,
                 cache: bool = True, augment: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """One split of a dataset as ``(float image in [0, 1], int label)`` pairs.

    ``split`` is ``"train"`` or ``"test"`` (``"val"`` is accepted for image folders).
    ``cache`` decodes an image folder of small images once into memory and persists the decoded
    tensor under ``cache_dir`` (default :func:`default_cache_dir`), keyed by the folder and its
    file list, so another process skips decoding. ``augment`` applies the training augmentations.
    Missing data raises :class:`DataError` naming ``dataset.root``, the env var and
    ``dataset.download``.
    """
    _check_name(name)
    if split not in ("train", "test", "val"):
        raise ValueError(f"unknown split {split!r}; valid: train, test, val")
    data_root, origin = resolve_root(name, root)
    pretty = _PRETTY.get(name, name)

    if _is_image_folder(data_root):
        folder = _split_dir(data_root, split)
        if name == "imagenet" or (name == "imagefolder" and not _small_images(folder)):
            transform = imagenet_transform(augment)
            source, detail = _folder_source(name, data_root, jpeg=False)
            return FolderDataset(folder, transform, source=source, source_detail=detail)
        n_classes = len(find_classes(str(folder))[0])
        if name in _NUM_CLASSES and n_classes != _NUM_CLASSES[name]:
            raise DataError(
                f"{folder} has {n_classes} class folders, but {pretty} has {_NUM_CLASSES[name]}: "
                f"check dataset.root / {env_var(name)} ({data_root})"
            )
        images, targets, classes, files = _load_folder_images(folder, cache, cache_dir)
        source, detail = _folder_source(name, data_root, jpeg=all(f.lower().endswith(_JPEG) for f in files))
        return CachedImageDataset(
            images, targets, classes, source=source, source_detail=detail,
            transform=cifar_transform(augment, size=images.shape[-1]),
        )

    if name not in _TORCHVISION:
        raise _not_found(name, data_root, origin, download)
    try:
        tv = _TORCHVISION[name](str(data_root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise _not_found(name, data_root, origin, download, cause=f"torchvision: {err}") from None
    except (urllib.error.URLError, OSError) as err:
        raise _not_found(name, data_root, origin, download,
                         cause=f"Downloading failed ({err}); is there internet access?") from None
    images = torch.from_numpy(np.ascontiguousarray(tv.data)).permute(0, 3, 1, 2).contiguous()
    return CachedImageDataset(
        images, torch.as_tensor(tv.targets), tv.classes, source=f"{pretty} (torchvision)",
        source_detail=f"{pretty} (torchvision files in {data_root})",
        transform=cifar_transform(augment, size=images.shape[-1]),
    )


def _folder_source(name: str, root: Path, jpeg: bool) -> tuple[str, str]:
    """Short and detailed source strings; a CIFAR folder of JPEGs is the "JPEG copy" (lossy pixels)."""
    if name == "imagefolder":
        return f"image folder {root.name}", f"image folder {root}"
    kind = "JPEG copy" if jpeg and name in _NUM_CLASSES else "image folder"
    return f"{_PRETTY[name]} ({kind})", f"{_PRETTY[name]} ({kind}, image folder {root})"


def _small_images(folder: Path) -> bool:
    classes, idx = find_classes(str(folder))
    for cls in classes:
        for entry in sorted(os.scandir(folder / cls), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                h, w = _decode_rgb(entry.path).shape[-2:]
                return max(h, w) <= SMALL_IMAGE_MAX_SIDE
    raise DataError(f"image folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")


# Decoded folders of this process, so that loading a split twice costs nothing.
_MEMORY: dict[str, tuple[Tensor, Tensor, list[str], list[str]]] = {}


def _folder_key(folder: Path, samples: list[tuple[str, int]]) -> str:
    """Hash of the folder path and its file list (relative names, sizes, modification times)."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _load_folder_images(folder: Path, cache: bool, cache_dir: str | os.PathLike | None
                        ) -> tuple[Tensor, Tensor, list[str], list[str]]:
    classes, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMAGE_EXTENSIONS)
    if not samples:
        raise DataError(f"image folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    files = [os.path.relpath(p, folder) for p, _ in samples]
    targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
    if not cache:
        return decode_files([p for p, _ in samples]), targets, classes, files

    key = _folder_key(folder, samples)
    if key in _MEMORY:
        return _MEMORY[key]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{folder.parent.name}-{folder.name}-{key}.pt"
    images = _read_cache(cache_file, len(samples))
    if images is None:
        images = decode_files([p for p, _ in samples])
        try:
            atomic_torch_save({"images": images, "files": files, "folder": str(folder.resolve())}, cache_file)
        except OSError:
            pass  # a read-only cache folder only costs the next process a decode
    _MEMORY[key] = (images, targets, classes, files)
    return _MEMORY[key]


def _read_cache(cache_file: Path, n: int) -> Tensor | None:
    if not cache_file.is_file():
        return None
    try:
        # mmap: the file's pages are shared with the OS page cache instead of copied.
        images = torch.load(cache_file, map_location="cpu", weights_only=True, mmap=True)["images"]
    except Exception:  # a truncated or foreign file is rebuilt, never trusted
        return None
    return images if isinstance(images, Tensor) and images.dtype == torch.uint8 and len(images) == n else None


def decode_files(paths: Sequence[str | os.PathLike], chunk: int = 4096) -> Tensor:
    """Decode image files into one uint8 N x 3 x H x W tensor (all images must share a size).

    JPEGs are decoded in batches with ``torchvision.io.decode_jpeg`` (about 4x faster than one
    call a file for 32 x 32 images); other formats with ``decode_image``.
    """
    out: Tensor | None = None
    for start in range(0, len(paths), chunk):
        part = [str(p) for p in paths[start:start + chunk]]
        jpeg = [i for i, p in enumerate(part) if p.lower().endswith(_JPEG)]
        decoded: list[Tensor | None] = [None] * len(part)
        with _quiet_torchvision_io():
            raw = [read_file(p) for p in part]
            if jpeg:
                for i, img in zip(jpeg, decode_jpeg([raw[i] for i in jpeg], mode=ImageReadMode.RGB)):
                    decoded[i] = img
            for i, img in enumerate(decoded):
                if img is None:
                    decoded[i] = decode_image(raw[i], mode=ImageReadMode.RGB)
        if out is None:
            out = torch.empty((len(paths), *decoded[0].shape), dtype=torch.uint8)
        for i, img in enumerate(decoded):
            if img.shape != out.shape[1:]:
                raise DataError(
                    f"{part[i]} is {tuple(img.shape[1:])} pixels but the first image is "
                    f"{tuple(out.shape[2:])}: in-memory caching needs one image size (set dataset.cache: false)"
                )
            out[start + i] = img
    if out is None:
        raise DataError("no image files to decode")
    return out


# ----------------------------------------------------------------------------- subsets


def _as_labels(labels: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    arr = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _class_groups(labels: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Indices of each class (in label order), shuffled by ``rng`` or kept in dataset order."""
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return [rng.permutation(g) if rng is not None else g for g in groups]


def _balanced_counts(sizes: Sequence[int], n: int) -> list[int]:
    """Split ``n`` over classes as evenly as their sizes allow (water-filling; lower labels first)."""
    if not 0 <= n <= sum(sizes):
        raise ValueError(f"cannot take {n} points from {sum(sizes)}")
    counts = [0] * len(sizes)
    left = n
    open_ = [c for c, s in enumerate(sizes) if s > 0]
    while left > 0:
        share, extra = divmod(left, len(open_))
        for rank, c in enumerate(open_):
            take = min(share + (rank < extra), sizes[c] - counts[c])
            counts[c] += take
            left -= take
        open_ = [c for c in open_ if counts[c] < sizes[c]]
    return counts


def balanced_subset(labels: Sequence[int] | np.ndarray | Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset: ``round(fraction * n_c)`` of each class.

    Deterministic in ``seed``; for one seed, a smaller fraction's subset is contained in a larger
    one's (each class is one permutation, cut at different lengths), so the less-data curve compares
    nested training sets. Every class keeps at least one image.
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dataset.fraction {fraction!r} is outside (0, 1]")
    arr = _as_labels(labels)
    groups = _class_groups(arr, np.random.default_rng(seed))
    picked = [g[: max(1, int(round(fraction * len(g))))] for g in groups]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def holdout_split(labels: Sequence[int] | np.ndarray | Tensor, n_holdout: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, holdout_idx)``, both sorted; the holdout has ``n_holdout`` points, classes balanced."""
    arr = _as_labels(labels)
    if not 0 <= int(n_holdout) < len(arr):
        raise ValueError(f"dataset.holdout {n_holdout!r} must be in [0, {len(arr)}) for {len(arr)} images")
    groups = _class_groups(arr, np.random.default_rng(seed))
    counts = _balanced_counts([len(g) for g in groups], int(n_holdout))
    held = np.sort(np.concatenate([g[:k] for g, k in zip(groups, counts)])) if groups else np.zeros(0, np.int64)
    mask = np.ones(len(arr), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def balanced_first_n(labels: Sequence[int] | np.ndarray | Tensor, n: int | None) -> np.ndarray:
    """Sorted indices of the first ``n // K`` images of each class (remainder to the lowest labels).

    The deterministic test subset of ``evaluate --n`` (n = 1000 on CIFAR-10: 100 a class).
    ``None`` means all images.
    """
    arr = _as_labels(labels)
    if n is None:
        return np.arange(len(arr))
    if not 0 < int(n) <= len(arr):
        raise ValueError(f"n = {n!r} test points requested, but the split has {len(arr)}")
    groups = _class_groups(arr, None)
    counts = _balanced_counts([len(g) for g in groups], int(n))
    return np.sort(np.concatenate([g[:k] for g, k in zip(groups, counts)]))
