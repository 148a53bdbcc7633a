"""Importing a foreign teacher without silent assumptions: the normalisation is stated (or the
file's), the clean accuracy is measured where test data is at hand and compared with the stated
one, and a disagreement beyond the margin is refused (or recorded with a warning).

The real case: the shared robust resnet4b with its CIFAR-10 normalisation folded into the first
convolution (a network that takes raw [0, 1] pixels), as foreign code often ships it.
"""
from __future__ import annotations

import json

import pytest
import torch

from mixacm.checkpoint import load_model_file
from mixacm.cli import main
from mixacm.models.base import CIFAR10_MEAN, CIFAR10_STD
from mixacm.teachers import (CHECK_DEFAULTS, TeacherError, acquire_teacher, check_settings,
                             normalization_kwargs, stated_accuracy)


def test_normalization_settings():
    assert normalization_kwargs(None, {}) == {}
    assert normalization_kwargs("none", {}) == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert normalization_kwargs({"mean": [0.5] * 3, "std": [0.25] * 3}, {}) == {"mean": [0.5] * 3, "std": [0.25] * 3}
    for bad in ("imagenet", {"mean": [0.5]}, {"mean": [0.5] * 3, "std": [0.0] * 3}, {"mean": [1, 2], "std": [1]}):
        with pytest.raises(TeacherError, match="normalization must be"):
            normalization_kwargs(bad, {})
    with pytest.raises(TeacherError, match="not both"):
        normalization_kwargs("none", {"mean": [0, 0, 0]})


def test_check_settings_and_stated_accuracy():
    assert check_settings(None) == CHECK_DEFAULTS
    assert check_settings({"margin_pct": 1, "on_mismatch": "warn"})["n"] == CHECK_DEFAULTS["n"]
    for bad, key in (({"n": 0}, "check.n"), ({"margin_pct": -1}, "margin_pct"), ({"on_mismatch": "x"}, "on_mismatch"),
                     ({"nn": 3}, "keys")):
        with pytest.raises(TeacherError, match=key):
            check_settings(bad)
    assert stated_accuracy({}, {"test_acc": 0.772}) == (pytest.approx(77.2), "file entry 'test_acc'")
    assert stated_accuracy({}, {"clean_acc": 88.5}) == (88.5, "file entry 'clean_acc'")
    assert stated_accuracy({"stated_clean_acc": 60}, {"test_acc": 0.7}) == (60.0, "teacher source stated_clean_acc")
    assert stated_accuracy({}, {"test_loss": 0.5}) == (None, None)


def test_bad_source_keys_fail_before_anything_is_written(tmp_path, shared_models):
    out = tmp_path / "t" / "teacher.pt"
    for source, match in (
        ({"normalization": "imagenet"}, "normalization must be"),
        ({"check": {"margin_pct": "x"}}, "margin_pct"),
        ({"stated_clean_acc": 150}, "stated_clean_acc"),
    ):
        with pytest.raises(TeacherError, match=match):
            acquire_teacher({"path": str(shared_models / "resnet4b.pth"), "arch": "resnet4b", **source}, out)
        assert not out.parent.exists()


