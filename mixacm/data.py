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
from dataclasses import dataclass
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
# The class names in label order: torchvision's CIFAR10.classes and CIFAR-100's fine_label_names
# (both alphabetical, so an image folder named after them gets CIFAR's labels from find_classes).
CIFAR_CLASSES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "cifar100": tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
        crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
        lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
        oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
        possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
        spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
        train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()),
}
_NUM_CLASSES = {name: len(classes) for name, classes in CIFAR_CLASSES.items()}
# Image formats torchvision.io does not decode here: such files in a class folder are refused by
# name rather than silently left out of the dataset.
_SKIPPED_IMAGE_FORMATS = (".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jp2",
                          ".heic", ".avif")
# Bumped whenever decoding or checking changes what a cache holds (2: every image checked,
# 16-bit PNGs scaled to 8 bits), so no cache written by older code is read.
CACHE_VERSION = 2
# Images shared by the train and test splits (pixel for pixel), or one image under two labels, in
# more than this fraction of the test split: the folder leaks its test set (verify_dataset).
MAX_SHARED_FRACTION = 0.01


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
    try:
        with _quiet_torchvision_io():
            img = decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as err:  # a truncated or foreign file, named in one line
        raise DataError(f"{path}: not a decodable image ({_first_line(err)}); replace or delete it") from None
    return _to_uint8(img, path)


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
        check_class_folders(name, data_root, folder)
        if name == "imagenet" or (name == "imagefolder" and not _small_images(folder)):
            transform = imagenet_transform(augment)
            source, detail = _folder_source(name, data_root, jpeg=False)
            return FolderDataset(folder, transform, source=source, source_detail=detail)
        images, targets, classes, files = _load_folder_images(folder, cache, cache_dir, image_rule(name))
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


def check_class_folders(name: str, root: Path, folder: Path) -> None:
    """What a split folder's class folders can get wrong, checked before any image is read.

    Labels are class-folder indices in alphabetical order, so: CIFAR folders must carry CIFAR's
    class names (``0`` .. ``99`` would sort 0, 1, 10, 11, ...; a misspelt name moves every label
    after it); every split must hold the same class folders (a class missing from test/ shifts
    the test labels after it); and no class folder may be empty. Raises ``DataError`` naming the
    folder."""
    classes = find_classes(str(folder))[0]
    expected = CIFAR_CLASSES.get(name)
    if expected is not None and tuple(classes) != expected:
        odd, missing = sorted(set(classes) - set(expected)), sorted(set(expected) - set(classes))
        what = (f"{folder} has {len(classes)} class folders, but {_PRETTY[name]} has {len(expected)}"
                if len(classes) != len(expected) else
                f"{folder}: class folders {_few(odd)} are not {_PRETTY[name]} class names (missing: {_few(missing)})")
        raise DataError(
            f"{what}; labels come from the folder names in alphabetical order, so they must be named "
            f"{', '.join(expected[:10])}{' ...' if len(expected) > 10 else ''}: check dataset.root / "
            f"{env_var(name)} ({root})")
    for split in ("train", "test", "val"):
        other = root / split
        # a split without class folders (ImageNet's unlabelled test/) has no labels to compare
        if other == folder or not other.is_dir() or not any(p.is_dir() for p in other.iterdir()):
            continue
        theirs = find_classes(str(other))[0]
        if theirs != classes:
            raise DataError(
                f"{folder} and {other} hold different class folders (only in {folder.name}/: "
                f"{_few(sorted(set(classes) - set(theirs))) or 'none'}; only in {split}/: "
                f"{_few(sorted(set(theirs) - set(classes))) or 'none'}): labels are folder indices in "
                "alphabetical order, so the two splits' labels would not mean the same classes")
    for cls in classes:
        if not any(_walk_files(folder / cls)):
            raise DataError(f"{folder / cls} is an empty class folder (no {', '.join(IMAGE_EXTENSIONS)} "
                            "files): fill it or remove it (labels are folder indices)")


def _walk_files(folder: Path) -> Iterator[str]:
    for parent, _, names in os.walk(folder, followlinks=True):
        for n in names:
            if n.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(parent, n)


