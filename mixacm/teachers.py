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
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mixacm.checkpoint import (FORMAT, CheckpointError, load_foreign_state_dict, load_model_file,
                               model_spec, save_model_file)
from mixacm.provenance import provenance
from mixacm.utils import sha256_file

_KINDS = ("robustbench", "url", "path")
_ALLOWED = {
    "robustbench": {"robustbench", "dataset", "threat_model", "arch", "kwargs", "model_dir"},
    "url": {"url", "sha256", "arch", "key", "kwargs", "dataset"},
    "path": {"path", "sha256", "arch", "key", "kwargs", "dataset"},
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_DEFAULT_KEY = "state_dict"
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


class TeacherError(RuntimeError):
    """A teacher source that cannot be used; the message names the source and the fix."""


def acquire_teacher(source: Mapping[str, Any], out_path: str | os.PathLike, *,
                    num_classes: int | None = None) -> Path:
    """Fetch or read the teacher ``source`` describes and write it as a mixacm model file.

    ``num_classes`` defaults to the class count of ``source["dataset"]`` (cifar10 10, cifar100
    100, imagenet 1000); without either, a mixacm model file keeps its own and foreign weights
    get 10. A mixacm model file with another class count is an error.

    Returns ``out_path``. The file's ``meta`` records the source, the sha256 of the bytes read
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
            return _convert(file, source, digest, out_path, num_classes)
        if kind == "url":
            with _temp_beside(out_path, ".download") as tmp:
                digest = _download(source["url"], tmp)
                _compare_sha256(digest, source["sha256"], what=source["url"])
                return _convert(tmp, source, digest, out_path, num_classes)
        return _from_robustbench(source, out_path, num_classes)
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
    return kind


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


def _from_robustbench(source: Mapping[str, Any], out_path: Path, num_classes: int | None) -> Path:
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
            f"({type(exc).__name__}: {exc}). Install it with `pip install 'mixacm[robustbench]'` "
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
        return _convert(weights, conv_source, digest, out_path, num_classes)


# ----------------------------------------------------------------------------- converting


def _peek(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TeacherError(
            f"teacher file {file} is not a readable torch file (corrupt, truncated, or pickled code "
            f"that weights_only loading refuses): {type(exc).__name__}: {first}"
        ) from exc


def _published_scalars(blob: Any) -> dict[str, float | int | str]:
    """Numbers and strings stored beside the weights (e.g. ``test_acc``), kept as provenance."""
    if not isinstance(blob, Mapping):
        return {}
    return {str(k): v for k, v in blob.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _convert(file: Path, source: Mapping[str, Any], digest: str, out_path: Path,
             num_classes: int | None) -> Path:
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
            kwargs = dict(source.get("kwargs") or {})
            num_classes = num_classes or 10
            key = source.get("key", _DEFAULT_KEY)
            if key == _DEFAULT_KEY and isinstance(blob, Mapping) and key not in blob:
                key = None  # the file is the state dict itself
            meta["published"] = _published_scalars(blob)
            del blob  # the loader reads the file again; do not hold two copies of large weights
            model = load_foreign_state_dict(file, arch, num_classes=num_classes, key=key, **kwargs)
            spec = model_spec(arch, num_classes, **kwargs)
        return save_model_file(model, spec, out_path, meta)
    except CheckpointError as exc:
        raise TeacherError(f"teacher {source}: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:  # unknown arch, bad kwargs
        msg = exc.args[0] if exc.args else exc
        raise TeacherError(f"teacher {source}: {msg}") from exc