@pytest.fixture(scope="module")
def folded(shared_models, tmp_path_factory):
    """resnet4b.pth with mean/std folded into conv1: the same function of raw [0, 1] pixels."""
    blob = torch.load(shared_models / "resnet4b.pth", map_location="cpu", weights_only=True)
    sd = dict(blob["state_dict"])
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    w, b = sd["conv1.weight"], sd["conv1.bias"]
    sd["conv1.weight"] = w / std.view(1, 3, 1, 1)
    sd["conv1.bias"] = b - (w * (mean / std).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    path = tmp_path_factory.mktemp("folded") / "resnet4b_raw_pixels.pth"
    torch.save({"state_dict": sd, "test_acc": blob["test_acc"]}, path)
    return path


def test_folded_checkpoint_normalised_twice_is_refused_with_both_numbers(folded, cifar10_jpeg_root, tmp_path):
    out = tmp_path / "teacher.pt"
    with pytest.raises(TeacherError) as err:
        acquire_teacher({"path": str(folded), "arch": "resnet4b", "check": {"n": 500}}, out,
                        data_root=cifar10_jpeg_root)
    msg = str(err.value)
    assert "stated 77.20 % (file entry 'test_acc')" in msg and "measured clean accuracy" in msg
    measured = float(msg.split("measured clean accuracy ")[1].split(" %")[0])
    assert measured < 65  # normalised twice: far below the stated 77.2 %
    assert not out.exists()


def test_folded_checkpoint_with_normalization_none_agrees_and_is_recorded(folded, cifar10_jpeg_root, tmp_path):
    out = tmp_path / "teacher.pt"
    acquire_teacher({"path": str(folded), "arch": "resnet4b", "normalization": "none", "check": {"n": 500}},
                    out, data_root=cifar10_jpeg_root)
    model, info = load_model_file(out)
    check = info["meta"]["accuracy_check"]
    assert check["status"] == "agrees" and check["n"] == 500
    assert abs(check["measured_clean_acc_pct"] - 77.2) <= 3 and check["stated_clean_acc_pct"] == pytest.approx(77.2)
    assert torch.equal(model.mean.flatten(), torch.zeros(3)) and info["model"]["kwargs"]["std"] == [1.0] * 3


def test_warn_switch_records_the_disagreement(folded, cifar10_jpeg_root, tmp_path):
    out = tmp_path / "teacher.pt"
    with pytest.warns(UserWarning, match="apart, more than the margin"):
        acquire_teacher({"path": str(folded), "arch": "resnet4b", "check": {"n": 200, "on_mismatch": "warn"}},
                        out, data_root=cifar10_jpeg_root)
    check = load_model_file(out)[1]["meta"]["accuracy_check"]
    assert check["status"] == "disagrees" and check["difference_pct"] < -3


def test_without_data_the_check_is_recorded_as_not_run(shared_models, tmp_path, monkeypatch):
    monkeypatch.delenv("MIXACM_DATA_CIFAR10", raising=False)
    monkeypatch.setenv("MIXACM_DATA_HOME", str(tmp_path / "nodata"))
    out = tmp_path / "teacher.pt"
    with pytest.warns(UserWarning, match=r"accuracy check not run: no cifar10 test data at hand .*MIXACM_DATA_CIFAR10"):
        acquire_teacher({"path": str(shared_models / "resnet2b.pth"), "arch": "resnet2b"}, out)
    check = load_model_file(out)[1]["meta"]["accuracy_check"]
    assert check["status"] == "not run" and "no cifar10 test data" in check["reason"]
    assert check["stated_clean_acc_pct"] == pytest.approx(69.25)


def test_cli_says_on_stderr_that_the_check_was_not_run(shared_models, tmp_path, monkeypatch):
    # The JSON on stdout records it; a user reading the terminal (or a job log) sees it too.
    import subprocess
    import sys

    monkeypatch.delenv("MIXACM_DATA_CIFAR10", raising=False)
    monkeypatch.setenv("MIXACM_DATA_HOME", str(tmp_path / "nodata"))
    proc = subprocess.run([sys.executable, "-m", "mixacm.cli", "teacher", "--path", str(shared_models / "resnet2b.pth"),
                           "--arch", "resnet2b", "--out", str(tmp_path / "t.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy_check"]["status"] == "not run"
    assert "UserWarning: teacher" in proc.stderr and "accuracy check not run" in proc.stderr


def test_cli_refuses_in_one_line_and_accepts_normalization_none(folded, cifar10_jpeg_root, tmp_path, capsys):
    out = tmp_path / "teacher.pt"
    args = ["teacher", "--path", str(folded), "--arch", "resnet4b", "--data-root", str(cifar10_jpeg_root),
            "--check-n", "300", "--out", str(out)]
    assert main(args) == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stated 77.20 %" in err
    assert main(args + ["--normalization", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy_check"]["status"] == "agrees"


def test_report_shows_each_teachers_measured_and_stated_accuracy(folded, cifar10_jpeg_root, tmp_path):
    import pandas as pd

    from mixacm.report import render_report
    from mixacm.report.teachers import teacher_records

    out = tmp_path / "teacher.pt"
    acquire_teacher({"path": str(folded), "arch": "resnet4b", "normalization": "none", "check": {"n": 200}},
                    out, data_root=cifar10_jpeg_root)
    rows = teacher_records([out])
    measured = load_model_file(out)[1]["meta"]["accuracy_check"]["measured_clean_acc_pct"]
    assert rows[0]["measured_clean_acc_pct"] == measured and rows[0]["status"] == "agrees"
    html = render_report({}, [], pd.DataFrame(columns=["file"]), tmp_path / "r.html", teachers=rows).read_text()
    assert 'id="teachers"' in html and f'value="{measured}"' in html and "77.20" in html
