"""A robustness audit: checks for gradient masking beside the one white-box number.

A student distilled without adversarial examples can look robust to PGD-20 because its
gradients are uninformative (Athalye et al. 2018; Carlini et al. 2019, "On Evaluating
Adversarial Robustness"; Tramer et al. 2020). On the same points as the evaluation (the first
``n`` class-balanced test points, the same per-batch seeds), the audit runs:

* PGD-20 (step eps/4, random start; the evaluation's ``pgd20``);
* PGD with more steps and restarts (default 100 x 5, step 2.5 eps / steps, Madry et al. 2018) on
  the points PGD-20 leaves correct;
* APGD-DLR (AutoAttack's, Croce & Hein 2020) on the first ``subset_n`` balanced points still
  correct, and the black-box Square attack (``square_queries`` queries) on the subset's clean-correct
  points;
* transfer attacks: PGD-20 examples crafted on each source model (the teacher of a distilled
  student, the PGD-AT model), classified by the model under test;
* an eps sweep: PGD-``sweep_steps`` at each multiple of eps (default 1, 2, 4, 8, 16; capped at 1).

Audited robust accuracy = 100 * #{points correct under every attack run on them at eps} / n (the
subset attacks count on the subset's points). Flags, each with its reason: a transfer or
black-box attack more than ``margin_pct`` points stronger than white-box PGD-20 on the same
points; accuracy above ``sweep_max_acc_pct`` at the largest eps; PGD-20 more than
``gap_pct`` points above PGD-100x5 or above a given AutoAttack accuracy.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import mixacm
from mixacm.attacks import ATTACK_PRECISION, AutoAttackAdapter, PGDAttack
from mixacm.provenance import provenance
from mixacm.utils import atomic_json_dump, format_eps, parse_eps, resolve_device

AUDIT_DEFAULTS: dict[str, Any] = {
    "n": 1000,               # points (the evaluation's first n balanced test points)
    "batch_size": 256,
    "pgd_steps": 100,        # the strong white-box PGD: steps x restarts
    "pgd_restarts": 5,
    "subset_n": 100,         # points of the APGD-DLR and Square checks
    "square_queries": 1000,  # Square's query budget per point (AutoAttack's standard: 5000)
    "eps_multipliers": [1, 2, 4, 8, 16],
    "sweep_steps": 20,
    "margin_pct": 2.0,       # transfer / black-box this much below PGD-20: flag
    "sweep_max_acc_pct": 5.0,  # accuracy above this at the largest eps: flag
    "gap_pct": 5.0,          # PGD-20 this much above PGD-100x5 or AutoAttack: flag
}


class AuditError(ValueError):
    """Bad audit settings (one line, naming the key)."""


def audit_settings(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``AUDIT_DEFAULTS`` with ``given`` on top, validated; errors name the key."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(AUDIT_DEFAULTS))
    if unknown:
        raise AuditError(f"audit: unknown key(s) {unknown}; valid: {sorted(AUDIT_DEFAULTS)}")
    s = {**AUDIT_DEFAULTS, **given}
    for key in ("n", "batch_size", "pgd_steps", "pgd_restarts", "subset_n", "square_queries", "sweep_steps"):
        if key == "batch_size" and s[key] == "auto":
            continue
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise AuditError(f"audit.{key}: must be a positive integer, got {s[key]!r}")
    for key in ("margin_pct", "sweep_max_acc_pct", "gap_pct"):
        if isinstance(s[key], bool) or not isinstance(s[key], (int, float)) or not 0 <= s[key] <= 100:
            raise AuditError(f"audit.{key}: must be a number of points in [0, 100], got {s[key]!r}")
    mults = s["eps_multipliers"]
    if (not isinstance(mults, (list, tuple)) or not mults or 1 not in mults
            or any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in mults)):
        raise AuditError(f"audit.eps_multipliers: a list of positive numbers including 1, got {mults!r}")
    s["eps_multipliers"] = sorted({float(m) for m in mults})
    if s["subset_n"] > s["n"]:
        raise AuditError(f"audit.subset_n ({s['subset_n']}) must not exceed audit.n ({s['n']})")
    return s


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _pct(mask: Tensor) -> float | None:
    return 100.0 * int(mask.sum()) / mask.numel() if mask.numel() else None


@dataclass
class _Attacks:
    """The audit's attacks at one eps (AUDIT_DEFAULTS names their settings)."""
    pgd20: PGDAttack
    strong: PGDAttack
    sweep: dict[float, PGDAttack]
    apgd_dlr: AutoAttackAdapter
    square: AutoAttackAdapter

    @property
    def strong_name(self) -> str:
        return f"pgd{self.strong.steps}x{self.strong.restarts}"


