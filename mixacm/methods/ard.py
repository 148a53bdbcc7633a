"""Adversarially robust distillation (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020).

The student is trained on its own PGD adversarial examples to match the robust teacher's
softened outputs on the clean inputs:

    L = alpha * T^2 * KL_mean(softmax(t(x) / T) || softmax(s(x') / T)) + (1 - alpha) * CE(s(x), y)

with ``x' = PGD_eps(s, x, y)`` (cross-entropy of the student, uniform random start) and
``KL_mean`` averaged over batch and classes as PyTorch's ``KLDivLoss()`` default does in the
official code (``mixacm.losses.ard_loss``). The teacher is frozen (eval mode, no gradients).

Source: github.com/goldblum/AdversariallyRobustDistillation, ``main.py`` (CIFAR-10): alpha 1.0,
T 30, eps 8/255, 10 steps of 2/255 with a uniform random start, the attack run with the student
in training mode (``net.train()`` around the whole step), SGD lr 0.1, momentum 0.9, weight decay
2e-4 on every parameter, batch 128, 200 epochs; a checkpoint every epoch (``--save_period 1``),
the last one kept here. The learning rate, as the code runs it: ``--lr_schedule 100 150`` with
``--lr_factor 0.1`` reads as 0.1 / 0.01 / 0.001, but ``adjust_learning_rate(optimizer, epoch,
lr)`` multiplies the local ``lr``, which the caller resets to ``args.lr`` = 0.1 every epoch,
so it sets 0.01 at epoch 100 and again 0.01 at epoch 150: the code trains at 0.1 for epochs
0-99 and at 0.01 for 100-199, never at 0.001. The recipe follows the code (the numbers the
paper reports come from it): lr / 10 at 50 % only. Officially supported dataset here:
CIFAR-10 (the paper also reports CIFAR-100). With alpha = 1 the clean student forward of the
official code only feeds a term of weight 0, so it is skipped here (it would also update
BatchNorm statistics on clean inputs; this student's see the adversarial ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixacm.attacks import pgd_linf
from mixacm.losses import ard_loss
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, register_method, sgd_recipe


@dataclass(frozen=True)
class ARDKnobs:
    alpha: float = knob(1.0, "weight of the distillation term (1 - alpha: clean CE)", kind="float", ge=0, le=1)
    T: float = knob(30.0, "distillation temperature", kind="float", gt=0)
    eps: float = knob("8/255", "L-inf radius of the student's training attack", kind="eps", unit="fraction of [0, 1]")
    steps: int = knob(10, "PGD steps", kind="int", unit="steps", ge=1)
    step_size: float = knob("2/255", "PGD step size", kind="eps", unit="fraction of [0, 1]")
    attack_mode: str = knob("train", "student's mode while the attack runs (official: train)", kind="choice",
                            choices=("eval", "train"))


class _FrozenTeacher(Method):
    needs_teacher = True

    def __init__(self, model, teacher=None, **knobs) -> None:
        super().__init__(model, teacher, **knobs)
        assert self.teacher is not None
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def teacher_logits(self, x: Tensor) -> Tensor:
        self.teacher.eval()  # guard against a loop that switched every module to train mode
        with torch.no_grad():
            return self.teacher(x)


@register_method("ard")
class ARD(_FrozenTeacher):
    """ARD. Knobs: alpha (1), T (30), eps (8/255), steps (10), step_size (2/255), attack_mode
    (train). Recipe (CIFAR-10): SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 200
    epochs, lr / 10 at epoch 100 only (as ``main.py`` runs, see the module docstring); the last
    epoch's checkpoint. Cost: AT's step plus one teacher forward. Metrics: loss, kl (the
    class-mean KL at temperature T times T^2, unweighted), term_kl (alpha x kl), term_ce
    ((1 - alpha) x clean CE; 0 at alpha 1)."""

    Knobs = ARDKnobs
    recipes = {"cifar10": sgd_recipe(
        source="Goldblum et al. 2020; github.com/goldblum/AdversariallyRobustDistillation, main.py as it runs "
               "(CIFAR-10; lr 0.1, 0.01 from epoch 100: adjust_learning_rate never reaches 0.001)",
        weight_decay=2e-4, epochs=200, milestones=[0.5])}

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = self.knobs
        t_logits = self.teacher_logits(x)
        with attack_mode(self.model, k.attack_mode):
            x_adv = pgd_linf(self.model, x, y, eps=k.eps, steps=k.steps, step_size=k.step_size, random_start=True)
        logits_adv = self.model(x_adv)
        logits_nat = self.model(x) if k.alpha != 1.0 else None
        loss = ard_loss(logits_adv, logits_nat, t_logits, y, alpha=k.alpha, T=k.T)
        kl = ard_loss(logits_adv.detach(), None, t_logits, y, alpha=1.0, T=k.T)
        ce = F.cross_entropy(logits_nat.detach(), y) if logits_nat is not None else 0.0
        return loss, detach_metrics(loss=loss, kl=kl, term_kl=k.alpha * kl, term_ce=(1.0 - k.alpha) * ce)
