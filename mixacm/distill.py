"""Distillation terms: a registry of pure tensor functions, each with its learnable projector
where it needs one, so that a method builds its loss from a config list of terms.

Every term compares one student tensor with one teacher tensor (the teacher's without
gradient) and returns a scalar averaged over the batch. Feature terms act on a pair of named
block outputs (B x C x H x W); the logit term (KD) on the two networks' logits.

* ``acm``: activated channel maps (Muhammad et al., NeurIPS 2021), ``mixacm.losses``:
  ``|| norm(P(a_s)) - a_t ||^2`` with ``a = norm(pool(act(A) ** p))`` and ``P`` a bias-free
  linear map C_s -> C_t (initialised to the interpolation), or the interpolation itself;
* ``sp``: similarity-preserving KD (Tung & Mori, ICCV 2019): with ``G = row_l2(Q Q^T)`` for
  ``Q`` the B x (C H W) flattened features, ``|| G_s - G_t ||_F^2 / B^2``;
* ``at``: attention transfer (Zagoruyko & Komodakis, ICLR 2017): with the spatial attention
  ``q = l2_normalise(flatten(mean_c |A|^p))`` (p = 2), ``mean_{b,hw} (q_s - q_t)^2``
  (the official code's ``(at(x) - at(y)).pow(2).mean()``);
* ``fitnet``: FitNet hints (Romero et al., ICLR 2015): ``mean (r(A_s) - A_t)^2`` with ``r``
  a learnable 1 x 1 convolution C_s -> C_t (the regressor);
* ``kd``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. 2015).

Where the student's and the teacher's spatial sizes differ (``at``, ``fitnet``), both maps are
average-pooled to the smaller size first (a choice of this project; the papers pair layers of
equal resolution).

A term in a config is a mapping ``{term: NAME, weight: W, blocks: ..., OPTION: VALUE}``;
``check_term`` validates it without networks (unknown term, unknown option, bad value: errors
naming the key and the valid names), ``resolve_blocks`` checks its block names against the
networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.losses import acm_distance, activated_channel_map, kd_kl, normalize_acm
from mixacm.registry import Registry

BLOCK_PRESETS = ("groups", "groups+stem")


# ----------------------------------------------------------------------------- pure functions


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Similarity-preserving loss ``||G_s - G_t||_F^2 / B^2``, ``G = row_l2(Q Q^T)``."""
    b = f_s.shape[0]
    if f_t.shape[0] != b:
        raise ValueError(f"sp: batch sizes differ: {b} vs {f_t.shape[0]}")
    g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).T, p=2.0, dim=1)
    g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).T, p=2.0, dim=1)
    return (g_s - g_t).pow(2).sum() / (b * b)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention ``l2_normalise(flatten(mean_c |A|^p))``: B x (H W)."""
    if feat.dim() != 4:
        raise ValueError(f"feat must be B x C x H x W, got shape {tuple(feat.shape)}")
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), p=2.0, dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss ``mean (q_s - q_t)^2`` over batch and positions."""
    q_s, q_t = attention_map(f_s, p), attention_map(f_t, p)
    if q_s.shape != q_t.shape:
        raise ValueError(f"at: attention maps differ in shape: {tuple(q_s.shape)} vs {tuple(q_t.shape)}")
    return (q_s - q_t).pow(2).mean()


def hint_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """FitNet hint loss ``mean (f_s - f_t)^2`` (``f_s`` already regressed to the teacher's shape)."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"fitnet: regressed student and teacher features differ: {tuple(f_s.shape)} vs {tuple(f_t.shape)}")
    return (f_s - f_t).pow(2).mean()


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two feature maps to the other's H x W (no-op when equal)."""
    hw_s, hw_t = tuple(f_s.shape[2:]), tuple(f_t.shape[2:])
    if hw_s == hw_t:
        return f_s, f_t
    size = (min(hw_s[0], hw_t[0]), min(hw_s[1], hw_t[1]))
    return F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)


# ----------------------------------------------------------------------------- projectors


