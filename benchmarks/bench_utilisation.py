"""Images/s of a bare training step, a forward and an attack step per architecture and precision,
and the share of the GPU's dense peak they reach: the utilisation that mixacm/cost.yaml assumes.

Units as in mixacm.cost: a forward is 1, a training step (forward + backward + SGD) 3, an attack
step (forward + input gradient, eval mode) 2; FLOPs of a forward from torch.utils.flop_counter.
Synthetic data on the device, 5 warmup and 20 timed calls each, bf16 autocast + channels_last
and plain fp32 (TF32 convolutions where cuDNN allows them, PyTorch's default).

    python benchmarks/bench_utilisation.py --device cuda
    python benchmarks/bench_utilisation.py --device cpu --archs tiny --batch 8 --steps 1   # a smoke run
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mixacm.cost import assumptions, network_size
from mixacm.models import build_model

# architecture -> (dataset it is priced on, batch)
ARCHS = {"wrn-34-10": ("cifar10", 128), "wrn-28-10": ("cifar10", 128), "resnet50": ("imagenet", 256),
         "tiny": ("cifar10", 128)}


def throughput(arch: str, dataset: str, batch: int, bf16: bool, device: str, steps: int) -> dict[str, float]:
    """Images/s of a training step, a no-grad forward and an attack step of ``arch``."""
    ds = assumptions()["datasets"][dataset]
    m = build_model(arch, num_classes=ds["classes"]).to(device)
    x = torch.rand(batch, 3, ds["image_size"], ds["image_size"], device=device)
    y = torch.randint(0, ds["classes"], (batch,), device=device)
    if bf16:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    kind = torch.device(device).type

    def autocast():
        return torch.autocast(kind, torch.bfloat16, enabled=bf16)

    def step():
        with autocast():
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), autocast():
            m(x)

    def attack_step():
        xa = x.detach().requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(m(xa), y)
        torch.autograd.grad(loss, xa)

    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    out = {}
    for name, fn in (("step", step), ("forward", forward), ("attack_step", attack_step)):
        m.train(name == "step")
        for _ in range(min(5, steps)):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out[name] = steps * batch / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--archs", nargs="+", default=["wrn-34-10", "wrn-28-10", "resnet50"], choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 128 at 32 px, 256 at 224 px)")
    ap.add_argument("--steps", type=int, default=20, help="timed calls of each kind")
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    peaks = assumptions()["device"]["peak_tflops"]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}")
    print("| arch | precision | step img/s | forward img/s | attack step img/s | % of peak (step / forward / attack) |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        dataset, batch = ARCHS[arch]
        flops = network_size(arch, dataset)[0]
        for bf16 in (True, False):
            speed = throughput(arch, dataset, args.batch or batch, bf16, args.device, args.steps)
            peak = peaks["bf16" if bf16 else "tf32"] * 1e12
            share = [100 * speed[k] * units * flops / peak for k, units in (("step", 3), ("forward", 1), ("attack_step", 2))]
            print(f"| {arch} | {'bf16 + channels_last' if bf16 else 'fp32 (TF32)'} | {speed['step']:,.0f} | "
                  f"{speed['forward']:,.0f} | {speed['attack_step']:,.0f} | "
                  + " / ".join(f"{s:.1f}" for s in share) + " |", flush=True)


if __name__ == "__main__":
    main()
