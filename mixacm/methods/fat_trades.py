"""FAT for TRADES (Zhang et al., ICML 2020): TRADES' loss on friendly adversarial inputs.

    x~ = early-stopped KL ascent from x + 0.001 N(0, 1)     (mixacm.methods.fat.early_stopped_pgd)
    L  = CE(f(x), y) + beta * KL(f(x) || f(x~))

The inner maximisation ascends TRADES' KL to the clean output (computed in eval mode, as the
attack) and stops an example once it is misclassified and its tau extra steps are spent; the
dynamic tau rises 0 / 1 / 2 / 3 over training. This is the system behind the MixACM paper's
"FAT" row (84.52 % clean): RobustBench's ``Zhang2020Attacks`` (WRN-34-10, clean 84.52, "reported"
54.36, AutoAttack 53.51), whose reported 54.36 is the README's C&W accuracy of FAT for TRADES
with beta 6 trained at eps 16/255 (0.062; clean 84.39 there). Plain FAT (``fat``) is FAT for AT.

Source: github.com/zjfheart/Friendly-Adversarial-Training, ``FAT_for_TRADES.py`` and
``earlystop.py`` (CIFAR-10, WRN-34-10): beta 6, at most 10 steps of 0.007, eps 0.062 (the
README's ``--epsilon 0.062`` run; the script's default is 0.031), start x + 0.001 N(0, 1)
clipped to [0, 1], omega 0 (no noise), the attack in eval mode, dynamic tau (1-based epoch
<= 30: 0, <= 50: 1, <= 70: 2, then 3); SGD lr 0.1, momentum 0.9, weight decay 2e-4 on every
parameter, batch 128, 85 epochs, lr x 0.1 from epoch 75 (the x 0.01 from epoch 90 is never
reached); the checkpoint of the last epoch. Officially supported dataset here: CIFAR-10.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixacm.losses import trades_kl
from mixacm.methods.base import attack_mode, detach_metrics, knob, register_method, sgd_recipe
from mixacm.methods.fat import DynamicTau, early_stopped_pgd
from mixacm.methods.trades import TRADES

# Official dynamic tau of FAT_for_TRADES.py (85 epochs): tau 1, 2, 3 from 1-based epochs 31, 51, 71.
DYNAMIC_TAU_STEPS = (30 / 85, 50 / 85, 70 / 85)


@dataclass(frozen=True)
class FATTRADESKnobs:
    beta: float = knob(6.0, "weight of the KL regulariser", kind="float", ge=0)
    eps: float = knob(0.062, "L-inf radius of the training attack (official run behind the paper's row: "
                      "0.062 = 16/255; FAT_for_TRADES.py's default 0.031)", kind="eps", unit="fraction of [0, 1]")
    steps: int = knob(10, "maximum steps K of the KL ascent", kind="int", unit="steps", ge=1)
    step_size: float = knob(0.007, "step size", kind="eps", unit="fraction of [0, 1]")
    init_std: float = knob(0.001, "std of the Gaussian start around x", kind="float", unit="fraction of [0, 1]", gt=0)
    tau: int = knob(0, "extra steps after misclassification (when dynamic_tau is off)", kind="int", unit="steps", ge=0)
    dynamic_tau: bool = knob(True, "tau 0 / 1 / 2 / 3 from 0, 30/85, 50/85 and 70/85 of the epochs (official)",
                             kind="bool")
    omega: float = knob(0.0, "std of the Gaussian noise added at each step (official: 0)", kind="float",
                        unit="fraction of [0, 1]", ge=0)
    attack_mode: str = knob("eval", "model mode while the attack runs (official: eval)", kind="choice",
                            choices=("eval", "train"))


@register_method("fat_trades")
class FATTRADES(DynamicTau, TRADES):
    """FAT for TRADES (the paper's FAT row). Knobs: beta (6), eps (0.062), steps (10), step_size
    (0.007), init_std (0.001), tau (0), dynamic_tau (true), omega (0), attack_mode (eval).
    Recipe (CIFAR-10): SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 85 epochs,
    lr / 10 after epoch 74 (1-based: from epoch 75); the last epoch's checkpoint. Metrics: loss,
    ce, kl (unweighted), term_ce, term_kl (beta x kl), tau, pgd_steps (mean steps taken)."""

    Knobs = FATTRADESKnobs
    TAU_STEPS = DYNAMIC_TAU_STEPS
    recipes = {"cifar10": sgd_recipe(
        source="Zhang et al. 2020; github.com/zjfheart/Friendly-Adversarial-Training, FAT_for_TRADES.py "
               "(CIFAR-10; eps 0.062 as the README's run behind RobustBench Zhang2020Attacks)",
        weight_decay=2e-4, epochs=85, milestones=[74 / 85])}

    def friendly_attack(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The early-stopped KL ascent's inputs and the steps each took (``attack_mode``)."""
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            with torch.no_grad():
                logits_nat = self.model(x)
            start = (x + k.init_std * torch.randn_like(x)).clamp(0.0, 1.0)
            return early_stopped_pgd(self.model, x, y, eps=k.eps, steps=k.steps, step_size=k.step_size,
                                     tau=self.tau, x_start=start, omega=k.omega, loss_fn=trades_kl,
                                     loss_target=logits_nat)

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        return self.friendly_attack(x, y)[0]

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x_adv, taken = self.friendly_attack(x, y)
        loss, terms = self.objective(self.model, x, x_adv, y)
        return loss, detach_metrics(loss=loss, **terms, tau=self.tau, pgd_steps=taken.mean())
