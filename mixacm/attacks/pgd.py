"""L-inf projected gradient descent (Madry et al., ICLR 2018) on [0, 1] images.

Each step ascends the loss with the sign of its input gradient and projects back onto the
intersection of the eps ball around ``x`` and the image box:

    x_{t+1} = clip_[0,1]( x + clip_[-eps,eps]( x_t + step_size * sign(grad_x L(f(x_t), y)) - x ) )

starting from ``x + U(-eps, eps)`` (random start) or ``x``. With several restarts every example
keeps the perturbation that misclassifies it, or failing that the one with the highest loss.

The model's train/eval mode is never changed here (the caller decides, visibly), and the
gradient is taken with ``torch.autograd.grad`` w.r.t. the input only, so parameter ``.grad``
buffers are left as they were.

Precision (``attack_autocast``, the one switch every attack pass goes through, the methods' own
attack loops included): under the caller's bf16 autocast the attack runs in bf16 too, unless
``attack_precision("fp32")`` is in force (run config ``train.attack_precision: fp32``); under
fp16 autocast it always runs with autocast off, in the model's fp32. The reasons: the attack is
about 90 % of an adversarial-training step, so an fp32 attack would leave bf16 nothing to speed
up; bf16 keeps fp32's exponent range, so the small input gradients of a confident model do not
underflow, and a sign-gradient step only needs their sign (tests/test_amp_attacks.py measures
equal attack success on a robust model). fp16 has no such range: without loss scaling the
gradient underflows to zero and ``sign(0) = 0`` leaves the example unperturbed. Evaluation
(``mixacm.evaluate``) switches autocast off itself, so its attacks run in fp32.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixacm.utils import parse_eps

LossFn = Callable[[Tensor, Tensor], Tensor]


def _per_example_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _uniform_like(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's own device, then move: the same seed gives the same start on
    # CPU and GPU, which keeps evaluations reproducible across machines.
    gen_device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    return (2 * u - 1).mul_(eps).to(x.device)


# Policies of ``attack_precision``: follow a bf16 autocast (the default), or always fp32.
ATTACK_PRECISIONS = ("autocast", "fp32")
_POLICY: ContextVar[str] = ContextVar("mixacm_attack_precision", default="autocast")


@contextmanager
def attack_precision(policy: str) -> Iterator[None]:
    """Set the attack precision policy for the block (the training loop sets the run config's
    ``train.attack_precision``): ``"autocast"`` lets attacks run in the caller's bf16 autocast,
    ``"fp32"`` switches autocast off in every attack pass. Raises ValueError on another name."""
    if policy not in ATTACK_PRECISIONS:
        raise ValueError(f"attack precision {policy!r}: valid: {', '.join(ATTACK_PRECISIONS)}")
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def attack_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype an attack pass on ``device`` runs in here: ``torch.bfloat16`` under a
    bf16 autocast with the ``"autocast"`` policy, else ``None`` (autocast off: fp32)."""
    device_type = torch.device(device).type
    if (_POLICY.get() == "autocast" and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16):
        return torch.bfloat16
    return None


def resolve_attack_precision(amp: str, policy: str) -> str:
    """What a training run's attacks run in: ``"bf16"`` for ``train.amp: bf16`` with the
    ``"autocast"`` policy, else ``"fp32"`` (no autocast, fp16 autocast, or the ``"fp32"`` policy)."""
    if policy not in ATTACK_PRECISIONS:
        raise ValueError(f"attack precision {policy!r}: valid: {', '.join(ATTACK_PRECISIONS)}")
    return "bf16" if amp == "bf16" and policy == "autocast" else "fp32"


@contextmanager
def attack_autocast(device: torch.device | str) -> Iterator[None]:
    """The precision of an attack pass on ``device`` (wrap the forward and ``autograd.grad`` of
    every attack step in it): the caller's bf16 autocast is kept under the ``"autocast"`` policy;
    otherwise autocast is switched off, so fp16 (which underflows without loss scaling) and the
    ``"fp32"`` policy give attack gradients in the model's fp32."""
    if attack_dtype(device) is not None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield


