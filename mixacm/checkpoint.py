"""Model files: one format for teachers, trained students and final models.

A model file is a ``torch.save`` of::

    {"format": "mixacm-model", "version": 1,
     "model": {"name": "wrn-34-10", "num_classes": 10, "kwargs": {...}},   # the spec
     "state_dict": {...}, "meta": {...}}

The spec rebuilds the architecture through the model registry, so a file needs no code beside it,
and the weights load with strict key matching. Everything in it is plain data (tensors, numbers,
strings, lists, dicts), so files load with ``torch.load(weights_only=True)`` and never run pickled
code. Besides this format, ``load_foreign_state_dict`` reads raw state dicts published elsewhere
(e.g. the teachers in ``../shared/models``) into a registered architecture, and ``load_any_model``
also accepts a TorchScript file (a foreign model that takes [0, 1] images).

Every failure raises ``CheckpointError`` naming the file and the cause.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mixacm.models import MODELS, FeatureClassifier
from mixacm.models.base import unwrap_state_dict
from mixacm.utils import atomic_torch_save, resolve_device

FORMAT = "mixacm-model"
VERSION = 1
SPEC_KEYS = ("name", "num_classes", "kwargs")
_SHOW = 5  # mismatched keys listed in an error message


class CheckpointError(Exception):
    """A model file that cannot be read or does not match its architecture."""


def model_spec(name: str, num_classes: int = 10, **kwargs: Any) -> dict:
    """The architecture part of a model file: ``{"name", "num_classes", "kwargs"}``."""
    spec = {"name": name, "num_classes": int(num_classes), "kwargs": dict(kwargs)}
    validate_spec(spec)
    return spec


def validate_spec(spec: Any) -> dict:
    """Check a spec's shape and that its name is registered; raise ValueError/KeyError if not."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"model spec must be a dict with keys {list(SPEC_KEYS)}, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    extra = [k for k in spec if k not in SPEC_KEYS]
    if missing or extra:
        raise ValueError(f"model spec {dict(spec)!r}: missing keys {missing}, unexpected keys {extra}")
    if not isinstance(spec["name"], str):
        raise ValueError(f"model spec name must be a string, got {spec['name']!r}")
    if isinstance(spec["num_classes"], bool) or not isinstance(spec["num_classes"], int) or spec["num_classes"] < 1:
        raise ValueError(f"model spec num_classes must be a positive integer, got {spec['num_classes']!r}")
    if not isinstance(spec["kwargs"], Mapping):
        raise ValueError(f"model spec kwargs must be a dict, got {spec['kwargs']!r}")
    for key, value in spec["kwargs"].items():
        # Plain values only: the spec is stored in files read with weights_only=True.
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f"model spec kwarg {key!r} = {value!r} is not plain data (numbers, "
                             "strings, lists, dicts)") from None
    MODELS.get(spec["name"])  # KeyError listing the valid names
    return dict(spec)


def build_from_spec(spec: Mapping[str, Any]) -> FeatureClassifier:
    """Build the (randomly initialised) model a spec describes."""
    spec = validate_spec(spec)
    return MODELS.get(spec["name"])(num_classes=spec["num_classes"], **spec["kwargs"])


def _unwrap(model: nn.Module) -> nn.Module:
    # Save the bare network: DDP/DataParallel add "module.", torch.compile adds "_orig_mod.".
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _plain(meta: Mapping[str, Any] | None) -> dict:
    # A JSON round trip turns Paths, tuples and numpy scalars into plain data, which keeps the
    # file loadable with weights_only=True.
    return json.loads(json.dumps(dict(meta or {}), default=str))