def _attacks(eps: float, s: Mapping[str, Any], num_classes: int) -> _Attacks:
    attacks = _Attacks(
        pgd20=PGDAttack(eps, steps=20),
        strong=PGDAttack(eps, steps=s["pgd_steps"], step_size=2.5 * eps / s["pgd_steps"], restarts=s["pgd_restarts"]),
        sweep={m: PGDAttack(min(1.0, m * eps), steps=s["sweep_steps"]) for m in s["eps_multipliers"] if m != 1},
        apgd_dlr=AutoAttackAdapter(eps, version="custom", attacks=["apgd-dlr"]),
        square=AutoAttackAdapter(eps, version="custom", attacks=["square"], square_queries=s["square_queries"]))
    for adapter in (attacks.apgd_dlr, attacks.square):
        adapter.adapt_to_classes(num_classes)
    return attacks


class _Cascade:
    """Per-point results of every attack on the audit's batches, with the time each took.

    ``per_point[name]`` collects one boolean tensor (correct after the attack) per batch, in the
    evaluation's batch order and with its per-batch seeds (``batch_seed``)."""

    def __init__(self, model: nn.Module, sources: Mapping[str, nn.Module], attacks: _Attacks, seed: int) -> None:
        from mixacm.evaluate import batch_seed  # torchvision: not at import (the config check imports this module)

        self.model, self.sources, self.attacks, self.seed = model, sources, attacks, seed
        self.seed_of = lambda key, b: batch_seed(seed, key, b)
        self.names = ["clean", "pgd20", "pgd_strong", *[f"transfer_{k}" for k in sources], "apgd_dlr", "square",
                      *[f"sweep_{m:g}x" for m in attacks.sweep]]
        self.per_point: dict[str, list[Tensor]] = {k: [] for k in self.names}
        self.seconds = {k: 0.0 for k in self.names}
        self.in_subset: list[Tensor] = []

    def _timed(self, name: str, fn) -> Tensor:
        t = time.perf_counter()
        out = fn()
        self.seconds[name] += time.perf_counter() - t
        self.per_point[name].append(out.cpu())
        return out

    def _on(self, mask: Tensor, attack, x: Tensor, y: Tensor, key: str, b: int) -> Tensor:
        """Correct after ``attack`` on the points of ``mask``; True (not attacked) elsewhere."""
        out = torch.ones_like(mask)
        if mask.any():
            i = mask.nonzero().flatten()
            out[i] = _correct(self.model, attack(self.model, x[i], y[i], seed=self.seed_of(key, b)), y[i])
        return out

    def batch(self, b: int, x: Tensor, y: Tensor, sub: Tensor) -> None:
        """Every attack on batch ``b``; ``sub`` marks its points of the APGD-DLR / Square subset."""
        model, a, seed_of = self.model, self.attacks, self.seed_of
        self.in_subset.append(sub.cpu())
        clean = self._timed("clean", lambda: _correct(model, x, y))
        # The evaluation's seeds: this PGD-20 is the evaluation's pgd20 on the same batches when the
        # batch sizes agree.
        p20 = self._timed("pgd20", lambda: _correct(model, a.pgd20(model, x, y, seed=seed_of("pgd20", b)), y))
        alive = clean & p20
        alive = alive & self._timed("pgd_strong", lambda: alive & self._on(alive, a.strong, x, y, "pgd_strong", b))
        for name, src in self.sources.items():
            alive = alive & self._timed(f"transfer_{name}", lambda: _correct(
                model, a.pgd20(src, x, y, seed=seed_of(f"transfer_{name}", b)), y))
        self._timed("apgd_dlr", lambda: self._on(alive & sub, a.apgd_dlr, x, y, "apgd_dlr", b))
        self._timed("square", lambda: self._on(clean & sub, a.square, x, y, "square", b))
        for m, attack in a.sweep.items():
            self._timed(f"sweep_{m:g}x", lambda: _correct(
                model, attack(model, x, y, seed=seed_of(f"sweep_{m:g}x", b)), y))

    def points(self) -> tuple[dict[str, Tensor], Tensor]:
        return {k: torch.cat(v) for k, v in self.per_point.items()}, torch.cat(self.in_subset)


