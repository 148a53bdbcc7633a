"""MixACM (Muhammad et al., NeurIPS 2021): robustness transfer by distilling activated channel maps
of a frozen robust teacher on mixup examples, with no adversarial examples.

    x~ = lam * x_i + (1 - lam) * x_j,   lam ~ Beta(alpha, alpha), j = perm(i)
    L  = w_ce * CE_mix(f_s(x~)) + beta * T^2 * KL(softmax(f_t(x~)/T) || softmax(f_s(x~)/T))
         + gamma * sum_l || norm(P_l(a_s^l(x~))) - a_t^l(x~) ||^2

where ``a^l`` is the activated channel map of block l (``mixacm.losses.activated_channel_map``)
and ``P_l`` the student-side transformation to the teacher's channel count; w_ce = 1 in the
paper (knob ``ce_weight``). Beyond the paper, knob ``input_noise`` = r > 0 distils on
``clip(x~ + U(-r, r), 0, 1)``: random noise, still no adversarial example. Every CHOICE of
``docs/method.md`` is a knob; ``docs/method_choices.md`` says why each default was chosen.

The distillation part is a list of terms from ``mixacm.distill.TERMS`` (term, block pairs,
weight): by default the paper's two, built from the knobs (``acm`` on ``blocks`` with weight
``gamma``, ``kd`` with weight ``beta`` and temperature ``T``) and switched by the ablation
presets; the ``terms`` knob replaces them with any list (e.g. ``[{term: sp, blocks: groups,
weight: 1000}, {term: kd, weight: 1}]``), so trying another term needs no code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.distill import (
    bind_terms, blocks_where, check_blocks_format, check_terms, evaluate_term, resolve_blocks,
    term_metric_names,
)
from mixacm.distill import Interpolate, make_transform  # noqa: F401  (their former home)
from mixacm.losses import activated_channel_map, mixup, mixup_ce, normalize_acm
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
    mixup_alpha: float = knob(1.0, "lam ~ Beta(alpha, alpha)", kind="float", gt=0)
    mixup_lambda: str = knob(
        "batch", "one lam for the whole batch (the paper's mixup) or one per example",
        kind="choice", choices=("batch", "sample"),
    )
    ce_weight: float = knob(1.0, "weight of the (mixup) cross-entropy on the hard labels", kind="float", ge=0)
    input_noise: float = knob(
        0.0, "BEYOND THE PAPER: half-width of uniform noise U(-r, r) added to the mixup inputs (then "
        "clipped to [0, 1]); 0 = the paper's method. Random noise, not an adversarial example",
        kind="eps", unit="fraction of [0, 1]", ge=0,
    )
    ablation: str = knob(
        "full", "loss-ablation preset (sets acm/kd/mixup); 'custom' when the switches match none",
        kind="choice", choices=(*ABLATIONS, "custom"),
    )
    acm: Any = knob(None, "ACM term on/off (null: from the ablation preset)", kind="any")
    kd: Any = knob(None, "KD term on/off (null: from the ablation preset)", kind="any")
    mixup: Any = knob(None, "mixup inputs + mixup CE on/off (null: from the preset)", kind="any")
    terms: Any = knob(
        None,
        "distillation terms replacing the acm/kd ones: a list of {term: acm|sp|at|fitnet|kd, weight, "
        "blocks, options} (mixacm.distill); null: the paper's acm (weight gamma) and kd (weight beta)",
        kind="any",
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
    transform (linear), beta (1), gamma (50), T (1), mixup_alpha (1), mixup_lambda (batch | sample),
    ce_weight (1), input_noise (0; beyond the paper), ablation (full | acm |
    acm+kd | acm+mixup | kd) and the switches acm / kd / mixup that the preset sets; terms
    (null: the paper's acm + kd; or a list of mixacm.distill terms replacing them).
    The teacher is frozen: eval mode, no gradients, forward under ``torch.no_grad()``; it sees
    the same (mixup) batch as the student. Metrics: loss, ce, kd, acm (unweighted terms, so
    loss = ce_weight * ce + beta * kd + gamma * acm), one per further term of ``terms`` (sp, at, fitnet,
    sp_2, ...), lam (1 without mixup; the batch mean with one lam per example), and the weighted
    terms that sum to the loss: term_mixup_ce (term_ce without mixup) and term_<name> for each
    distillation term (term_acm, term_kd, ...).
    Recipe, CIFAR-10 (source: method.md section 1, the paper's CIFAR-10 setting): SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs 100 and 150.
    ImageNet (source: method.md section 1): SGD lr 0.1 at batch 256 (scale it by batch / 256),
    weight decay 1e-4, 90 epochs, step schedule (method.md allows step or cosine; the step
    schedule of the standard ResNet-50 recipe: lr / 10 at epochs 30 and 60). No CIFAR-100
    recipe: the paper gives none."""

    needs_teacher = True
    supports_cuda_graphs = True
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
        given = k.terms is not None
        self.term_specs = k.terms if given else default_terms(k)
        where = "knob 'terms' of method 'mixacm'" if given else "knob 'blocks' of method 'mixacm'"
        bound, projectors = bind_terms(self.term_specs, model, self.teacher, where=where, listed=given)
        self.bound = bound
        self.metric_names = term_metric_names(bound)
        acm_terms = [b for b in bound if b.name == "acm"]
        # The pairs of the (first) ACM term, recorded in the run's knobs as before.
        self.pairs: list[tuple[str, str]] = acm_terms[0].pairs if acm_terms else []
        if not given:
            self.knobs = dataclasses.replace(k, blocks=[list(p) for p in self.pairs])
        device = next(model.parameters()).device
        self.transforms = projectors.to(device)
        self._s_names = list(dict.fromkeys(s for b in bound for s, _ in b.pairs))
        self._t_names = list(dict.fromkeys(t for b in bound for _, t in b.pairs))
        # Features come from the forward already activated by the network (BN + ReLU of the next
        # unit in pre-activation nets) when an ACM term asks for activation 'network'; every
        # feature term of the run then sees those activated maps.
        self._activated = any(b.spec.get("activation") == "network" for b in bound)

    @classmethod
    def resolve(cls, given: dict[str, Any], dataset: str | None = None) -> MixACMKnobs:
        """Validate the knobs; the ablation preset, the acm/kd/mixup switches and the terms are
        reconciled here (no networks needed), the block names against the networks in
        ``__init__``. With ``terms`` the switches acm/kd follow the terms and the ablation is
        ``custom``."""
        knobs = super().resolve(given, dataset)
        check_blocks_format(knobs.blocks, "knob 'blocks' of method 'mixacm'")
        if knobs.terms is None:
            return dataclasses.replace(knobs, **_resolve_switches(knobs, preset_given="ablation" in given))
        terms = check_terms(knobs.terms, "knob 'terms' of method 'mixacm'")
        if "ablation" in given and knobs.ablation != "custom":
            raise ValueError(
                f"knob 'ablation'={knobs.ablation!r} of method 'mixacm' cannot be combined with knob 'terms' "
                "(the terms say which distillation terms are on); leave it out or set it to custom"
            )
        switches = {s: any(t["term"] == s for t in terms) for s in ("acm", "kd")}
        for s, on in switches.items():
            value = getattr(knobs, s)
            if value is not None and value != on:
                raise ValueError(
                    f"knob {s!r}={value} of method 'mixacm' contradicts knob 'terms' (which has "
                    f"{'a' if on else 'no'} {s} term)"
                )
        mixup = True if knobs.mixup is None else knobs.mixup
        if not isinstance(mixup, bool):
            raise ValueError(f"knob 'mixup' of method 'mixacm' must be true, false or null, got {mixup!r}")
        return dataclasses.replace(knobs, terms=terms, mixup=mixup, ablation="custom", **switches)

    @classmethod
    def check_feature_names(cls, given: dict[str, Any], student_names: Sequence[str],
                            teacher_names: Sequence[str]) -> None:
        """Check every term's block pairs against the two networks' feature names (from
        ``mixacm.distill.arch_feature_names``), before any network or job exists."""
        k = cls.resolve(given)
        listed = k.terms is not None
        where = "knob 'terms' of method 'mixacm'" if listed else "knob 'blocks' of method 'mixacm'"
        for i, spec in enumerate(k.terms if listed else default_terms(k)):
            if "blocks" in spec:
                resolve_blocks(spec["blocks"], student_names, teacher_names, blocks_where(where, i, listed))

    def extra_modules(self) -> nn.ModuleDict:
        return self.transforms

    def use_cuda_graphs(self) -> None:
        """The student's and the teacher's calls replayed from CUDA graphs (``mixacm.graphs``),
        captured on the first step's batch."""
        from mixacm.graphs import GraphedCalls

        calls = {"student": (self.model, self._s_names, self._activated)}
        if self.bound:  # the teacher runs only for the distillation terms
            calls["teacher"] = (self.teacher, self._t_names, self._activated)
        self.graphs = GraphedCalls(calls)

    def _features(self, role: str, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(logits, {name: feature})`` of the student or the teacher on ``x``."""
        if self.graphs is not None:
            return self.graphs(role, x)
        net, names = (self.model, self._s_names) if role == "student" else (self.teacher, self._t_names)
        if not names:
            return net(x), {}
        return net(x, features=names, activated=self._activated)

    def channel_map(self, feat: Tensor) -> Tensor:
        """The ACM of one feature tensor with this run's p, pooling, normalisation, activation
        (``network``: the features come from the forward already activated by the network)."""
        k = self.knobs
        act = "none" if k.activation == "network" else k.activation
        return activated_channel_map(feat, p=k.p, pooling=k.pooling, normalize=k.normalize, activation=act)

    def applied_activation(self) -> dict[str, str]:
        """What activated each side's maps in this run, in words (recorded with the knobs): the
        activation of the first ACM term (the knob ``activation`` for the paper's terms)."""
        acm = [b.spec for b in self.bound if b.name == "acm"]
        activation = acm[0]["activation"] if acm else self.knobs.activation
        out = {}
        for role, net in (("student", self.model), ("teacher", self.teacher)):
            if activation != "network":
                out[role] = activation
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
        return normalize_acm(self.transforms[f"{s}_to_{t}"](self.channel_map(feat)), self.knobs.normalize)

    def _mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # lam is drawn on the batch's device (a fill, no copy) and stays a tensor: nothing is
        # read back to the host (argument validation would read alpha > 0 back: the knob is
        # checked already). On the CPU these are the same draws as a host-side float.
        alpha = torch.full((), float(self.knobs.mixup_alpha), device=x.device)
        beta = torch.distributions.Beta(alpha, alpha, validate_args=False)
        lam = beta.sample((x.shape[0],)) if self.knobs.mixup_lambda == "sample" else beta.sample()
        perm = torch.randperm(x.shape[0], device=x.device)
        x_mix, y_a, y_b = mixup(x, y, lam, perm)
        return x_mix, y_a, y_b, lam

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = self.knobs
        lam: Tensor | float = 1.0
        if k.mixup:
            x_in, y_a, y_b, lam = self._mix(x, y)
        else:
            x_in, y_a, y_b = x, y, y
        if k.input_noise > 0:
            x_in = (x_in + torch.empty_like(x_in).uniform_(-k.input_noise, k.input_noise)).clamp(0.0, 1.0)

        logits, s_feats = self._features("student", x_in)
        ce = mixup_ce(logits, y_a, y_b, lam) if k.mixup else F.cross_entropy(logits, y)

        zero = logits.new_zeros(())
        values = {"kd": zero, "acm": zero}
        loss = k.ce_weight * ce
        terms = {("term_mixup_ce" if k.mixup else "term_ce"): loss}
        if self.bound:
            if self.teacher.training:  # a loop that switched every module to train mode
                self.teacher.eval()
            with torch.no_grad():
                t_logits, t_feats = self._features("teacher", x_in)
            for b, name in zip(self.bound, self.metric_names):
                value = evaluate_term(b, self.transforms, logits, t_logits, s_feats, t_feats)
                values[name] = value
                terms[f"term_{name}"] = b.weight * value
                loss = loss + terms[f"term_{name}"]
        lam_mean = lam.mean() if isinstance(lam, Tensor) else lam
        return loss, detach_metrics(loss=loss, ce=ce, **values, lam=lam_mean, **terms)


def default_terms(k: MixACMKnobs) -> list[dict[str, Any]]:
    """The paper's distillation terms from the knobs: ACM (weight gamma) and KD (weight beta),
    each when its switch is on."""
    terms: list[dict[str, Any]] = []
    if k.acm:
        terms.append({"term": "acm", "weight": k.gamma, "blocks": k.blocks, "p": k.p, "pooling": k.pooling,
                      "normalize": k.normalize, "activation": k.activation, "transform": k.transform})
    if k.kd:
        terms.append({"term": "kd", "weight": k.beta, "T": k.T})
    return check_terms(terms, "knobs of method 'mixacm'") if terms else []
