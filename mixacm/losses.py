"""Loss terms of MixACM and the baselines, as pure functions of tensors.

No modules, no attacks, no train/eval switches: the methods in ``mixacm.methods`` decide what
the inputs are. Notation follows ``docs/method.md`` (Muhammad et al., NeurIPS 2021, and Zhang et
al., ICML 2019, for TRADES):

* activated channel map (ACM) of a feature tensor A (B x C x H x W):
  ``a_c = pool_{h,w}( act(A)_{c,h,w} ** p )``, then optionally ``a / ||a||_2`` -> B x C
* ACM distance: ``mean_b ||a_s - a_t||_2^2``
* distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch
* mixup: ``x~ = lam * x + (1 - lam) * x[perm]`` and
  ``CE_mix = lam * CE(f(x~), y) + (1 - lam) * CE(f(x~), y[perm])``
* TRADES regulariser: ``KL(f(x) || f(x'))``, averaged over the batch
* robust distillation (ARD, Goldblum et al., AAAI 2020; RSLAD, Zi et al., ICCV 2021): the same
  KL averaged over batch *and classes* (PyTorch's ``KLDivLoss()`` default, which both official
  codes use, so it is ``kd_kl / C``):
  ``ARD = alpha * T^2 * KL_mean(t(x) / T || s(x') / T) + (1 - alpha) * CE(s(x), y)``,
  ``RSLAD = w_adv * KL_mean(t(x) || s(x')) + w_nat * KL_mean(t(x) || s(x))``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POOLINGS = ("mean", "sum")
NORMALIZATIONS = ("l2", "none")
ACTIVATIONS = ("relu", "none")


def _at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is a lower precision (bf16, fp16); float32 and float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def normalize_acm(a: Tensor, normalize: str = "l2") -> Tensor:
    """Normalise B x C channel maps across channels (``"l2"``) or leave them (``"none"``)."""
    _check_choice("normalize", normalize, NORMALIZATIONS)
    return F.normalize(a, p=2.0, dim=1) if normalize == "l2" else a


class _PooledPower(torch.autograd.Function):
    """``pool_{h,w}(A ** p)`` of a B x C x H x W tensor for p in {1, 2}, as B x C in at least float32,
    reading A once and writing one gradient tensor in A's dtype.

    Why by hand: under autocast ``A.pow(p).mean((2, 3))`` casts the whole map to float32, keeps a
    float32 copy for the backward and casts the gradient back, about six passes over each feature
    map (0.7 ms of GPU time in a 22 ms WRN-34-10 MixACM step on an H200). Here the forward is one
    reduction that accumulates in float32 (``linalg.vector_norm`` / ``sum`` with ``dtype``; on CUDA
    they read bf16 and fp16 directly) and the backward one broadcast product in A's dtype. No
    library fuses this without compiling the step (``torch.compile``).
    """

    @staticmethod
    def forward(ctx, feat: Tensor, p: int, scale: float) -> Tensor:
        dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32  # no cast of feat itself
        with torch.autocast(feat.device.type, enabled=False):
            if p == 2:
                out = torch.linalg.vector_norm(feat, 2, dim=(2, 3), dtype=dtype).square().mul_(scale)
            else:
                out = feat.sum(dim=(2, 3), dtype=dtype).mul_(scale)
        ctx.save_for_backward(feat if p == 2 else None)
        ctx.p, ctx.scale, ctx.shape, ctx.dtype = p, scale, feat.shape, feat.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (feat,) = ctx.saved_tensors
        if ctx.p == 2:  # d/dA of scale * sum A^2 = 2 * scale * A
            # The factor is rounded to A's dtype first (one more rounding than a float32 product,
            # which would need a float32 copy of A); fp16 runs scale the loss, keeping it in range.
            return feat * (grad * (2.0 * ctx.scale)).to(feat.dtype)[:, :, None, None], None, None
        # A broadcast view in A's dtype: nothing of A's size is written here.
        return (grad * ctx.scale).to(ctx.dtype)[:, :, None, None].expand(ctx.shape), None, None


def pooled_power(feat: Tensor, p: int = 2, pooling: str = "mean") -> Tensor:
    """``pool_{h,w}(feat ** p)``: B x C x H x W -> B x C, spatial ``mean`` or ``sum`` of the p-th power
    (p in {1, 2}), in float32 for bf16 / fp16 / float32 input (float64 stays float64), with or
    without autocast. Raises ValueError for another p or pooling."""
    _check_choice("pooling", pooling, POOLINGS)
    if p not in (1, 2):
        raise ValueError(f"p={p!r} must be 1 or 2")
    scale = 1.0 / (feat.shape[2] * feat.shape[3]) if pooling == "mean" else 1.0
    return _PooledPower.apply(feat, int(p), scale)


def activated_channel_map(
    feat: Tensor,
    p: float = 2,
    pooling: str = "mean",
    normalize: str = "l2",
    activation: str = "relu",
) -> Tensor:
    """Map a B x C x H x W feature tensor to its B x C activated channel map (at least float32).

    ``activation`` is applied first (``"relu"`` for block outputs that are pre-activation, e.g.
    pre-act ResNets and WideResNets, whose residual sums can be negative), then the p-th power,
    then pooling over H and W (``pooled_power`` for p in {1, 2}: one pass over the map), then
    normalisation across channels.
    """
    if feat.dim() != 4:
        raise ValueError(f"feat must be B x C x H x W, got shape {tuple(feat.shape)}")
    if not p > 0:
        raise ValueError(f"p={p!r} must be > 0")
    _check_choice("pooling", pooling, POOLINGS)
    _check_choice("activation", activation, ACTIVATIONS)
    a = F.relu(feat) if activation == "relu" else feat
    if p in (1, 2):
        a = pooled_power(a, int(p), pooling)
    else:
        a = _at_least_fp32(a).pow(p)
        a = a.mean(dim=(2, 3)) if pooling == "mean" else a.sum(dim=(2, 3))
    return normalize_acm(a, normalize)


def acm_distance(a_s: Tensor, a_t: Tensor) -> Tensor:
    """Squared L2 distance between two B x C channel maps, averaged over the batch (a scalar)."""
    if a_s.shape != a_t.shape:
        raise ValueError(
            f"student and teacher channel maps differ in shape: {tuple(a_s.shape)} vs {tuple(a_t.shape)}"
        )
    return (a_s - a_t).pow(2).sum(dim=1).mean()


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the batch.

    The T^2 factor (Hinton et al., 2015) keeps the gradient scale independent of T. Gradients
    flow into both arguments; detach the teacher's logits (or compute them without grad).
    Computed in at least float32 whatever the logits' dtype: under the CPU's bf16 autocast log_softmax
    stays bf16, and ARD's T^2 = 900 times a bf16 KL of near-equal distributions came out
    negative (-1.04 against 0.0044 in fp32 on a WRN-16-4 pair).
    """
    if not T > 0:
        raise ValueError(f"T={T!r} must be > 0")
    log_q = F.log_softmax(_at_least_fp32(student_logits) / T, dim=1)
    log_p = F.log_softmax(_at_least_fp32(teacher_logits) / T, dim=1)
    return (T * T) * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def trades_kl(logits_adv: Tensor, logits_nat: Tensor) -> Tensor:
    """TRADES' regulariser ``KL(f(x) || f(x'))`` (batch mean), gradients into both arguments.

    The same divergence as :func:`kd_kl` at T = 1 with the natural output as the target.
    """
    return kd_kl(logits_adv, logits_nat, T=1.0)


