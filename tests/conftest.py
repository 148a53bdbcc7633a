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

# Two threads is what the CI machine has; tests must not oversubscribe it. Under pytest-xdist (CI
# runs two workers) each worker is one core.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    return any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist (CI: ``-n 2 --dist loadgroup --no-loadscope-reorder``): the long tests first
    (slow and slurm: the end-to-end runs), so that the workers start them early and the short ones
    fill in around them; tests that share something built once stay on one worker (xdist groups):
    the SLURM tests their local cluster ("slurm"), the tests of a module its module-scoped
    fixtures (a trained model, a workflow copy), which another worker would build again."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif not item.get_closest_marker("xdist_group") and _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.get_closest_marker("slurm")))


@pytest.fixture(autouse=True)
def _no_data_roots_from_the_shell(monkeypatch, tmp_path):
    """Tests name their data themselves: a MIXACM_DATA_* variable of the shell that runs pytest
    (the quick start exports MIXACM_DATA_CIFAR10) must not change what they see, nor data in the
    user's default download folder (MIXACM_DATA_HOME points at an empty folder of the test)."""
    for key in [k for k in os.environ if k.startswith("MIXACM_DATA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MIXACM_DATA_HOME", str(tmp_path / "mixacm-data-home"))


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


@pytest.fixture(scope="session")
def robustbench_extra() -> None:
    """Skips where the `robustbench` extra is not installed: the workflow refuses a config with
    RobustBench teachers (config/config.yaml) without it, dry runs included."""
    from mixacm.inputs import ROBUSTBENCH_EXTRA, ROBUSTBENCH_INSTALL, missing_extra

    missing = missing_extra(ROBUSTBENCH_EXTRA)
    if missing:
        pytest.skip(f"the robustbench extra is not installed ({'; '.join(missing)}): {ROBUSTBENCH_INSTALL}")


@pytest.fixture(scope="session")
def place_robustbench_checkpoint():
    """``place(model_dir, dataset, name, seed)``: a checkpoint with random weights (and random
    BatchNorm statistics, so a normalisation or BN mix-up changes the logits) of RobustBench
    entry ``name``'s own architecture, built by RobustBench, where its ``load_model`` looks for
    it: ``<model_dir>/<dataset>/Linf/<name>.pt``, so no download is tried. Skips where the
    robustbench package is not importable (``pip install -e '.[robustbench]'``; CI installs it)."""
    from mixacm.teachers import import_robustbench_load_model, robustbench_checkpoint_path

    try:
        import_robustbench_load_model()
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed as the extra"
        pytest.skip(f"robustbench is not importable here ({type(exc).__name__}: {exc}); "
                    "install it with pip install -e '.[robustbench]'")
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    def place(model_dir: Path, dataset: str, name: str, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        net = model_dicts[BenchmarkDataset(dataset)][ThreatModel("Linf")][name]["model"]()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        path = robustbench_checkpoint_path(model_dir, name, dataset, "Linf")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": net.state_dict()}, path)
        return path

    return place


@pytest.fixture(scope="session")
def make_imagenet_folder():
    """``make(root, classes, train_per_class, val_per_class, size)``: ImageNet's folder layout
    (``train/`` and ``val/``, one folder a class) with small JPEG images, brighter for higher
    classes (so a few steps can tell the first classes apart)."""
    from torchvision.io import write_jpeg

    def make(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int) -> Path:
        g = torch.Generator().manual_seed(0)
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for c in range(classes):
                folder = root / split / f"n{c:08d}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    img = (torch.rand(3, size, size, generator=g) * 100 + 100 * c).clamp(0, 255).to(torch.uint8)
                    write_jpeg(img, str(folder / f"img{i}.JPEG"))
        return root

    return make
