"""Images/s of the training loader, with the batches exactly as the training loop gets them.

``--dataset cifar10``: epochs of ``mixacm.loader.make_train_loader`` over a cached uint8
N x 3 x 32 x 32 training set (augmentation on: random crop with 4 px zero padding + horizontal
flip, batch 128, the device loader's batched ops), against the per-sample pipeline it replaced:
the dataset's own torchvision v2 ``cifar_transform`` applied image by image in a ``DataLoader``
in the training process, with the same sampler. The two alternate epoch by epoch (interleaved
rounds, so a change in machine load hits both alike); each figure is the median over rounds.
Without ``--data-root`` the images are random pixels (the speed does not depend on them).

``--dataset imagenet``: an ImageNet-layout folder of 500 x 375 JPEGs (``--image-size H W``;
smooth random content, 80 KB a file at that size) written to a temporary folder, read through ``load_dataset``
(``FolderDataset``: decoded on the fly, RandomResizedCrop(224) + flip) by the worker loader with
0 (in the training process), 1 and 2 worker processes: img/s and img/s per worker (per process
for 0), after one untimed epoch that starts the persistent workers.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py --dataset cifar10 --json
    python benchmarks/bench_data.py --dataset imagenet --json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.io import encode_jpeg, write_file

from mixacm.data import CachedImageDataset, cifar_transform, load_dataset
from mixacm.loader import EpochSampler, make_train_loader
from mixacm.provenance import device_name, git_info
from mixacm.utils import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epoch(loader, epoch: int, device: torch.device) -> float:
    """Images/s of one epoch of ``loader``, each batch on ``device`` as the loop receives it."""
    (loader.sampler if isinstance(loader, DataLoader) else loader).set_epoch(epoch)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)  # the device loader's batches are there already
        n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- CIFAR-10


def cifar_train_set(args) -> CachedImageDataset | Subset:
    if args.data_root:
        ds = load_dataset("cifar10", "train", root=args.data_root, augment=True)
        return ds if args.images >= len(ds) else Subset(ds, range(args.images))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    return CachedImageDataset(images, torch.randint(0, 10, (args.images,), generator=g), [str(c) for c in range(10)],
                              source="random images", source_detail="random images (bench_data)",
                              transform=cifar_transform(augment=True))


def bench_cifar(args, device: torch.device) -> dict:
    ds = cifar_train_set(args)
    batched = make_train_loader(ds, args.batch_size, seed=0, device=device)
    per_sample = DataLoader(ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0), drop_last=True)
    times: dict[str, list[float]] = {"batched": [], "per_sample": []}
    for r in range(args.rounds):
        times["batched"].append(time_epoch(batched, r, device))
        times["per_sample"].append(time_epoch(per_sample, r, device))
    fast, slow = statistics.median(times["batched"]), statistics.median(times["per_sample"])
    return {"images_per_s": fast, "per_sample_baseline_images_per_s": slow, "speedup": fast / slow,
            "rounds_images_per_s": times, "images": len(ds), "batch_size": args.batch_size,
            "augmentation": "RandomCrop(32, padding=4) + RandomHorizontalFlip, uint8 -> float32 [0, 1]",
            "data": "random uint8 images" if not args.data_root else f"load_dataset('cifar10', root={args.data_root})"}


# ----------------------------------------------------------------------------- ImageNet


def write_jpeg_folder(root: Path, n: int, classes: int = 4, size: tuple[int, int] = (375, 500)) -> Path:
    """``n`` JPEGs (quality 90) of ``size`` (H, W) in ``root/train/<class>/``: bilinear-upsampled
    random colour blocks plus pixel noise, whose files (80 KB at 500 x 375; ImageNet's average is
    about 110 KB) decode like photographs' rather than like pure noise (which compresses badly and
    decodes slowly)."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        blocks = torch.rand(1, 3, size[0] // 16, size[1] // 16, generator=g) * 255
        img = F.interpolate(blocks, size=size, mode="bilinear", align_corners=False)[0]
        img = (img + 12 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's TorchCodec notice
            write_file(str(folder / f"{i:06d}.jpg"), encode_jpeg(img, quality=90))
    return root


def bench_imagenet(args, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = write_jpeg_folder(Path(tmp), args.images, size=tuple(args.image_size))
        mean_kb = statistics.mean(p.stat().st_size for p in root.rglob("*.jpg")) / 1024
        ds = load_dataset("imagenet", "train", root=root, augment=True)
        loaders = {w: make_train_loader(ds, args.batch_size, seed=0, device=device, num_workers=w)
                   for w in (0, *args.workers)}
        for w, ld in loaders.items():
            time_epoch(ld, 0, device)  # starts the persistent workers; not timed
        times: dict[int, list[float]] = {w: [] for w in loaders}
        for r in range(1, args.rounds + 1):
            for w, ld in loaders.items():
                times[w].append(time_epoch(ld, r, device))
        del loaders  # stops the workers before the folder goes
    return {"workers": {str(w): {"images_per_s": statistics.median(t),
                                 "images_per_s_per_worker": statistics.median(t) / max(w, 1),
                                 "rounds_images_per_s": t} for w, t in times.items()},
            "images": args.images, "batch_size": args.batch_size, "image_size_hw": args.image_size,
            "mean_file_kb": round(mean_kb, 1),
            "augmentation": "RandomResizedCrop(224) + RandomHorizontalFlip in the workers, uint8 collate, "
                            "uint8 -> float32 [0, 1] on the device"}


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("cifar10", "imagenet"), required=True)
    p.add_argument("--data-root", default=None, help="cifar10: a CIFAR-10 root for load_dataset (default: random "
                                                     "images)")
    p.add_argument("--images", type=int, default=None, help="images an epoch (default: 50,000 cifar10, 512 imagenet)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 cifar10, 64 imagenet")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs of each loader, interleaved")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="imagenet: worker counts beside 0")
    p.add_argument("--image-size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"),
                   help="imagenet: the JPEGs' height and width (a pre-resized copy: e.g. 256 341)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training process")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto: where the batches go")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    args = p.parse_args(argv)
    args.images = args.images or (50_000 if args.dataset == "cifar10" else 512)
    args.batch_size = args.batch_size or (128 if args.dataset == "cifar10" else 64)
    return args


def summary(result: dict) -> str:
    head = (f"{result['dataset']}: {result['images']} images, batch {result['batch_size']}, "
            f"{result['device_name']}, load {result['load_average_before']:.2f} -> {result['load_average_after']:.2f}")
    if result["dataset"] == "cifar10":
        return (f"{head}\nloader (batched): {result['images_per_s']:,.0f} img/s\n"
                f"per-sample v2:    {result['per_sample_baseline_images_per_s']:,.0f} img/s\n"
                f"speedup:          {result['speedup']:.1f}x")
    rows = [f"{w} worker(s): {r['images_per_s']:,.0f} img/s, {r['images_per_s_per_worker']:,.0f} per worker"
            for w, r in result["workers"].items()]
    return "\n".join([head, *rows])


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    before = os.getloadavg()[0]
    result = (bench_cifar if args.dataset == "cifar10" else bench_imagenet)(args, device)
    result = {"dataset": args.dataset, **result, "threads": args.threads, "device": str(device),
              "device_name": device_name(device), "cpu_count": os.cpu_count(), "load_average_before": before,
              "load_average_after": os.getloadavg()[0], "torch_version": torch.__version__,
              "git_commit": git_info()["git_commit"], "date": dt.date.today().isoformat()}
    print(json.dumps(result, indent=1) if args.json else summary(result))
    return result


if __name__ == "__main__":
    main()
