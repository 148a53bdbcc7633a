"""Small shared helpers: epsilon parsing and formatting, device choice, seeding, atomic writes, hashing."""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


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


def format_eps(eps: str | float) -> str:
    """The one text form of an eps: ``"8/255"`` for a whole number of 1/255 steps (within 1e-12),
    else the shortest decimal; a string is checked by ``parse_eps`` and kept as written."""
    if isinstance(eps, str):
        parse_eps(eps)
        return eps.strip()
    value = parse_eps(eps)
    steps = round(value * 255)
    return f"{steps}/255" if abs(steps / 255 - value) < 1e-12 else repr(value)


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash leaves either the old file or the new one, never a partial file, and
    the temporary file is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def atomic_json_dump(obj: Any, path: str | os.PathLike) -> Path:
    def write(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    return atomic_write(path, write)


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
