"""Images/s of the quick config's job kinds with 1 and 2 CPU threads, alone and side by side.

Snakemake runs as many jobs at once as their ``threads`` fit into ``--cores``: on a 2-core machine
two 1-thread jobs or one 2-thread job. Which is faster depends on how well torch spreads one small
model's work over two threads, so this script measures it per job kind of ``config/quick.yaml``
(0.08 M-parameter ``tiny`` model, batch 128 for training, 250 for evaluation):

- ``train-at``: one step of PGD-AT with PGD-2 (the quick teacher's recipe and the AT student's);
- ``train-mixacm``: one MixACM step with a ``tiny`` teacher;
- ``eval-pgd20``: PGD-20 on one batch, the evaluation jobs' attack.

and four ways of running it, each in fresh processes (the thread count is set before any work):

- ``1 thread``: one process with 1 thread, nothing else of ours running;
- ``2 threads``: one process with 2 threads;
- ``2 x 1 thread``: two 1-thread processes at once (what two 1-thread jobs get): the sum;
- ``2 threads + 1``: a 2-thread process beside a 1-thread one (a 2-thread job on a machine with
  one more busy process): the 2-thread process's figure.

Each figure is images per second over ``--seconds`` of steps after ``--warmup`` untimed steps. The
machine's 1-minute load average before and after is printed: the figures hold for that load.

    OMP_NUM_THREADS=1 python benchmarks/bench_threads.py            # about 2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOADS = ("train-at", "train-mixacm", "eval-pgd20")
# name -> list of (threads per process); the first process's figure is reported unless "sum"
SCENARIOS = {"1 thread": [1], "2 threads": [2], "2 x 1 thread": [1, 1], "2 threads + 1": [2, 1]}


def _workload(name: str, batch: int | None = None):
    """A function doing one unit of the job kind's work, and the images it processes (``batch``;
    default 250 for PGD-20, the CPU evaluation batch, and 128 for training)."""
    import torch

    from mixacm.attacks import build_attack
    from mixacm.methods import METHODS
    from mixacm.models import build_model
    from mixacm.train import training_step

    torch.manual_seed(0)
    batch = batch or (250 if name == "eval-pgd20" else 128)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model = build_model("tiny", 10)
    if name == "eval-pgd20":
        attack = build_attack("pgd20", 2 / 255)
        model.eval()
        return (lambda: attack(model, x, y, seed=0)), batch
    if name == "train-at":
        method = METHODS.get("at")(model, eps=2 / 255, steps=2, step_size=1 / 255)
    else:
        method = METHODS.get("mixacm")(model, teacher=build_model("tiny", 10).eval())
    extra = list(method.extra_modules().parameters())
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return (lambda: training_step(method, opt, scaler, x, y, extra_params=extra)), batch


def worker(name: str, threads: int, seconds: float, warmup: int, batch: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    step, batch = _workload(name, batch)
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(json.dumps({"img_s": n * batch / (time.perf_counter() - t0)}))


def scenario(name: str, threads: list[int], args) -> list[float]:
    """Start one process per entry of ``threads`` at once; their images/s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", name, "--threads", str(t),
                               "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                               *(["--batch", str(args.batch)] if args.batch else [])],
                              stdout=subprocess.PIPE, text=True, env=env) for t in threads]
    return [json.loads(p.communicate()[0])["img_s"] for p in procs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--batch", type=int, default=None,
                   help="images a step (default: 250 for eval-pgd20, 128 for training, as the jobs use)")
    p.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads, args.seconds, args.warmup, args.batch)
    before = os.getloadavg()[0]
    rows = []
    for name in args.workloads:
        figures = {s: scenario(name, threads, args) for s, threads in SCENARIOS.items()}
        rows.append((name, figures["1 thread"][0], figures["2 threads"][0], sum(figures["2 x 1 thread"]),
                     figures["2 threads + 1"][0]))
    print(f"img/s, {args.seconds:g} s per figure after {args.warmup} warmup steps; {os.cpu_count()} CPUs; "
          f"1-min load average {before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| job kind | 1 thread | 2 threads | 2 x 1 thread (sum) | 2 threads beside a 1-thread job |")
    print("|---|---|---|---|---|")
    for name, *vals in rows:
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
