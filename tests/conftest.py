"""Shared fixtures: paths to the read-only assets in ../shared, skipped with a reason when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIXACM_SHARED", REPO.parent / "shared"))
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg"
SHARED_MODELS = SHARED / "models"

# Two threads is what the CI machine has; tests must not oversubscribe it.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Path:
    if not (CIFAR10_JPEG / "test").is_dir():
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CIFAR10_JPEG} (set MIXACM_SHARED)")
    return CIFAR10_JPEG


@pytest.fixture(scope="session")
def shared_models() -> Path:
    if not (SHARED_MODELS / "resnet4b.pth").is_file():
        pytest.skip(f"shared teacher checkpoints not found in {SHARED_MODELS} (set MIXACM_SHARED)")
    return SHARED_MODELS
