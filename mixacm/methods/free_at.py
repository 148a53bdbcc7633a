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
        200, "training budget; the recipe trains ceil(budget / m) epochs (the dataset's recipe sets it: "
        "CIFAR 200, ImageNet 90)", kind="int", unit="epochs", ge=1
    )


@register_method("free_at")
class FreeAT(Method):
    """Free-AT. Knobs: eps (fraction of the [0, 1] range; also the FGSM step), replays (m),
    budget_epochs (recipe epochs = ceil(budget / m)); their defaults come from the dataset's
    recipe. The attack is the training pass itself, so it necessarily runs in training mode. The
    carried perturbation has the size of a full batch; a smaller (last) batch uses and updates
    its leading part and leaves the rest as it was (``global_noise_data[0:n]`` in the official
    code).

    Recipe, CIFAR-10 and CIFAR-100 (source: Shafahi et al., NeurIPS 2019, ashafahi/free_adv_train
    ``config.py`` defaults, the same for both datasets): m = 8, eps 8/255, SGD lr 0.1, momentum
    0.9, weight decay 2e-4 on convolution and linear kernels only (TensorFlow: ``total_loss =
    mean_xent + weight_decay * weight_decay_loss`` over the ``DW`` variables, so BatchNorm and
    biases are exempt), batch 128, 80,000 minibatch steps with lr / 10 at steps 40,000 and
    60,000, i.e. at 50 % and 75 % of the (replayed) steps; the 80,000 steps are about 205
    epochs of images, kept here as a budget of 200 epochs: ceil(200 / 8) = 25 epochs of replays.
    The last checkpoint.

    Recipe, ImageNet (source: mahyarnajibi/FreeAdversarialTraining ``configs.yml`` and
    ``main_free.py``): ResNet-50, m = 4, eps = FGSM step = 4/255, SGD lr 0.1, momentum 0.9,
    weight decay 1e-4 on every parameter, batch 256, a budget of 90 epochs: ceil(90 / 4) = 23
    epochs, lr / 10 every ceil(30 / m) = 8 epochs (``adjust_learning_rate``: epochs 8 and 16);
    the last checkpoint (the code also keeps the best by clean validation accuracy). Metrics:
    loss, ce, term_ce."""

    Knobs = FreeATKnobs
    replays = 8
    recipes = {
        ds: sgd_recipe(
            source="Shafahi et al. 2019, ashafahi/free_adv_train config.py defaults (80k steps, lr drops "
                   "at 40k/60k, m 8, wd 2e-4, batch 128)",
            knobs={"eps": "8/255", "replays": 8, "budget_epochs": 200},
            weight_decay=2e-4, epochs=200, milestones=[0.5, 0.75], weight_decay_exempt=["batchnorm", "bias"])
        for ds in ("cifar10", "cifar100")
    }
    recipes["imagenet"] = sgd_recipe(
        source="Shafahi et al. 2019, mahyarnajibi/FreeAdversarialTraining configs.yml + main_free.py "
               "(budget 90 epochs, m 4, lr / 10 every ceil(30 / m) epochs)",
        knobs={"eps": "4/255", "replays": 4, "budget_epochs": 90},
        batch_size=256, lr=0.1, weight_decay=1e-4, epochs=90, milestones=[], drop_every_budget_epochs=30)

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self.replays = self.knobs.replays
        self.delta: Tensor | None = None
        self._leaf: Tensor | None = None

    def adjust_recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        m = self.knobs.replays
        recipe["epochs"] = math.ceil(self.knobs.budget_epochs / m)
        recipe["replays"] = m
        every = recipe.pop("drop_every_budget_epochs", None)
        if every is not None:
            # main_free.py: lr = lr0 * 0.1 ** (epoch // ceil(30 / m)), epoch counted from 0.
            step = math.ceil(every / m)
            recipe["milestones"] = [k * step / recipe["epochs"] for k in range(1, recipe["epochs"]) if k * step < recipe["epochs"]]
        return recipe

    def resolved_knobs(self) -> dict[str, Any]:
        """The knobs as run: ``budget_epochs`` is the epochs actually trained times m (an
        ``optim.epochs`` override changes it)."""
        knobs = super().resolved_knobs()
        knobs["budget_epochs"] = int(self.recipe["epochs"]) * int(self.knobs.replays)
        return knobs

    def _carried_delta(self, x: Tensor) -> Tensor:
        d = self.delta
        if d is None or d.shape[1:] != x.shape[1:]:
            # First batch or another image size: start from no perturbation.
            d = torch.zeros_like(x)
        elif d.shape[0] < x.shape[0]:
            # A larger batch than any before: extra rows start from zero.
            d = torch.cat([d.to(x.device), d.new_zeros((x.shape[0] - d.shape[0], *d.shape[1:])).to(x.device)])
        self.delta = d.to(device=x.device, dtype=x.dtype)
        # A smaller (last) batch uses the leading part of the full-size perturbation.
        return self.delta[: x.shape[0]]

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # A leaf with requires_grad: the loop's loss.backward() fills its .grad for after_backward.
        self._leaf = self._carried_delta(x).detach().requires_grad_(True)
        loss = F.cross_entropy(self.model((x + self._leaf).clamp(0.0, 1.0)), y)
        return loss, detach_metrics(loss=loss, ce=loss, term_ce=loss)

    def after_backward(self) -> None:
        leaf = self._leaf
        if leaf is None or leaf.grad is None:
            raise RuntimeError("free_at: after_backward() needs loss() and loss.backward() first")
        eps = self.knobs.eps
        n = leaf.shape[0]
        # Under train.amp: fp16 this gradient comes from the loop's scaled loss (GradScaler), so
        # it does not underflow; a step the scaler skips for inf/NaN must not poison delta.
        grad = torch.nan_to_num(leaf.grad, nan=0.0)
        updated = (leaf.detach() + eps * grad.sign()).clamp_(-eps, eps)
        # Only the rows this batch used change; the carried perturbation keeps its full size.
        delta = self.delta.clone()
        delta[:n] = updated.to(delta.dtype)
        self.delta = delta
        self._leaf = None

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"delta"}
        if unknown:
            raise ValueError(f"free_at state has unknown keys {sorted(unknown)}")
        self.delta = state.get("delta")
