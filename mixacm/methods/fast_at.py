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
    ordinary training-mode forward). The early stop against catastrophic overfitting is the
    loop's checkpoint selection by PGD accuracy on a held-out split (``train.selection:
    best_pgd``), not part of this loss.

    Recipe, CIFAR-10 (source: Wong, Rice and Kolter, ICLR 2020, locuslab/fast_adversarial
    ``CIFAR10/train_fgsm.py`` defaults): SGD momentum 0.9, weight decay 5e-4 on every parameter,
    batch 128, 15 epochs, ``CyclicLR(base_lr=0, max_lr=0.2, step_size_up = step_size_down =
    steps / 2)`` stepped after every batch: lr rises linearly from 0 and peaks halfway
    (``lr_peak`` 0.5), back to 0 at the end; eps 8/255, alpha 10/255 (1.25 eps), random start.
    The model is in training mode throughout (``model.train()`` once), so both forwards of a
    step update BatchNorm's running statistics. Checkpoint: the last epoch, or with
    ``--early-stop`` the epoch before PGD-5 accuracy on the first batch fell by 20 points.

    Recipe, ImageNet (source: locuslab/fast_adversarial ``ImageNet/run_fast_4px.sh`` and
    ``configs/configs_fast_4px_phase{1,2,3}.yml``; eps 4/255, ``fgsm_step`` 5/255 = 1.25 eps,
    ``n_repeats`` 1, random init): 15 epochs in three phases ending at epochs 6, 12 and 15, lr
    ``np.interp`` between (epoch, lr) points evaluated at ``epoch + (i + 1) / len``: phase 1
    (0, 0), (1, 0.4), (6, 0.04); phase 2 (6, 0.04), (12, 0.004); phase 3 (12, 0.004),
    (15, 0.0004): ``lr_points`` are these as fractions of the 15 epochs and of the peak 0.4.
    Weight decay 1e-4 in every phase, BatchNorm parameters exempt (``main_fast.py`` puts the
    parameters of modules whose type name contains "BatchNorm" in a group with weight decay 0;
    every other parameter, the fully connected bias included, decays). Mixed precision
    (``half: true``, apex O1). The checkpoint of phase 3's last epoch. The official phases also
    grow the image size (128, 224, 288 px crops of images resized to 160, 352 px and full size,
    batches 512, 224, 128); this pipeline trains at 224 px with batch 512 throughout."""

    Knobs = FastATKnobs
    recipes = {
        "cifar10": sgd_recipe(
            source="Wong et al. 2020, locuslab/fast_adversarial CIFAR10/train_fgsm.py defaults (cyclic lr)",
            epochs=15, lr=0.2, weight_decay=5e-4, schedule="cyclic"),
        "imagenet": sgd_recipe(
            source="Wong et al. 2020, locuslab/fast_adversarial ImageNet/run_fast_4px.sh + "
                   "configs_fast_4px_phase1/2/3.yml + main_fast.py (wd 1e-4, BatchNorm exempt; fixed 224 px, "
                   "batch 512)",
            knobs={"eps": "4/255", "step_scale": 1.25},
            epochs=15, batch_size=512, lr=0.4, weight_decay=1e-4, schedule="piecewise",
            lr_points=[[0.0, 0.0], [1 / 15, 1.0], [6 / 15, 0.1], [12 / 15, 0.01], [1.0, 0.001]],
            weight_decay_exempt=["batchnorm"]),
    }

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = self.knobs
        with attack_mode(self.model, k.attack_mode):
            x_adv = pgd_linf(self.model, x, y, eps=k.eps, steps=1, step_size=k.step_scale * k.eps, random_start=True)
        loss = F.cross_entropy(self.model(x_adv), y)
        return loss, detach_metrics(loss=loss, ce=loss, term_ce=loss)
