"""RobustBench teachers with the real robustbench package, installed as the `robustbench` extra.

Checkpoints are placed in RobustBench's model-folder layout (<model_dir>/<dataset>/<threat
model>/<name>.pt), with random weights of each entry's own architecture (built by RobustBench),
so RobustBench's ``load_model`` reads them without a download. The project's model loaded by name
(``mixacm teacher``) must hold the same weights with strict keys and give the same logits as
RobustBench's own model; tests/test_paper_config.py checks the same for the workflow's teacher
rule, with config/config.yaml's two entries. Skips where robustbench is not installed
(`pip install -e '.[robustbench]'`; CI installs it).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixacm.checkpoint import load_model_file
from mixacm.cli import main
from mixacm.teachers import (TeacherError, acquire_teacher, import_robustbench_load_model,
                             robustbench_checkpoint_path)

try:
    load_model = import_robustbench_load_model()
except Exception as exc:  # noqa: BLE001 - any import failure means "not installed as the extra"
    pytest.skip(f"robustbench is not importable here ({type(exc).__name__}: {exc}); "
                "install it with pip install -e '.[robustbench]'", allow_module_level=True)

# A WRN-28-10 entry with the unused sub_block1 group (the paper config's teacher) and a
# WRN-34-10 entry.
ENTRIES = {"Carmon2019Unlabeled": "wrn-28-10", "Wu2020Adversarial": "wrn-34-10"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, place_robustbench_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("rbmodels")
    for i, name in enumerate(ENTRIES):
        place_robustbench_checkpoint(root, "cifar10", name, seed=i)
    return root


def same_logits(teacher_file: Path, name: str, model_dir: Path) -> None:
    ours, info = load_model_file(teacher_file)
    theirs = load_model(model_name=name, model_dir=str(model_dir), dataset="cifar10", threat_model="Linf").eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    assert info["model"]["name"] == ENTRIES[name]
    assert info["meta"]["teacher_source"]["robustbench"] == name
    assert info["meta"]["source_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENTRIES))
def test_mixacm_teacher_loads_robustbench_checkpoints(tmp_path, model_dir, name):
    out = tmp_path / "teacher.pt"
    rc = main(["teacher", "--robustbench", name, "--arch", ENTRIES[name], "--model-dir", str(model_dir),
               "--out", str(out)])
    assert rc == 0 and out.is_file()
    same_logits(out, name, model_dir)


def test_unknown_name_lists_the_nearest_names(tmp_path):
    with pytest.raises(TeacherError, match="no model 'Carmon2019Unlabelled'.*nearest names: Carmon2019Unlabeled"):
        acquire_teacher({"robustbench": "Carmon2019Unlabelled", "arch": "wrn-28-10", "model_dir": str(tmp_path)},
                        tmp_path / "out" / "t.pt")
    assert not (tmp_path / "out").exists()


def test_failed_download_leaves_nothing_and_names_the_file_to_place(tmp_path, monkeypatch):
    """A quota page saved in place of the weights (what Google Drive serves when a file is over
    its download quota): nothing stays behind, and the error says where to put the checkpoint."""
    import robustbench.utils as rb_utils

    def quota_page(gdrive_id, model_path):
        Path(model_path).write_text("<html><body>Google Drive - Quota exceeded</body></html>")

    monkeypatch.setattr(rb_utils, "download_gdrive_new", quota_page)
    model_dir = tmp_path / "models"
    expected = robustbench_checkpoint_path(model_dir, "Standard", "cifar10", "Linf")
    with pytest.raises(TeacherError, match="place its checkpoint at " + str(expected).replace(".", r"\.")):
        acquire_teacher({"robustbench": "Standard", "arch": "wrn-28-10", "model_dir": str(model_dir)},
                        tmp_path / "out" / "t.pt")
    assert not expected.exists() and not model_dir.exists()
    assert not (tmp_path / "out").exists()


def test_teacher_cli_reports_a_failed_download_on_one_line(tmp_path, monkeypatch, capsys):
    import robustbench.utils as rb_utils

    def offline(gdrive_id, model_path):
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(rb_utils, "download_gdrive_new", offline)
    rc = main(["teacher", "--robustbench", "Standard", "--arch", "wrn-28-10", "--model-dir", str(tmp_path / "m"),
               "--out", str(tmp_path / "t.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "Standard.pt" in err and "ConnectionError" in err
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "m").exists()
