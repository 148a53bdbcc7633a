"""Adversarial weight perturbation (Wu, Xia & Wang, NeurIPS 2020) on top of PGD-AT and TRADES.

Each step first finds the adversarial inputs x' of the base method, then perturbs the weights
towards a higher outer loss L (AT: ``CE(f(x'), y)``; TRADES: ``CE(f(x), y) + beta KL``), layer
by layer, scaled to the layer's norm:

    v_l = gamma * ||w_l|| * g_l / ||g_l||,     g_l = grad_{w_l} L(w)

(only multi-dimensional weights: convolutions and linear maps; biases and BatchNorm are left
alone), trains on ``L(w + v)`` and puts ``w`` back (an exact copy, not ``w + v - v``) before the
optimiser step, so the update is ``w <- w - lr * grad L(w + v)``. The perturbation is computed on a copy of the network (the
official "proxy"), so its forward pass leaves the model's BatchNorm statistics alone.

One deliberate difference from the official code: it restores the weights after
``optimizer.step()`` (momentum and weight decay then see ``w + v``); here they are restored
between backward and step (the loop's ``after_backward``), so weight decay acts on ``w``.
The official proxy takes one SGD step from ``w`` and keeps the normalised difference: the same
direction as ``g_l`` above, its learning rate cancels in the normalisation.

Sources (CIFAR-10): github.com/csdongxian/AWP, ``trades_AWP/train_trades_cifar.py`` (TRADES-AWP:
gamma 0.005, warm-up 10 of 200 epochs, WRN-34-10, SGD lr 0.1 momentum 0.9 weight decay 5e-4,
lr / 10 at epochs 100 and 150, eps 8/255, 10 steps of 2/255, beta 6) and its README (AT-AWP on
the robust-overfitting code: PreAct ResNet-18, 200 epochs, lr 0.1 / 0.01 / 0.001 at epochs 100
and 150, weight decay 5e-4; gamma 0.01, no warm-up, as reproduced in MTandHJ/PyTorch-Robust).
Officially supported dataset here: CIFAR-10 (the paper also reports CIFAR-100 and SVHN).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixacm.methods.at import AT, ATKnobs
from mixacm.methods.base import detach_metrics, knob, register_method, sgd_recipe
from mixacm.methods.trades import TRADES, TRADESKnobs

_EPS = 1e-20  # the official code's guard against a zero gradient norm


def _weights(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The perturbed parameters: multi-dimensional weights (official: 'weight' keys of dim > 1)."""
    return [(n, p) for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]


def weight_perturbation(weights: list[Tensor], grads: list[Tensor], gamma: float) -> list[Tensor]:
    """``gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)`` for each layer (a pure tensor function)."""
    return [gamma * w.detach().norm() / (g.norm() + _EPS) * g for w, g in zip(weights, grads)]


