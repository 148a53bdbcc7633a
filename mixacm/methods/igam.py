"""Input-gradient adversarial matching (Chan, Tay & Ong, CVPR 2020: "What it thinks is important
is important: robustness transfers through input gradients").

The student learns, on clean images only, to have the input gradients of the robust teacher:

    J_f(x) = grad_x p_f(y | x) / 255          (per image; the official code feeds 0-255 pixels)
    L      = CE(s(x), y) - beta * CE_D + gamma * sum_{b, pixels} (J_s - J_t)^2

where ``CE_D`` is the cross-entropy of a discriminator D telling the student's input gradients
(label 0) from the teacher's (label 1); the student maximises it, D minimises it, one D step
every ``disc_every`` student steps. ``J_s`` is differentiated through (double
back-propagation), so one step costs about two to three standard steps plus a teacher forward
and backward. For the first ``ce_only_fraction`` of training the loss is CE alone and D is not
trained (the official run's first phase), which costs a standard step.

D (``GradientDiscriminator``, official ``IgamConvDiscriminatorModel``): each gradient is centred
(its mean over pixels and channels subtracted) and scaled to unit L2 norm, then ``disc_layers``
4 x 4 convolutions of stride 2 with bias ("SAME" padding), each followed by BatchNorm and leaky
ReLU (0.1), channels doubling from ``disc_channels``; flattened, a linear map to 2 logits. It
sees the student's and the teacher's gradients as one batch in training mode (BatchNorm
statistics over both), in the student's loss and in its own step alike.

Source, the run behind the paper's CIFAR-10 row (github.com/alvinchangw/IGAM_CVPR2020,
``run_IGAM_tinyimagenettoc10_upresize.sh`` with ``config_igam_tinyimagenet2cifar10_upresize.py``
and ``train_igam_tinyimagenet2cifar_upresize.py``): beta 5 (``--beta``, the D term), gamma 10
(``--gamma``, the squared difference summed over batch and pixels), batch 32, 320,000 steps
(204.8 epochs of CIFAR-10) of momentum SGD (0.9) with lr 0.1 / 0.01 / 0.001 at steps 160,000 and
240,000, CE only for the first 280,000 steps (``--steps_before_adv_opt``), one D step every 5
(``--disc_update_steps``), D with 4 layers from 8 channels and no pooling (the config's
``disc_layers``, ``disc_base_channels``, ``disc_avg_pool_hw`` defaults), the teacher built in
training mode (its BatchNorm uses the batch's statistics), weight decay 2e-4 on convolution and
linear kernels only (``_decay`` sums the ``DW`` variables: BatchNorm and biases are exempt).
``config_igam.py``'s defaults (beta 1, gamma 0.001, 5 layers from 16 channels, batch 128,
80,000 steps) belong to the CIFAR-10 -> CIFAR-100 code path (``train_igam.py``, dataset default
cifar100), whose own script overrides them (``run_IGAM_c10toc100.sh``: beta 2, gamma 10, batch
32, the same two phases); the repository's only IGAM run with CIFAR-10 as the target task is
the Tiny-ImageNet -> CIFAR-10 transfer, so that run is taken as the paper's CIFAR-10 row here. D is trained by the
classifier's optimiser settings (``same_optimizer``: momentum SGD on the same learning-rate
schedule, the same weight decay on kernels only): here D's parameters are an extra module in
the loop's optimiser and ``after_backward`` turns the student's gradient on them, ``-beta *
grad CE_D``, into D's own, ``grad CE_D``, on D-step iterations (none otherwise). The teacher here
is the same-task teacher of the other students (no up-resizing); the official code checkpoints
the last step. Two deliberate differences: D steps on the gradients of the student's step (the
official D step recomputes them after the classifier's update), and the phases and D's schedule
follow epochs, not steps. Officially supported dataset here: CIFAR-10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks import fp32_attack
from mixacm.methods.ard import _FrozenTeacher
from mixacm.methods.base import (
    attack_mode, check_phase_starts, detach_metrics, knob, phase_start, register_method, sgd_recipe,
)

PIXEL_SCALE = 255.0  # the official code's input range is [0, 255]
IMAGE_SIZE = 32  # D's linear layer is sized for the CIFAR images of the method's recipes
_L2_EPS = 1e-12  # tf.math.l2_normalize's floor on the squared norm


def input_gradient(net: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """``grad_x sum_b softmax(net(x))_{b, y_b} / 255`` (B x C x H x W): each image's gradient of
    its true-class probability, per 0-255 pixel unit."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        p = F.softmax(net(x), dim=1).gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(p, x, create_graph=create_graph)
    return g / PIXEL_SCALE


