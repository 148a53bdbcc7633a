"""Attacks on [0, 1] images and the evaluation names that select them.

``pgd_linf`` is mixacm's L-inf PGD (used for training and evaluation); ``AutoAttackAdapter`` runs
AutoAttack from ``pyautoattack`` or upstream ``autoattack``. The ``ATTACKS`` registry maps an
evaluation name to a factory ``(eps, **params) -> attack`` where an attack is called as
``attack(model, x, y, seed=...) -> x_adv`` and has a ``spec`` dict recorded in result files.

Evaluation names (``build_attack``): ``clean``; ``pgd<K>`` = K steps of eps/4 from a random start,
1 restart (Madry et al. 2018; ``pgd20`` is the usual report); ``autoattack`` (standard version);
``autoattack-apgd`` (APGD-CE + APGD-T, the "custom" version); ``autoattack-rand``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

import mixacm
from mixacm.attacks.autoattack import AutoAttackAdapter
from mixacm.attacks.pgd import (ATTACK_PRECISION, ATTACK_PRECISIONS, attack_autocast, attack_dtype, attack_precision,
                                fp32_attack, pgd_linf, project_linf, resolve_attack_precision)
from mixacm.registry import Registry


class Attack(Protocol):
    spec: dict[str, Any]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, seed: int) -> Tensor: ...


ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")


class CleanAttack:
    """No perturbation: clean accuracy goes through the same code path as the attacks."""

    def __init__(self, eps: float | None = None) -> None:
        self.spec = {"name": "clean", "package": "mixacm", "version": mixacm.__version__}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, seed: int) -> Tensor:
        return x


class PGDAttack:
    """``pgd_linf`` with a random start drawn from a CPU generator seeded per call."""

    def __init__(self, eps: float, *, steps: int, step_size: float | None = None,
                 restarts: int = 1, random_start: bool = True) -> None:
        self.eps = float(eps)
        self.steps = int(steps)
        # eps/4 per step: PGD-K with K >= 4 can reach every corner of the eps ball.
        self.step_size = float(step_size) if step_size is not None else self.eps / 4
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.spec = {
            "name": "pgd", "norm": "Linf", "eps": self.eps, "steps": self.steps,
            "step_size": self.step_size, "restarts": self.restarts,
            "random_start": self.random_start, "loss": "ce",
            "package": "mixacm", "version": mixacm.__version__,
        }

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, seed: int) -> Tensor:
        # A CPU generator gives the same start on any device for the same seed.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        return pgd_linf(model, x, y, eps=self.eps, steps=self.steps, step_size=self.step_size,
                        random_start=self.random_start, restarts=self.restarts, generator=gen)


ATTACKS.register("clean")(CleanAttack)
ATTACKS.register("pgd")(PGDAttack)


@ATTACKS.register("autoattack")
def _autoattack_standard(eps: float, **kw: Any) -> AutoAttackAdapter:
    return AutoAttackAdapter(eps, version="standard", **kw)


@ATTACKS.register("autoattack-apgd")
def _autoattack_apgd(eps: float, **kw: Any) -> AutoAttackAdapter:
    return AutoAttackAdapter(eps, version="custom", attacks=["apgd-ce", "apgd-t"], **kw)


@ATTACKS.register("autoattack-rand")
def _autoattack_rand(eps: float, **kw: Any) -> AutoAttackAdapter:
    return AutoAttackAdapter(eps, version="rand", **kw)


_PGD_NAME = re.compile(r"pgd(\d+)")


def attack_names() -> list[str]:
    """Valid evaluation names, with ``pgd<K>`` standing for any step count."""
    return [("pgd<K> (e.g. pgd20)" if n == "pgd" else n) for n in ATTACKS.names()]


def build_attack(name: str, eps: float, **kw: Any) -> Attack:
    """The attack an evaluation name selects, e.g. ``build_attack("pgd20", 8/255)``.

    Unknown names raise ``KeyError`` listing the valid ones; extra keywords go to the factory
    (e.g. ``backend="autoattack"`` for the AutoAttack names).
    """
    m = _PGD_NAME.fullmatch(name)
    if m:
        steps = int(m.group(1))
        if steps < 1:
            raise KeyError(f"attack {name!r}: PGD needs at least 1 step")
        return PGDAttack(eps, steps=steps, **kw)
    if name == "pgd" or name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; valid names: {', '.join(attack_names())}")
    return ATTACKS.get(name)(eps, **kw)


__all__ = [
    "ATTACK_PRECISION", "ATTACK_PRECISIONS", "ATTACKS", "Attack", "AutoAttackAdapter", "CleanAttack", "PGDAttack",
    "attack_autocast", "attack_dtype", "attack_names", "attack_precision", "build_attack", "fp32_attack", "pgd_linf",
    "project_linf", "resolve_attack_precision",
]
