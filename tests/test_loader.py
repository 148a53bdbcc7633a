"""The training loader: epoch order and shards, batches made on the device equal to the dataset's
own v2 pipeline, batches a function of (seed, epoch) alone, no host reads, worker processes that
change nothing but the speed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, Subset
from torchvision.io import encode_png, write_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mixacm import data, loader
from mixacm.hostreads import HostReadCounter

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def cached(n: int, augment: bool = True, size: int = 8, seed: int = 0, transform=None) -> data.CachedImageDataset:
    """Random images whose label is their index, so a batch's labels say which images it holds."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)  # no zeros
    return data.CachedImageDataset(images, torch.arange(n), [str(i) for i in range(n)], source="test",
                                   source_detail="test", transform=transform or data.cifar_transform(augment, size))


def epoch(ld, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ld.set_epoch(e)
    return list(ld)


def labels(batches) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ----------------------------------------------------------------------------- order and shards


def test_order_is_a_function_of_seed_and_epoch_only():
    ds = cached(103)
    torch.manual_seed(1)
    first = labels(epoch(loader.make_train_loader(ds, 10, seed=5), 2))
    torch.manual_seed(999)  # another global RNG state (e.g. a resumed process) changes nothing
    assert labels(loader.make_train_loader(ds, 10, seed=5, epoch=2)) == first
    assert labels(loader.make_train_loader(ds, 10, seed=5, epoch=3)) != first
    assert labels(loader.make_train_loader(ds, 10, seed=6, epoch=2)) != first
    assert len(first) == 100 and len(set(first)) == 100  # drop_last: 10 full batches, no repeats


def test_the_loader_does_not_consume_the_global_rng():
    torch.manual_seed(0)
    list(loader.make_train_loader(cached(20), 4, seed=0))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_ranks_get_disjoint_shards_of_one_permutation():
    n, ws = 103, 4
    ds = cached(n)
    shards = [labels(loader.make_train_loader(ds, 5, seed=1, rank=r, world_size=ws)) for r in range(ws)]
    assert all(len(s) == 25 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)
    perm = loader.epoch_permutation(n, 1, 0).tolist()
    assert shards[1][:5] == perm[1:20:4]
    with pytest.raises(ValueError, match="rank"):
        loader.make_train_loader(ds, 5, seed=1, rank=4, world_size=4)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        loader.make_train_loader(ds, 200, seed=1)


def test_epoch_sampler_keeps_distributed_samplers_contract():
    n, ws = 103, 4
    for rank in range(ws):
        ours = loader.EpochSampler(n, seed=1, epoch=0, rank=rank, world_size=ws)
        theirs = DistributedSampler(range(n), num_replicas=ws, rank=rank, shuffle=True, seed=1, drop_last=True)
        assert isinstance(ours, DistributedSampler)
        assert len(ours) == len(theirs) == 25 and len(list(ours)) == 25
        ours.set_epoch(3)
        assert list(ours) == loader.epoch_permutation(n, 1, 3).tolist()[rank:100:ws]
    # Unlike seed + epoch, (seed 0, epoch 1) and (seed 1, epoch 0) are different orders.
    assert not torch.equal(loader.epoch_permutation(n, 0, 1), loader.epoch_permutation(n, 1, 0))


# ----------------------------------------------------------------------------- batches on the device


def test_crop_flip_equals_torchvisions_crop_then_flip_for_the_same_draws():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 6, 9), dtype=torch.uint8, generator=g)  # not square
    p = 3
    shifts = torch.randint(0, 2 * p + 1, (40, 2), generator=g)
    shifts[:4] = torch.tensor([[0, 0], [0, 2 * p], [2 * p, 0], [2 * p, 2 * p]])  # the corners, too
    flips = torch.randint(0, 2, (40,), generator=g)
    out = loader.crop_flip(images, shifts, flips, p)
    for img, (top, left), flip, got in zip(images, shifts.tolist(), flips.tolist(), out):
        want = TF.crop(TF.pad(img, [p] * 4, fill=0), top, left, 6, 9)
        assert torch.equal(got, TF.horizontal_flip(want) if flip else want)


