"""Teacher acquisition: a robust pre-trained network, written as a mixacm model file.

MixACM distils from a frozen robust teacher (method.md section 1). A teacher comes from one of
three sources, each a dict (``mixacm teacher`` builds one from its flags):

* ``{"robustbench": NAME, "dataset": "cifar10", "threat_model": "Linf", "arch": "wrn-34-10"}``:
  RobustBench's ``load_model`` (optional dependency; its downloads need internet).
* ``{"url": URL, "sha256": HEX, "arch": ..., "key": "state_dict" | None}``: downloaded with
  urllib (``http(s)://`` or ``file://``) to a temporary file beside the output; the checksum is
  required and checked before anything is read.
* ``{"path": FILE, "arch": ..., "sha256": optional, "key": ...}``: a local file.

The pipeline config's ``teachers.<dataset>`` block is translated into one of these at the
boundary where that config is read (``mixacm.config.teacher_source``); this module does not know
its shape.

Two optional keys of every source say what a foreign file cannot: ``normalization``
(``"none"`` for a network that takes raw [0, 1] pixels, its normalisation folded into the first
layer; ``{"mean": [...], "std": [...]}``; absent: the file's RobustBench normaliser if it has one,
else the architecture's default) and ``check`` (the accuracy check below). ``stated_clean_acc``
(percent) states the accuracy the teacher should have.

Accuracy check (``check_teacher_accuracy``): where test data is at hand, the imported teacher's
clean accuracy is measured on the first ``check.n`` class-balanced test points and compared with
the stated accuracy (``stated_clean_acc``, else the ``test_acc`` / ``clean_acc`` stored in the
file, read as a fraction when <= 1). A difference above ``check.margin_pct`` points is refused
(``on_mismatch: refuse``, the default: TeacherError with both numbers, nothing written) or
recorded with a warning (``warn``). The result goes into the file's meta as ``accuracy_check``.

A file is either already a mixacm model file (``arch`` not needed) or a foreign state dict read
strictly into the registered architecture ``arch`` (``kwargs`` are its constructor arguments,
``key`` the entry that holds the weights; default ``"state_dict"``, falling back to the file
itself when there is no such entry). The output is written atomically, so a wrong checksum, an
unreadable file or a key mismatch raises :class:`TeacherError` and leaves no file behind.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mixacm.checkpoint import (FORMAT, CheckpointError, load_error, load_foreign_state_dict, load_model_file,
                               model_spec, save_model_file)
from mixacm.provenance import provenance
from mixacm.utils import sha256_file

_KINDS = ("robustbench", "url", "path")
_COMMON = {"arch", "kwargs", "dataset", "normalization", "check", "stated_clean_acc"}
_ALLOWED = {
    "robustbench": {"robustbench", "threat_model", "model_dir"} | _COMMON,
    "url": {"url", "sha256", "key"} | _COMMON,
    "path": {"path", "sha256", "key"} | _COMMON,
}
# The accuracy check's settings and their defaults.
CHECK_DEFAULTS = {"n": 1000, "margin_pct": 3.0, "on_mismatch": "refuse"}
# Keys of a foreign file that state its clean test accuracy (fractions when <= 1).
_STATED_KEYS = ("clean_acc", "test_acc", "clean_accuracy", "accuracy")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_DEFAULT_KEY = "state_dict"
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


class TeacherError(RuntimeError):
    """A teacher source that cannot be used; the message names the source and the fix."""


def acquire_teacher(source: Mapping[str, Any], out_path: str | os.PathLike, *,
                    num_classes: int | None = None, data_root: str | os.PathLike | None = None) -> Path:
    """Fetch or read the teacher ``source`` describes and write it as a mixacm model file.

    ``num_classes`` defaults to the class count of ``source["dataset"]`` (cifar10 10, cifar100
    100, imagenet 1000); without either, a mixacm model file keeps its own and foreign weights
    get 10. A mixacm model file with another class count is an error.

    ``data_root`` is the test data of the accuracy check (else ``$MIXACM_DATA_<NAME>``; without
    data the check is recorded as not run). Returns ``out_path``. The file's ``meta`` records the
    source, the accuracy check, the sha256 of the bytes read
    (``source_sha256``), any scalars published beside the weights (``published``, e.g. the
    shared checkpoints' ``test_acc``) and the provenance of this conversion.
    """
    kind = _check_source(source)
    if num_classes is None and "dataset" in source:
        num_classes = _NUM_CLASSES.get(str(source["dataset"]))
    out_path = Path(out_path)
    # A failed acquisition leaves nothing behind, not even the output's folder.
    new_dirs = [p for p in (out_path.parent, *out_path.parent.parents) if not p.exists()]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "path":
            file = Path(source["path"]).expanduser()
            if not file.is_file():
                raise TeacherError(f"teacher file {file} does not exist (teacher source 'path')")
            digest = _verify_sha256(file, source.get("sha256"), what=str(file))
            return _convert(file, source, digest, out_path, num_classes, data_root)
        if kind == "url":
            with _temp_beside(out_path, ".download") as tmp:
                digest = _download(source["url"], tmp)
                _compare_sha256(digest, source["sha256"], what=source["url"])
                return _convert(tmp, source, digest, out_path, num_classes, data_root)
        return _from_robustbench(source, out_path, num_classes, data_root)
    except BaseException:
        for folder in new_dirs:  # deepest first; stops at the first one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


# ----------------------------------------------------------------------------- checks


def _check_source(source: Any) -> str:
    if not isinstance(source, Mapping):
        raise TeacherError(f"teacher source must be a dict with one of the keys {list(_KINDS)}, got {source!r}")
    kinds = [k for k in _KINDS if k in source]
    if len(kinds) != 1:
        raise TeacherError(
            f"teacher source {dict(source)!r} must have exactly one of the keys {list(_KINDS)} "
            f"(found {kinds or 'none'})"
        )
    kind = kinds[0]
    unknown = sorted(set(source) - _ALLOWED[kind])
    if unknown:
        raise TeacherError(
            f"teacher source ({kind}): unknown key(s) {unknown}; valid: {sorted(_ALLOWED[kind])}"
        )
    if kind == "url" and not source.get("sha256"):
        raise TeacherError(
            f"teacher source url {source['url']!r}: `sha256` is required for downloads "
            f"(compute it with `sha256sum FILE` on a trusted copy)"
        )
    if source.get("sha256") is not None and not _SHA256.match(str(source["sha256"])):
        raise TeacherError(f"teacher source ({kind}): sha256 {source['sha256']!r} is not 64 hex digits")
    if kind == "robustbench" and not source.get("arch"):
        raise TeacherError(
            f"teacher source robustbench {source['robustbench']!r}: `arch` is required (the registered "
            f"architecture the weights are read into, e.g. wrn-34-10 or wrn-28-10)"
        )
    if "kwargs" in source and not isinstance(source["kwargs"], Mapping):
        raise TeacherError(f"teacher source ({kind}): kwargs must be a dict, got {source['kwargs']!r}")
    normalization_kwargs(source.get("normalization"), source.get("kwargs") or {}, kind)
    check_settings(source.get("check"), kind)
    stated = source.get("stated_clean_acc")
    if stated is not None and (isinstance(stated, bool) or not isinstance(stated, (int, float))
                               or not 0 <= stated <= 100):
        raise TeacherError(f"teacher source ({kind}): stated_clean_acc must be a percentage in [0, 100], "
                           f"got {stated!r}")
    return kind


def normalization_kwargs(value: Any, kwargs: Mapping[str, Any], kind: str = "source") -> dict[str, Any]:
    """Model keyword arguments for a ``normalization`` setting (``{}`` when it is absent)."""
    if value is None:
        return {}
    if "mean" in kwargs or "std" in kwargs:
        raise TeacherError(f"teacher source ({kind}): give the normalisation once, as `normalization` "
                           "or as kwargs mean/std, not both")
    if value == "none":
        return {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    if isinstance(value, Mapping) and set(value) == {"mean", "std"}:
        try:
            mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
        except (TypeError, ValueError):
            mean = std = []
        if mean and len(mean) == len(std) and all(v > 0 for v in std):
            return {"mean": mean, "std": std}
    raise TeacherError(f"teacher source ({kind}): normalization must be 'none' or "
                       f"{{mean: [...], std: [...]}} with positive std, got {value!r}")


def check_settings(value: Any, kind: str = "source") -> dict[str, Any]:
    """The accuracy check's settings with defaults filled in (``CHECK_DEFAULTS``)."""
    if value is None:
        return dict(CHECK_DEFAULTS)
    if not isinstance(value, Mapping) or set(value) - set(CHECK_DEFAULTS):
        raise TeacherError(f"teacher source ({kind}): check must be a dict with keys "
                           f"{sorted(CHECK_DEFAULTS)}, got {value!r}")
    out = {**CHECK_DEFAULTS, **value}
    if isinstance(out["n"], bool) or not isinstance(out["n"], int) or out["n"] < 1:
        raise TeacherError(f"teacher source ({kind}): check.n must be a positive integer, got {out['n']!r}")
    if isinstance(out["margin_pct"], bool) or not isinstance(out["margin_pct"], (int, float)) \
            or not 0 <= out["margin_pct"] <= 100:
        raise TeacherError(f"teacher source ({kind}): check.margin_pct must be in [0, 100], "
                           f"got {out['margin_pct']!r}")
    if out["on_mismatch"] not in ("refuse", "warn"):
        raise TeacherError(f"teacher source ({kind}): check.on_mismatch must be refuse or warn, "
                           f"got {out['on_mismatch']!r}")
    return out


def _compare_sha256(actual: str, expected: str, what: str) -> None:
    if actual.lower() != str(expected).lower():
        raise TeacherError(
            f"sha256 mismatch for {what}: expected {str(expected).lower()}, got {actual}; "
            f"the file was not used and nothing was written"
        )


def _verify_sha256(file: Path, expected: str | None, what: str) -> str:
    try:
        digest = sha256_file(file)
    except OSError as exc:
        raise TeacherError(f"teacher file {file} cannot be read: {exc}") from exc
    if expected is not None:
        _compare_sha256(digest, expected, what)
    return digest


# ----------------------------------------------------------------------------- fetching


@contextmanager
def _temp_beside(out_path: Path, suffix: str) -> Iterator[Path]:
    """A temporary file in the output's folder (same file system), removed on the way out."""
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=suffix, dir=out_path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _download(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest``, hashing on the way; returns the sha256."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            for block in iter(lambda: response.read(_CHUNK), b""):
                h.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TeacherError(
            f"downloading the teacher from {url} failed: {exc}. Downloads need internet access; "
            f"a local copy works too (teacher source {{path: FILE, arch: ...}}, or a file:// URL)"
        ) from exc
    return h.hexdigest()


ROBUSTBENCH_DIR_ENV = "MIXACM_ROBUSTBENCH_DIR"


def import_robustbench_load_model():
    """``robustbench.utils.load_model`` from the registry's robustbench 1.1.1.

    That release imports ``autoattack`` (upstream's module name) while it declares the
    ``pyautoattack`` package: when no ``autoattack`` module is installed, ``autoattack`` and
    ``autoattack.state`` are mapped to pyautoattack's modules first (the same code under another
    name). ``pkg_resources`` comes from ``setuptools<81``, pinned by the ``robustbench`` extra.
    """
    import importlib
    import importlib.util
    import sys

    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        pkg = importlib.import_module("pyautoattack")
        sys.modules.setdefault("autoattack", pkg)
        for sub in ("state", "autopgd_base", "fab_pt", "square", "other_utils", "checks"):
            try:
                sys.modules.setdefault(f"autoattack.{sub}", importlib.import_module(f"pyautoattack.{sub}"))
            except ImportError:
                pass
    from robustbench.utils import load_model

    return load_model


def robustbench_checkpoint_path(model_dir: str | os.PathLike, name: str, dataset: str, threat_model: str) -> Path:
    """Where RobustBench's ``load_model`` reads (and downloads) a model's checkpoint."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def _robustbench_names(dataset: str, threat_model: str) -> list[str]:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return list(model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)])


def _from_robustbench(source: Mapping[str, Any], out_path: Path, num_classes: int | None,
                      data_root: str | os.PathLike | None = None) -> Path:
    import difflib

    name = source["robustbench"]
    dataset = source.get("dataset", "cifar10")
    threat_model = source.get("threat_model", "Linf")
    model_dir = Path(source.get("model_dir") or os.environ.get(ROBUSTBENCH_DIR_ENV) or "models").expanduser()
    try:
        load_model = import_robustbench_load_model()
    except Exception as exc:  # not installed, or failing at import
        raise TeacherError(
            f"teacher source robustbench {name!r}: the robustbench package is not usable here "
            f"({type(exc).__name__}: {exc}). Install it with `pip install -e '.[robustbench]'` "
            f"(robustbench 1.1.1 with setuptools<81; the README says more); its model downloads need "
            f"internet access, or a checkpoint placed in its model folder. Without it, give the "
            f"teacher as a local file ({{path: FILE, arch: ...}}) or as {{url: URL, sha256: HEX, arch: ...}}"
        ) from exc
    try:
        names = _robustbench_names(dataset, threat_model)
    except ImportError:
        names = None  # a robustbench without its model zoo module: load_model itself checks the name
    except (KeyError, ValueError) as exc:
        raise TeacherError(f"RobustBench has no {dataset!r} / {threat_model!r} leaderboard: {exc}") from exc
    if names is not None and name not in names:
        near = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
        raise TeacherError(
            f"RobustBench has no model {name!r} for {dataset} / {threat_model}; nearest names: "
            f"{', '.join(near) if near else 'none'} ({len(names)} models in that leaderboard)"
        )
    ckpt = robustbench_checkpoint_path(model_dir, name, dataset, threat_model)
    had_file = ckpt.is_file()
    new_dirs = [p for p in (ckpt.parent, *ckpt.parent.parents) if not p.exists()]
    try:
        net = load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as exc:
        # A failed download (offline, or a quota page saved instead of weights) leaves nothing:
        # the next run must not read a broken file as the checkpoint.
        if not had_file:
            ckpt.unlink(missing_ok=True)
            for folder in new_dirs:
                try:
                    folder.rmdir()
                except OSError:
                    break
        where = (f"the file {ckpt} is there but could not be read" if had_file else
                 f"to load it without a download, place its checkpoint at {ckpt} (RobustBench's "
                 f"<model_dir>/<dataset>/<threat_model>/<name>.pt; model_dir from the source's "
                 f"model_dir, ${ROBUSTBENCH_DIR_ENV} or ./models)")
        raise TeacherError(
            f"RobustBench could not load {name!r} ({dataset}, {threat_model}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Its downloads need internet access; {where}"
        ) from exc
    with _temp_beside(out_path, ".robustbench.pt") as weights:
        sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        del net
        if not any(k.endswith("normalize.mean") for k in sd) and "mean" not in sd and "std" not in sd:
            # RobustBench's models take [0, 1] images; those without a normalisation layer (its
            # CIFAR WideResNets) must not get the project model's default mean/std.
            sd["mean"], sd["std"] = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        torch.save(sd, weights)
        # A raw state dict (no "state_dict" entry): _convert reads the file itself as the weights.
        conv_source = {k: v for k, v in source.items() if k != "model_dir"}
        conv_source["checkpoint"] = str(ckpt)
        digest = sha256_file(ckpt if ckpt.is_file() else weights)
        return _convert(weights, conv_source, digest, out_path, num_classes, data_root)


# ----------------------------------------------------------------------------- converting


def _peek(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # the refused global of a pickled file is named, in plain text
        raise TeacherError(f"teacher file {load_error(file, exc)}") from exc


def _published_scalars(blob: Any) -> dict[str, float | int | str]:
    """Numbers and strings stored beside the weights (e.g. ``test_acc``), kept as provenance."""
    if not isinstance(blob, Mapping):
        return {}
    return {str(k): v for k, v in blob.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _convert(file: Path, source: Mapping[str, Any], digest: str, out_path: Path,
             num_classes: int | None, data_root: str | os.PathLike | None = None) -> Path:
    """Read ``file`` (a mixacm model file or a foreign state dict) and write ``out_path``."""
    blob = _peek(file)
    meta = {
        "role": "teacher",
        "teacher_source": {k: (str(v) if isinstance(v, Path) else v) for k, v in source.items()},
        "source_sha256": digest,
        "provenance": provenance("cpu"),
    }
    try:
        if isinstance(blob, Mapping) and blob.get("format") == FORMAT:
            if source.get("normalization") is not None:
                raise TeacherError(f"teacher {file} is a {FORMAT} file, which carries its own "
                                   "normalisation; remove `normalization` from the teacher source")
            model, info = load_model_file(file)
            spec = info["model"]
            meta["original_meta"] = info.get("meta", {})
            if num_classes is not None and spec["num_classes"] != num_classes:
                raise TeacherError(
                    f"teacher {file} has {spec['num_classes']} classes, the dataset has {num_classes}"
                )
        else:
            arch = source.get("arch")
            if not arch:
                raise TeacherError(
                    f"teacher file {file} is not a {FORMAT} file, so `arch` is needed: the registered "
                    f"architecture its weights are read into (e.g. resnet4b, wrn-34-10)"
                )
            norm = normalization_kwargs(source.get("normalization"), source.get("kwargs") or {})
            kwargs = {**dict(source.get("kwargs") or {}), **norm}
            num_classes = num_classes or 10
            key = source.get("key", _DEFAULT_KEY)
            if key == _DEFAULT_KEY and isinstance(blob, Mapping) and key not in blob:
                key = None  # the file is the state dict itself
            meta["published"] = _published_scalars(blob)
            del blob  # the loader reads the file again; do not hold two copies of large weights
            model = load_foreign_state_dict(file, arch, num_classes=num_classes, key=key, **kwargs)
            if norm and not _same_normalization(model, norm):
                raise TeacherError(
                    f"teacher {file} carries its own normaliser (mean {_as_list(model.mean)}, std "
                    f"{_as_list(model.std)}) but the source says normalization {source['normalization']!r}; "
                    "remove one of them")
            spec = model_spec(arch, num_classes, **kwargs)
        stated, stated_from = stated_accuracy(source, meta.get("published") or {})
        meta["accuracy_check"] = check_teacher_accuracy(
            model, source.get("dataset", "cifar10"), data_root, check_settings(source.get("check")),
            stated, stated_from, what=str(source.get("path") or source.get("url") or source.get("robustbench")))
        return save_model_file(model, spec, out_path, meta)
    except CheckpointError as exc:
        raise TeacherError(f"teacher {source}: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:  # unknown arch, bad kwargs
        msg = exc.args[0] if exc.args else exc
        raise TeacherError(f"teacher {source}: {msg}") from exc



# ----------------------------------------------------------------------------- accuracy check


def _as_list(t: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in t.flatten()]


def _same_normalization(model: torch.nn.Module, norm: Mapping[str, Any]) -> bool:
    return all(torch.allclose(getattr(model, k).flatten().cpu(), torch.tensor(norm[k], dtype=torch.float32))
               for k in ("mean", "std"))


def stated_accuracy(source: Mapping[str, Any], published: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """The clean accuracy (percent) the teacher should have, and where that number comes from."""
    if source.get("stated_clean_acc") is not None:
        return float(source["stated_clean_acc"]), "teacher source stated_clean_acc"
    for key in _STATED_KEYS:
        value = published.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Files store fractions (0.772) or percentages (77.2); nothing is above 1 % of 100.
            return (100.0 * value if value <= 1 else float(value)), f"file entry {key!r}"
    return None, None


def check_teacher_accuracy(model: torch.nn.Module, dataset: str, data_root: str | os.PathLike | None,
                           settings: Mapping[str, Any], stated: float | None, stated_from: str | None,
                           *, what: str = "teacher") -> dict[str, Any]:
    """Measure ``model``'s clean accuracy where the test data is at hand and compare it with
    ``stated``; refuse (TeacherError) or warn beyond ``settings["margin_pct"]``. Returns the record."""
    from mixacm.data import DataError, dataset_source, load_dataset
    from mixacm.evaluate import evaluate

    record: dict[str, Any] = {"stated_clean_acc_pct": stated, "stated_from": stated_from,
                              "margin_pct": float(settings["margin_pct"]), "on_mismatch": settings["on_mismatch"],
                              "n": None, "measured_clean_acc_pct": None}
    try:
        data = load_dataset(dataset, "test", root=data_root)
    except (DataError, RuntimeError) as exc:
        record.update(status="not run", reason=f"no {dataset} test data at hand ({str(exc).splitlines()[0]})")
        warnings.warn(f"teacher {what}: accuracy check not run: {record['reason']}; set the data root "
                      f"(--data-root, or $MIXACM_DATA_{dataset.upper()}) to measure it", stacklevel=2)
        return record
    n = min(int(settings["n"]), len(data))
    result = evaluate(model, data, ["clean"], eps=1 / 255, n=n, progress=False, device="cpu")
    measured = result["metrics"]["clean"]["accuracy_pct"]
    record.update(n=result["n"], measured_clean_acc_pct=measured, data_source=dataset_source(data),
                  data_sha256=result["data"]["sha256"])
    if stated is None:
        record.update(status="measured", reason="no stated accuracy to compare with")
        return record
    gap = measured - stated
    record["difference_pct"] = gap
    if abs(gap) <= settings["margin_pct"]:
        record["status"] = "agrees"
        return record
    message = (f"teacher {what}: measured clean accuracy {measured:.2f} % on {result['n']} test points, "
               f"stated {stated:.2f} % ({stated_from}): {abs(gap):.2f} points apart, more than the margin "
               f"of {settings['margin_pct']:g}; check the normalisation (normalization: none for a "
               "network that takes raw [0, 1] pixels), the architecture and its kwargs")
    if settings["on_mismatch"] == "refuse":
        raise TeacherError(message + "; nothing was written (check.on_mismatch: warn records it instead)")
    warnings.warn(message, stacklevel=2)
    record["status"] = "disagrees"
    return record