def _few(items: Sequence[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


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


@dataclass(frozen=True)
class ImageRule:
    """What every image of a cached folder must be: ``size`` (H, W) or None (any, all alike);
    ``rgb`` True refuses grayscale and CMYK files (CIFAR's images are RGB) instead of converting
    them; ``what`` names the dataset in messages."""

    size: tuple[int, int] | None = None
    rgb: bool = False
    what: str = "image folder"


def image_rule(name: str) -> ImageRule:
    """The rule for dataset ``name``: CIFAR's images are 32 x 32 RGB; other folders convert to RGB."""
    if name in CIFAR_CLASSES:
        return ImageRule(size=(32, 32), rgb=True, what=_PRETTY[name])
    return ImageRule(what=_PRETTY.get(name, "image folder"))


# Decoded folders of this process, so that loading a split twice costs nothing.
_MEMORY: dict[str, tuple[Tensor, Tensor, list[str], list[str]]] = {}


def _folder_key(folder: Path, samples: list[tuple[str, int]], rule: ImageRule = ImageRule()) -> str:
    """Hash of the folder path, its file list (relative names, sizes, modification times), the
    image rule it was checked against and ``CACHE_VERSION``."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0{rule}\0{folder.resolve()}".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _list_images(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``make_dataset``'s (path, label) list; an image file in a format it would skip is refused."""
    def is_image(path: str) -> bool:
        low = path.lower()
        if low.endswith(_SKIPPED_IMAGE_FORMATS):
            raise DataError(f"{path}: {Path(path).suffix} images are not read (only "
                            f"{', '.join(IMAGE_EXTENSIONS)}); convert it, or the dataset silently loses it")
        return low.endswith(IMAGE_EXTENSIONS)

    return make_dataset(str(folder), class_to_idx, is_valid_file=is_image, allow_empty=True)


def _load_folder_images(folder: Path, cache: bool, cache_dir: str | os.PathLike | None,
                        rule: ImageRule = ImageRule()) -> tuple[Tensor, Tensor, list[str], list[str]]:
    classes, class_to_idx = find_classes(str(folder))
    samples = _list_images(folder, class_to_idx)
    if not samples:
        raise DataError(f"image folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    files = [os.path.relpath(p, folder) for p, _ in samples]
    targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
    if not cache:
        return decode_files([p for p, _ in samples], rule=rule), targets, classes, files

    key = _folder_key(folder, samples, rule)
    if key in _MEMORY:
        return _MEMORY[key]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{folder.parent.name}-{folder.name}-{key}.pt"
    images = _read_cache(cache_file, len(samples))
    if images is None:
        images = decode_files([p for p, _ in samples], rule=rule)
        try:
            atomic_torch_save({"images": images, "files": files, "folder": str(folder.resolve()),
                               "cache_version": CACHE_VERSION}, cache_file)
        except OSError:
            pass  # a read-only or full cache folder only costs the next process a decode
    _MEMORY[key] = (images, targets, classes, files)
    return _MEMORY[key]


def _read_cache(cache_file: Path, n: int) -> Tensor | None:
    if not cache_file.is_file():
        return None
    try:
        # mmap: the file's pages are shared with the OS page cache instead of copied.
        blob = torch.load(cache_file, map_location="cpu", weights_only=True, mmap=True)
        images = blob["images"]
    except Exception:  # a truncated or foreign file is rebuilt, never trusted
        return None
    ok = (blob.get("cache_version") == CACHE_VERSION and isinstance(images, Tensor)
          and images.dtype == torch.uint8 and images.dim() == 4 and len(images) == n)
    return images if ok else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.rsplit(", ", 1)[-1] if "decode" in text and ".cpp:" in text else text


def _unreadable(path: str, err: BaseException) -> DataError:
    return DataError(f"{path}: not a decodable image ({_first_line(err)}); replace or delete it")


def _decode_chunk(paths: Sequence[str]) -> list[Tensor]:
    """Decode ``paths`` with their channels as stored (JPEGs in one batched call); a file that
    cannot be read or decoded is named in one ``DataError``."""
    raw = []
    for p in paths:
        try:
            raw.append(read_file(p))
        except (RuntimeError, OSError) as err:
            raise DataError(f"{p}: cannot be read ({_first_line(err)})") from None
    decoded: list[Tensor | None] = [None] * len(paths)
    jpeg = [i for i, p in enumerate(paths) if p.lower().endswith(_JPEG)]
    with _quiet_torchvision_io():
        if jpeg:
            try:
                batch = decode_jpeg([raw[i] for i in jpeg], mode=ImageReadMode.UNCHANGED)
            except RuntimeError:  # the batched call names no file: find it one by one
                batch = [_decode_one(raw[i], paths[i], jpeg=True) for i in jpeg]
            for i, img in zip(jpeg, batch):
                decoded[i] = img
        for i, img in enumerate(decoded):
            if img is None:
                decoded[i] = _decode_one(raw[i], paths[i], jpeg=False)
    return decoded  # type: ignore[return-value]


def _decode_one(data: Tensor, path: str, jpeg: bool) -> Tensor:
    try:
        if jpeg:
            return decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
        return decode_image(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        raise _unreadable(path, err) from None


def _to_uint8(img: Tensor, path: str) -> Tensor:
    """8-bit pixels: a 16-bit image (PNG) scaled, ``round(v * 255 / 65535)``, never truncated."""
    if img.dtype == torch.uint16:
        return ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    if img.dtype != torch.uint8:
        raise DataError(f"{path}: {img.dtype} pixels; expected 8- or 16-bit images")
    return img


def _to_rgb(img: Tensor, path: str, rule: ImageRule) -> Tensor:
    """A decoded image (channels as stored) as 8-bit RGB under ``rule``, or a ``DataError``."""
    img = _to_uint8(img, path)
    channels = img.shape[0]
    if channels in (2, 4) and not (channels == 4 and path.lower().endswith(_JPEG)):
        alpha = img[-1]
        if int(alpha.min()) < 255:  # a translucent pixel: its RGB values are not what it shows
            raise DataError(f"{path} has a transparent alpha channel (lowest alpha {int(alpha.min())}/255): "
                            "its RGB values alone are not the image; flatten it onto a background first")
        img, channels = img[:-1], channels - 1
    if channels == 3:
        return img
    kind = "CMYK" if channels == 4 else "grayscale"
    if rule.rgb:
        raise DataError(f"{path} is a {kind} image, but {rule.what} images are RGB (3 channels); "
                        f"is this folder really {rule.what}?")
    if channels == 1:
        return img.expand(3, -1, -1).contiguous()
    with _quiet_torchvision_io():  # CMYK JPEG: libjpeg's own conversion
        return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def decode_files(paths: Sequence[str | os.PathLike], chunk: int = 4096, rule: ImageRule = ImageRule()) -> Tensor:
    """Decode image files into one uint8 N x 3 x H x W tensor (all images must share a size).

    Every image is checked once here: it decodes (else a ``DataError`` naming the file); 16-bit
    images are scaled to 8 bits; an opaque alpha channel is dropped, a transparent one refused;
    grayscale and CMYK files are converted to RGB, or refused when ``rule.rgb``; the size is
    ``rule.size`` when given. JPEGs are decoded in batches with ``torchvision.io.decode_jpeg``
    (about 4x faster than one call a file for 32 x 32 images); other formats with ``decode_image``.
    """
    out: Tensor | None = None
    for start in range(0, len(paths), chunk):
        part = [str(p) for p in paths[start:start + chunk]]
        for i, img in enumerate(_decode_chunk(part)):
            img = _to_rgb(img, part[i], rule)
            if out is None:
                out = torch.empty((len(paths), *img.shape), dtype=torch.uint8)
            if rule.size is not None and tuple(img.shape[1:]) != rule.size:
                raise DataError(f"{part[i]} is {img.shape[1]} x {img.shape[2]} pixels, but {rule.what} "
                                f"images are {rule.size[0]} x {rule.size[1]}")
            if img.shape != out.shape[1:]:
                raise DataError(
                    f"{part[i]} is {tuple(img.shape[1:])} pixels but the first image is "
                    f"{tuple(out.shape[2:])}: in-memory caching needs one image size (set dataset.cache: false)"
                )
            out[start + i] = img
    if out is None:
        raise DataError("no image files to decode")
    return out


# ----------------------------------------------------------------------------- identity


def data_digest(dataset: Dataset, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """The identity of images ``indices`` of ``dataset`` (default: all) with their labels and class
    names: ``{"sha256": hex, "of": what was hashed, "images": count}``.

    What is hashed is the data as loaded: the uint8 pixels of a dataset held in memory (an image
    folder of small images, torchvision's CIFAR files), the file bytes of a streamed image folder,
    and the float tensors ``dataset[i]`` returns for any other dataset. Subsets are followed to
    their base. Two folders with other images, other labels or renamed classes differ; a copy of
    a folder elsewhere does not.
    """
    base = dataset
    idx = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    while isinstance(base, Subset):
        idx = np.asarray(base.indices, dtype=np.int64)[idx]
        base = base.dataset
    h = hashlib.sha256()
    if isinstance(base, CachedImageDataset):
        of = "uint8 pixels, labels and class names"
        for start in range(0, len(idx), 8192):  # bounded memory for a 1.28 M-image split
            part = torch.as_tensor(idx[start:start + 8192])
            h.update(base.images.index_select(0, part).contiguous().numpy().tobytes())
        labels = base.targets_tensor.numpy()[idx]
    elif isinstance(base, tv_datasets.ImageFolder):
        of = "file bytes, labels and class names"
        for i in idx:
            h.update(Path(base.samples[i][0]).read_bytes())
        labels = np.asarray([base.samples[i][1] for i in idx], dtype=np.int64)
    else:
        of = "float32 images, labels and class names"
        labels_list = []
        for i in idx:
            x, y = base[int(i)]
            h.update(torch.as_tensor(x).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            labels_list.append(int(y))
        labels = np.asarray(labels_list, dtype=np.int64)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update("\0".join(map(str, getattr(base, "classes", None) or [])).encode())
    return {"sha256": h.hexdigest(), "of": of, "images": int(len(idx))}


def _pixel_keys(dataset: CachedImageDataset) -> list[bytes]:
    rows = dataset.images.reshape(len(dataset.images), -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def verify_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = False,
                   cache: bool = True, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a dataset as the pipeline does before its first job; ``DataError`` (one line) if it lies.

    Loads the train and test splits (a folder of small images is decoded once into the cache,
    every image checked by ``decode_files``; class folders are checked by
    ``check_class_folders``; CIFAR's classes must be balanced within 1 %), then compares the
    splits pixel for pixel: test images that also appear in train/, and images that appear under
    two labels, are refused when they are more than ``MAX_SHARED_FRACTION`` of the test split (a
    copied or leaked split; the CIFAR-10 JPEG copy has none of either). Streamed folders
    (ImageNet) get the folder checks only. Returns, per split, the image and class counts and
    the ``data_digest``, and the counts found.
    """
    splits = {s: load_dataset(name, s, root=root, download=download, cache=cache, cache_dir=cache_dir)
              for s in ("train", "test")}
    report: dict[str, Any] = {s: {"images": len(d), "classes": getattr(d, "num_classes", None)}
                              for s, d in splits.items()}
    train, test = splits["train"], splits["test"]
    for split, d in splits.items():
        _check_balance(name, split, d, resolve_root(name, root)[0])
    if not (isinstance(train, CachedImageDataset) and isinstance(test, CachedImageDataset)):
        return report
    keys = {s: _pixel_keys(d) for s, d in splits.items()}
    in_train = dict(zip(keys["train"], range(len(train))))
    shared = [(i, in_train[k]) for i, k in enumerate(keys["test"]) if k in in_train]
    labels: dict[bytes, set[int]] = {}
    for s, d in splits.items():
        for k, y in zip(keys[s], d.targets_tensor.tolist()):
            labels.setdefault(k, set()).add(y)
    relabelled = sum(len(v) > 1 for v in labels.values())
    for s, d in splits.items():
        report[s]["data"] = data_digest(d)
    report.update(test_images_in_train=len(shared), images_under_two_labels=relabelled)
    limit = MAX_SHARED_FRACTION * len(test)
    where = resolve_root(name, root)[0]
    if len(shared) > limit:
        i, j = shared[0]
        raise DataError(
            f"{where}: {len(shared)} of {len(test)} test images are also in the train split, pixel for "
            f"pixel (e.g. {_image_name(test, 'test', where, i)} = {_image_name(train, 'train', where, j)}): "
            "the test set leaks into training; use a folder with separate splits")
    if relabelled > limit:
        raise DataError(f"{where}: {relabelled} images appear under two labels, pixel for pixel: a class "
                        "folder holds copies of another's images; fix the folders")
    return report


def _check_balance(name: str, split: str, dataset: Dataset, root: Path) -> None:
    """CIFAR's classes hold equally many images in each split (5,000 / 1,000 for CIFAR-10, 500 /
    100 for CIFAR-100): a folder whose classes differ by more than 1 % is not CIFAR (the balanced
    test subsets would silently not be balanced)."""
    if name not in CIFAR_CLASSES:
        return
    counts = np.bincount(dataset_labels(dataset), minlength=len(CIFAR_CLASSES[name]))
    lo, hi = int(counts.argmin()), int(counts.argmax())
    if counts[hi] > 1.01 * counts[lo]:
        classes = CIFAR_CLASSES[name]
        raise DataError(f"{root}: the {split} split holds {counts[lo]} {classes[lo]} images but {counts[hi]} "
                        f"{classes[hi]} images; {_PRETTY[name]}'s classes are balanced (images missing or "
                        "copied into the wrong class folder?)")


def _image_name(dataset: CachedImageDataset, split: str, root: Path, i: int) -> str:
    """A cached image's file (``test/cat/0001.png``) where its folder is known, else its index."""
    if _is_image_folder(root):
        folder = _split_dir(root, split)
        samples = _list_images(folder, find_classes(str(folder))[1])
        return os.path.relpath(samples[i][0], root)
    return f"{split} image {i}"


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