def test_device_batches_are_the_datasets_v2_steps_with_the_epochs_draws():
    ds = cached(64)
    ld = loader.make_train_loader(ds, 16, seed=3, epoch=1)
    shifts, flips = ld.draws()
    to_float = v2.ToDtype(torch.float32, scale=True)
    for x, y in ld:
        assert x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
        for xi, i in zip(x, y.tolist()):
            (top, left), flip = shifts[i].tolist(), flips[i].item()
            want = TF.crop(TF.pad(ds.images[i], [4] * 4), top, left, 8, 8)
            want = to_float(TF.horizontal_flip(want) if flip else want)
            assert torch.equal(xi, want)


def test_the_draws_cover_every_offset_and_flip_half_the_images():
    ld = loader.make_train_loader(cached(4000, size=4), 100, seed=0)
    shifts, flips = ld.draws()
    assert set(shifts[:, 0].tolist()) == set(shifts[:, 1].tolist()) == set(range(9))
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    ld.set_epoch(1)
    assert not torch.equal(ld.draws()[0], shifts)  # new draws each epoch


def test_without_augmentation_a_batch_is_its_images_as_floats():
    ds = cached(32, augment=False)
    x, y = next(iter(loader.make_train_loader(ds, 8, seed=0)))
    assert torch.equal((x * 255).round().to(torch.uint8), ds.images[y])


def test_a_resumed_run_gets_the_batches_of_an_uninterrupted_one():
    """One loader through epochs 0-2 and a loader built fresh at epoch 2 (a resumed process, another
    global RNG state) give the same batches, augmentation included."""
    ds = cached(50)
    running = loader.make_train_loader(ds, 10, seed=7)
    for e in range(2):
        epoch(running, e)
    third = epoch(running, 2)
    torch.manual_seed(123)
    assert same(epoch(loader.make_train_loader(ds, 10, seed=7), 2), third)
    assert not same(epoch(loader.make_train_loader(ds, 10, seed=7), 1), third)


