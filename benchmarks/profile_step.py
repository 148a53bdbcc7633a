"""Where the MixACM step's time goes beyond a bare student step plus the teacher's forward.

The step of ``config/config.yaml``'s CIFAR-10 MixACM recipe (WRN-34-10 student, the config's
WRN-28-10 teacher, batch 128, bf16 + channels_last, cuDNN autotuning on, as training runs it)
beside the parts the issue's goal compares it with, and variants that change one thing:

* ``bare``: the student's CE forward, backward and SGD step; ``teacher``: the teacher's forward;
  ``bare_plus_teacher``: both in one call (what a MixACM step should cost);
* ``mixacm``: ``mixacm.train.training_step`` of the recipe, eager (``train.cuda_graphs`` off);
* ``mixacm_graphs``: the same with ``train.cuda_graphs`` on (``mixacm.graphs``; CUDA only);
* ``mixacm_unfused``: the same with the channel map written as ``A.pow(p).mean((2, 3))`` under
  autocast (the implementation before ``mixacm.losses.pooled_power``);
* ``mixacm_no_acm``: MixACM without its ACM term (mixup CE + KD; the teacher still runs).

Each variant is timed in ``--rounds`` interleaved rounds of ``--steps`` steps (the median round is
reported), then a few steps of each run under ``torch.profiler``: kernels per step, summed kernel
time per step and the top kernels, so the difference between two variants can be read kernel by
kernel. A microbenchmark times one channel map (forward + backward) of the student's largest
feature map in both implementations. One JSON (``--out``) and one line per figure on stdout.

    python benchmarks/profile_step.py --out profile_step.json          # on a GPU, ~1 minute
    python benchmarks/profile_step.py --device cpu --dry-run           # the same code, tiny, on a CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_check  # noqa: E402  (benchmarks/gpu_check.py: the recipe's step as training builds it)

import mixacm.distill  # noqa: E402
from mixacm.losses import normalize_acm, pooled_power  # noqa: E402
from mixacm.utils import atomic_json_dump  # noqa: E402


def unfused_channel_map(feat, p=2, pooling="mean", normalize="l2", activation="relu"):
    """The channel map as written before ``pooled_power``: autocast runs ``pow`` in float32 on
    CUDA, so the map is cast, powered and reduced in float32 and the gradient cast back."""
    a = F.relu(feat) if activation == "relu" else feat
    a = a.pow(p)
    a = a.mean(dim=(2, 3)) if pooling == "mean" else a.sum(dim=(2, 3))
    return normalize_acm(a, normalize)


def _parts(job: dict, args, device: torch.device) -> dict[str, Callable[[], Any]]:
    """``bare``, ``teacher`` (``gpu_check.bare_and_teacher``) and ``bare_plus_teacher``."""
    out = gpu_check.bare_and_teacher(job, args, device)

    def both():
        out["bare"]()
        out["teacher"]()

    return {**out, "bare_plus_teacher": both}


def _mixacm(job: dict, args, device: torch.device, unfused: bool = False, graphs: bool = False,
            **knobs) -> Callable[[], Any]:
    cfg = job["cfg"]
    job = {**job, "cfg": {**cfg, "method": {**cfg["method"], **knobs}, "train": {**cfg["train"], "cuda_graphs": graphs}}}
    _, step, _ = gpu_check.build_step(job, gpu_check._precision(job, device), args, device)
    if not unfused:
        return step

    def step_unfused():
        fused = mixacm.distill.activated_channel_map
        mixacm.distill.activated_channel_map = unfused_channel_map
        try:
            step()
        finally:
            mixacm.distill.activated_channel_map = fused

    return step_unfused


def variants(job: dict, args, device: torch.device) -> dict[str, Callable[[], Any]]:
    out = _parts(job, args, device)
    out["mixacm"] = _mixacm(job, args, device)
    if device.type == "cuda":
        out["mixacm_graphs"] = _mixacm(job, args, device, graphs=True)
    out["mixacm_unfused"] = _mixacm(job, args, device, unfused=True)
    out["mixacm_no_acm"] = _mixacm(job, args, device, acm=False, ablation="custom")
    return out


def time_rounds(fns: dict[str, Callable[[], Any]], args, device: torch.device) -> dict[str, dict]:
    """Median step ms of each variant over interleaved rounds (the spread says the noise)."""
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name, fn in fns.items():
            n, s = gpu_check.time_calls(fn, device, args.warmup if r == 0 else 1, args.steps, 60.0)
            ms[name].append(1000 * s / n)
    return {name: {"step_ms": statistics.median(v), "rounds_ms": v} for name, v in ms.items()}


def profile_kernels(fn: Callable[[], Any], device: torch.device, steps: int, top: int) -> dict:
    """Kernels per step, summed kernel ms per step, host ms per step and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    gpu_check._sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        host_s = time.perf_counter() - t0  # the host's time to issue the steps (it may wait on a full queue)
        gpu_check._sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time_total / 1000)
    rows = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:top]
    return {"kernels_per_step": len(kernels) / steps,
            "kernel_ms_per_step": sum(e.device_time_total for e in kernels) / 1000 / steps,
            "host_ms_per_step": 1000 * host_s / steps,
            "top": [{"kernel": k[:120], "ms_per_step": t / steps, "calls_per_step": n / steps} for t, n, k in rows]}


