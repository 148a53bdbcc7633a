"""The training loader: each rank's batches of every epoch, on the training device.

Built once per run (``make_train_loader``); ``set_epoch(e)`` before each epoch; iterating yields
``(x, y)``: x a float32 B x C x H x W batch in [0, 1] and y int64 labels, both on the device.
The batches of epoch ``e`` are a function of ``(seed, e, rank, world_size)`` alone (not of the
global RNG, the device or the number of worker processes), so a run resumed at an epoch boundary
gets exactly the batches of an uninterrupted run.

* Order: ``epoch_permutation(n, seed, epoch)``; rank ``r`` of ``world_size`` takes
  ``perm[r : n - n % world_size : world_size]`` (``EpochSampler``, torch's ``DistributedSampler``
  contract: disjoint shards of one permutation), in batches of ``batch_size``, the last partial
  batch dropped.
* Augmentation draws: one generator seeded with ``(seed, epoch)`` draws every image's parameters
  of the epoch, indexed by the image's position in the dataset, so an image is augmented the same
  way whichever rank reads it: the union of the ranks' shards of a global batch is the global
  batch of one process.
* ``CachedImageDataset`` (CIFAR, small-image folders; or a ``Subset`` of one, indexed once):
  ``DeviceBatchLoader`` moves the uint8 N x C x H x W tensor to the device once and makes each
  batch there with batched tensor ops (gather of the batch, random crop with zero padding and
  horizontal flip as one ``gather``, uint8 -> float). No host read: a GPU never waits for it.
* Anything else (``FolderDataset``: ImageNet, decoded on the fly): ``WorkerBatchLoader``, a
  ``DataLoader`` whose worker processes (``num_workers``, persistent across epochs) decode and
  crop each image to uint8 with its own RNG seeded per (seed, epoch, image); batches are
  collated as uint8 (4x less to pin and copy than float), copied to the device from pinned
  memory while the previous batch trains (on a side CUDA stream) and turned into floats there.

Both reproduce the dataset's own ``torchvision.transforms.v2`` pipeline (``mixacm.data``'s
``cifar_transform`` / ``imagenet_transform``): the last step, ``ToDtype(float32, scale=True)``,
runs on the device; the steps before it run per image in the workers, or, for cached data, as
their batched equivalent, which gives exactly the pixels of the v2 steps for the same draws.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2

from mixacm.data import CachedImageDataset, FolderDataset

# An epoch's two random streams: the order is seeded with (seed, epoch), the augmentation draws
# with (seed, epoch, _AUGMENT_STREAM).
_AUGMENT_STREAM = 2


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashes them apart)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of epoch ``epoch``: a function of ``(seed, epoch)`` only, so resuming reproduces it."""
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``'s augmentation draws (independent of the order's)."""
    return torch.Generator().manual_seed(_mix_seed(seed, epoch, _AUGMENT_STREAM))


class EpochSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (shuffle, ``drop_last=True``) with another epoch order.

    Everything but the permutation is ``DistributedSampler``'s: ``set_epoch``, ``num_replicas``,
    ``rank``, the cut to a multiple of ``world_size`` and rank ``r`` taking every
    ``world_size``-th index from ``r``. The order is ``epoch_permutation(n, seed, epoch)`` rather
    than ``randperm`` seeded with ``seed + epoch``: with the sum, seed 0's second epoch is seed 1's
    first, so the data orders of two seeds of an experiment would be shifted copies of each other.
    (It also keeps the orders, hence the numbers, of runs made before the switch to this class.)
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.world_size = n, world_size
        self.set_epoch(epoch)

    def shard(self) -> Tensor:
        """This rank's indices of the current epoch, in order: an int64 CPU tensor of ``len(self)``."""
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        return perm[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard().tolist())


# ----------------------------------------------------------------------------- batched augmentation


def crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random crop with zero padding + horizontal flip of each image of a batch, as one gather.

    ``images``: B x C x H x W (any dtype, any device); ``shifts``: B x 2 integer (top, left)
    offsets in [0, 2 * padding] into the zero-padded image; ``flips``: B integers, 1 = flip.
    Returns B x C x H x W: ``out[b, :, i, j] = pad(images[b])[:, top + i, left + j']`` with
    ``j' = W - 1 - j`` when flipped, else ``j``: exactly ``v2.RandomCrop((H, W), padding)`` then
    ``v2.RandomHorizontalFlip`` for those draws.

    Written here because no library does this without host reads: torchvision's v2 transforms
    draw one crop per call (the same for the whole batch), and the GPU CIFAR loaders of airbench
    and KellerJordan/cifar10-loader crop by boolean-mask indexing (one host read per offset) and
    pad by reflection rather than with zeros as the adversarial-training recipes do.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    hp, wp = h + 2 * padding, w + 2 * padding
    i = torch.arange(h, device=images.device)
    j = torch.arange(w, device=images.device)
    rows = shifts[:, :1] + i  # B x H
    cols = shifts[:, 1:] + j + flips[:, None] * (w - 1 - 2 * j)  # B x W; j -> w - 1 - j when flipped
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


def _steps(transform: Callable) -> list:
    return list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]


