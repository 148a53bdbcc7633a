"""Standard training: cross-entropy on clean images, ``L = CE(f(x), y)``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mixacm.methods.base import Method, detach_metrics, register_method, sgd_recipe


@register_method("standard")
class Standard(Method):
    """Plain cross-entropy; no knobs. Recipe: the CIFAR SGD recipe used by AT (method.md gives
    no separate one): lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10
    at 50 % and 75 % of training."""

    recipes = {"cifar10": sgd_recipe()}

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = F.cross_entropy(self.model(x), y)
        return loss, detach_metrics(loss=loss, ce=loss)