class AWPMixin:
    """Wraps a base method with ``attack(x, y)`` and ``objective(net, x, x_adv, y)``."""

    knobs: Any
    model: nn.Module

    def _awp_setup(self) -> None:
        self._proxy: nn.Module | None = None
        self._delta: list[Tensor] | None = None
        self._saved: list[Tensor] | None = None
        self._active = self.knobs.warmup_fraction == 0

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        # Official: AWP from epoch `warmup` on (1-based); 10 of 200 -> 0-based epoch 9.
        self._active = epoch >= round(self.knobs.warmup_fraction * epochs)

    def _net(self) -> nn.Module:
        return getattr(self.model, "module", self.model)  # the network inside a DDP wrapper

    def _perturbation(self, x: Tensor, x_adv: Tensor, y: Tensor) -> list[Tensor]:
        net = self._net()
        if self._proxy is None:
            self._proxy = copy.deepcopy(net)
        proxy = self._proxy
        proxy.load_state_dict(net.state_dict())
        proxy.train()
        loss, _ = self.objective(proxy, x, x_adv, y)
        weights = [p for _, p in _weights(proxy)]
        grads = torch.autograd.grad(loss, weights)
        return weight_perturbation(weights, list(grads), self.knobs.gamma)

    def _perturb(self, delta: list[Tensor]) -> None:
        weights = [p for _, p in _weights(self._net())]
        self._saved = [p.detach().clone() for p in weights]
        with torch.no_grad():
            for p, d in zip(weights, delta):
                p.add_(d)

    def _restore(self) -> None:
        assert self._saved is not None
        with torch.no_grad():
            for (_, p), w in zip(_weights(self._net()), self._saved):
                p.copy_(w)
        self._saved = None

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        if self._delta is not None:
            raise RuntimeError(f"{self.name}: loss() called twice without after_backward(); weights still perturbed")
        x_adv = self.attack(x, y)
        on = self._active and self.knobs.gamma > 0
        if on:
            self._delta = self._perturbation(x, x_adv, y)
            self._perturb(self._delta)
        loss, terms = self.objective(self.model, x, x_adv, y)
        return loss, detach_metrics(loss=loss, **terms, awp=float(on))

    def after_backward(self) -> None:
        # The gradient was taken at w + v; the step is applied to w.
        if self._delta is not None:
            self._restore()
            self._delta = None

    def state_dict(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class AWPATKnobs(ATKnobs):
    gamma: float = knob(0.01, "relative size of the weight perturbation ||v_l|| / ||w_l||", kind="float", ge=0)
    warmup_fraction: float = knob(
        0.0, "fraction of the epochs trained without AWP (official AT-AWP: 0)", kind="float", ge=0, le=1
    )


@register_method("awp_at")
class AWPAT(AWPMixin, AT):
    """AT-AWP. Knobs: those of ``at`` (eps 8/255, 10 steps of 2/255, random start, attack_mode)
    plus gamma (0.01) and warmup_fraction (0). Recipe (CIFAR-10): SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs 100 and 150. Cost: one AT step
    plus one forward/backward of the copy. Metrics: loss, ce, awp (1 when the weights were
    perturbed)."""

    Knobs = AWPATKnobs
    recipes = {"cifar10": sgd_recipe(source="Wu et al. 2020; github.com/csdongxian/AWP README: AT-AWP on the robust-overfitting code (CIFAR-10)", weight_decay=5e-4, epochs=200, milestones=[0.5, 0.75])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self._awp_setup()


@dataclass(frozen=True)
class AWPTRADESKnobs(TRADESKnobs):
    eps: float = knob("8/255", "L-inf radius of the inner maximisation", kind="eps", unit="fraction of [0, 1]")
    step_size: float = knob("2/255", "inner step size", kind="eps", unit="fraction of [0, 1]")
    gamma: float = knob(0.005, "relative size of the weight perturbation ||v_l|| / ||w_l||", kind="float", ge=0)
    warmup_fraction: float = knob(
        9 / 200, "fraction of the epochs trained without AWP (official: from epoch 10 of 200)",
        kind="float", ge=0, le=1,
    )


@register_method("awp_trades")
class AWPTRADES(AWPMixin, TRADES):
    """TRADES-AWP. Knobs: those of ``trades`` with the AWP code's eps 8/255 and step 2/255 (beta
    6, 10 steps, Gaussian start 0.001, eval-mode attack), plus gamma (0.005) and
    warmup_fraction (9/200: AWP from epoch 10 of 200). Recipe (CIFAR-10): SGD lr 0.1, momentum
    0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs 100 and 150 (1-based:
    from epoch 100, i.e. after 99). Metrics: loss, ce, kl, awp."""

    Knobs = AWPTRADESKnobs
    recipes = {"cifar10": sgd_recipe(source="Wu et al. 2020; github.com/csdongxian/AWP, trades_AWP/train_trades_cifar.py defaults (CIFAR-10)", weight_decay=5e-4, epochs=200, milestones=[99 / 200, 149 / 200])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self._awp_setup()