def _accuracies(pts: Mapping[str, Tensor], sub_mask: Tensor, sources: Iterable[str],
                strong_name: str) -> tuple[dict[str, float | None], Tensor]:
    """Accuracy (%) under each attack and the audited per-point worst case (True: survived all)."""
    clean = pts["clean"]
    # Subset attacks: "not run" (True) outside the subset; within it, the cascade's and Square's results.
    worst = clean & pts["pgd20"] & pts["pgd_strong"] & pts["apgd_dlr"] & pts["square"]
    for name in sources:
        worst &= pts[f"transfer_{name}"]
    acc = {
        "clean": _pct(clean),
        "pgd20": _pct(pts["pgd20"]),
        strong_name: _pct(clean & pts["pgd20"] & pts["pgd_strong"]),
        **{f"transfer_{k}": _pct(pts[f"transfer_{k}"]) for k in sources},
        "subset_pgd20": _pct(pts["pgd20"][sub_mask]),
        "subset_apgd_dlr": _pct((clean & pts["pgd20"] & pts["pgd_strong"] & pts["apgd_dlr"])[sub_mask]),
        "subset_square": _pct((clean & pts["square"])[sub_mask]),
        "audited": _pct(worst),
    }
    return acc, worst


def _sweep_rows(acc: Mapping[str, float | None], pts: Mapping[str, Tensor], sweep: Iterable[float],
                eps: float) -> list[dict[str, Any]]:
    rows = [{"multiplier": 1.0, "eps": eps, "eps_text": format_eps(eps), "accuracy_pct": acc["pgd20"]}]
    return rows + [{"multiplier": m, "eps": min(1.0, m * eps), "eps_text": format_eps(min(1.0, m * eps)),
                    "accuracy_pct": _pct(pts[f"sweep_{m:g}x"])} for m in sweep]


def run_audit(model: nn.Module, dataset: Dataset, eps: float | str, *,
              sources: Mapping[str, nn.Module] | None = None, settings: Mapping[str, Any] | None = None,
              autoattack_acc_pct: float | None = None, seed: int = 0,
              device: str | torch.device = "auto") -> dict[str, Any]:
    """Audit ``model`` on ``dataset``'s first ``n`` balanced points; returns the result dict.

    ``sources`` maps a name (``teacher``, ``at``) to a model whose PGD-20 examples are transferred.
    ``autoattack_acc_pct`` (the evaluation's AutoAttack accuracy, if known) adds the PGD-20 vs
    AutoAttack check. The result has the evaluation result's shape with one metric, ``audited``,
    and the details under ``audit`` (``accuracy_pct.pgd20`` is PGD-20 on the same points).
    """
    s = audit_settings(settings)
    eps_value = parse_eps(eps)
    dev = resolve_device(device)
    sources = dict(sources or {})
    # Imported here: mixacm.data loads torchvision (seconds), and the workflow's config check
    # imports this module for audit_settings alone.
    from mixacm.data import balanced_first_n, data_digest, dataset_labels
    from mixacm.evaluate import check_model, checked_first_batch, dataset_num_classes, resolve_batch_size

    labels = dataset_labels(dataset)
    num_classes = dataset_num_classes(dataset)
    indices = balanced_first_n(labels, min(s["n"], len(labels)))
    subset = set(balanced_first_n(labels, min(s["subset_n"], len(indices))).tolist())
    for src in sources.values():  # on the device before an "auto" batch size measures its free memory
        src.to(dev).eval()
    s["batch_size"], s["batch_size_rule"] = resolve_batch_size(s["batch_size"], model, dataset, indices, dev)
    batches = [indices[i:i + s["batch_size"]].tolist() for i in range(0, len(indices), s["batch_size"])]
    attacks = _attacks(eps_value, s, num_classes)

    was_training = model.training
    model.to(dev).eval()
    x0 = checked_first_batch(dataset, batches[0], num_classes).to(dev)  # [0, 1] float images, fixed
    attacked, record = check_model(model, x0, num_classes)
    cascade = _Cascade(attacked, {name: check_model(src, x0, num_classes)[0] for name, src in sources.items()},
                       attacks, seed)
    t0 = time.perf_counter()
    try:
        with torch.autocast(device_type=dev.type, enabled=False):
            for b, idx in enumerate(batches):
                x = torch.stack([dataset[i][0] for i in idx]).to(dev)
                y = torch.as_tensor([int(labels[i]) for i in idx], device=dev)
                cascade.batch(b, x, y, torch.tensor([i in subset for i in idx], device=dev))
    finally:
        model.train(was_training)
    pts, sub_mask = cascade.points()
    acc, worst = _accuracies(pts, sub_mask, sources, attacks.strong_name)
    sweep_rows = _sweep_rows(acc, pts, attacks.sweep, eps_value)
    flags = _flags(acc, sweep_rows, sources, s, autoattack_acc_pct)
    audited = {"accuracy_pct": acc["audited"], "correct": int(worst.sum()), "n": len(indices),
               "attack": {"name": "audit", "worst_of": ["clean", "pgd20", attacks.strong_name,
                                                        *[f"transfer_{k}" for k in sources],
                                                        "apgd-dlr (subset)", "square (subset)"],
                          "flags": [f["reason"] for f in flags], "package": "mixacm", "version": mixacm.__version__}}
    details = {
        "settings": s, "accuracy_pct": acc, "sweep": sweep_rows, "sources": sorted(sources),
        "autoattack_acc_pct": autoattack_acc_pct, "flags": flags, "status": "flagged" if flags else "passed",
        "attack_seconds": {k: round(v, 3) for k, v in cascade.seconds.items()},
        "attacks": {"pgd20": attacks.pgd20.spec, attacks.strong_name: attacks.strong.spec,
                    "apgd_dlr": attacks.apgd_dlr.spec, "square": attacks.square.spec,
                    "sweep": {f"{m:g}x": a.spec for m, a in attacks.sweep.items()}},
        "attack_precision": ATTACK_PRECISION,
    }
    from mixacm.evaluate import PRECISION, RESULT_SCHEMA, model_sha256

    n = len(indices)
    return {
        "schema": RESULT_SCHEMA, "eps": eps_value, "eps_text": format_eps(eps), "n": n,
        "subset": {"selection": "balanced_first_n", "n": n, "audit_subset_n": int(sub_mask.sum())},
        "data": data_digest(dataset, indices),
        "seed": int(seed), "batch_size": s["batch_size"], "model_sha256": model_sha256(model),
        "model_check": record, "precision": PRECISION, "metrics": {"audited": audited}, "audit": details,
        "provenance": {**provenance(dev), "wall_time_s": time.perf_counter() - t0},
    }