def _mismatch(model: nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """Describe how ``state_dict`` differs from ``model``'s (keys and shapes), or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != v.shape
    ]
    not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], Tensor)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes), ("non-tensor values", not_tensors)):
        if items:
            more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    return "; ".join(parts) or None


def save_model_file(model: nn.Module, spec: Mapping[str, Any], path: str | os.PathLike,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with its spec and metadata to ``path`` atomically.

    The weights are checked against the spec's architecture first (built on the meta device, so
    no memory is spent), so a file that could not be loaded back is never written.
    """
    spec = validate_spec(spec)
    model = _unwrap(model)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        reference = build_from_spec(spec)
    problem = _mismatch(reference, state_dict)
    if problem:
        raise CheckpointError(f"not saving {path}: the weights do not match spec {spec}: {problem}")
    blob = {"format": FORMAT, "version": VERSION, "model": spec, "state_dict": state_dict,
            "meta": _plain(meta)}
    return atomic_torch_save(blob, path)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's WeightsUnpickler names what it refused, e.g. "Unsupported global: GLOBAL argparse.Namespace".
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_error(path: Path, exc: BaseException) -> str:
    """One plain-text line on why ``torch.load(path, weights_only=True)`` failed.

    A file refused for pickling code (a whole module, ``argparse.Namespace``, numpy scalars) is
    named with the global torch refused and what to do; other failures (corrupt, truncated, not a
    torch file) get torch's own reason in one line, without the terminal colour codes torch puts
    in its message.
    """
    text = " ".join(_ANSI.sub("", str(exc)).split())
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return (f"{path}: torch.load(weights_only=True) refuses this file: it pickles the global "
                f"{refused.group(1)}, which could run code when loaded. If you trust the file, re-save its "
                f"weights as a plain state dict: torch.save(torch.load({str(path)!r}, weights_only=False)"
                f"['state_dict'], 'weights.pt') (for a pickled whole module: its .state_dict())")
    unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    first = unpickler.group(1) if unpickler else re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return f"{path}: not a readable torch file (corrupt, truncated or not a torch.save file): {type(exc).__name__}: {first}"


def _read(path: Path, device: torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickle, zip and EOF errors all mean the same thing here
        raise CheckpointError(load_error(path, exc)) from exc


def _load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, what: str) -> None:
    problem = _mismatch(model, state_dict)
    if problem:
        raise CheckpointError(f"{path}: weights do not match {what}: {problem}")
    model.load_state_dict(state_dict, strict=True)


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[FeatureClassifier, dict]:
    """Load a mixacm model file; returns the model in eval mode and the file's dict minus weights."""
    path = Path(path)
    dev = resolve_device(device)
    blob = _read(path, dev)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        hint = ""
        if isinstance(blob, dict) and "format" not in blob:
            hint = (" (a raw state dict? read it with mixacm.checkpoint.load_foreign_state_dict "
                    "or convert it with `mixacm teacher`)")
        raise CheckpointError(f"{path}: not a {FORMAT} file (format: {found!r}){hint}")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported {FORMAT} version {blob.get('version')!r}; "
                              f"this code reads version {VERSION}")
    for key in ("model", "state_dict", "meta"):
        if key not in blob:
            raise CheckpointError(f"{path}: {FORMAT} file lacks the {key!r} entry")
    try:
        model = build_from_spec(blob["model"])
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else exc
        raise CheckpointError(f"{path}: cannot build the architecture: {msg}") from exc
    if not isinstance(blob["state_dict"], Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(blob['state_dict']).__name__}, not a dict")
    _load_strict(model, blob["state_dict"], path, f"architecture {blob['model']}")
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.to(dev).eval(), info


def load_foreign_state_dict(path: str | os.PathLike, arch: str, num_classes: int = 10,
                            key: str | None = "state_dict", device: str | torch.device = "cpu",
                            **kwargs: Any) -> FeatureClassifier:
    """Load a raw state dict published outside this project into the registered ``arch``.

    ``key`` is the entry holding the weights (``None``: the file is the state dict itself). The
    model's ``adapt_state_dict`` maps upstream key names (and adds the normalisation buffers);
    then keys and shapes must match exactly. Returns the model in eval mode.
    """
    path = Path(path)
    dev = resolve_device(device)
    try:
        model = MODELS.get(arch)(num_classes=num_classes, **kwargs)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}") from exc
    blob = _read(path, dev)
    if key is not None:
        if not isinstance(blob, Mapping) or key not in blob:
            found = list(blob)[:10] if isinstance(blob, Mapping) else type(blob).__name__
            raise CheckpointError(f"{path}: no {key!r} entry holding the weights (found: {found})")
        blob = blob[key]
    if not isinstance(blob, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(blob).__name__}")
    adapted = model.adapt_state_dict(blob)
    problem = _mismatch(model, adapted)
    if problem:
        _, stripped = unwrap_state_dict(blob, model.state_dict().keys())
        removed = f" after removing the wrapper prefix {''.join(stripped)!r}" if stripped else ""
        raise CheckpointError(
            f"{path}: weights do not match architecture {arch!r}{removed}: {problem}. If the file "
            "holds a wrapped network, re-save the bare one's weights: torch.save(net.state_dict(), "
            "'weights.pt') with net = model.module (DataParallel/DDP), model._orig_mod (torch.compile) "
            "or RobustBench's model.model; otherwise check --arch and its kwargs")
    model.load_state_dict(adapted, strict=True)
    return model.to(dev).eval()


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives hold compiled code under "<archive>/code/"; torch.save files do not.
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_exported_program(path: Path) -> bool:
    # torch.export.save writes a zip archive whose "<archive>/archive_format" entry reads "pt2".
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            entry = next((n for n in zf.namelist() if n.split("/", 1)[-1] == "archive_format"), None)
            return entry is not None and zf.read(entry).strip() == b"pt2"
    except (zipfile.BadZipFile, OSError):
        return False