def split_float_step(transform: Callable) -> tuple[list, Callable[[Tensor], Tensor] | None]:
    """A v2 pipeline's steps before its final ``ToDtype(float, scale=True)``, and that step
    (``None`` when it has none: the dataset's samples are then used as they come)."""
    steps = _steps(transform)
    if steps and isinstance(steps[-1], v2.ToDtype) and steps[-1].scale:
        return steps[:-1], steps[-1]
    return steps, None


def _batched_crop_flip(steps: list, size: tuple[int, int]) -> tuple[int, float]:
    """``(padding, flip probability)`` of the uint8 steps of a cached dataset's pipeline:
    ``[RandomCrop(size, padding)]`` then ``[RandomHorizontalFlip(p)]``, each optional. Any other
    step has no batched version here: TypeError naming it."""
    padding, flip_p, rest = 0, 0.0, list(steps)
    if rest and isinstance(rest[0], v2.RandomCrop):
        crop = rest.pop(0)
        pad = crop.padding or [0]
        if (tuple(crop.size) != tuple(size) or len(set(pad)) != 1 or crop.padding_mode != "constant"
                or crop.fill not in (0, None) or crop.pad_if_needed):
            raise TypeError(f"{crop} has no batched version: the device loader crops to the image size "
                             f"{tuple(size)} with equal zero padding on every side")
        padding = int(pad[0])
    if rest and isinstance(rest[0], v2.RandomHorizontalFlip):
        flip_p = float(rest.pop(0).p)
    if rest:
        raise TypeError(f"{rest[0]} has no batched version in mixacm.loader.DeviceBatchLoader "
                         f"(it knows RandomCrop with zero padding, then RandomHorizontalFlip)")
    return padding, flip_p


# ----------------------------------------------------------------------------- loaders


def _base_and_index(dataset: Dataset) -> tuple[Dataset, Tensor | None]:
    """The dataset under any ``Subset`` wrappers, and the composed indices into it (None: all)."""
    index = None
    while isinstance(dataset, Subset):
        sub = torch.as_tensor(dataset.indices, dtype=torch.int64)
        index = sub if index is None else sub[index]
        dataset = dataset.dataset
    return dataset, index


