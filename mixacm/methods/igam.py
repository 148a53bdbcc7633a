"""Input-gradient adversarial matching (Chan, Tay & Ong, CVPR 2020: "What it thinks is important
is important: robustness transfers through input gradients").

The student learns, on clean images only, to have the input gradients of the robust teacher:

    J_f(x) = grad_x p_f(y | x) / 255          (per image; the official code feeds 0-255 pixels)
    L      = CE(s(x), y) - beta * CE_D + gamma * sum_{b, pixels} (J_s - J_t)^2

where ``CE_D`` is the cross-entropy of a discriminator D telling the student's input gradients
(label 0) from the teacher's (label 1); the student maximises it, D minimises it with its own
SGD optimiser, one D step every ``disc_every`` student steps. ``J_s`` is differentiated through
(double back-propagation), so one step costs about two to three standard steps plus a teacher
forward and backward.

Source: github.com/alvinchangw/IGAM_CVPR2020, ``config_igam.py`` and ``train_igam.py``
(TensorFlow; the paper's experiments transfer a CIFAR-10 teacher to CIFAR-100 and Tiny-ImageNet
to CIFAR-10; here the teacher is the same-task teacher of the other students): beta 1 (the
discriminator term), gamma 0.001 (the squared difference, summed over batch and pixels), one D
step every 5 classifier steps, D with 5 convolutions from 16 channels trained by momentum SGD
on the classifier's schedule, classifier SGD momentum 0.9, weight decay 2e-4, batch 128, 80,000
steps (205 epochs of CIFAR-10) with lr 0.1 / 0.01 / 0.001 at steps 40,000 and 60,000.
Officially supported dataset here: CIFAR-10 (the target task of the paper's Tiny-ImageNet
transfer). Choices of this project where the code says no more: D's layers are 3 x 3
convolutions of stride 2 with leaky ReLU (0.2), channels doubling from 16, global average
pooling and a linear map to 2 logits (stride 2 from the first layer keeps D at about 1.3 M
multiply-adds per 32 x 32 gradient: negligible beside a WideResNet, and still about the cost
of the CPU-scale students, see docs/benchmarks.md); D's learning rate follows the recipe's
milestones (``begin_epoch``) from ``disc_lr``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.attacks import fp32_attack
from mixacm.methods.ard import _FrozenTeacher
from mixacm.methods.base import detach_metrics, knob, register_method, sgd_recipe

PIXEL_SCALE = 255.0  # the official code's input range is [0, 255]


def input_gradient(net: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """``grad_x sum_b softmax(net(x))_{b, y_b} / 255``: each image's gradient of its true-class
    probability, per 0-255 pixel unit."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        p = F.softmax(net(x), dim=1).gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(p, x, create_graph=create_graph)
    return g / PIXEL_SCALE


def gradient_matching(j_s: Tensor, j_t: Tensor) -> Tensor:
    """``sum_{b, pixels} (J_s - J_t)^2`` (the official reduction: a sum, not a mean)."""
    return (j_s - j_t).pow(2).sum()


