"""Images/s of one training step of each method, and its cost relative to a bare PyTorch loop.

Every method's step is ``mixacm.train.training_step`` (the loop's own step: loss, finiteness
check, backward, ``after_backward``, SGD step); the baseline is a bare
``cross_entropy(model(x), y).backward(); sgd.step()`` on the same architecture. All are timed in
one run, interleaved in rounds so that a change in machine load hits every method alike; each
figure is the median over all timed steps after a warmup.

Primitives are timed beside them to explain the ratios: ``fwd-only`` (an eval-mode forward
without gradients of the student's architecture), ``teacher-fwd`` (the same for the teacher's
architecture, when ``--teacher`` names another one: what MixACM, IGAM, ARD and RSLAD add per step)
and ``pgd-step`` (an eval-mode forward plus the gradient w.r.t. the input, what each PGD step
costs).

First-principles cost, counting a forward as 1 unit and a full backward as 2 (bare step = 3):
MixACM = 3 + one teacher forward (1 unit when the teacher is the student's size) -> ~1.33x;
AT (PGD-10) = 10 x (forward + input-only backward) + 3; a backward to the input alone skips the
weight-gradient work, about 1 unit, so 10 x 2 + 3 = 23 units -> ~7.7x (11x if every attack
step cost a full step); TRADES = 10 KL steps (20) + clean target forward (1) + the loss's two
forwards and backwards (6) -> ~9x; Free-AT: one replay is one full step -> ~1x per optimiser step
(m replays per minibatch); Fast-AT: one FGSM step (2) + 3 -> ~1.67x.
AT's clean training-mode forward after the step (Rice et al.) adds 1 unit: AT = 24 units -> 8x.
AWP adds one forward and backward of the outer loss on the proxy copy: AT-AWP = 24 + 3 = 27
units -> 9x, TRADES-AWP = 27 + 6 (the TRADES loss has two forwards) = 33 -> 11x; every method is
timed in the last epoch of its recipe, so AWP's perturbation is on (after its warm-up), IGAM is
in its IGAM phase and FAT at its last tau. FAT's early stop is a mask: every example runs every
iteration, so FAT costs AT's 23 units (without the clean forward) -> ~7.7x, and FAT for TRADES
TRADES' 27 -> 9x, whatever the number of steps the examples take. ARD = AT + a teacher
forward (24 units with a teacher of the student's size) -> 8x; RSLAD = 10 KL steps (20) + two
forwards and backwards (6) + a teacher forward (1) -> 9x. IGAM: a student forward (1), the
input-gradient backward with its graph kept (2), the backward through it (double
back-propagation, ~4), the teacher's forward and input backward (2) and the small
discriminator (0.5 M multiply-adds per gradient) -> ~9 units, 3x: "two to three standard steps
plus a teacher pass".

    python benchmarks/bench_methods.py                       # tiny student, batch 128, CPU
    python benchmarks/bench_methods.py --model wrn-34-10 --device cuda --amp bf16 --channels-last
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixacm.methods import METHODS
from mixacm.models import build_model
from mixacm.provenance import device_name
from mixacm.train import training_step
from mixacm.utils import resolve_device, seed_everything

# Cost in units of the bare step (forward 1 + backward 2 = 3 units), from the module docstring.
EXPECTED = {
    "bare": 1.0, "fwd-only": 1 / 3, "teacher-fwd": float("nan"), "pgd-step": 2 / 3, "standard": 1.0,
    "mixacm": 4 / 3, "at": 24 / 3, "trades": 27 / 3, "free_at": 1.0, "fast_at": 5 / 3,
    "awp_at": 27 / 3, "awp_trades": 33 / 3, "fat": 23 / 3, "fat_trades": 27 / 3, "ard": 24 / 3, "rslad": 27 / 3,
    "igam": 9 / 3,
}
DEFAULT_METHODS = ("standard", "mixacm", "at", "trades", "free_at", "fast_at",
                   "awp_at", "awp_trades", "fat", "fat_trades", "igam", "ard", "rslad")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareStep:
    """The reference: forward, cross-entropy, backward, SGD step, nothing else."""

    def __init__(self, model, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def __call__(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()


class ForwardOnly:
    """A teacher's share of MixACM: one forward in eval mode without gradients (1 unit)."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    def __call__(self, x, y) -> None:
        with torch.no_grad():
            self.model(x)


