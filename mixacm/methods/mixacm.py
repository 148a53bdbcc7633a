"""MixACM (Muhammad et al., NeurIPS 2021): robustness transfer by distilling activated channel maps
of a frozen robust teacher on mixup examples, with no adversarial examples.

    x~ = lam * x_i + (1 - lam) * x_j,   lam ~ Beta(alpha, alpha), j = perm(i)
    L  = CE_mix(f_s(x~)) + beta * T^2 * KL(softmax(f_t(x~)/T) || softmax(f_s(x~)/T))
         + gamma * sum_l || norm(P_l(a_s^l(x~))) - a_t^l(x~) ||^2

where ``a^l`` is the activated channel map of block l (``mixacm.losses.activated_channel_map``)
and ``P_l`` the student-side transformation to the teacher's channel count. Every CHOICE of
``docs/method.md`` is a knob; ``docs/method_choices.md`` says why each default was chosen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.losses import acm_distance, activated_channel_map, kd_kl, mixup, mixup_ce, normalize_acm
from mixacm.methods.base import Method, detach_metrics, knob, register_method, sgd_recipe

# The loss-ablation presets of the paper's supplement: which of the ACM, KD and mixup parts are
# on. CE is always present; "mixup" switches mixup inputs and mixup CE on together.
ABLATIONS: dict[str, dict[str, bool]] = {
    "full": {"acm": True, "kd": True, "mixup": True},
    "acm": {"acm": True, "kd": False, "mixup": False},
    "acm+kd": {"acm": True, "kd": True, "mixup": False},
    "acm+mixup": {"acm": True, "kd": False, "mixup": True},
    "kd": {"acm": False, "kd": True, "mixup": False},
}
SWITCHES = ("acm", "kd", "mixup")
BLOCK_PRESETS = ("groups", "groups+stem")


@dataclass(frozen=True)
class MixACMKnobs:
    p: int = knob(2, "power applied to the activations before pooling", kind="choice", choices=(1, 2))
    pooling: str = knob("mean", "spatial pooling of the ACM", kind="choice", choices=("mean", "sum"))
    normalize: str = knob("l2", "normalisation of the ACM across channels", kind="choice", choices=("l2", "none"))
    activation: str = knob(
        "network", "what activates a block output before the power: 'network' = the activation the "
        "network itself applies next (pre-activation nets: the next unit's BN + ReLU, the final BN + "
        "ReLU after the last group; other nets: their features already end in a ReLU), 'relu' = "
        "relu(raw output), 'none'", kind="choice", choices=("network", "relu", "none")
    )
    blocks: Any = knob(
        "groups",
        "student/teacher feature pairs: 'groups' (residual groups paired from the last one "
        "backwards), 'groups+stem' (also block 1), or a list of [student, teacher] feature names",
        kind="any",
    )
    transform: str = knob(
        "linear", "student-side map to the teacher's channel count (identity when equal)",
        kind="choice", choices=("linear", "interpolate"),
    )
    beta: float = knob(1.0, "weight of the KD term", kind="float", ge=0)
    gamma: float = knob(50.0, "weight of the summed ACM distances", kind="float", ge=0)
    T: float = knob(1.0, "distillation temperature", kind="float", gt=0)
    mixup_alpha: float = knob(1.0, "lam ~ Beta(alpha, alpha), one lam per batch", kind="float", gt=0)
    ablation: str = knob(
        "full", "loss-ablation preset (sets acm/kd/mixup); 'custom' when the switches match none",
        kind="choice", choices=(*ABLATIONS, "custom"),
    )
    acm: Any = knob(None, "ACM term on/off (null: from the ablation preset)", kind="any")
    kd: Any = knob(None, "KD term on/off (null: from the ablation preset)", kind="any")
    mixup: Any = knob(None, "mixup inputs + mixup CE on/off (null: from the preset)", kind="any")


class Interpolate(nn.Module):
    """Parameter-free transformation: 1-D linear interpolation of a B x C_s vector to length C_t."""

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.c_out = c_out

    def forward(self, a: Tensor) -> Tensor:
        return F.interpolate(a.unsqueeze(1), size=self.c_out, mode="linear", align_corners=True).squeeze(1)


def make_transform(kind: str, c_s: int, c_t: int) -> nn.Module:
    """The student-side map C_s -> C_t: identity when equal, else a bias-free linear map
    (initialised to the interpolation) or the parameter-free interpolation."""
    if c_s == c_t:
        return nn.Identity()
    interp = Interpolate(c_t)
    if kind == "interpolate":
        return interp
    linear = nn.Linear(c_s, c_t, bias=False)
    # Start the learnable map at the interpolation (row i of interp(I) is the image of the i-th
    # unit vector): a random init would map the non-negative student ACM to a mixed-sign vector
    # and inflate the ACM distance by an arbitrary amount at the start of training.
    with torch.no_grad():
        linear.weight.copy_(interp(torch.eye(c_s)).T)
    return linear


def residual_groups(model: nn.Module) -> list[str]:
    return [n for n in model.feature_names if n != "stem"]


def _check_blocks_format(blocks: Any) -> None:
    is_pairs = isinstance(blocks, Sequence) and not isinstance(blocks, str) and all(
        isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(isinstance(n, str) for n in p)
        for p in blocks
    )
    if blocks not in BLOCK_PRESETS and not is_pairs:
        raise ValueError(
            f"knob 'blocks' of method 'mixacm' must be one of {list(BLOCK_PRESETS)} or a list of "
            f"[student, teacher] feature-name pairs, got {blocks!r}"
        )


def _resolve_switches(knobs: MixACMKnobs, preset_given: bool) -> dict[str, Any]:
    preset = ABLATIONS.get(knobs.ablation)
    if preset is None:
        # "custom" is not a preset: switches left unset take the full method's values.
        preset = ABLATIONS["full"]
    switches = {}
    for s in SWITCHES:
        value = getattr(knobs, s)
        if value is None:
            value = preset[s]
        elif not isinstance(value, bool):
            raise ValueError(f"knob {s!r} of method 'mixacm' must be true, false or null, got {value!r}")
        elif preset_given and knobs.ablation != "custom" and value != preset[s]:
            raise ValueError(
                f"knob {s!r}={value} contradicts knob 'ablation'={knobs.ablation!r} (which sets {s}={preset[s]})"
            )
        switches[s] = value
    name = next((n for n, sw in ABLATIONS.items() if sw == switches), "custom")
    return {**switches, "ablation": name}


@register_method("mixacm")
class MixACM(Method):
    """MixACM. Knobs (defaults from docs/method.md; units: beta, gamma, T, mixup_alpha are
    dimensionless): p (2), pooling (mean), normalize (l2), activation (network: the BN + ReLU the
    network applies next for pre-activation nets, see docs/method_choices.md), blocks (groups),
    transform (linear), beta (1), gamma (50), T (1), mixup_alpha (1), ablation (full | acm |
    acm+kd | acm+mixup | kd) and the switches acm / kd / mixup that the preset sets.
    The teacher is frozen: eval mode, no gradients, forward under ``torch.no_grad()``; it sees
    the same (mixup) batch as the student. Metrics: loss, ce, kd, acm (unweighted terms, so
    loss = ce + beta * kd + gamma * acm) and lam (1 without mixup).
    Recipe, CIFAR-10 (source: method.md section 1, the paper's CIFAR-10 setting): SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs 100 and 150.
    ImageNet (source: method.md section 1): SGD lr 0.1 at batch 256 (scale it by batch / 256),
    weight decay 1e-4, 90 epochs, step schedule (method.md allows step or cosine; the step
    schedule of the standard ResNet-50 recipe: lr / 10 at epochs 30 and 60). No CIFAR-100
    recipe: the paper gives none."""

    needs_teacher = True
    Knobs = MixACMKnobs
    recipes = {
        "cifar10": sgd_recipe(source="method.md section 1 (MixACM paper, CIFAR-10 WRN-34-10)",
                              weight_decay=5e-4, epochs=200, milestones=[0.5, 0.75]),
        "imagenet": sgd_recipe(source="method.md section 1 (MixACM paper, ImageNet ResNet-50; step schedule)",
                               epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4, milestones=[1 / 3, 2 / 3]),
    }

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, **knobs: Any) -> None:
        super().__init__(model, teacher, **knobs)
        assert self.teacher is not None
        if self.teacher is self.model:
            raise ValueError("method 'mixacm': the teacher must be a different network from the student")
        for role, net in (("student", model), ("teacher", self.teacher)):
            if not hasattr(net, "feature_names"):
                raise ValueError(f"method 'mixacm': the {role} does not expose named features (feature_names)")
        # Frozen teacher: eval mode and no parameter gradients, once and for all.
        self.teacher.eval()
        self.teacher.requires_grad_(False)

        k = self.knobs
        pairs = self._resolve_blocks(k.blocks) if k.acm else []
        self.knobs = dataclasses.replace(k, blocks=[list(p) for p in pairs])
        self.pairs: list[tuple[str, str]] = pairs

        c_s = model.feature_channels() if pairs else {}
        c_t = self.teacher.feature_channels() if pairs else {}
        device = next(model.parameters()).device
        self.transforms = nn.ModuleDict(
            {self._key(s, t): make_transform(k.transform, c_s[s], c_t[t]) for s, t in pairs}
        ).to(device)

    @classmethod
    def resolve(cls, given: dict[str, Any], dataset: str | None = None) -> MixACMKnobs:
        """Validate the knobs; the ablation preset and the acm/kd/mixup switches are reconciled
        here (no networks needed), the block names against the networks in ``__init__``."""
        knobs = super().resolve(given, dataset)
        _check_blocks_format(knobs.blocks)
        return dataclasses.replace(knobs, **_resolve_switches(knobs, preset_given="ablation" in given))

    @staticmethod
    def _key(s: str, t: str) -> str:
        return f"{s}_to_{t}"

    def _resolve_blocks(self, blocks: Any) -> list[tuple[str, str]]:
        student, teacher = self.model, self.teacher
        if isinstance(blocks, str):
            s_groups, t_groups = residual_groups(student), residual_groups(teacher)
            n = min(len(s_groups), len(t_groups))
            # Pair from the deepest group backwards: the high-level features carry most of the
            # robustness and exist in both networks whatever their depths.
            pairs = list(zip(s_groups[len(s_groups) - n:], t_groups[len(t_groups) - n:]))
            if blocks == "groups+stem":
                pairs = [("stem", "stem")] + pairs
        else:
            pairs = [(p[0], p[1]) for p in blocks]
        if not pairs:
            raise ValueError("knob 'blocks' of method 'mixacm' selects no feature pairs, but the ACM term is on")
        for role, net, names in (("student", student, [s for s, _ in pairs]), ("teacher", teacher, [t for _, t in pairs])):
            unknown = [n for n in names if n not in net.feature_names]
            if unknown:
                raise ValueError(
                    f"knob 'blocks' of method 'mixacm': the {role} has no feature(s) {unknown}; "
                    f"valid: {list(net.feature_names)}"
                )
        return pairs

    def extra_modules(self) -> nn.ModuleDict:
        return self.transforms

    def channel_map(self, feat: Tensor) -> Tensor:
        """The ACM of one feature tensor with this run's p, pooling, normalisation, activation
        (``network``: the features come from the forward already activated by the network)."""
        k = self.knobs
        act = "none" if k.activation == "network" else k.activation
        return activated_channel_map(feat, p=k.p, pooling=k.pooling, normalize=k.normalize, activation=act)

    def applied_activation(self) -> dict[str, str]:
        """What activated each side's maps in this run, in words (recorded with the knobs)."""
        k = self.knobs
        out = {}
        for role, net in (("student", self.model), ("teacher", self.teacher)):
            if k.activation != "network":
                out[role] = k.activation
            elif getattr(net, "preactivation", False):
                out[role] = "network: next unit's BN + ReLU (final BN + ReLU after the last group)"
            else:
                out[role] = "network: the features' own ReLU (post-activation blocks)"
        return out

    def run_details(self) -> dict[str, Any]:
        return {"acm_activation": self.applied_activation(), "acm_pairs": [list(p) for p in self.pairs]}

    def student_channel_map(self, s: str, t: str, feat: Tensor) -> Tensor:
        """Student ACM mapped to the teacher's length, then normalised again so that both sides
        are compared as unit vectors (a no-op for the identity)."""
        return normalize_acm(self.transforms[self._key(s, t)](self.channel_map(feat)), self.knobs.normalize)

    def _mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        alpha = torch.tensor(float(self.knobs.mixup_alpha))
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        x_mix, y_a, y_b = mixup(x, y, lam, perm)
        return x_mix, y_a, y_b, lam

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        k = self.knobs
        if k.mixup:
            x_in, y_a, y_b, lam = self._mix(x, y)
        else:
            x_in, y_a, y_b, lam = x, y, y, 1.0

        s_names = list(dict.fromkeys(s for s, _ in self.pairs))
        t_names = list(dict.fromkeys(t for _, t in self.pairs))
        act = k.activation == "network"
        if s_names:
            logits, s_feats = self.model(x_in, features=s_names, activated=act)
        else:
            logits, s_feats = self.model(x_in), {}
        ce = mixup_ce(logits, y_a, y_b, lam) if k.mixup else F.cross_entropy(logits, y)

        zero = logits.new_zeros(())
        kd = acm = zero
        if k.kd or k.acm:
            # Guard against a loop that switched every module to train mode.
            self.teacher.eval()
            with torch.no_grad():
                if t_names:
                    t_logits, t_feats = self.teacher(x_in, features=t_names, activated=act)
                else:
                    t_logits, t_feats = self.teacher(x_in), {}
            if k.kd:
                kd = kd_kl(logits, t_logits, T=k.T)
            if k.acm:
                acm = sum(
                    (acm_distance(self.student_channel_map(s, t, s_feats[s]), self.channel_map(t_feats[t]))
                     for s, t in self.pairs),
                    zero,
                )
        loss = ce + k.beta * kd + k.gamma * acm
        return loss, detach_metrics(loss=loss, ce=ce, kd=kd, acm=acm, lam=lam)