def _flags(acc: Mapping[str, float | None], sweep: list[dict[str, Any]], sources: Mapping[str, Any],
           s: Mapping[str, Any], autoattack: float | None) -> list[dict[str, str]]:
    flags = []
    pgd20, margin = acc["pgd20"], s["margin_pct"]
    for name in sources:
        t = acc[f"transfer_{name}"]
        if t is not None and t < pgd20 - margin:
            flags.append({"check": f"transfer_{name}", "reason": (
                f"PGD-20 examples transferred from the {name} model leave {t:.2f} % correct, "
                f"{pgd20 - t:.2f} points below white-box PGD-20 ({pgd20:.2f} %): gradient masking suspected")})
    sq, sub20 = acc["subset_square"], acc["subset_pgd20"]
    if sq is not None and sub20 is not None and sq < sub20 - margin:
        flags.append({"check": "square", "reason": (
            f"black-box Square leaves {sq:.2f} % correct on the subset, {sub20 - sq:.2f} points below "
            f"white-box PGD-20 ({sub20:.2f} %) on the same points: gradient masking suspected")})
    top = sweep[-1]
    if top["accuracy_pct"] is not None and top["accuracy_pct"] > s["sweep_max_acc_pct"]:
        flags.append({"check": "eps_sweep", "reason": (
            f"at {top['multiplier']:g} x eps ({top['eps_text']}) PGD leaves {top['accuracy_pct']:.2f} % correct, "
            f"above {s['sweep_max_acc_pct']:g} %: the attack does not reach about 0 at large eps")})
    strong = next(v for k, v in acc.items() if k.startswith("pgd") and k != "pgd20")
    if strong is not None and pgd20 - strong > s["gap_pct"]:
        flags.append({"check": "pgd_strong", "reason": (
            f"PGD-20 ({pgd20:.2f} %) is {pgd20 - strong:.2f} points above PGD with more steps and "
            f"restarts ({strong:.2f} %)")})
    if autoattack is not None and pgd20 - autoattack > s["gap_pct"]:
        flags.append({"check": "autoattack", "reason": (
            f"PGD-20 ({pgd20:.2f} %) is {pgd20 - autoattack:.2f} points above AutoAttack ({autoattack:.2f} %)")})
    return flags


def write_audit(result: Mapping[str, Any], path: str | os.PathLike):
    """Write an audit result as JSON in one atomic rename."""
    return atomic_json_dump(dict(result), path)


__all__ = ["AUDIT_DEFAULTS", "AuditError", "audit_settings", "run_audit", "write_audit"]