class Interpolate(nn.Module):
    """Parameter-free map of a B x C_s vector to length C_t by 1-D linear interpolation."""

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.c_out = c_out

    def forward(self, a: Tensor) -> Tensor:
        return F.interpolate(a.unsqueeze(1), size=self.c_out, mode="linear", align_corners=True).squeeze(1)


def make_transform(kind: str, c_s: int, c_t: int) -> nn.Module:
    """ACM's student-side map C_s -> C_t: identity when equal, else a bias-free linear map
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


def make_regressor(c_s: int, c_t: int) -> nn.Module:
    """FitNet's regressor: a 1 x 1 convolution C_s -> C_t (identity when the widths agree)."""
    if c_s == c_t:
        return nn.Identity()
    return nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    gt: float | None = None


@dataclass(frozen=True)
class Term:
    """One distillation term.

    ``level`` is ``"features"`` (a list of block pairs) or ``"logits"``; ``projector(c_s, c_t,
    opts)`` builds the student-side module of one pair (``None``: no projector); ``loss(s, t,
    proj, opts)`` is the term of one pair (student tensor with gradient, teacher tensor without).
    """

    name: str
    level: str
    paper: str
    options: Mapping[str, Option]
    loss: Callable[[Tensor, Tensor, nn.Module, Mapping[str, Any]], Tensor]
    projector: Callable[[int, int, Mapping[str, Any]], nn.Module] | None = None


TERMS: Registry[Term] = Registry("distillation term")


def _register(term: Term) -> Term:
    return TERMS.register(term.name)(term)


def _acm_map(feat: Tensor, o: Mapping[str, Any]) -> Tensor:
    # 'network': the method asked the networks for their activated maps (``activated=True``), so
    # nothing more is applied here.
    act = "none" if o["activation"] == "network" else o["activation"]
    return activated_channel_map(feat, p=o["p"], pooling=o["pooling"], normalize=o["normalize"], activation=act)


def _acm(s: Tensor, t: Tensor, proj: nn.Module, o: Mapping[str, Any]) -> Tensor:
    # The student map goes through the projector, then is normalised again so that both sides
    # are compared as unit vectors (skipped for the identity, where it changes nothing).
    a_s = _acm_map(s, o)
    if not isinstance(proj, nn.Identity):
        a_s = normalize_acm(proj(a_s), o["normalize"])
    return acm_distance(a_s, _acm_map(t, o))


_register(Term(
    name="acm", level="features", paper="Muhammad et al., NeurIPS 2021 (MixACM)",
    options={
        "p": Option(2, "power applied to the activations before pooling", choices=(1, 2)),
        "pooling": Option("mean", "spatial pooling of the channel map", choices=("mean", "sum")),
        "normalize": Option("l2", "normalisation across channels", choices=("l2", "none")),
        "activation": Option("network", "what activates block outputs before the power: 'network' = the "
                             "activation the network applies next (pre-activation nets: the next BN + ReLU), "
                             "'relu', 'none'", choices=("network", "relu", "none")),
        "transform": Option("linear", "student-side map to the teacher's channel count (identity when equal)",
                            choices=("linear", "interpolate")),
    },
    loss=_acm,
    projector=lambda c_s, c_t, o: make_transform(o["transform"], c_s, c_t),
))
_register(Term(
    name="sp", level="features", paper="Tung & Mori, ICCV 2019 (similarity-preserving KD)",
    options={}, loss=lambda s, t, proj, o: sp_loss(s, t),
))
_register(Term(
    name="at", level="features", paper="Zagoruyko & Komodakis, ICLR 2017 (attention transfer)",
    options={"p": Option(2.0, "power of |A| in the attention map", gt=0)},
    loss=lambda s, t, proj, o: at_loss(*match_spatial(s, t), p=o["p"]),
))
_register(Term(
    name="fitnet", level="features", paper="Romero et al., ICLR 2015 (FitNets hints)",
    options={}, loss=lambda s, t, proj, o: hint_loss(*match_spatial(proj(s), t)),
    projector=lambda c_s, c_t, o: make_regressor(c_s, c_t),
))
_register(Term(
    name="kd", level="logits", paper="Hinton et al., 2015 (knowledge distillation)",
    options={"T": Option(1.0, "distillation temperature", gt=0)},
    loss=lambda s, t, proj, o: kd_kl(s, t, T=o["T"]),
))

