"""Friendly adversarial training (Zhang et al., ICML 2020: "Attacks which do not kill training make
adversarial learning stronger"), the AT variant (``fat``; the TRADES variant is ``fat_trades``).

``L = CE(f(x~), y)`` on friendly adversarial inputs ``x~`` from early-stopped PGD: PGD steps as
in AT, but an example stops moving once it is misclassified and its budget of tau extra steps
is spent (every step taken while misclassified costs one unit of tau). With tau >= the number
of steps no example ever stops and ``x~`` is AT's PGD output. The official "dynamic tau" raises
tau during training: 0 until epoch 50, 1 until epoch 90, 2 afterwards (of 120).

The early stop is a mask: every example runs every iteration (one forward and input backward
of the whole batch) and only the moving ones take their step, so the attack reads nothing back
to the host. With the attack in eval mode (official) an example's step does not depend on the
others, so this gives the official output; the official code shrinks the batch instead, so its
cost falls as examples stop, while here it is always PGD's. ``pgd_steps`` reports the mean
number of steps the examples took, the official "BP count" per example.

Source: github.com/zjfheart/Friendly-Adversarial-Training, ``FAT.py`` and ``earlystop.py``
(CIFAR-10, WRN-32-10 "WRN_madry"): SGD lr 0.1, momentum 0.9, weight decay 2e-4 on every
parameter, batch 128, 120 epochs, lr x 0.1 from epoch 60, x 0.01 from epoch 90, x 0.005 from
epoch 110 (1-based); eps 0.031, at most 10 steps of 0.007, uniform random start, Gaussian noise
of std omega = 0.001 added at every step, the attack in eval mode (so it leaves BatchNorm's
statistics alone), dynamic tau; the checkpoint of the last epoch. Officially supported dataset
here: CIFAR-10 (the paper also reports SVHN). The loop's step schedule has one factor per
milestone, so the last halving at epoch 110 (lr 0.001 -> 0.0005) is not reproduced: the recipe
keeps lr 0.001 for the last 11 epochs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks.pgd import _uniform_like, fp32_attack, project_linf
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, phase_start, register_method, sgd_recipe

# Official dynamic tau of FAT.py: tau = number of these fractions of the epochs already reached.
DYNAMIC_TAU_STEPS = (50 / 120, 90 / 120)


def dynamic_tau(epoch: int, epochs: int, fractions: tuple[float, ...]) -> int:
    """Tau of 0-based ``epoch``: how many of the ``fractions`` of ``epochs`` it has reached."""
    return sum(epoch >= phase_start(f, epochs) for f in fractions)


def _per_example_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def early_stopped_pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
                      tau: int, x_start: Tensor | None = None, omega: float = 0.0,
                      loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                      loss_target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Early-stopped PGD (FAT's Algorithm 1): returns ``(x~, steps taken per example)``.

    From ``x_start`` (default ``x``), at each of ``steps`` iterations every example is classified:
    a misclassified one with no tau left stops where it is, a misclassified one with tau left
    spends one unit and moves on, the others move on too; moving examples take a signed-gradient
    step of ``loss_fn(logits, loss_target)`` (default: CE with the labels ``y``; FAT for TRADES
    ascends the KL to the clean output), plus ``omega`` Gaussian noise, projected onto the eps
    ball and [0, 1]. A boolean mask, not indexing, selects the moving examples (no host read).
    """
    loss_fn = loss_fn or _per_example_ce
    target = y if loss_target is None else loss_target
    x = x.detach()
    x_adv = (x if x_start is None else x_start).detach().clone()
    budget = torch.full((len(x),), int(tau), dtype=torch.long, device=x.device)
    moving = torch.ones(len(x), dtype=torch.bool, device=x.device)
    taken = torch.zeros(len(x), device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        xa = x_adv.requires_grad_(True)
        # fp32 under AMP, as every attack (mixacm.attacks.fp32_attack): fp16 input gradients
        # underflow without loss scaling and leave examples unperturbed.
        with torch.enable_grad(), fp32_attack(x.device):
            logits = model(xa)
            (grad,) = torch.autograd.grad(loss_fn(logits, target).sum(), xa)
        wrong = logits.detach().argmax(1) != y
        stop = moving & wrong & (budget == 0)
        budget = budget - (moving & wrong & ~stop).long()
        moving = moving & ~stop
        step = xa.detach() + step_size * grad.sign()
        if omega > 0:
            step = step + omega * torch.randn_like(step)
        x_adv = torch.where(moving.view(shape), project_linf(step, x, eps), xa.detach())
        taken = taken + moving.float()
    return x_adv.detach(), taken


class DynamicTau:
    """FAT's tau as a method attribute: the knob ``tau``, or with ``dynamic_tau`` the official
    schedule, a step up at each of the class's ``TAU_STEPS`` (fractions of the epochs)."""

    TAU_STEPS: tuple[float, ...] = ()
    knobs: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tau = 0 if self.knobs.dynamic_tau else self.knobs.tau

    @classmethod
    def resolve(cls, given: dict[str, Any], dataset: str | None = None) -> Any:
        """The knobs; a ``tau`` other than the default given with ``dynamic_tau`` on is an error
        (the schedule sets tau; a run's recorded knobs, default tau included, rebuild it)."""
        knobs = super().resolve(given, dataset)  # type: ignore[misc]
        default = next(f.default for f in dataclasses.fields(cls.Knobs) if f.name == "tau")
        if knobs.dynamic_tau and knobs.tau != default:
            raise ValueError(f"knob 'tau' of method {cls.name!r} is not read while 'dynamic_tau' is true "
                             "(the official schedule sets tau); set dynamic_tau: false to fix tau")
        return knobs

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        if self.knobs.dynamic_tau:
            self.tau = dynamic_tau(epoch, epochs, self.TAU_STEPS)


@dataclass(frozen=True)
class FATKnobs:
    eps: float = knob(0.031, "L-inf radius of the training attack", kind="eps", unit="fraction of [0, 1]")
    steps: int = knob(10, "maximum PGD steps K", kind="int", unit="steps", ge=1)
    step_size: float = knob(0.007, "PGD step size", kind="eps", unit="fraction of [0, 1]")
    tau: int = knob(0, "extra steps after misclassification (when dynamic_tau is off)", kind="int", unit="steps", ge=0)
    dynamic_tau: bool = knob(True, "tau 0 / 1 / 2 from 0, 50/120 and 90/120 of the epochs (official)", kind="bool")
    random_start: bool = knob(True, "start from x + U(-eps, eps)", kind="bool")
    omega: float = knob(0.001, "std of the Gaussian noise added at each step", kind="float", unit="fraction of [0, 1]",
                        ge=0)
    attack_mode: str = knob("eval", "model mode while the attack runs (official: eval)", kind="choice",
                            choices=("eval", "train"))


@register_method("fat")
class FAT(DynamicTau, Method):
    """FAT (for AT; the paper's FAT row is FAT for TRADES, ``fat_trades``). Knobs: eps (0.031),
    steps (10), step_size (0.007), tau (0), dynamic_tau (true), random_start (true), omega
    (0.001), attack_mode (eval). Recipe (CIFAR-10): SGD lr 0.1, momentum 0.9, weight decay 2e-4,
    batch 128, 120 epochs, lr / 10 after epochs 59 and 89; the last epoch's checkpoint.
    Metrics: loss, ce, term_ce, tau, pgd_steps (mean steps taken per example)."""

    Knobs = FATKnobs
    TAU_STEPS = DYNAMIC_TAU_STEPS
    recipes = {"cifar10": sgd_recipe(source="Zhang et al. 2020; github.com/zjfheart/Friendly-Adversarial-Training, FAT.py defaults (CIFAR-10)", weight_decay=2e-4, epochs=120, milestones=[59 / 120, 89 / 120])}

    def attack(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Friendly adversarial inputs and the steps each took, in the mode of ``attack_mode``."""
        k = self.knobs
        start = (x + _uniform_like(x, k.eps, None)).clamp(0.0, 1.0) if k.random_start else None
        with attack_mode(self.model, k.attack_mode):
            return early_stopped_pgd(self.model, x, y, eps=k.eps, steps=k.steps, step_size=k.step_size,
                                     tau=self.tau, x_start=start, omega=k.omega)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x_adv, taken = self.attack(x, y)
        loss = F.cross_entropy(self.model(x_adv), y)
        return loss, detach_metrics(loss=loss, ce=loss, term_ce=loss, tau=self.tau, pgd_steps=taken.mean())