# The earlier name, kept for the methods that call it: it now follows the policy above.
fp32_attack = attack_autocast

# Evaluation attacks: ``mixacm.evaluate`` and ``mixacm.audit`` run with autocast off.
ATTACK_PRECISION = "fp32 (autocast off inside attacks)"


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Nearest point of the eps ball around ``x`` intersected with the [0, 1] box."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _check_args(x: Tensor, eps: float, steps: int, step_size: float, restarts: int) -> None:
    parse_eps(eps)  # the project's one range check: (0, 1], a fraction of the pixel range
    if steps < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    if step_size <= 0 and steps > 0:
        raise ValueError(f"step_size={step_size!r} must be > 0")
    if restarts < 1:
        raise ValueError(f"restarts={restarts!r} must be >= 1")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float image tensor in [0, 1], got dtype {x.dtype}")


def _one_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    loss_fn: LossFn,
    start: Tensor,
) -> Tensor:
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv), y)
            # Summing per-example losses keeps each example's gradient independent of the
            # batch size (only the sign is used anyway).
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = project_linf(x_adv, x, eps)
    return x_adv.detach()


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    restarts: int = 1,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
) -> Tensor:
    """Return adversarial images ``x_adv`` with ``|x_adv - x|_inf <= eps`` and ``0 <= x_adv <= 1``.

    ``loss_fn(logits, y)`` is maximised; it may return per-example losses (shape B) or a
    scalar (default: per-example cross-entropy). ``y`` is passed to it untouched, so it may be
    labels or any target (e.g. clean logits for TRADES). ``generator`` draws the random start
    (and nothing else), so a seeded generator makes the attack reproducible. ``x_init`` is an
    explicit starting point (e.g. TRADES' ``x + 0.001 * N(0, 1)``); it is projected first and
    replaces the random start of the first restart.
    """
    _check_args(x, eps, steps, step_size, restarts)
    with attack_autocast(x.device):
        return _pgd_linf(model, x, y, eps, steps, step_size, random_start, restarts, loss_fn, generator, x_init)


def _pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float,
              random_start: bool, restarts: int, loss_fn: LossFn | None,
              generator: torch.Generator | None, x_init: Tensor | None) -> Tensor:
    loss_fn = loss_fn or _per_example_ce
    x = x.detach()
    labels = y if (not y.is_floating_point() and y.dim() == 1 and y.shape[0] == x.shape[0]) else None

    best: Tensor | None = None
    best_wrong: Tensor | None = None
    best_loss: Tensor | None = None
    for r in range(restarts):
        if r == 0 and x_init is not None:
            start = project_linf(x_init.detach(), x, eps)
        elif random_start:
            start = (x + _uniform_like(x, eps, generator)).clamp_(0.0, 1.0)
        else:
            start = x.clone()
        x_adv = _one_run(model, x, y, eps, steps, step_size, loss_fn, start)
        if restarts == 1:
            return x_adv

        with torch.no_grad():
            logits = model(x_adv)
            per_ex = loss_fn(logits, y)
            if per_ex.dim() != 1:
                # A scalar loss cannot rank examples: fall back to cross-entropy when y are labels.
                per_ex = _per_example_ce(logits, labels) if labels is not None else torch.zeros(len(x), device=x.device)
            wrong = logits.argmax(1) != labels if labels is not None else torch.zeros_like(per_ex, dtype=torch.bool)
        if best is None:
            best, best_wrong, best_loss = x_adv, wrong, per_ex
            continue
        # Misclassified beats correct; between equals the higher loss wins.
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (per_ex > best_loss))
        mask = better.view(-1, *([1] * (x.dim() - 1)))
        best = torch.where(mask, x_adv, best)
        best_wrong = torch.where(better, wrong, best_wrong)
        best_loss = torch.where(better, per_ex, best_loss)
    assert best is not None
    return best