def gradient_matching(j_s: Tensor, j_t: Tensor) -> Tensor:
    """``sum_{b, pixels} (J_s - J_t)^2`` (the official reduction: a sum, not a mean)."""
    return (j_s - j_t).pow(2).sum()


def standardize_gradient(g: Tensor) -> Tensor:
    """Each B x C x H x W gradient minus its mean over (C, H, W), scaled to unit L2 norm (the
    official D input: ``normalize_zero_mean`` then ``tf.math.l2_normalize``)."""
    centred = g - g.mean(dim=(1, 2, 3), keepdim=True)
    return centred * centred.pow(2).sum(dim=(1, 2, 3), keepdim=True).clamp_min(_L2_EPS).rsqrt()


def discriminator_ce(d_student: Tensor, d_teacher: Tensor) -> Tensor:
    """D's cross-entropy, student gradients labelled 0 and the teacher's 1, averaged over both."""
    logits = torch.cat([d_student, d_teacher])
    labels = torch.cat([torch.zeros(len(d_student), dtype=torch.long, device=logits.device),
                        torch.ones(len(d_teacher), dtype=torch.long, device=logits.device)])
    return F.cross_entropy(logits, labels)


def discriminator_accuracy(d_student: Tensor, d_teacher: Tensor) -> Tensor:
    """Fraction of the 2B gradients D labels correctly (a 0-d tensor; 0.5 = chance)."""
    right = torch.cat([d_student.argmax(1) == 0, d_teacher.argmax(1) == 1])
    return right.float().mean()


class GradientDiscriminator(nn.Module):
    """The official IGAM discriminator for ``image_size`` x ``image_size`` gradients: standardise,
    then ``layers`` x (4 x 4 convolution of stride 2 with bias, BatchNorm, leaky ReLU 0.1) with
    channels doubling from ``base``, flatten, a linear map to 2 logits. Initialised as the
    TensorFlow code: kernels N(0, 2 / (k^2 c_out)), fully connected U(+-sqrt(3 / fan_in)), biases 0;
    BatchNorm with TensorFlow's epsilon 1e-3 and decay 0.9."""

    def __init__(self, in_channels: int = 3, layers: int = 4, base: int = 8, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if image_size % 2**layers:
            raise ValueError(f"a {layers}-layer discriminator halves {image_size} px {layers} times: "
                             f"the image size must be a multiple of {2**layers}")
        mods: list[nn.Module] = []
        c_in = in_channels
        for i in range(layers):
            c_out = base * 2**i
            conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)  # "SAME" for even sizes
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            mods += [conv, nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.1), nn.LeakyReLU(0.1)]
            c_in = c_out
        self.body = nn.Sequential(*mods)
        side = image_size // 2**layers
        self.fc = nn.Linear(c_in * side * side, 2)
        bound = math.sqrt(3.0 / self.fc.in_features)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, g: Tensor) -> Tensor:
        return self.fc(self.body(standardize_gradient(g)).flatten(1))

    def pair(self, j_s: Tensor, j_t: Tensor) -> tuple[Tensor, Tensor]:
        """D's logits on both sets of gradients from one forward (BatchNorm over both)."""
        logits = self(torch.cat([j_s, j_t]))
        return logits[: len(j_s)], logits[len(j_s):]


@dataclass(frozen=True)
class IGAMKnobs:
    beta: float = knob(5.0, "weight of the discriminator term the student maximises (official --beta)",
                       kind="float", gt=0)
    gamma: float = knob(10.0, "weight of the summed squared input-gradient difference (official --gamma)",
                        kind="float", ge=0)
    disc_every: int = knob(5, "student steps per discriminator step", kind="int", unit="steps", ge=1)
    disc_layers: int = knob(4, "convolutions of the discriminator (32 px: at most 5)", kind="int", ge=1, le=5)
    disc_channels: int = knob(8, "channels of the discriminator's first convolution", kind="int", ge=1)
    ce_only_fraction: float = knob(
        0.875, "fraction of training with the cross-entropy alone, D untrained (official: 280,000 of "
        "320,000 steps)", kind="float", ge=0, le=1)
    teacher_mode: str = knob(
        "train", "teacher's mode for its input gradients (official: train, BatchNorm on the batch's "
        "statistics)", kind="choice", choices=("train", "eval"))


