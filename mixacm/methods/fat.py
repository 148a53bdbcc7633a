"""Friendly adversarial training (Zhang et al., ICML 2020: "Attacks which do not kill training make
adversarial learning stronger").

``L = CE(f(x~), y)`` on friendly adversarial inputs ``x~`` from early-stopped PGD: PGD steps as
in AT, but an example stops moving once it is misclassified and its budget of tau extra steps
is spent (every step taken while misclassified costs one unit of tau). With tau >= the number
of steps no example ever stops and ``x~`` is AT's PGD output. The official "dynamic tau" raises
tau during training: 0 until epoch 50, 1 until epoch 90, 2 afterwards (of 120).

Source: github.com/zjfheart/Friendly-Adversarial-Training, ``FAT.py`` and ``earlystop.py``
(CIFAR-10, WRN-32-10 "WRN_madry"): SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 120
epochs, lr x 0.1 from epoch 60, x 0.01 from epoch 90, x 0.005 from epoch 110 (1-based); eps
0.031, at most 10 steps of 0.007, uniform random start, Gaussian noise of std omega = 0.001
added at every step, the attack in eval mode, dynamic tau. Officially supported dataset here:
CIFAR-10 (the paper also reports SVHN). The loop's step schedule has one factor per milestone,
so the last halving at epoch 110 (lr 0.001 -> 0.0005) is not reproduced: the recipe keeps
lr 0.001 for the last 11 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks.pgd import _uniform_like, fp32_attack, project_linf
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, register_method, sgd_recipe

# Official dynamic tau: tau = number of these fractions of the epochs already reached (0, 1, 2).
DYNAMIC_TAU_STEPS = (50 / 120, 90 / 120)


def early_stopped_pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
                      tau: int, random_start: bool = True, omega: float = 0.0) -> tuple[Tensor, Tensor]:
    """Early-stopped PGD (FAT's Algorithm 1): returns ``(x~, steps taken per example)``.

    At each of ``steps`` iterations the examples still moving are classified; a misclassified
    one with no tau left stops where it is, a misclassified one with tau left spends one unit
    and moves on; the others take a signed-gradient step of per-example CE (plus ``omega``
    Gaussian noise) projected onto the eps ball and [0, 1]. Forward and backward passes are
    run on the moving examples only, so the cost is at most PGD's.
    """
    x = x.detach()
    x_adv = (x + _uniform_like(x, eps, None)).clamp_(0.0, 1.0) if random_start else x.clone()
    budget = torch.full((len(x),), int(tau), device=x.device)
    moving = torch.arange(len(x), device=x.device)
    taken = torch.zeros(len(x), device=x.device)
    for _ in range(steps):
        if len(moving) == 0:
            break
        xa = x_adv[moving].requires_grad_(True)
        # fp32 under AMP, as every attack (mixacm.attacks.fp32_attack): fp16 input gradients
        # underflow without loss scaling and leave examples unperturbed.
        with torch.enable_grad(), fp32_attack(x.device):
            logits = model(xa)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y[moving], reduction="sum"), xa)
        wrong = logits.detach().argmax(1) != y[moving]
        stop = wrong & (budget[moving] == 0)
        budget[moving[wrong & ~stop]] -= 1
        keep = ~stop
        moving, grad = moving[keep], grad[keep]
        if len(moving) == 0:
            break
        step = xa.detach()[keep] + step_size * grad.sign()
        if omega > 0:
            step = step + omega * torch.randn_like(step)
        x_adv[moving] = project_linf(step, x[moving], eps)
        taken[moving] += 1
    return x_adv.detach(), taken


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
class FAT(Method):
    """FAT (for AT). Knobs: eps (0.031), steps (10), step_size (0.007), tau (0), dynamic_tau
    (true), random_start (true), omega (0.001), attack_mode (eval). Recipe (CIFAR-10): SGD lr
    0.1, momentum 0.9, weight decay 2e-4, batch 128, 120 epochs, lr / 10 after epochs 59 and 89.
    Metrics: loss, ce, tau, pgd_steps (mean steps taken per example: the attack's cost)."""

    Knobs = FATKnobs
    recipes = {"cifar10": sgd_recipe(source="Zhang et al. 2020; github.com/zjfheart/Friendly-Adversarial-Training, FAT.py defaults (CIFAR-10)", weight_decay=2e-4, epochs=120, milestones=[59 / 120, 89 / 120])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self.tau = 0 if self.knobs.dynamic_tau else self.knobs.tau

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        if self.knobs.dynamic_tau:
            self.tau = sum(epoch >= round(f * epochs) for f in DYNAMIC_TAU_STEPS)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            x_adv, taken = early_stopped_pgd(self.model, x, y, eps=k.eps, steps=k.steps, step_size=k.step_size,
                                             tau=self.tau, random_start=k.random_start, omega=k.omega)
        loss = F.cross_entropy(self.model(x_adv), y)
        return loss, detach_metrics(loss=loss, ce=loss, tau=self.tau, pgd_steps=taken.mean())