def discriminator_ce(d_student: Tensor, d_teacher: Tensor) -> Tensor:
    """D's cross-entropy, student gradients labelled 0 and the teacher's 1, averaged over both."""
    logits = torch.cat([d_student, d_teacher])
    labels = torch.cat([torch.zeros(len(d_student)), torch.ones(len(d_teacher))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


class GradientDiscriminator(nn.Module):
    """D: ``layers`` 3 x 3 convolutions of stride 2 with leaky ReLU, channels doubling from
    ``base``, global average pooling, a linear map to 2 logits."""

    def __init__(self, in_channels: int = 3, layers: int = 5, base: int = 16) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = in_channels
        for i in range(layers):
            c_out = base * 2**i
            mods += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.body = nn.Sequential(*mods)
        self.fc = nn.Linear(c_in, 2)

    def forward(self, g: Tensor) -> Tensor:
        return self.fc(self.body(g).mean(dim=(2, 3)))


@dataclass(frozen=True)
class IGAMKnobs:
    beta: float = knob(1.0, "weight of the discriminator term the student maximises", kind="float", ge=0)
    gamma: float = knob(0.001, "weight of the summed squared input-gradient difference", kind="float", ge=0)
    disc_every: int = knob(5, "student steps per discriminator step", kind="int", unit="steps", ge=1)
    disc_layers: int = knob(5, "convolutions of the discriminator", kind="int", ge=1)
    disc_channels: int = knob(16, "channels of the discriminator's first convolution", kind="int", ge=1)
    disc_lr: float = knob(0.1, "discriminator learning rate before the recipe's milestones", kind="float", gt=0)
    disc_momentum: float = knob(0.9, "discriminator SGD momentum", kind="float", ge=0, le=1)
    disc_weight_decay: float = knob(2e-4, "discriminator weight decay", kind="float", ge=0)


@register_method("igam")
class IGAM(_FrozenTeacher):
    """IGAM. Knobs: beta (1), gamma (0.001), disc_every (5), disc_layers (5), disc_channels (16),
    disc_lr (0.1), disc_momentum (0.9), disc_weight_decay (2e-4). Recipe (CIFAR-10): SGD lr
    0.1, momentum 0.9, weight decay 2e-4, batch 128, 205 epochs (80,000 steps), lr / 10 at 50 %
    and 75 %. The discriminator and its optimiser are method state (checkpointed with the run,
    not exported). Metrics: loss, ce, disc_ce, grad_l2 (unweighted), disc_acc."""

    Knobs = IGAMKnobs
    recipes = {"cifar10": sgd_recipe(source="Chan et al. 2020; github.com/alvinchangw/IGAM_CVPR2020, config_igam.py and train_igam.py (CIFAR-10)", weight_decay=2e-4, epochs=205, milestones=[0.5, 0.75])}

    def __init__(self, model, teacher=None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        k = self.knobs
        device = next(model.parameters()).device
        self.disc = GradientDiscriminator(3, k.disc_layers, k.disc_channels).to(device)
        self.disc_opt = torch.optim.SGD(self.disc.parameters(), lr=k.disc_lr, momentum=k.disc_momentum,
                                        weight_decay=k.disc_weight_decay)
        self.steps = 0
        self._pending: tuple[Tensor, Tensor] | None = None

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        r = self.recipe
        factor = r["gamma"] ** sum(epoch >= round(m * epochs) for m in r["milestones"])
        for group in self.disc_opt.param_groups:
            group["lr"] = self.knobs.disc_lr * factor

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        k = self.knobs
        self.teacher.eval()
        # Both input gradients in fp32 under AMP, as the attacks' (mixacm.attacks.fp32_attack):
        # they are what the loss matches, and fp16 input gradients underflow without loss scaling.
        with fp32_attack(x.device):
            j_t = input_gradient(self.teacher, x, y, create_graph=False).detach()
            x_in = x.detach().requires_grad_(True)
            logits = self.model(x_in)
            ce = F.cross_entropy(logits, y)
            p = F.softmax(logits, dim=1).gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(p, x_in, create_graph=True)
        j_s = g / PIXEL_SCALE
        d_s, d_t = self.disc(j_s), self.disc(j_t)
        disc_ce = discriminator_ce(d_s, d_t)
        grad_l2 = gradient_matching(j_s, j_t)
        loss = ce - k.beta * disc_ce + k.gamma * grad_l2
        self._pending = (j_s.detach(), j_t)
        with torch.no_grad():
            acc = torch.cat([d_s.argmax(1) == 0, d_t.argmax(1) == 1]).float().mean()
        return loss, detach_metrics(loss=loss, ce=ce, disc_ce=disc_ce, grad_l2=grad_l2, disc_acc=acc)

    def after_backward(self) -> None:
        # The student's backward also reached D's parameters (through -beta * CE_D): D is not in
        # the loop's optimiser, and its own step below starts from zeroed gradients.
        if self._pending is None:
            raise RuntimeError("igam: after_backward() needs loss() first")
        if self.steps % self.knobs.disc_every == 0:
            j_s, j_t = self._pending
            self.disc_opt.zero_grad(set_to_none=True)
            discriminator_ce(self.disc(j_s), self.disc(j_t)).backward()
            self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        self.steps += 1
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"disc", "disc_opt", "steps"}
        if unknown:
            raise ValueError(f"igam state has unknown keys {sorted(unknown)}")
        if state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
            self.steps = int(state["steps"])