TERM_KEYS = ("term", "weight", "blocks")


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def check_term(spec: Any, where: str = "terms[0]") -> dict[str, Any]:
    """Validate one term's config (no networks needed); return it complete with defaults.

    The result has ``term``, ``weight``, ``blocks`` (feature terms only) and every option of the
    term, so that checking it again gives it back unchanged.
    """
    if not isinstance(spec, Mapping):
        _fail(where, f"a term is a mapping like {{term: acm, weight: 1.0, blocks: groups}}, got {spec!r}")
    name = spec.get("term")
    if name not in TERMS:
        _fail(f"{where}.term", f"unknown distillation term {name!r}; valid: {', '.join(TERMS.names())}")
    term = TERMS.get(name)
    valid = [*TERM_KEYS, *term.options] if term.level == "features" else ["term", "weight", *term.options]
    unknown = [k for k in spec if k not in valid]
    if unknown:
        _fail(f"{where}.{unknown[0]}", f"unknown key(s) {unknown} for term {name!r}; valid: {', '.join(valid)}")
    out: dict[str, Any] = {"term": name}
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        _fail(f"{where}.weight", f"must be a number >= 0, got {weight!r}")
    out["weight"] = float(weight)
    if term.level == "features":
        blocks = spec.get("blocks", "groups")
        check_blocks_format(blocks, f"{where}.blocks")
        out["blocks"] = blocks if isinstance(blocks, str) else [list(p) for p in blocks]
    for key, opt in term.options.items():
        value = spec.get(key, opt.default)
        if opt.choices is not None and value not in opt.choices:
            _fail(f"{where}.{key}", f"must be one of {list(opt.choices)}, got {value!r}")
        if opt.gt is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > opt.gt:
                _fail(f"{where}.{key}", f"must be a number > {opt.gt}, got {value!r}")
            value = float(value)
        out[key] = value
    return out


def check_terms(specs: Any, where: str = "terms") -> list[dict[str, Any]]:
    """Validate a list of term configs (see ``check_term``)."""
    if not isinstance(specs, Sequence) or isinstance(specs, (str, bytes)) or not specs:
        _fail(where, f"a non-empty list of terms like [{{term: acm, weight: 50}}], got {specs!r}")
    return [check_term(s, f"{where}[{i}]") for i, s in enumerate(specs)]


def check_blocks_format(blocks: Any, where: str = "blocks") -> None:
    is_pairs = isinstance(blocks, Sequence) and not isinstance(blocks, str) and len(blocks) > 0 and all(
        isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(isinstance(n, str) for n in p)
        for p in blocks
    )
    if blocks not in BLOCK_PRESETS and not is_pairs:
        _fail(where, f"must be one of {list(BLOCK_PRESETS)} or a list of [student, teacher] feature-name pairs, "
                     f"got {blocks!r}")


def residual_groups(names: Sequence[str]) -> list[str]:
    return [n for n in names if n != "stem"]


def resolve_blocks(blocks: Any, student_names: Sequence[str], teacher_names: Sequence[str],
                   where: str = "blocks") -> list[tuple[str, str]]:
    """The (student, teacher) feature pairs of ``blocks``; names checked against both networks.

    ``groups`` pairs the residual groups from the deepest one backwards (the high-level features
    carry most of the robustness and exist in both networks whatever their depths);
    ``groups+stem`` adds the two stems.
    """
    if isinstance(blocks, str):
        s_groups, t_groups = residual_groups(student_names), residual_groups(teacher_names)
        n = min(len(s_groups), len(t_groups))
        pairs = list(zip(s_groups[len(s_groups) - n:], t_groups[len(t_groups) - n:]))
        if blocks == "groups+stem":
            pairs = [("stem", "stem")] + pairs
    else:
        pairs = [(p[0], p[1]) for p in blocks]
    if not pairs:
        _fail(where, "selects no feature pairs")
    for role, names, wanted in (("student", student_names, [s for s, _ in pairs]),
                                ("teacher", teacher_names, [t for _, t in pairs])):
        unknown = [n for n in wanted if n not in names]
        if unknown:
            _fail(where, f"the {role} has no feature(s) {unknown}; valid: {list(names)}")
    return pairs