@register_method("igam")
class IGAM(_FrozenTeacher):
    """IGAM. Knobs: beta (5), gamma (10), disc_every (5), disc_layers (4), disc_channels (8),
    ce_only_fraction (0.875), teacher_mode (train). Recipe (CIFAR-10): SGD lr 0.1, momentum 0.9,
    weight decay 2e-4 on kernels only (BatchNorm and biases exempt), batch 32, 205 epochs
    (320,000 steps), lr / 10 at 50 % and 75 %; the IGAM loss from 87.5 % on. The discriminator is
    an extra module (trained by the loop's optimiser on D-step iterations, checkpointed with the
    run, not exported). Metrics: loss, ce, igam_on (0 in the CE-only phase), term_ce, term_adv
    (-beta CE_D), term_grad_l2 (gamma x the summed difference), and in the IGAM phase disc_ce,
    disc_acc (D's accuracy: 0.5 = chance) and grad_l2 (unweighted)."""

    Knobs = IGAMKnobs
    recipes = {"cifar10": sgd_recipe(
        source="Chan et al. 2020; github.com/alvinchangw/IGAM_CVPR2020 run_IGAM_tinyimagenettoc10_upresize.sh "
               "(the paper's CIFAR-10 run: batch 32, 320k steps, lr drops at 160k/240k, CE only for 280k, wd on "
               "kernels only)",
        batch_size=32, weight_decay=2e-4, epochs=205, milestones=[0.5, 0.75],
        weight_decay_exempt=["batchnorm", "bias"])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        k = self.knobs
        device = next(model.parameters()).device
        self.disc = GradientDiscriminator(3, k.disc_layers, k.disc_channels, IMAGE_SIZE).to(device)
        self._extra = nn.ModuleDict({"disc": self.disc})
        self.steps = 0  # steps of the IGAM phase: D steps on every disc_every-th
        self._active = k.ce_only_fraction == 0

    @classmethod
    def check_recipe(cls, knobs: Any, recipe: dict[str, Any]) -> None:
        check_phase_starts(cls.name, "ce_only_fraction", knobs.ce_only_fraction, recipe["epochs"], "the IGAM loss")

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        check_phase_starts(self.name, "ce_only_fraction", self.knobs.ce_only_fraction, epochs, "the IGAM loss")
        self._active = epoch >= phase_start(self.knobs.ce_only_fraction, epochs)

    def extra_modules(self) -> nn.ModuleDict:
        return self._extra

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self._active:
            ce = F.cross_entropy(self.model(x), y)
            return ce, detach_metrics(loss=ce, ce=ce, igam_on=0.0, term_ce=ce, term_adv=0.0, term_grad_l2=0.0)
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"igam: the discriminator is built for {IMAGE_SIZE} x {IMAGE_SIZE} images, "
                             f"got {tuple(x.shape[-2:])}")
        k = self.knobs
        # Both input gradients in fp32 under AMP, as the attacks' (mixacm.attacks.fp32_attack):
        # they are what the loss matches, and fp16 input gradients underflow without loss scaling.
        with fp32_attack(x.device):
            with attack_mode(self.teacher, k.teacher_mode):
                j_t = input_gradient(self.teacher, x, y, create_graph=False).detach()
            x_in = x.detach().requires_grad_(True)
            logits = self.model(x_in)
            ce = F.cross_entropy(logits, y)
            p = F.softmax(logits, dim=1).gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(p, x_in, create_graph=True)
        j_s = g / PIXEL_SCALE
        self.disc.train()  # official: D is always in training mode
        d_s, d_t = self.disc.pair(j_s, j_t)
        disc_ce = discriminator_ce(d_s, d_t)
        grad_l2 = gradient_matching(j_s, j_t)
        term_adv, term_grad = -k.beta * disc_ce, k.gamma * grad_l2
        loss = ce + term_adv + term_grad
        return loss, detach_metrics(
            loss=loss, ce=ce, igam_on=1.0, disc_ce=disc_ce, disc_acc=discriminator_accuracy(d_s, d_t),
            grad_l2=grad_l2, term_ce=ce, term_adv=term_adv, term_grad_l2=term_grad)

    def after_backward(self) -> None:
        # The student's backward left -beta * grad CE_D on D's parameters: on a D step that is
        # turned into D's own descent direction grad CE_D (same inputs, same scale under a
        # GradScaler), otherwise dropped so that the optimiser leaves D (and its momentum) alone.
        if not self._active:
            return
        d_step = self.steps % self.knobs.disc_every == 0
        for p in self.disc.parameters():
            if p.grad is None:
                continue
            if d_step:
                p.grad.div_(-self.knobs.beta)
            else:
                p.grad = None
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"steps"}
        if unknown:
            raise ValueError(f"igam state has unknown keys {sorted(unknown)}")
        self.steps = int(state.get("steps", 0))
