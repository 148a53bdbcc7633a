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

On a GPU (``resolve_batch_size``): the batch size ``"auto"`` is sized to the device by one rule,
and ``cudnn.benchmark`` is on for the evaluation. Attacks run in fp32 (autocast off) unless
``precision="bf16"`` asks for bf16 autocast; the result records what really ran
(``precision``: fp32, tf32 or bf16, and ``precision_detail``, ``mixacm.provenance.compute_precision``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from mixacm.attacks import build_attack
from mixacm.data import balanced_first_n, data_digest, dataset_labels
from mixacm.provenance import compute_precision, provenance
from mixacm.utils import atomic_json_dump, format_eps, parse_eps, resolve_device

STATE_FORMAT = "mixacm-eval-state"
# Evaluation runs with autocast off unless asked (``precision``); the result records the real
# arithmetic (TF32 on Ampere and newer GPUs included). PRECISION is the default's name.
PRECISION = "fp32"
PRECISIONS = ("fp32", "bf16")
# 2: the evaluated data's identity (``data``) in every result.
RESULT_SCHEMA = 2

# The batch-size rule of ``resolve_batch_size``: on the CPU ``DEFAULT_BATCH_SIZE``; on a GPU as
# many images as fit in ``BATCH_MEMORY_FRACTION`` of the free device memory at the measured
# memory of one attack step per image, rounded down to a multiple of 8, capped at ``BATCH_CAP``.
DEFAULT_BATCH_SIZE = 256
BATCH_CAP = 1024
BATCH_MEMORY_FRACTION = 0.5
PROBE_IMAGES = 16


class EvaluationStateError(ValueError):
    """A state file that belongs to a different evaluation, or cannot be read."""


class ModelCheckError(ValueError):
    """The model handed to ``evaluate`` fails the first-batch check (one line, before any attack)."""


# The one rule for models whose forward does not return a logits tensor (recorded in results).
OUTPUT_RULE = "logits tensor as is; tuple or list: element 0; dict: its 'logits' entry"


def _select_logits(out: Any) -> tuple[Any, str]:
    """Apply OUTPUT_RULE: ``(logits or None, how)`` where how names the rule that applied."""
    if isinstance(out, torch.Tensor):
        return out, "tensor"
    if isinstance(out, (tuple, list)):
        return (out[0] if out else None), f"{type(out).__name__}[0]"
    if isinstance(out, dict):
        return out.get("logits"), "dict['logits']"
    return None, type(out).__name__


class LogitsOf(nn.Module):
    """A model whose forward returns a tuple/list or dict, seen through OUTPUT_RULE as logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _select_logits(self.model(x))[0]


def dataset_num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset from ``mixacm.data`` (Subsets followed), else max label + 1."""
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    k = getattr(base, "num_classes", None)
    return int(k) if k is not None else int(dataset_labels(dataset).max()) + 1


# Attacks meant for a randomised model: clean accuracy (one draw of the randomness per image) and
# AutoAttack's rand version (APGD-CE and APGD-DLR with expectation over transformation).
RANDOMNESS_ATTACKS = "clean, autoattack-rand"


def handles_randomness(spec: dict[str, Any]) -> bool:
    """Whether the attack with ``spec`` is meant for a randomised model (``RANDOMNESS_ATTACKS``)."""
    return spec.get("name") == "clean" or spec.get("aa_version") == "rand"


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_model(model: nn.Module, x: Tensor, num_classes: int, *,
                allow_random: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Check ``model`` on one batch ``x`` before any attack; return ``(logits model, record)``.

    Checks, each failing with one ``ModelCheckError`` line: the output is a logits tensor, or a
    tuple/list/dict from which OUTPUT_RULE picks one; it is floating point, of shape
    ``len(x) x num_classes`` (the dataset's classes), finite, not probabilities (a softmax output
    masks the attacks' gradients). Then two passes over the same batch:
    when they differ the model is randomised (noise on the input, dropout left on), which is
    refused unless ``allow_random`` (the attacks are all meant for it, ``RANDOMNESS_ATTACKS``:
    PGD without expectation over the randomness overestimates robustness); a deterministic model
    must not depend on the rest of the batch (the first sample alone and the batch reversed give
    the same logits within a tolerance; BatchNorm in training mode fails this). The record goes
    into the result as ``model_check``.
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        out = model(x)
        logits, how = _select_logits(out)
        if not isinstance(logits, torch.Tensor):
            raise ModelCheckError(
                f"model output is {how} without a logits tensor; the rule is: {OUTPUT_RULE}")
        if not logits.is_floating_point():
            raise ModelCheckError(f"model logits have dtype {logits.dtype}; expected a floating-point tensor")
        if logits.dim() != 2 or logits.shape[0] != len(x):
            raise ModelCheckError(
                f"model logits have shape {tuple(logits.shape)}; expected {len(x)} x {num_classes} "
                f"(batch x classes)")
        if logits.shape[1] != num_classes:
            raise ModelCheckError(
                f"model has {logits.shape[1]} outputs but the dataset has {num_classes} classes")
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).any(1).sum())
            raise ModelCheckError(f"model logits are not finite (NaN or inf) for {bad} of {len(x)} images")
        ref = logits.float()
        if bool(((ref >= 0) & (ref <= 1)).all()) and float((ref.sum(1) - 1).abs().max()) < 1e-4:
            raise ModelCheckError(
                "model outputs are probabilities (every row in [0, 1], summing to 1): cross-entropy and DLR "
                "attacks on a softmax output see vanishing gradients; return the logits (drop the final softmax)")
        wrapped = model if how == "tensor" else LogitsOf(model)
        # Float sums in another batch order or size differ by rounding only.
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        randomness = _max_abs(wrapped(x), ref)
        deviation: float | None = 0.0
        if randomness > tol:
            if not allow_random:
                raise ModelCheckError(
                    f"the model is randomised: two passes over the same batch differ by up to {randomness:.3g} "
                    f"(noise on the input, or dropout left on?); PGD without expectation over the randomness "
                    f"overestimates its robustness, so evaluate it with --attacks {RANDOMNESS_ATTACKS.replace(' ', '')}")
            deviation = None  # another draw differs anyway: batch dependence cannot be told apart
        elif len(x) > 1:
            deviation = max(_max_abs(wrapped(x[:1]), ref[:1]), _max_abs(wrapped(x.flip(0)).flip(0), ref))
            if deviation > tol:
                raise ModelCheckError(
                    f"a sample's logits depend on the rest of the batch (max difference {deviation:.3g} > "
                    f"{tol:.3g}; two passes over the same batch agree, so this is not randomness); is the "
                    "model in training mode (BatchNorm batch statistics)?")
    record = {"output": how, "output_rule": OUTPUT_RULE, "num_outputs": int(logits.shape[1]),
              "num_classes": int(num_classes), "logits_dtype": str(logits.dtype).replace("torch.", ""),
              "randomised": randomness > tol, "repeat_max_abs": randomness,
              "batch_dependence_max_abs": deviation, "checked_images": len(x)}
    return wrapped, record


def check_inputs(x: Tensor, y: Tensor, num_classes: int, where: str = "the first batch") -> None:
    """Refuse (ValueError, one line) images that are not floating point in [0, 1], or labels
    outside ``[0, num_classes)``: a dataset of normalised images or of uint8 0-255 pixels would
    otherwise be attacked with an eps meant for [0, 1] and give numbers."""
    if not x.is_floating_point():
        hint = " (0-255 pixels? scale them: x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"dataset images of {where} are {str(x.dtype).replace('torch.', '')}{hint}; "
                         "evaluate takes float images in [0, 1] (the model normalises inside)")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):
        hint = ("normalised images? give [0, 1] pixels and put the normalisation inside the model"
                if lo < 0 else "0-255 pixels? scale them to [0, 1]")
        raise ValueError(f"dataset images of {where} range over [{lo:.4g}, {hi:.4g}], outside [0, 1] ({hint}); "
                         "eps is a fraction of the [0, 1] pixel range")
    if y.dtype.is_floating_point or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"dataset labels of {where} span [{y.min().item()}, {y.max().item()}]; expected "
                         f"integers in [0, {num_classes}) for {num_classes} classes")


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