class AttackStep:
    """One PGD step's network work: eval-mode forward + gradient w.r.t. the input only (2 units)."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    def __call__(self, x, y) -> None:
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(self.model(x), y), x)


class MethodStep:
    """One optimiser step of a registered method through the training loop's ``training_step``,
    in the last epoch of its recipe (``begin_epoch``), so every epoch-dependent part is on: AWP's
    weight perturbation (after its warm-up), IGAM's discriminator and input-gradient terms (after
    its CE-only phase), FAT's final tau."""

    def __init__(self, name: str, model, teacher, lr: float, amp: str) -> None:
        cls = METHODS.get(name)
        self.method = cls(model, teacher=teacher if cls.needs_teacher else None)
        epochs = int(self.method.recipe["epochs"])
        self.method.begin_epoch(epochs - 1, epochs)
        extra = self.method.extra_modules().to(next(model.parameters()).device)
        self.extra = list(extra.parameters())
        self.opt = torch.optim.SGD([*model.parameters(), *self.extra], lr=lr, momentum=0.9, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=amp == "fp16")
        self.amp = amp

    def __call__(self, x, y) -> None:
        training_step(self.method, self.opt, self.scaler, x, y, amp=self.amp, extra_params=self.extra)


def build_steps(args, device: torch.device) -> dict:
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    teacher = build_model(args.teacher or args.model, args.num_classes).to(device, memory_format=fmt).eval()
    steps = {}
    primitives = {"bare": lambda m: BareStep(m, 1e-3), "fwd-only": ForwardOnly, "pgd-step": AttackStep}
    if args.teacher and args.teacher != args.model:
        # The teacher's own forward: the share of a distillation step that is not the method's.
        primitives["teacher-fwd"] = lambda m: ForwardOnly(teacher)
    for name in (*primitives, *args.methods):
        seed_everything(0)  # every method starts from the same weights
        model = build_model(args.model, args.num_classes).to(device, memory_format=fmt).train()
        # A small lr keeps weights (and so the time per step) in the same regime across steps.
        steps[name] = primitives[name](model) if name in primitives else MethodStep(name, model, teacher, 1e-3, args.amp)
    return steps


def run(args) -> dict[str, list[float]]:
    device = resolve_device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device, memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    steps = build_steps(args, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step(x, y)
    _sync(device)
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step(x, y)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def report(args, times: dict[str, list[float]], load: tuple[float, float] | None = None) -> str:
    device = resolve_device(args.device)
    bare = statistics.median(times["bare"])
    lines = [
        f"student {args.model}, teacher {args.teacher or args.model}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, device {device_name(device)}, amp {args.amp}, "
        f"channels_last {args.channels_last}, torch {torch.__version__}",
        f"median of {args.rounds} x {args.iters} timed steps after {args.warmup} warmup steps"
        + (f"; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after ({os.cpu_count()} CPUs)" if load else ""),
        "",
        f"| {'method':<11} | {'img/s':>8} | {'ms/step':>8} | {'x bare':>7} | {'expected':>8} |",
        f"|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 10}|",
    ]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        lines.append(f"| {name:<11} | {args.batch_size / t:8.0f} | {1000 * t:8.1f} | {t / bare:7.2f} | "
                     f"{EXPECTED.get(name, float('nan')):8.2f} |")
    teacher = med.get("teacher-fwd", med.get("fwd-only"))
    if "mixacm" in med and "standard" in med and teacher is not None:
        floor = med["standard"] + teacher
        lines += ["", f"mixacm / (standard + teacher forward) = {med['mixacm'] / floor:.3f} "
                      f"(goal: within 5 %, i.e. <= 1.05)"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="student architecture (a mixacm.models name)")
    p.add_argument("--teacher", default=None, help="teacher architecture for mixacm (default: the student's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS.names())
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods")
    p.add_argument("--iters", type=int, default=5, help="timed steps per method and round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    times = run(args)
    table = report(args, times, (before, os.getloadavg()[0]))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
