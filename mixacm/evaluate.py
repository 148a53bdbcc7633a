"""Clean, PGD and AutoAttack accuracy of a model on a fixed test subset, resumable per batch.

The points are the first ``n`` of a class-balanced deterministic subset
(``mixacm.data.balanced_first_n``), split into batches in index order. Every (attack, batch) pair
gets its own seed, derived from ``(seed, attack name, batch index)`` only, so a run that is
interrupted and resumed gives the same counts as an uninterrupted one. After each pair the counts
go to a JSON state file (atomic rename), which records what the counts belong to (attacks, eps,
points, seed, batch size, model weights); resuming against a different evaluation is an error,
never a silent mix. The state file is removed once the evaluation completes. (The AutoAttack
packages' own ``state_path`` resume is broken, hence this.)

Robust accuracy of an attack = 100 * #{i : argmax f(attack(x_i)) = y_i} / n.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mixacm.attacks import build_attack
from mixacm.data import balanced_first_n, dataset_labels
from mixacm.provenance import provenance
from mixacm.utils import atomic_json_dump, parse_eps, resolve_device

STATE_FORMAT = "mixacm-eval-state"
RESULT_SCHEMA = 1


class EvaluationStateError(ValueError):
    """A state file that belongs to a different evaluation, or cannot be read."""


def model_sha256(model: nn.Module) -> str:
    """Hash of the model's state dict (names, dtypes, shapes, values) in a device-independent way."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def batch_seed(seed: int, attack: str, batch: int) -> int:
    """The seed of one (attack, batch) pair: independent of run order and interruptions."""
    digest = hashlib.sha256(f"{int(seed)}/{attack}/{int(batch)}".encode()).digest()
    # 31 bits: accepted as a seed by torch, numpy and both AutoAttack packages.
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def eps_text(eps: str | float) -> str:
    """``"8/255"`` for values that are a whole number of 1/255 steps, else the decimal."""
    if isinstance(eps, str):
        return eps.strip()
    steps = round(float(eps) * 255)
    return f"{steps}/255" if abs(steps / 255 - float(eps)) < 1e-12 else repr(float(eps))


def _indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _read_state(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluationStateError(f"evaluation state file {path} is unreadable ({err}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise EvaluationStateError(f"{path} is not a mixacm evaluation state file (format != {STATE_FORMAT!r})")
    old = state.get("key", {})
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if diff:
        details = "; ".join(f"{k}: state has {old.get(k)!r}, this run has {key.get(k)!r}" for k in diff)
        raise EvaluationStateError(
            f"evaluation state file {path} belongs to a different evaluation ({details}); "
            "delete it or pass another state path"
        )
    return state


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    attacks: Sequence[str],
    eps: float | str,
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    state_path: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
    attack_kwargs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` under each attack on the first ``n`` balanced points of ``dataset``.

    ``dataset[i]`` must give ``([0, 1] image tensor, label)``. The model is moved to ``device`` and
    put in eval mode for the evaluation (its previous mode is restored afterwards).
    ``attack_kwargs`` maps an attack name to extra factory keywords (e.g.
    ``{"autoattack": {"backend": "autoattack"}}``). Returns the result dict of
    docs/architecture.md (without the ``run`` section, which the caller knows).
    """
    eps_value = parse_eps(eps)
    attacks = list(attacks)
    if not attacks:
        raise ValueError("no attacks given; valid names include clean, pgd20, autoattack")
    dupes = sorted({a for a in attacks if attacks.count(a) > 1})
    if dupes:
        raise ValueError(f"attack(s) listed twice: {dupes}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    attack_kwargs = attack_kwargs or {}
    # Build every attack first: an unknown name fails before any work or state file.
    built = {name: build_attack(name, eps_value, **attack_kwargs.get(name, {})) for name in attacks}
    dev = resolve_device(device)

    indices = balanced_first_n(dataset_labels(dataset), n)
    batches = [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    key = {
        "attacks": attacks,
        "attack_specs": {name: built[name].spec for name in attacks},
        "eps": eps_value,
        "n": len(indices),
        "indices_sha256": _indices_sha256(indices),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "model_sha256": model_sha256(model),
    }
    state_file = Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.exists():
        state = _read_state(state_file, key)
    else:
        state = {"format": STATE_FORMAT, "version": 1, "key": key, "wall_time_s": 0.0,
                 "done": {name: {} for name in attacks}}
    done: dict[str, dict[str, list[int]]] = state["done"]
    prior_wall = float(state["wall_time_s"])

    pending = [b for b in range(len(batches)) if any(str(b) not in done[a] for a in attacks)]
    total = len(batches) * len(attacks)
    t0 = time.perf_counter()
    was_training = model.training
    model.to(dev).eval()
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in pending], num_workers=num_workers)
    # One step = one attack on one batch; the postfix names the step running now (one AutoAttack
    # step can take minutes on a CPU), then the accuracy of the step just finished.
    bar = tqdm(total=total, initial=total - sum(str(b) not in done[a] for b in pending for a in attacks),
               desc="evaluate (attack x batch)", unit="step", disable=not progress)
    try:
        for b, (x, y) in zip(pending, loader):
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            for name in attacks:
                if str(b) in done[name]:
                    continue
                bar.set_postfix_str(f"running {name} on batch {b + 1}/{len(batches)}")
                x_adv = built[name](model, x, y, seed=batch_seed(seed, name, b))
                with torch.no_grad():
                    correct = int((model(x_adv).argmax(1) == y).sum())
                done[name][str(b)] = [correct, len(y)]
                state["wall_time_s"] = prior_wall + time.perf_counter() - t0
                if state_file is not None:
                    atomic_json_dump(state, state_file)
                bar.set_postfix_str(f"{name} batch {b + 1}: {100.0 * correct / len(y):.1f}%")
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)

    metrics = {}
    for name in attacks:
        correct = sum(c for c, _ in done[name].values())
        count = sum(k for _, k in done[name].values())
        metrics[name] = {"accuracy_pct": 100.0 * correct / count, "correct": correct, "n": count,
                         "attack": built[name].spec}
    result = {
        "schema": RESULT_SCHEMA,
        "eps": eps_value,
        "eps_text": eps_text(eps),
        "n": len(indices),
        "subset": {"selection": "balanced_first_n", "indices_sha256": key["indices_sha256"]},
        "seed": int(seed),
        "batch_size": int(batch_size),
        "model_sha256": key["model_sha256"],
        "metrics": metrics,
        "provenance": {**provenance(dev), "wall_time_s": prior_wall + time.perf_counter() - t0},
    }
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    return result


def write_result(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a result dict as JSON in one atomic rename."""
    return atomic_json_dump(result, path)
