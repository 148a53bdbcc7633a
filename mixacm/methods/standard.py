"""Standard training: cross-entropy on clean images, ``L = CE(f(x), y)``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mixacm.methods.base import Method, detach_metrics, register_method, sgd_recipe


@register_method("standard")
class Standard(Method):
    """Plain cross-entropy; no knobs.

    Recipe, CIFAR-10 / CIFAR-100 (source: method.md section 3, AT's CIFAR recipe without the
    attack; method.md gives no separate one): lr 0.1, momentum 0.9, weight decay 5e-4, batch
    128, 200 epochs, lr / 10 at 50 % and 75 % of training. ImageNet (source: the PyTorch
    ImageNet reference, pytorch/examples ``imagenet/main.py`` defaults): lr 0.1, momentum 0.9,
    weight decay 1e-4, batch 256, 90 epochs, lr / 10 every 30 epochs."""

    recipes = {
        **{ds: sgd_recipe(source="method.md section 3 (AT's CIFAR recipe without the attack)")
           for ds in ("cifar10", "cifar100")},
        "imagenet": sgd_recipe(source="pytorch/examples imagenet/main.py defaults", epochs=90, batch_size=256,
                               lr=0.1, weight_decay=1e-4, milestones=[1 / 3, 2 / 3]),
    }

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(self.model(x), y)
        return loss, detach_metrics(loss=loss, ce=loss, term_ce=loss)
