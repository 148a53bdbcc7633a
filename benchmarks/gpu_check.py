"""A short check for a machine with a GPU: WRN-34-10 training speed and memory, then AutoAttack.

1. A few hundred training steps of MixACM (WRN-34-10 student, WRN-34-10 teacher with random
   weights: the cost is the same as a trained one) and of AT (PGD-10), with bf16 autocast and
   channels_last, through the training loop's own ``training_step``; prints images/s and
   ``torch.cuda.max_memory_allocated`` of each.
2. AutoAttack (APGD-CE + APGD-T, mixacm's adapter) on a few hundred points, on the AT student
   just trained, through ``mixacm.evaluate`` (the CIFAR-10 test split with ``--data-root``,
   random images otherwise): checks that the attack runs on the GPU and reports its speed.

    python benchmarks/gpu_check.py                     # needs CUDA; ~3-5 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --model tiny --steps 3 --aa-n 16   # dry run
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mixacm.data import CachedImageDataset, cifar_transform, load_dataset
from mixacm.evaluate import evaluate
from mixacm.methods import METHODS
from mixacm.models import build_model
from mixacm.provenance import provenance
from mixacm.train import training_step
from mixacm.utils import parse_eps, seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(name: str, args, device: torch.device, teacher) -> tuple[dict, torch.nn.Module]:
    seed_everything(0)
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    model = build_model(args.model).to(device, memory_format=fmt).train()
    cls = METHODS.get(name)
    method = cls(model, teacher=teacher if cls.needs_teacher else None)
    extra = list(method.extra_modules().to(device).parameters())
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(device, memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    def step() -> float:
        return training_step(method, opt, scaler, x, y, amp=args.amp, extra_params=extra)[0]

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    row = {
        "method": name, "steps": args.steps, "batch_size": args.batch_size, "seconds": seconds,
        "images_per_s": args.steps * args.batch_size / seconds, "last_loss": loss,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return row, model


def autoattack_check(model, args, device: torch.device) -> dict:
    if args.data_root:
        data = load_dataset("cifar10", "test", root=args.data_root)
    else:
        g = torch.Generator().manual_seed(1)
        images = (torch.rand(args.aa_n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
        labels = torch.randint(0, 10, (args.aa_n,), generator=g)
        data = CachedImageDataset(images, labels, [str(c) for c in range(10)], source="random images",
                                  source_detail="random images (gpu_check)", transform=cifar_transform(False))
    t0 = time.perf_counter()
    res = evaluate(model, data, ["clean", "pgd20", "autoattack-apgd"], args.eps, n=args.aa_n, batch_size=args.aa_batch,
                   seed=0, device=device, progress=False)
    return {"n": res["n"], "seconds": time.perf_counter() - t0, "data": "cifar10 test" if args.data_root else "random",
            **{name: m["accuracy_pct"] for name, m in res["metrics"].items()},
            "autoattack_package": res["metrics"]["autoattack-apgd"]["attack"].get("package")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu only for a dry run)")
    p.add_argument("--model", default="wrn-34-10")
    p.add_argument("--teacher", default=None, help="teacher architecture (default: the student's)")
    p.add_argument("--methods", nargs="+", default=["mixacm", "at"])
    p.add_argument("--steps", type=int, default=200, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--aa-n", type=int, default=200, help="AutoAttack points")
    p.add_argument("--aa-batch", type=int, default=200)
    p.add_argument("--data-root", default=None, help="CIFAR-10 root for the AutoAttack points")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device is visible here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, "
              "or pass --device cpu --model tiny for a dry run.", file=sys.stderr)
        return 2
    args.eps = parse_eps(args.eps)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
    print(json.dumps({"provenance": provenance(device), "args": vars(args)}, default=str))
    teacher = build_model(args.teacher or args.model).to(device).eval().requires_grad_(False)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    student = None
    for name in args.methods:
        row, student = time_method(name, args, device, teacher)
        print(json.dumps(row))
    if student is not None and args.aa_n > 0:
        print(json.dumps({"autoattack": autoattack_check(student, args, device)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