class _EpochLoader:
    """What both loaders share: the sampler of a rank, the batch size, ``set_epoch``, ``len``."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.sampler = EpochSampler(n, seed, 0, rank, world_size)
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class DeviceBatchLoader(_EpochLoader):
    """Batches of a ``CachedImageDataset`` (or a Subset of one) made on the device.

    The images (uint8 N x C x H x W, the Subset's rows taken once) and labels are moved to
    ``device`` when the loader is built. Each epoch the order and every image's crop offsets and
    flip are drawn on the CPU from ``(seed, epoch)`` and copied to the device once (from pinned
    memory, not waited for); a batch is then an ``index_select``, ``crop_flip`` and the float
    conversion, all on the device: nothing makes the host wait for the device.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        base, index = _base_and_index(dataset)
        if not isinstance(base, CachedImageDataset):
            raise TypeError(f"DeviceBatchLoader needs a CachedImageDataset, got {type(base).__name__}")
        images = base.images if index is None else base.images.index_select(0, index)
        targets = base.targets_tensor if index is None else base.targets_tensor.index_select(0, index)
        super().__init__(len(images), batch_size, seed, rank, world_size, device)
        steps, finish = split_float_step(base.transform)
        self.padding, self.flip_p = _batched_crop_flip(steps, tuple(images.shape[-2:]))
        self.finish = finish or (lambda x: x)
        self.images, self.targets = images.to(self.device), targets.to(self.device)

    @property
    def augments(self) -> bool:
        return self.padding > 0 or self.flip_p > 0

    def draws(self) -> tuple[Tensor, Tensor]:
        """This epoch's ``(shifts N x 2, flips N)`` of every image (CPU, int64), by dataset position."""
        g = augment_generator(self.seed, self.epoch)
        n = len(self.images)
        shifts = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
        flips = (torch.rand(n, generator=g) < self.flip_p).long()
        return shifts, flips

    def _upload(self, t: Tensor) -> Tensor:
        # From pinned memory without blocking: a pageable copy would make the host wait for the
        # device's queue (a sync at every epoch start).
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._upload(self.sampler.shard())
        shifts, flips = (self._upload(t) for t in self.draws())
        bs = self.batch_size
        for k in range(len(self)):
            idx = order[k * bs:(k + 1) * bs]
            x = self.images.index_select(0, idx)
            if self.augments:
                x = crop_flip(x, shifts.index_select(0, idx), flips.index_select(0, idx), self.padding)
            yield self.finish(x), self.targets.index_select(0, idx)


class _SeededSamples(Dataset):
    """``samples[(i, s)]``: item ``i`` of ``dataset``, its random steps drawn from torch's RNG
    seeded with ``s`` (in a fork of the RNG, so the main process's stream is left as it was).

    A ``FolderDataset`` (or a Subset of one) is decoded and transformed up to its uint8 steps;
    the float conversion (``finish``) is left for the device. Other datasets are used as they are.
    """

    def __init__(self, dataset: Dataset) -> None:
        base, index = _base_and_index(dataset)
        self.finish: Callable[[Tensor], Tensor] | None = None
        if isinstance(base, FolderDataset):
            steps, self.finish = split_float_step(base.transform)
            self.folder, self.steps = base, v2.Compose(steps)
            self.index = None if index is None else index.tolist()
        else:
            self.folder, self.dataset = None, dataset

    def _item(self, i: int) -> Any:
        if self.folder is None:
            return self.dataset[i]
        j = i if self.index is None else self.index[i]
        path, label = self.folder.samples[j]
        return self.steps(self.folder.loader(path)), label

    def __getitem__(self, key: tuple[int, int]) -> Any:
        i, s = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self._item(i)


class _KeyedSampler(Sampler):
    """``(index, seed)`` of each image of a rank's epoch; the seeds come from ``(seed, epoch)``
    and the image's dataset position, so they do not depend on the rank or the worker."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.sampler.shard()
        seeds = torch.randint(0, 2**62, (self.sampler.n,), generator=augment_generator(self.sampler.seed,
                                                                                       self.sampler.epoch))
        return iter(zip(idx.tolist(), seeds[idx].tolist()))


class WorkerBatchLoader(_EpochLoader):
    """Batches decoded by ``num_workers`` persistent worker processes (0: in this process),
    collated as uint8, copied to ``device`` (pinned memory, next batch ahead) and made float there."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", num_workers: int = 0) -> None:
        super().__init__(len(dataset), batch_size, seed, rank, world_size, device)
        samples = _SeededSamples(dataset)
        self.finish = samples.finish
        self.num_workers = num_workers
        # The explicit generator keeps DataLoader from drawing worker seeds from the global RNG
        # (the workers' draws are seeded per image anyway).
        self.loader = DataLoader(samples, batch_size=batch_size, sampler=_KeyedSampler(self.sampler), drop_last=True,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(_mix_seed(seed, rank, 1)))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return to_device(self.loader, self.device, self.finish)


def to_device(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
              finish: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``(finish(x), y)`` of each batch on ``device``. On CUDA the next batch's copy (from pinned
    memory, ``non_blocking``) and ``finish`` are issued on a side stream before the current batch
    is handed out, so they overlap its training step (timm's ``PrefetchLoader`` pattern)."""
    finish = finish or (lambda x: x)
    if device.type != "cuda":
        for x, y in batches:
            yield finish(x.to(device)), y.to(device)
        return
    stream, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def load(batch: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return finish(batch[0].to(device, non_blocking=True)), batch[1].to(device, non_blocking=True)

    it = iter(batches)
    ahead = load(next(it, None))
    while ahead is not None:
        main.wait_stream(stream)
        x, y = ahead
        x.record_stream(main)  # made on the side stream, used on the main one
        y.record_stream(main)
        ahead = load(next(it, None))
        yield x, y


TrainLoader = DeviceBatchLoader | WorkerBatchLoader


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, *, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, device: torch.device | str = "cpu", num_workers: int = 0) -> TrainLoader:
    """The training loader of a run (built once; ``set_epoch`` before each epoch).

    Cached images (a ``CachedImageDataset`` or Subset of one) get a ``DeviceBatchLoader``
    (``num_workers`` is not used: there is nothing to decode); anything else a
    ``WorkerBatchLoader`` with ``num_workers`` worker processes. Raises ValueError when a rank's
    share of the data cannot fill one batch, or ``rank`` is not in ``[0, world_size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be positive")
    if len(dataset) // world_size < batch_size:
        raise ValueError(
            f"{len(dataset)} training images over {world_size} rank(s) cannot fill one batch of "
            f"{batch_size} (drop_last): use a smaller batch_size or more data"
        )
    kw = {"rank": rank, "world_size": world_size, "device": device}
    if isinstance(_base_and_index(dataset)[0], CachedImageDataset):
        loader: TrainLoader = DeviceBatchLoader(dataset, batch_size, seed, **kw)
    else:
        loader = WorkerBatchLoader(dataset, batch_size, seed, num_workers=num_workers, **kw)
    loader.set_epoch(epoch)
    return loader
