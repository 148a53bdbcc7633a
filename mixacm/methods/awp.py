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
direction as ``g_l`` above, its learning rate cancels in the normalisation. Metric
``awp_rel_norm`` = ||v|| / ||w|| over the perturbed layers (gamma while AWP is on, 0 before).

Sources (CIFAR-10), github.com/csdongxian/AWP:
- TRADES-AWP, ``trades_AWP/train_trades_cifar.py`` defaults: gamma 0.005, AWP from epoch 10 of
  200 (``--awp-warmup 10``, epochs counted from 1), WRN-34-10, SGD lr 0.1, momentum 0.9, weight
  decay 5e-4 on every parameter, lr / 10 at epochs 100 and 150, eps 8/255, 10 steps of 2/255,
  beta 6; a checkpoint every epoch, the last one released. Its loss forwards the clean batch
  twice (the KL target and the CE) in training mode; here once (the same gradient; BatchNorm's
  running statistics see the clean batch once instead of twice).
- AT-AWP, ``AT_AWP/train_cifar10.py`` defaults (Rice et al.'s ``train_cifar.py`` with AWP):
  gamma 0.01 (``--awp-gamma``), no warm-up (``--awp-warmup 0``), PreAct ResNet-18 (the README's
  WRN-34-10 run: ``--model WideResNet``), SGD lr 0.1 momentum 0.9 weight decay 5e-4 on every
  parameter, batch 128, 200 epochs, piecewise lr 0.1 / 0.01 / 0.001 at 50 % and 75 %, PGD-10 of
  2/255 within 8/255 in training mode; after the step and the restore a clean training-mode
  forward (knob ``clean_bn_forward`` of ``at``); the checkpoint with the best test PGD accuracy
  (``model_best.pth``, as Rice et al.): ``train.selection: best_pgd``.
Officially supported dataset here: CIFAR-10 (the paper also reports CIFAR-100 and SVHN).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixacm.methods.at import AT, ATKnobs
from mixacm.methods.base import check_phase_starts, detach_metrics, knob, phase_start, register_method, sgd_recipe
from mixacm.methods.trades import TRADES, TRADESKnobs

_EPS = 1e-20  # the official code's guard against a zero gradient norm


def _weights(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The perturbed parameters: multi-dimensional weights (official: 'weight' keys of dim > 1)."""
    return [(n, p) for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]


def weight_perturbation(weights: list[Tensor], grads: list[Tensor], gamma: float) -> list[Tensor]:
    """``gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)`` for each layer (a pure tensor function)."""
    return [gamma * w.detach().norm() / (g.norm() + _EPS) * g for w, g in zip(weights, grads)]


def relative_norm(delta: list[Tensor], weights: list[Tensor]) -> Tensor:
    """``||v|| / ||w||`` over all perturbed layers together (a 0-d tensor)."""
    v = torch.stack([d.pow(2).sum() for d in delta]).sum()
    w = torch.stack([p.pow(2).sum() for p in weights]).sum()
    return (v / w).sqrt()


class AWPMixin:
    """Wraps a base method with ``attack(x, y)`` and ``objective(net, x, x_adv, y)``."""

    knobs: Any
    model: nn.Module

    def _awp_setup(self) -> None:
        self._proxy: nn.Module | None = None
        self._delta: list[Tensor] | None = None
        self._saved: list[Tensor] | None = None
        self._active = self.knobs.warmup_fraction == 0

    @classmethod
    def check_recipe(cls, knobs: Any, recipe: dict[str, Any]) -> None:
        if knobs.gamma > 0:
            check_phase_starts(cls.name, "warmup_fraction", knobs.warmup_fraction, recipe["epochs"],
                               "the weight perturbation")

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        # Official: AWP from epoch `warmup` on (1-based); 10 of 200 -> 0-based epoch 9.
        self.check_recipe(self.knobs, {"epochs": epochs})
        self._active = epoch >= phase_start(self.knobs.warmup_fraction, epochs)

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

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self._delta is not None:
            raise RuntimeError(f"{self.name}: loss() called twice without after_backward(); weights still perturbed")
        self._clean = x
        x_adv = self.attack(x, y)
        on = self._active and self.knobs.gamma > 0
        rel_norm: Tensor | float = 0.0
        if on:
            self._delta = self._perturbation(x, x_adv, y)
            self._perturb(self._delta)
            rel_norm = relative_norm(self._delta, self._saved)
        loss, terms = self.objective(self.model, x, x_adv, y)
        return loss, detach_metrics(loss=loss, **terms, awp=float(on), awp_rel_norm=rel_norm)

    def after_backward(self) -> None:
        # The gradient was taken at w + v; the step is applied to w.
        if self._delta is not None:
            self._restore()
            self._delta = None
        super().after_backward()  # AT-AWP: the clean training-mode forward, on w

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
    weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs 100 and 150; the official code
    keeps the best checkpoint by test PGD accuracy (run it with ``train.selection: best_pgd``).
    Cost: one AT step plus one forward/backward of the copy and the clean forward. Metrics:
    loss, ce, term_ce, awp (1 when the weights were perturbed), awp_rel_norm."""

    Knobs = AWPATKnobs
    recipes = {"cifar10": sgd_recipe(source="Wu et al. 2020; github.com/csdongxian/AWP, AT_AWP/train_cifar10.py defaults (CIFAR-10; best checkpoint by PGD)", weight_decay=5e-4, epochs=200, milestones=[0.5, 0.75])}

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
    from epoch 100, i.e. after 99); the last epoch's checkpoint. Metrics: loss, ce, kl, term_ce,
    term_kl, awp, awp_rel_norm."""

    Knobs = AWPTRADESKnobs
    recipes = {"cifar10": sgd_recipe(source="Wu et al. 2020; github.com/csdongxian/AWP, trades_AWP/train_trades_cifar.py defaults (CIFAR-10)", weight_decay=5e-4, epochs=200, milestones=[99 / 200, 149 / 200])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        self._awp_setup()