def test_the_ranks_batches_together_are_the_global_batch_of_one_process():
    """Augmentation draws follow the image, not the rank: under DDP, the union of the ranks'
    k-th batches is one process's k-th batch of the global batch size, pixel for pixel."""
    ds = cached(96)
    one = list(loader.make_train_loader(ds, 16, seed=2, epoch=1))
    ranks = [list(loader.make_train_loader(ds, 8, seed=2, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6
    for k, (x, y) in enumerate(one):
        xr = torch.cat([ranks[0][k][0], ranks[1][k][0]])
        yr = torch.cat([ranks[0][k][1], ranks[1][k][1]])
        assert torch.equal(xr[yr.argsort()], x[y.argsort()])


def test_a_subset_is_indexed_once_and_batched_like_its_images():
    ds = cached(60)
    inner = Subset(ds, list(range(10, 60)))
    nested = Subset(inner, list(range(0, 50, 2)))  # images 10, 12, ..., 58
    ld = loader.make_train_loader(nested, 5, seed=4, epoch=1)
    assert torch.equal(ld.images, ds.images[10:60:2]) and ld.images.data_ptr() != ds.images.data_ptr()
    direct = data.CachedImageDataset(ds.images[10:60:2].clone(), torch.arange(10, 60, 2), ds.classes, source="t",
                                     source_detail="t", transform=ds.transform)
    assert same(list(ld), list(loader.make_train_loader(direct, 5, seed=4, epoch=1)))


def test_making_a_batch_reads_nothing_back_to_the_host():
    ld = loader.make_train_loader(cached(64), 16, seed=0)
    with HostReadCounter() as reads:
        ld.set_epoch(1)
        batches = list(ld)
    assert len(batches) == 4 and reads.count == 0, reads.summary()


def test_a_pipeline_without_a_batched_version_is_refused_by_name():
    jitter = v2.Compose([v2.ColorJitter(0.4), v2.ToDtype(torch.float32, scale=True)])
    with pytest.raises(TypeError, match="ColorJitter"):
        loader.make_train_loader(cached(16, transform=jitter), 4, seed=0)
    reflect = v2.Compose([v2.RandomCrop(8, padding=4, padding_mode="reflect"), v2.ToDtype(torch.float32, scale=True)])
    with pytest.raises(TypeError, match="zero padding"):
        loader.make_train_loader(cached(16, transform=reflect), 4, seed=0)


# ----------------------------------------------------------------------------- worker processes


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> data.FolderDataset:
    """An ImageNet-layout folder of 24 images larger than the cache limit: decoded on the fly."""
    root = tmp_path_factory.mktemp("inet")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / "train" / f"n0{c}").mkdir(parents=True)
        for i in range(8):
            img = torch.randint(0, 256, (3, 72, 90), dtype=torch.uint8, generator=g)
            write_file(str(root / "train" / f"n0{c}" / f"{i}.png"), encode_png(img))
    ds = data.load_dataset("imagenet", "train", root=root, augment=True)
    assert isinstance(ds, data.FolderDataset)
    return ds


def test_worker_processes_change_nothing_but_the_speed(folder: data.FolderDataset):
    """Each image's crop is drawn from its own (seed, epoch, image) seed, so 0, 1 or 2 worker
    processes give the same batches; the workers persist across epochs; a loader built at epoch 1
    (a resumed run) gives epoch 1's batches; the training process's RNG is left alone."""
    torch.manual_seed(0)
    main = loader.make_train_loader(folder, 4, seed=1)
    assert isinstance(main, loader.WorkerBatchLoader)
    first, second = epoch(main, 0), epoch(main, 1)
    assert torch.equal(torch.rand(1), (torch.manual_seed(0), torch.rand(1))[1])
    x, y = first[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 224, 224) and 0 <= x.min() and x.max() <= 1
    assert not same(first, second) and len(first) == 6
    for workers in (1, 2):
        ld = loader.make_train_loader(folder, 4, seed=1, num_workers=workers)
        assert ld.loader.persistent_workers
        assert same(epoch(ld, 0), first) and same(epoch(ld, 1), second), workers
    assert same(epoch(loader.make_train_loader(folder, 4, seed=1, epoch=1, num_workers=1), 1), second)


def test_workers_collate_uint8_and_the_float_conversion_runs_after_the_copy(folder: data.FolderDataset):
    ld = loader.make_train_loader(Subset(folder, list(range(0, 24, 3))), 4, seed=0)
    x8, y = next(iter(ld.loader))
    assert x8.dtype == torch.uint8 and x8.shape == (4, 3, 224, 224)
    x, y2 = next(iter(ld))
    assert torch.equal(x, v2.ToDtype(torch.float32, scale=True)(x8)) and torch.equal(y, y2)
    assert torch.equal(y, torch.tensor(folder.targets)[0:24:3][ld.sampler.shard()[:4]])


def test_other_datasets_go_through_the_worker_loader_as_they_are():
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.randn(30, 2), torch.arange(30))
    x, y = next(iter(loader.make_train_loader(ds, 5, seed=0)))
    assert torch.equal(x, ds.tensors[0][y])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_batches_equal_the_cpus_and_never_sync(folder: data.FolderDataset):
    """The same batches on the GPU as on the CPU: made on the device (cached data), or copied
    from pinned memory through the side stream (workers); and no epoch of either makes the host
    wait for the GPU (torch's sync debug mode raises on any synchronising call)."""
    ds = cached(64)
    cpu = list(loader.make_train_loader(ds, 16, seed=0))
    on_gpu = loader.make_train_loader(ds, 16, seed=0, device="cuda")
    workers = loader.make_train_loader(folder, 4, seed=0, device="cuda", num_workers=1)
    epoch(workers, 0)  # starts the workers (and the pinning thread) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = epoch(on_gpu, 0)
        gpu_workers = epoch(workers, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(x.is_cuda and y.is_cuda for x, y in gpu + gpu_workers)
    assert same(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])
    cpu_workers = epoch(loader.make_train_loader(folder, 4, seed=0), 1)
    assert same(cpu_workers, [(x.cpu(), y.cpu()) for x, y in gpu_workers])


def test_the_data_benchmark_prints_its_figures(capsys):
    """benchmarks/bench_data.py in a tiny mode (docs/benchmarks.md shows the full commands)."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    try:
        bench.main(["--dataset", "cifar10", "--json", "--images", "512", "--rounds", "2"])
        cifar = json.loads(capsys.readouterr().out)
        bench.main(["--dataset", "imagenet", "--json", "--images", "8", "--batch-size", "4", "--rounds", "1",
                    "--workers", "1"])
        inet = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(before)
    assert cifar["images_per_s"] > 0 and cifar["per_sample_baseline_images_per_s"] > 0
    assert len(cifar["rounds_images_per_s"]["batched"]) == 2 and cifar["batch_size"] == 128
    assert set(inet["workers"]) == {"0", "1"} and inet["workers"]["1"]["images_per_s_per_worker"] > 0
