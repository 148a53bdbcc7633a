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


def _tf32_enabled(kind: str) -> bool:
    """Whether fp32 ``kind`` ("conv": cuDNN convolutions, "matmul": cuBLAS) may run in TF32 now.

    torch has two APIs for the flag: the per-backend ``fp32_precision`` ("tf32" / "ieee" / "none"
    = inherit) and the older ``allow_tf32``; the newer one wins where it is set, and reading the
    older one raises when the two were mixed, so it is read last."""
    backend = getattr(torch.backends.cudnn, "conv", None) if kind == "conv" else torch.backends.cuda.matmul
    value = getattr(backend, "fp32_precision", "none")  # absent before torch 2.9
    if value in ("tf32", "ieee"):
        return value == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return False


def compute_precision(device: torch.device | str, autocast: str | None = None) -> dict[str, object]:
    """What arithmetic the code on ``device`` really runs in, for result files and summaries.

    ``autocast`` is the autocast dtype the caller runs under (``"bf16"``, ``"fp16"`` or None).
    fp32 convolutions and matrix products run in TF32 (10-bit mantissa) on CUDA devices of compute
    capability 8.0 (Ampere) and newer when torch's TF32 flags allow it (by default: convolutions
    yes, matrix products no). Returns ``{"label", "autocast", "fp32_conv", "fp32_matmul"}``: the
    last two are "tf32" or "fp32"; ``label`` is the autocast dtype when there is one, else "tf32"
    when either runs in TF32, else "fp32".
    """
    device = torch.device(device)
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    conv = "tf32" if ampere and _tf32_enabled("conv") else "fp32"
    matmul = "tf32" if ampere and _tf32_enabled("matmul") else "fp32"
    label = autocast or ("tf32" if "tf32" in (conv, matmul) else "fp32")
    return {"label": label, "autocast": autocast, "fp32_conv": conv, "fp32_matmul": matmul}