def _attack_step_bytes_per_image(model: nn.Module, x: Tensor) -> float:
    """Peak CUDA memory of one attack step (fp32 forward + input gradient, the model in eval
    mode) on the probe batch ``x``, above what was allocated before, per image."""
    dev = x.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device_type="cuda", enabled=False):
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else _select_logits(out)[0]
        torch.autograd.grad(logits.float().logsumexp(1).sum(), x)
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / len(x)


def check_batch_and_precision(batch_size: int | str, precision: str = PRECISION) -> None:
    """ValueError unless ``batch_size`` is an integer >= 1 or "auto" and ``precision`` one of PRECISIONS."""
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                 or int(batch_size) < 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1 or 'auto'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: valid: {', '.join(PRECISIONS)}")


def resolve_batch_size(batch_size: int | str, model: nn.Module, dataset: Dataset, indices: np.ndarray,
                       device: torch.device, state_file: Path | None = None) -> tuple[int, dict[str, Any]]:
    """The evaluation batch size and how it was chosen: ``(size, record)``.

    An integer is used as given (``>= 1``, else ValueError). ``"auto"``: the batch size of the
    state file being resumed (so a resumed evaluation keeps its batches and seeds); else, on the
    CPU, ``DEFAULT_BATCH_SIZE``; on a GPU, the rule of the module constants:
    ``min(BATCH_CAP, floor(BATCH_MEMORY_FRACTION * free / per_image))`` rounded down to a multiple
    of 8 (at least 1), where ``free`` is ``torch.cuda.mem_get_info``'s free memory with the model
    on the device and ``per_image`` the peak memory of one attack step (forward + input gradient
    in fp32) measured once on ``PROBE_IMAGES`` points. AutoAttack's attacks hold a handful of
    image-sized tensors per point beside the same activations (FAB-T and Square no more than
    APGD), so one rule serves PGD and AutoAttack; the half of free memory left covers those and
    the allocator's fragmentation.
    """
    check_batch_and_precision(batch_size)
    if batch_size != "auto":
        return int(batch_size), {"rule": "given"}
    if state_file is not None and state_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads(state_file.read_text())["key"]["batch_size"]), {"rule": "auto: the resumed state file's"}
    if device.type != "cuda":
        return DEFAULT_BATCH_SIZE, {"rule": f"auto: {DEFAULT_BATCH_SIZE} on the {device.type}"}
    was_training = model.training
    model.to(device).eval()
    try:
        probe = torch.stack([dataset[int(i)][0] for i in indices[:PROBE_IMAGES]]).to(device)
        per_image = _attack_step_bytes_per_image(model, probe)
    finally:
        model.train(was_training)
    free, total = torch.cuda.mem_get_info(device)
    fit = math.floor(BATCH_MEMORY_FRACTION * free / max(per_image, 1.0))
    size = max(1, min(BATCH_CAP, fit // 8 * 8 or fit))
    return size, {"rule": f"auto: min({BATCH_CAP}, {BATCH_MEMORY_FRACTION} x free memory / attack-step memory "
                          "per image), a multiple of 8",
                  "per_image_mib": per_image / 2**20, "free_gib": free / 2**30, "total_gib": total / 2**30}


@contextlib.contextmanager
def evaluation_backend(device: torch.device) -> Any:
    """cuDNN picks its fastest convolution algorithms for the evaluation's shapes
    (``cudnn.benchmark``, restored afterwards); nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class AutocastLogits(nn.Module):
    """``model`` run under autocast of ``dtype``, its logits returned in fp32: what ``precision``
    ``"bf16"`` attacks (the attacks themselves, AutoAttack's included, then see fp32 logits)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.model(x).float()


def precision_record(device: torch.device, precision: str) -> tuple[str, dict[str, Any]]:
    """``(label, detail)`` of an evaluation in ``precision`` ("fp32" or "bf16") on ``device``:
    label "fp32", "tf32" (fp32 convolutions or matrix products in TF32, Ampere+) or "bf16"."""
    check_batch_and_precision("auto", precision)
    detail = compute_precision(device, None if precision == "fp32" else precision)
    return str(detail["label"]), {**detail, "requested": precision}


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    attacks: Sequence[str],
    eps: float | str,
    n: int | None = None,
    batch_size: int | str = "auto",
    seed: int = 0,
    device: str | torch.device = "auto",
    state_path: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
    attack_kwargs: dict[str, dict[str, Any]] | None = None,
    precision: str = PRECISION,
) -> dict[str, Any]:
    """Accuracy of ``model`` under each attack on the first ``n`` balanced points of ``dataset``.

    ``dataset[i]`` must give ``([0, 1] image tensor, label)``. The model is moved to ``device`` and
    put in eval mode for the evaluation (its previous mode is restored afterwards).
    ``attack_kwargs`` maps an attack name to extra factory keywords (e.g.
    ``{"autoattack": {"backend": "autoattack"}}``). ``batch_size`` is a number or ``"auto"``
    (``resolve_batch_size``: the CPU's default, sized to the device on a GPU); ``precision``
    "fp32" (autocast off) or "bf16" (the attacks and the scoring under bf16 autocast). Returns the
    result dict of docs/architecture.md (without the ``run`` section, which the caller knows).
    """
    eps_value = parse_eps(eps)
    attacks = list(attacks)
    check_batch_and_precision(batch_size, precision)
    num_classes = dataset_num_classes(dataset)
    built = _build_attacks(attacks, eps_value, attack_kwargs or {}, num_classes)
    dev = resolve_device(device)

    indices = balanced_first_n(dataset_labels(dataset), n)
    state_file = Path(state_path) if state_path is not None else None
    batch_size, batch_rule = resolve_batch_size(batch_size, model, dataset, indices, dev, state_file)
    precision_label, precision_detail = precision_record(dev, precision)
    batches = [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    # What the counts are of: the evaluated images and labels themselves, not where they came from.
    data = data_digest(dataset, indices)
    key = {
        "attacks": attacks,
        "attack_specs": {name: built[name].spec for name in attacks},
        "eps": eps_value,
        "n": len(indices),
        "indices_sha256": _indices_sha256(indices),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "model_sha256": model_sha256(model),
        "precision": precision,
        "data_sha256": data["sha256"],
    }
    state = _read_state(state_file, key) if state_file is not None and state_file.exists() else {
        "format": STATE_FORMAT, "version": 1, "key": key, "wall_time_s": 0.0, "done": {a: {} for a in attacks}}
    t0, prior_wall = time.perf_counter(), float(state["wall_time_s"])
    was_training = model.training
    model.to(dev).eval()
    # The one input and model check, on the first batch, before any attack or state file.
    try:
        x0 = checked_first_batch(dataset, batches[0], num_classes).to(dev)
        attacked, model_check = check_model(
            model, x0, num_classes, allow_random=all(handles_randomness(built[a].spec) for a in attacks))
    except (ModelCheckError, ValueError):
        model.train(was_training)
        raise
    if precision != "fp32":
        attacked = AutocastLogits(attacked, torch.bfloat16)
    try:
        _attack_batches(attacked, dataset, batches, built, state, state_file, dev=dev, seed=seed,
                        num_classes=num_classes, randomised=model_check["randomised"], progress=progress,
                        num_workers=num_workers)
    finally:
        model.train(was_training)

    result = _result(eps, key, batch_rule, data, model_check, (precision_label, precision_detail),
                     _metrics(state["done"], built), {**provenance(dev), "wall_time_s": prior_wall + time.perf_counter() - t0})
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    return result


def _result(eps: float | str, key: dict[str, Any], batch_rule: str, data: dict[str, Any],
            model_check: dict[str, Any], precision: tuple[str, Any], metrics: dict[str, Any],
            prov: dict[str, Any]) -> dict[str, Any]:
    """The result dict of ``evaluate`` (docs/architecture.md) from its parts."""
    return {
        "schema": RESULT_SCHEMA,
        "eps": key["eps"],
        "eps_text": format_eps(eps),
        "n": key["n"],
        "subset": {"selection": "balanced_first_n", "indices_sha256": key["indices_sha256"]},
        "data": data,
        "seed": key["seed"],
        "batch_size": key["batch_size"],
        "batch_size_rule": batch_rule,
        "model_sha256": key["model_sha256"],
        "model_check": model_check,
        "precision": precision[0],
        "precision_detail": precision[1],
        "metrics": metrics,
        "provenance": prov,
    }


def _build_attacks(attacks: list[str], eps: float, attack_kwargs: dict[str, dict[str, Any]],
                   num_classes: int) -> dict[str, Any]:
    """Every attack, built before any work or state file (an unknown name fails here), with
    AutoAttack's targeted attacks fitted to the class count or refused up front."""
    if not attacks:
        raise ValueError("no attacks given; valid names include clean, pgd20, autoattack")
    dupes = sorted({a for a in attacks if attacks.count(a) > 1})
    if dupes:
        raise ValueError(f"attack(s) listed twice: {dupes}")
    built = {name: build_attack(name, eps, **attack_kwargs.get(name, {})) for name in attacks}
    for attack in built.values():
        adapt = getattr(attack, "adapt_to_classes", None)
        if adapt is not None:
            adapt(num_classes)
    return built


def _attack_batches(attacked: Callable[[Tensor], Tensor], dataset: Dataset, batches: list[list[int]],
                    built: dict[str, Any], state: dict, state_file: Path | None, *, dev: torch.device, seed: int,
                    num_classes: int, randomised: bool, progress: bool, num_workers: int) -> None:
    """Run every (batch, attack) step not yet in ``state["done"]``, recording ``[correct, n]``
    after each (and writing ``state_file``, so a kill loses at most the step running)."""
    attacks, done = list(built), state["done"]
    prior_wall, t0 = float(state["wall_time_s"]), time.perf_counter()
    pending = [b for b in range(len(batches)) if any(str(b) not in done[a] for a in attacks)]
    total = len(batches) * len(attacks)
    # A randomised model draws from the global RNG: seeded per (attack, batch), its counts do not
    # depend on interruptions either.
    draws = _seeded_draws if randomised else _no_seed
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in pending], num_workers=num_workers)
    # One step = one attack on one batch; the postfix names the step running now (one AutoAttack
    # step can take minutes on a CPU), then the accuracy of the step just finished.
    bar = tqdm(total=total, initial=total - sum(str(b) not in done[a] for b in pending for a in attacks),
               desc="evaluate (attack x batch)", unit="step", disable=not progress)
    # Autocast off whatever context the caller is in (bf16 comes only from AutocastLogits).
    with torch.autocast(device_type=dev.type, enabled=False), evaluation_backend(dev):
        try:
            for b, (x, y) in zip(pending, loader):
                x, y = x.to(dev), torch.as_tensor(y).to(dev)
                check_inputs(x, y, num_classes, where=f"batch {b + 1}")
                for name in attacks:
                    if str(b) in done[name]:
                        continue
                    bar.set_postfix_str(f"running {name} on batch {b + 1}/{len(batches)}")
                    with draws(dev, batch_seed(seed, name, b)):
                        x_adv = built[name](attacked, x, y, seed=batch_seed(seed, name, b))
                        with torch.no_grad():
                            correct = int((attacked(x_adv).argmax(1) == y).sum())
                    done[name][str(b)] = [correct, len(y)]
                    state["wall_time_s"] = prior_wall + time.perf_counter() - t0
                    if state_file is not None:
                        atomic_json_dump(state, state_file)
                    bar.set_postfix_str(f"{name} batch {b + 1}: {100.0 * correct / len(y):.1f}%")
                    bar.update(1)
        finally:
            bar.close()


def _metrics(done: dict[str, dict[str, list[int]]], built: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each attack's accuracy (percent), its counts and its spec, summed over the batches."""
    metrics = {}
    for name, attack in built.items():
        correct = sum(c for c, _ in done[name].values())
        count = sum(k for _, k in done[name].values())
        metrics[name] = {"accuracy_pct": 100.0 * correct / count, "correct": correct, "n": count,
                         "attack": attack.spec}
    return metrics


def checked_first_batch(dataset: Dataset, indices: Sequence[int], num_classes: int) -> Tensor:
    """The first batch's images, after ``check_inputs``; read twice, since a test split that
    returns another image for the same index (augmentation left on) changes every count."""
    items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(img) for img, _ in items])
    # labels collated as the DataLoader of the evaluation will collate them
    check_inputs(x, torch.as_tensor(default_collate([label for _, label in items])), num_classes)
    again = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
    if not torch.equal(x, again):
        raise ValueError("the dataset returns another image for the same index on a second read "
                         "(random augmentation on the test split?); evaluate needs fixed images")
    return x


@contextlib.contextmanager
def _seeded_draws(device: torch.device, seed: int) -> Iterator[None]:
    """The global RNG (CPU and ``device``) seeded with ``seed`` inside, restored after."""
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _no_seed(device: torch.device, seed: int) -> Iterator[None]:
    yield


def write_result(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a result dict as JSON in one atomic rename."""
    return atomic_json_dump(result, path)
