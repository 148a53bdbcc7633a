"""Provenance recorded with every checkpoint and result: code version, environment, device."""
from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

import mixacm

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_info() -> dict[str, object]:
    """Commit and dirty flag of the checkout the package runs from (``None`` outside git)."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device | str = "cpu") -> dict[str, object]:
    return {
        **git_info(),
        "mixacm_version": mixacm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "host": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
