"""Small shared helpers: epsilon parsing and formatting, the one YAML loader, device choice,
seeding, atomic writes (also in the background), hashing."""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import random
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

# The largest L-inf budget taken without an explicit flag: CIFAR and ImageNet robustness is
# reported at 2/255 to 16/255, and 64/255 already erases most of an image's content.
MAX_LINF_EPS = 64 / 255
MAX_LINF_EPS_TEXT = "64/255"


def parse_eps(value: str | float | int) -> float:
    """Parse a perturbation budget given as a fraction of the [0, 1] pixel range.

    Accepts ``"8/255"``, ``"0.5/255"``, ``"0.031"`` or a number. Values outside (0, 1] are
    rejected: ``8`` almost always means ``8/255`` and is reported as such.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                eps = float(Fraction(num.strip()) / Fraction(den.strip()))
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps {value!r} is not a number or a fraction like 8/255") from None
    else:
        eps = float(value)
    if not 0.0 < eps <= 1.0:
        hint = f" (did you mean {value}/255?)" if eps > 1 else ""
        raise ValueError(
            f"eps {value!r} is outside (0, 1]: give it as a fraction of the [0, 1] pixel range{hint}"
        )
    return eps


def _whole_number(value: str | float | int) -> int | None:
    """``value`` as an int when it is written as a whole number (``1``, ``"4"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_linf_eps(value: str | float | int, *, allow_large: bool = False,
                   beyond: str = "to attack at it anyway, pass --allow-large-eps") -> float:
    """``parse_eps`` for an L-inf budget a user gives, with a sanity bound.

    Above ``MAX_LINF_EPS`` (64/255) the budget is refused unless ``allow_large`` (``beyond`` ends
    the message: how to get past the bound, if at all); a whole number such as ``1`` is 255/255
    and is reported as probably meaning ``1/255``. Raises ValueError in one line.
    """
    eps = parse_eps(value)
    if eps <= MAX_LINF_EPS + 1e-12 or allow_large:
        return eps
    whole = _whole_number(value)
    hint = f" (did you mean {whole}/255?)" if whole is not None else ""
    raise ValueError(
        f"eps {value!r} is {format_eps(eps)} of the pixel range, above the sane L-inf bound "
        f"{MAX_LINF_EPS_TEXT}{hint}; {beyond}"
    )


def format_eps(eps: str | float) -> str:
    """The one text form of an eps: ``"8/255"`` for a whole number of 1/255 steps (within 1e-12),
    else the shortest decimal; a string is checked by ``parse_eps`` and kept as written, except
    a bare whole number (``"1"``, which reads as 1/255 but is 255/255)."""
    if isinstance(eps, str) and _whole_number(eps) is None:
        parse_eps(eps)
        return eps.strip()
    value = parse_eps(eps)
    steps = round(value * 255)
    return f"{steps}/255" if abs(steps / 255 - value) < 1e-12 else repr(value)


class YAMLFileError(ValueError):
    """A YAML text that cannot be read as written: a syntax error or a key given twice."""


def load_yaml(source: str | os.PathLike, *, text: str | None = None) -> Any:
    """The one YAML reader of the project (configs, run configs, tuning grids, paper numbers).

    Reads ``source`` (a path), or ``text`` with ``source`` naming where it came from. Like
    ``yaml.safe_load``, except that a key written twice in one mapping is refused
    (``YAMLFileError`` naming the key path and both line numbers) instead of the last one
    silently winning (yaml/pyyaml#165). Merge keys (``<<``) may still be overridden.
    """
    where = str(source)
    if text is None:
        try:
            text = Path(source).read_text()
        except OSError as err:
            raise YAMLFileError(f"cannot read {where}: {err.strerror or err}") from None
    loader = yaml.SafeLoader(text)
    loader.name = where  # positions in PyYAML's messages name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, (), where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise YAMLFileError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, where: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, (*path, f"[{i}]"), where)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a complex key: PyYAML refuses it while constructing
        key = loader.construct_object(key_node)
        here = key_node.start_mark.line + 1
        if key in seen:
            name = ".".join(str(p) for p in (*path, key)).replace(".[", "[")
            raise YAMLFileError(f"{where}: key {name} is given twice (lines {seen[key]} and {here}); "
                                "YAML would keep only the last: delete one")
        seen[key] = here
        _refuse_duplicate_keys(loader, value_node, (*path, key), where)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else the CPU; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class WriteFailed(OSError):
    """An output that could not be written (disk full, quota, read-only file system, ...): one
    line naming the file and the cause. Nothing of it is left behind."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its cause/context chain (torch.save reports a
    full disk as "[enforce fail at inline_container.cc] unexpected pos", with the file object's
    OSError as its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# Errors of the file system being written to (not of the object being serialised).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR}


def _write_failed(path: Path, err: OSError) -> WriteFailed:
    code = errno.errorcode.get(err.errno, "")
    hint = ": the disk is full; free space or write elsewhere" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    failed = WriteFailed(f"cannot write {path}: {err.strerror or err} ({code}){hint}")
    failed.errno = err.errno
    return failed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash leaves either the old file or the new one, never a partial file: the temporary file
    is removed on error, and so are the folders this call created for it. A failure of the file
    system (a full disk, a quota, a read-only mount) raises :class:`WriteFailed` naming ``path``
    and the cause in one line.
    """
    path = Path(path)
    new_dirs = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        for folder in new_dirs:  # deepest first; stops at the first one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        os_error = None if isinstance(exc, WriteFailed) else _os_error_in(exc)
        if os_error is not None and os_error.errno in _WRITE_ERRNOS:
            raise _write_failed(path, os_error) from exc
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    def write(p: Path) -> None:
        # Through a Python file object, so that a full disk surfaces as an OSError (ENOSPC)
        # rather than as torch's bare "unexpected pos" from its own writer.
        with open(p, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def atomic_json_dump(obj: Any, path: str | os.PathLike) -> Path:
    def write(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    return atomic_write(path, write)


def cpu_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that shares nothing with it: every tensor cloned to the CPU, mappings, lists
    and tuples rebuilt around copies of their items, anything else deep-copied. What a background write may serialise while
    training goes on changing the originals (weights, optimiser buffers, the lr in param groups)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        # copy.copy keeps the mapping's own type and attributes (a Counter of milestones, a state
        # dict's _metadata); only the values are replaced.
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = cpu_snapshot(v)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Writes files on one background thread, one write at a time, so that training does not wait
    for the disk (a WRN-34-10 training state is ~370 MB).

    ``submit(fn, *args)`` first waits for the previous write (so at most one is in flight and
    files are written in order), then runs ``fn(*args)`` on the thread; ``wait()`` blocks until
    the write in flight is done and re-raises its error. Call ``wait()`` before anything that
    needs the files, and at the end of a run; at interpreter exit the thread is joined as well
    (concurrent.futures' own exit hook), so a write in flight finishes. ``fn`` should write
    atomically (``atomic_write``): a process killed mid-write then leaves the previous file.
    """

    def __init__(self, name: str = "mixacm-writer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the write in flight (re-raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left beside ``path`` when a process was killed
    mid-write (``.<name>.*.tmp``); returns what was removed. Call it only where no other process
    writes ``path`` at the same time."""
    path = Path(path)
    removed = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(cfg: Any) -> str:
    """A short, stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a file that may be published should name it: relative to the checkout the
    command runs in (the nearest folder above the current one that holds ``.git``; else the
    current folder) when it lies inside it, else as given. An absolute path would name the
    folder a run happened to sit in."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    cwd = Path.cwd()
    checkout = next((d for d in (cwd, *cwd.parents) if (d / ".git").exists()), cwd)
    for base in (checkout, cwd):
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)
