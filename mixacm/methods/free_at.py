"""Free adversarial training (Shafahi et al., NeurIPS 2019).

Each minibatch is replayed m times. Every replay trains on ``clip_[0,1](x + delta)`` and reuses
the input gradient of that same backward pass to update the perturbation, which is carried
across replays and minibatches:

    delta <- clip_[-eps, eps](delta + eps * sign(grad_delta CE(f(x + delta), y)))

so the attack costs no extra forward/backward passes. Training for budget / m epochs keeps the
total cost close to that of ``budget`` epochs of standard training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mixacm.methods.base import Method, detach_metrics, knob, register_method, sgd_recipe


@dataclass(frozen=True)
class FreeATKnobs:
    eps: float = knob("8/255", "L-inf radius and FGSM step size", kind="eps", unit="fraction of [0, 1]")
    replays: int = knob(8, "m: replays of each minibatch", kind="int", unit="replays", ge=1)
    budget_epochs: int = knob(
        200, "training budget; the recipe trains ceil(budget / m) epochs", kind="int", unit="epochs", ge=1
    )


@register_method("free_at")
class FreeAT(Method):
    """Free-AT. Knobs: eps (8/255, fraction of the [0, 1] range; also the FGSM step), replays
    (m = 8), budget_epochs (200: recipe epochs = ceil(200 / m) = 25). The attack is the training
    pass itself, so it necessarily runs in training mode. Recipe: SGD lr 0.1, momentum 0.9,
    weight decay 2e-4, batch 128, lr / 10 at 50 % and 75 % of the epochs (method.md gives no
    schedule; this is the step schedule of the other CIFAR recipes), replays m."""

    Knobs = FreeATKnobs
    replays = 8
    recipes = {"cifar10": sgd_recipe(weight_decay=2e-4, epochs=200, milestones=[0.5, 0.75])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self.replays = self.knobs.replays
        self.delta: Tensor | None = None
        self._leaf: Tensor | None = None

    def adjust_recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        recipe["epochs"] = math.ceil(self.knobs.budget_epochs / self.knobs.replays)
        recipe["replays"] = self.knobs.replays
        return recipe

    def _carried_delta(self, x: Tensor) -> Tensor:
        d = self.delta
        if d is None or d.shape[1:] != x.shape[1:] or d.shape[0] < x.shape[0]:
            # First batch, or a larger batch/other image size: start from no perturbation.
            return torch.zeros_like(x)
        # A smaller (last) batch keeps the leading part of the carried perturbation.
        return d[: x.shape[0]].to(device=x.device, dtype=x.dtype)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        # A leaf with requires_grad: the loop's loss.backward() fills its .grad for after_backward.
        self._leaf = self._carried_delta(x).detach().requires_grad_(True)
        loss = F.cross_entropy(self.model((x + self._leaf).clamp(0.0, 1.0)), y)
        return loss, detach_metrics(loss=loss, ce=loss)

    def after_backward(self) -> None:
        leaf = self._leaf
        if leaf is None or leaf.grad is None:
            raise RuntimeError("free_at: after_backward() needs loss() and loss.backward() first")
        eps = self.knobs.eps
        # Under train.amp: fp16 this gradient comes from the loop's scaled loss (GradScaler), so
        # it does not underflow; a step the scaler skips for inf/NaN must not poison delta.
        grad = torch.nan_to_num(leaf.grad, nan=0.0)
        self.delta = (leaf.detach() + eps * grad.sign()).clamp_(-eps, eps)
        self._leaf = None

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"delta"}
        if unknown:
            raise ValueError(f"free_at state has unknown keys {sorted(unknown)}")
        self.delta = state.get("delta")