@dataclass
class BoundTerm:
    """A checked term bound to networks: its block pairs and projectors (keyed per pair)."""

    spec: dict[str, Any]
    pairs: list[tuple[str, str]]
    keys: list[str]

    @property
    def term(self) -> Term:
        return TERMS.get(self.spec["term"])

    @property
    def name(self) -> str:
        return self.spec["term"]

    @property
    def weight(self) -> float:
        return self.spec["weight"]


def arch_feature_names(arch: str, num_classes: int = 10, **kwargs: Any) -> tuple[str, ...]:
    """The feature names of a registered architecture, read from a network built on the meta
    device (no memory, no initialisation cost): what a config check needs before any job."""
    return _feature_names(arch, num_classes, tuple(sorted(kwargs.items())))


@lru_cache(maxsize=64)
def _feature_names(arch: str, num_classes: int, kwargs: tuple) -> tuple[str, ...]:
    from mixacm.models import build_model

    with torch.device("meta"):
        return tuple(build_model(arch, num_classes, **dict(kwargs)).feature_names)


def blocks_where(where: str, i: int, given: bool) -> str:
    """The key a block error names: ``<where>[i].blocks`` for a term list, else ``where``."""
    return f"{where}[{i}].blocks" if given else where


def bind_terms(specs: list[dict[str, Any]], student: nn.Module, teacher: nn.Module,
               where: str = "terms", listed: bool = True) -> tuple[list[BoundTerm], nn.ModuleDict]:
    """Resolve each checked term's blocks against the networks and build its projectors.

    Projector keys are ``"{s}_to_{t}"`` for the first ``acm`` term (the key layout MixACM's
    checkpoints have always had) and ``"{term}{i}_{s}_to_{t}"`` for the others.
    """
    bound, projectors = [], nn.ModuleDict()
    first_acm = True
    c_s = student.feature_channels() if any("blocks" in s for s in specs) else {}
    c_t = teacher.feature_channels() if c_s else {}
    for i, spec in enumerate(specs):
        term = TERMS.get(spec["term"])
        if term.level == "logits":
            bound.append(BoundTerm(spec, [], []))
            continue
        pairs = resolve_blocks(spec["blocks"], student.feature_names, teacher.feature_names,
                               blocks_where(where, i, listed))
        prefix = "" if (spec["term"] == "acm" and first_acm) else f"{spec['term']}{i}_"
        first_acm = first_acm and spec["term"] != "acm"
        keys = [f"{prefix}{s}_to_{t}" for s, t in pairs]
        for key, (s, t) in zip(keys, pairs):
            projectors[key] = term.projector(c_s[s], c_t[t], spec) if term.projector else nn.Identity()
        bound.append(BoundTerm(spec, pairs, keys))
    return bound, projectors


def term_metric_names(bound: Sequence[BoundTerm]) -> list[str]:
    """Metric names: the term's name, ``name_2``, ``name_3`` ... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for b in bound:
        seen[b.name] = seen.get(b.name, 0) + 1
        names.append(b.name if seen[b.name] == 1 else f"{b.name}_{seen[b.name]}")
    return names


def evaluate_term(b: BoundTerm, projectors: nn.ModuleDict, s_logits: Tensor, t_logits: Tensor,
                  s_feats: Mapping[str, Tensor], t_feats: Mapping[str, Tensor]) -> Tensor:
    """The unweighted value of one bound term (summed over its block pairs)."""
    term = b.term
    if term.level == "logits":
        return term.loss(s_logits, t_logits, nn.Identity(), b.spec)
    return sum((term.loss(s_feats[s], t_feats[t], projectors[k], b.spec) for (s, t), k in zip(b.pairs, b.keys)),
               s_logits.new_zeros(()))


__all__ = [
    "TERMS", "Term", "Option", "check_term", "check_terms", "resolve_blocks", "bind_terms", "evaluate_term",
    "sp_loss", "at_loss", "attention_map", "hint_loss", "match_spatial", "make_transform", "make_regressor",
    "Interpolate", "term_metric_names", "BLOCK_PRESETS", "arch_feature_names", "blocks_where",
]
