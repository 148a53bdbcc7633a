"""Madry PGD adversarial training (Madry et al., ICLR 2018; recipe of Rice et al., ICML 2020).

``L = CE(f(x'), y)`` with ``x' = PGD_eps(x)``: ``steps`` signed-gradient steps of ``step_size``
from a uniform random start in the L-inf ball, projected onto the ball and [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks import pgd_linf
from mixacm.methods.base import Method, attack_mode, detach_metrics, knob, register_method, sgd_recipe


@dataclass(frozen=True)
class ATKnobs:
    eps: float = knob("8/255", "L-inf radius of the training attack", kind="eps", unit="fraction of [0, 1]")
    steps: int = knob(10, "PGD steps", kind="int", unit="steps", ge=1)
    step_size: float = knob("2/255", "PGD step size", kind="eps", unit="fraction of [0, 1]")
    random_start: bool = knob(True, "start from x + U(-eps, eps)", kind="bool")
    attack_mode: str = knob(
        "train", "model mode while the attack runs (train: as Rice et al.'s train_cifar.py, the "
        "attack sees batch statistics and updates BatchNorm's running ones; eval: running "
        "statistics, untouched by adversarial passes)", kind="choice", choices=("eval", "train"),
    )
    clean_bn_forward: bool = knob(
        True, "after each step a clean training-mode forward without gradients, as Rice et al.'s "
        "train_cifar.py and AT-AWP's train_cifar10.py log training accuracy with it: it updates "
        "BatchNorm's running statistics with the clean batch's", kind="bool",
    )


@register_method("at")
class AT(Method):
    """PGD-AT. Knobs: eps (default 8/255, fraction of the [0, 1] range), steps (10), step_size
    (2/255), random_start (true), attack_mode (train | eval, default train: the code the recipe
    cites runs the attack with the model in training mode, so the attack's forward passes use
    batch statistics and update BatchNorm's running statistics; eval keeps them untouched).

    Recipe, CIFAR-10 (source: Rice, Wong and Kolter, ICML 2020, locuslab/robust_overfitting
    ``train_cifar.py`` defaults with ``--lr-schedule piecewise``): SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, batch 128, 200 epochs, lr / 10 at 50 % and lr / 100 at 75 % of training
    (their schedule is evaluated at ``epoch + (i + 1) / len``, i.e. each drop one step earlier
    than here); PGD-10 of 2/255 within 8/255 from a random start; the paper keeps the best
    checkpoint by PGD accuracy (``train.selection: best_pgd``; the code keeps ``model_best.pth``
    by test PGD-10 accuracy). Weight decay on every parameter (``--l2`` 0, the default, leaves
    ``SGD(model.parameters(), weight_decay=5e-4)``). BatchNorm: the attack's forwards and the
    loss's run in training mode, and after the optimiser step the code runs the clean batch
    through the model in training mode (``output = model(normalize(X))``, for the logged
    training accuracy), so the running statistics also see clean batches: knob
    ``clean_bn_forward`` (default true) does that forward in ``after_backward``, before the
    optimiser step (the loop has no hook after it), i.e. on the step's starting weights. No
    ImageNet recipe: the sources give none, so an AT run on ImageNet is a config error.
    Metrics: loss, ce, term_ce."""

    Knobs = ATKnobs
    recipes = {
        "cifar10": sgd_recipe(
            source="Rice et al. 2020, locuslab/robust_overfitting train_cifar.py defaults (piecewise schedule)",
            weight_decay=5e-4, epochs=200, milestones=[0.5, 0.75]),
    }

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        """The training attack's adversarial inputs, in the model mode of ``attack_mode``."""
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            return pgd_linf(
                self.model, x, y, eps=k.eps, steps=k.steps, step_size=k.step_size, random_start=k.random_start
            )

    def objective(self, net: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The outer loss of ``net`` given the adversarial inputs (AWP evaluates it on a copy)."""
        loss = F.cross_entropy(net(x_adv), y)
        return loss, {"ce": loss, "term_ce": loss}

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._clean = x
        x_adv = self.attack(x, y)
        # Back in the mode the loop set (train) for the loss itself.
        loss, terms = self.objective(self.model, x, x_adv, y)
        return loss, detach_metrics(loss=loss, **terms)

    def after_backward(self) -> None:
        self.clean_bn_forward()

    def clean_bn_forward(self) -> None:
        """The official clean training-mode forward (knob ``clean_bn_forward``): no gradient,
        only BatchNorm's running statistics change."""
        x, self._clean = getattr(self, "_clean", None), None
        if self.knobs.clean_bn_forward and x is not None:
            with torch.no_grad():
                self.model(x)
