"""TRADES (Zhang et al., ICML 2019): ``L = CE(f(x), y) + beta * KL(f(x) || f(x'))``.

The inner maximisation ascends the KL itself, from ``x + 0.001 * N(0, 1)`` (at ``x`` the KL and
its gradient are zero), with signed steps projected onto the L-inf ball and [0, 1], as in the
official code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks import pgd_linf
from mixacm.losses import trades_kl
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, register_method, sgd_recipe


@dataclass(frozen=True)
class TRADESKnobs:
    beta: float = knob(6.0, "weight of the KL regulariser", kind="float", ge=0)
    eps: float = knob(0.031, "L-inf radius of the inner maximisation", kind="eps", unit="fraction of [0, 1]")
    steps: int = knob(10, "inner maximisation steps", kind="int", unit="steps", ge=1)
    step_size: float = knob(0.007, "inner step size", kind="eps", unit="fraction of [0, 1]")
    init_std: float = knob(0.001, "std of the Gaussian start around x", kind="float", unit="fraction of [0, 1]", gt=0)
    attack_mode: str = knob(
        "eval", "model mode during the inner maximisation (official: eval)", kind="choice", choices=("eval", "train")
    )


@register_method("trades")
class TRADES(Method):
    """TRADES. Knobs: beta (6), eps (0.031, fraction of the [0, 1] range: the official value,
    not 8/255), steps (10), step_size (0.007), init_std (0.001), attack_mode (eval, official).
    Recipe, CIFAR-10 (source: Zhang et al., ICML 2019, yaodongyu/TRADES
    ``train_trades_cifar10.py`` defaults): SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch
    128, 76 epochs; ``adjust_learning_rate`` gives lr / 10 from 1-based epoch 75 on
    (``if epoch >= 75``, epochs counted from 1), so epochs 75 and 76 train at 0.01: the drop is
    at 74 / 76 of training; weight decay on every parameter; the official script saves every
    epoch and does not say which epoch the released ``model_cifar_wrn.pt`` is: the last is kept
    here. No ImageNet or CIFAR-100 recipe in the
    source. Metrics: loss, ce, kl (unweighted), term_ce, term_kl (beta x kl)."""

    Knobs = TRADESKnobs
    recipes = {
        "cifar10": sgd_recipe(
            source="Zhang et al. 2019, yaodongyu/TRADES train_trades_cifar10.py defaults",
            weight_decay=2e-4, epochs=76, milestones=[74 / 76]),
    }

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        """The inner maximisation of the KL, in the model mode of ``attack_mode``."""
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            with torch.no_grad():
                logits_target = self.model(x)
            x_init = x + k.init_std * torch.randn_like(x)
            return pgd_linf(
                self.model, x, logits_target, eps=k.eps, steps=k.steps, step_size=k.step_size,
                random_start=False, loss_fn=trades_kl, x_init=x_init,
            )

    def objective(self, net: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE(f(x), y) + beta * KL(f(x) || f(x'))`` of ``net`` (AWP evaluates it on a copy)."""
        logits_nat = net(x)
        ce = F.cross_entropy(logits_nat, y)
        kl = trades_kl(net(x_adv), logits_nat)
        term_kl = self.knobs.beta * kl
        return ce + term_kl, {"ce": ce, "kl": kl, "term_ce": ce, "term_kl": term_kl}

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x_adv = self.attack(x, y)
        # Back in training mode: both terms are trained, gradients reach f(x) through both.
        loss, terms = self.objective(self.model, x, x_adv, y)
        return loss, detach_metrics(loss=loss, **terms)
