"""Fast adversarial training (Wong, Rice and Kolter, ICLR 2020): FGSM with a random start.

``x' = clip( x + delta0 + alpha * sign(grad CE(f(x + delta0), y)) )`` with
``delta0 ~ U(-eps, eps)`` and ``alpha = 1.25 * eps``, projected onto the L-inf ball and [0, 1]
(one PGD step from a random start); ``L = CE(f(x'), y)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mixacm.attacks import pgd_linf
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, register_method, sgd_recipe


@dataclass(frozen=True)
class FastATKnobs:
    eps: float = knob("8/255", "L-inf radius of the training attack", kind="eps", unit="fraction of [0, 1]")
    step_scale: float = knob(1.25, "FGSM step alpha as a multiple of eps", kind="float", unit="x eps", gt=0)
    attack_mode: str = knob(
        "train", "model mode during the FGSM step (official code: train)", kind="choice", choices=("eval", "train")
    )


@register_method("fast_at")
class FastAT(Method):
    """Fast-AT. Knobs: eps (8/255, fraction of the [0, 1] range), step_scale (1.25: alpha =
    1.25 eps = 10/255 at 8/255), attack_mode (train, as the official code: the FGSM pass is an
    ordinary training-mode forward). Recipe (CIFAR-10, Wong et al.): SGD momentum 0.9, weight
    decay 5e-4, batch 128, 15 epochs, cyclic lr rising linearly from 0 to lr = 0.2 at
    ``milestones[0]`` = 40 % of training and back to 0 at the end. The early stop against
    catastrophic overfitting is the loop's checkpoint selection by PGD accuracy on a held-out
    split (``train.selection: best_pgd``), not part of this loss."""

    Knobs = FastATKnobs
    recipes = {"cifar10": sgd_recipe(epochs=15, lr=0.2, weight_decay=5e-4, schedule="cyclic", milestones=[0.4])}

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            x_adv = pgd_linf(self.model, x, y, eps=k.eps, steps=1, step_size=k.step_scale * k.eps, random_start=True)
        loss = F.cross_entropy(self.model(x_adv), y)
        return loss, detach_metrics(loss=loss, ce=loss)