def microbench(args, device: torch.device) -> dict:
    """One channel map forward + backward of the student's largest feature (batch x 160 x 32 x 32
    for WRN-34-10) in bf16 channels_last under autocast, both implementations."""
    batch = gpu_check._per_gpu_batch(128, 1, args)
    width = 16 if args.dry_run else 160
    feat = torch.randn(batch, width, 32, 32, device=device).to(torch.bfloat16)
    feat = feat.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = {"shape": list(feat.shape)}
    fused = lambda f: normalize_acm(pooled_power(f, 2, "mean"))  # noqa: E731
    for name, cmap in (("fused", fused), ("unfused", lambda f: unfused_channel_map(f, activation="none"))):
        def fwd_bwd():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                a = cmap(feat)
            a.square().sum().backward()
        n, s = gpu_check.time_calls(fwd_bwd, device, 3, 10 * args.steps, 10.0)
        out[f"{name}_ms"] = 1000 * s / n
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny models and few steps (a CPU check of the code)")
    p.add_argument("--config", default=str(gpu_check.REPO / "config" / "config.yaml"))
    p.add_argument("--model", default="wrn-34-10")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="profile_step.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.rounds, args.profile_steps = 2, 1, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_step.py: no CUDA device; pass --device cpu --dry-run", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as mixacm.train.setup
    pipeline = gpu_check.load_pipeline(args.config)
    args.teacher_arch = {ds: t.get("arch") or args.model for ds, t in pipeline["teachers"].items()}
    job = gpu_check.recipe_run(pipeline, "cifar10", "mixacm", args.model)
    report: dict[str, Any] = {"provenance": gpu_check.provenance(device), "args": {k: str(v) for k, v in vars(args).items()}}
    report["microbench_channel_map"] = microbench(args, device)
    print(json.dumps({"microbench_channel_map": report["microbench_channel_map"]}), flush=True)
    fns = variants(job, args, device)
    report["steps"] = time_rounds(fns, args, device)
    steps = report["steps"]
    base = steps["bare"]["step_ms"] + steps["teacher"]["step_ms"]
    report["ratios"] = {name: steps[name]["step_ms"] / base for name in steps if name not in ("bare", "teacher")}
    print(json.dumps({"steps": {k: round(v["step_ms"], 3) for k, v in steps.items()}, "ratios": report["ratios"]}),
          flush=True)
    atomic_json_dump(report, Path(args.out))
    report["profile"] = {}
    for name in ("bare_plus_teacher", "mixacm", "mixacm_graphs", "mixacm_unfused"):
        if name not in fns:
            continue
        report["profile"][name] = profile_kernels(fns[name], device, args.profile_steps, args.top)
        prof = report["profile"][name]
        print(json.dumps({"profile": name, **{k: v for k, v in prof.items() if k != "top"}}), flush=True)
        for row in prof["top"]:
            print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x  {row['kernel']}", flush=True)
        atomic_json_dump(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