def kl_class_mean(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over batch and classes (``kd_kl / C``)."""
    return kd_kl(student_logits, teacher_logits, T=T) / student_logits.shape[1]


def ard_loss(logits_adv: Tensor, logits_nat: Tensor | None, teacher_logits: Tensor, y: Tensor,
             alpha: float = 1.0, T: float = 30.0) -> Tensor:
    """ARD: ``alpha * T^2 * KL_mean(t(x)/T || s(x')/T) + (1 - alpha) * CE(s(x), y)``.

    ``logits_nat`` (the student on clean inputs) may be ``None`` when ``alpha == 1``.
    """
    loss = alpha * kl_class_mean(logits_adv, teacher_logits, T=T)
    if alpha != 1.0:
        if logits_nat is None:
            raise ValueError("ard_loss: alpha < 1 needs the student's clean logits")
        loss = loss + (1.0 - alpha) * F.cross_entropy(logits_nat, y)
    return loss


def rslad_loss(logits_adv: Tensor, logits_nat: Tensor, teacher_logits: Tensor,
               w_adv: float = 5 / 6, w_nat: float = 1 / 6) -> Tensor:
    """RSLAD: ``w_adv * KL_mean(t(x) || s(x')) + w_nat * KL_mean(t(x) || s(x))`` (robust soft
    labels: the teacher's outputs on clean inputs are the targets of both terms)."""
    return w_adv * kl_class_mean(logits_adv, teacher_logits) + w_nat * kl_class_mean(logits_nat, teacher_logits)


def mixup(x: Tensor, y: Tensor, lam: float | Tensor, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mix each example with its partner ``perm[i]``: returns ``(x~, y, y[perm])``.

    ``lam`` is one value in [0, 1] for the whole batch (Zhang et al. 2018, the paper's mixup), a
    number or a 0-d tensor, or a tensor of shape (B,) with one value per example (broadcast over
    x's other dimensions). A tensor's values are not checked (that would read them back to the
    host inside a training step): they must lie in [0, 1], as Beta draws do.
    """
    if isinstance(lam, Tensor):
        if lam.shape not in ((), (x.shape[0],)):
            raise ValueError(f"lam of shape {tuple(lam.shape)}: expected one value, or one per example ({x.shape[0]},)")
        w = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) if lam.dim() else lam.to(x.dtype)
        return w * x + (1.0 - w) * x[perm], y, y[perm]
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam!r} must be in [0, 1]")
    return lam * x + (1.0 - lam) * x[perm], y, y[perm]


def mixup_ce(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float | Tensor) -> Tensor:
    """Mixup cross-entropy ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` (batch mean);
    with a per-example ``lam`` of shape (B,) each example's two CEs are weighted by its own lam
    before the mean (a number or a 0-d tensor weighs the two batch means)."""
    if isinstance(lam, Tensor) and lam.dim():
        ce_a = F.cross_entropy(logits, y_a, reduction="none")
        ce_b = F.cross_entropy(logits, y_b, reduction="none")
        w = lam.to(logits.dtype)
        return (w * ce_a + (1.0 - w) * ce_b).mean()
    return lam * F.cross_entropy(logits, y_a) + (1.0 - lam) * F.cross_entropy(logits, y_b)


__all__ = [
    "activated_channel_map",
    "pooled_power",
    "normalize_acm",
    "acm_distance",
    "kd_kl",
    "trades_kl",
    "kl_class_mean",
    "ard_loss",
    "rslad_loss",
    "mixup",
    "mixup_ce",
]