DYNAMIC_EXPORT = "torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))"


def exported_batch_sizes(program: Any) -> tuple[int, float]:
    """``(smallest, largest)`` batch size a ``torch.export`` program accepts for its first input:
    the same number twice for a static batch, ``inf`` for no upper bound."""
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    batch = node.meta["val"].shape[0]
    if isinstance(batch, int):
        return batch, batch
    ranges = program.range_constraints.get(batch.node.expr)
    if ranges is None:
        return 1, math.inf
    upper = float(ranges.upper) if ranges.upper.is_finite else math.inf
    return max(1, int(ranges.lower)), upper


def _batch_text(lo: int, hi: float) -> str:
    if lo == hi:
        return f"only batches of exactly {lo} image{'s' * (lo != 1)} (a static batch dimension)"
    return f"batches of {lo} to {'any size' if hi == math.inf else int(hi)} images"


class ExportedModel(nn.Module):
    """A ``torch.export`` program (``.pt2``) as a module. Its train/eval behaviour was fixed when
    it was exported (export a model in eval mode), and the graph module refuses ``.eval()``, so
    ``train()`` / ``eval()`` here only set the flag that the evaluation code saves and restores.
    ``batch_sizes`` is the program's accepted range; a batch outside it is a one-line
    ``CheckpointError`` rather than torch's guard failure."""

    def __init__(self, program: nn.Module, batch_sizes: tuple[int, float] = (1, math.inf),
                 path: str = "torch.export program") -> None:
        super().__init__()
        self.program = program
        self.batch_sizes = batch_sizes
        self.path = path

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.batch_sizes
        if not lo <= len(x) <= hi:
            raise CheckpointError(
                f"{self.path}: the exported program accepts {_batch_text(lo, hi)}, not {len(x)}; use "
                f"--batch-size within that range, or re-export it with a dynamic batch: {DYNAMIC_EXPORT}")
        return self.program(x)


def load_any_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a mixacm model file, a ``torch.export`` program (``.pt2``) or a TorchScript file (a
    foreign model taking [0, 1] images and returning logits; torch 2.14 deprecates TorchScript
    in favour of torch.export).

    Returns the model in eval mode and the file's information: for a mixacm file the dict minus
    weights, else ``{"format": "torch.export" | "torchscript", "model": {"name": <format>}, "meta": {}}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if _is_exported_program(path):
        dev = resolve_device(device)
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable torch.export file: {type(exc).__name__}: {exc}") from exc
        lo, hi = exported_batch_sizes(program)
        if lo > 1:  # the model check runs one image alone; a static batch of 64 cannot run it
            raise CheckpointError(
                f"{path}: this torch.export program accepts {_batch_text(lo, hi)}, but evaluation "
                f"runs batches of any size from 1 up; re-export it with a dynamic batch: {DYNAMIC_EXPORT}")
        # An exported program is moved between devices as a program, then unwrapped.
        if dev.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, dev)
        model = ExportedModel(program.module(), (lo, hi), str(path))
        return model.eval(), {"format": "torch.export", "model": {"name": "torch.export"}, "meta": {}}
    if _is_torchscript(path):
        dev = resolve_device(device)
        try:
            # torch marks TorchScript deprecated, but it is the format users export foreign models in.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(path), map_location=dev)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable TorchScript file: {type(exc).__name__}: {exc}") from exc
        return model.eval(), {"format": "torchscript", "model": {"name": "torchscript"}, "meta": {}}
    return load_model_file(path, device)
