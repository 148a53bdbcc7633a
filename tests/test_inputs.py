"""Inputs of the pipeline config checked before any job (mixacm.inputs): every problem at once,
each named by its pipeline key; a real `snakemake` run with a wrong data root stops before its
first job (slow)."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixacm.inputs import PipelineInputError, check_pipeline_inputs, datasets_used, pipeline_input_errors

REPO = Path(__file__).resolve().parents[1]


def image_folder(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split / "airplane").mkdir(parents=True)
    return root


def config(**data) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    cfg["data"] = data
    return cfg


@pytest.fixture
def home(tmp_path, monkeypatch):
    # no MIXACM_DATA_* from the caller; the default download folder is an empty temp folder
    for k in list(os.environ):
        if k.startswith("MIXACM_DATA_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MIXACM_DATA_HOME", str(tmp_path / "default"))
    return tmp_path


def test_a_good_root_passes_and_the_datasets_come_from_experiments_and_trained_teachers(home):
    cfg = config(cifar10={"root": str(image_folder(home / "c10"))})
    assert datasets_used(cfg) == ["cifar10"]
    assert pipeline_input_errors(cfg) == []
    check_pipeline_inputs(cfg)
    torchvision_files = home / "tv"
    (torchvision_files / "cifar-10-batches-py").mkdir(parents=True)
    assert pipeline_input_errors(config(cifar10={"root": str(torchvision_files)})) == []


def test_wrong_roots_name_the_pipeline_key(home):
    errors = pipeline_input_errors(config(cifar10={"root": str(home / "nowhere")}))
    assert errors == [f"data.cifar10.root: {home / 'nowhere'} does not exist. Point it at an image "
                      "folder (train/<class>/<image> and test/ or val/) or torchvision's files "
                      "(cifar-10-batches-py/) of CIFAR-10."]
    (home / "empty").mkdir()
    (error,) = pipeline_input_errors(config(cifar10={"root": str(home / "empty")}))
    assert error.startswith(f"data.cifar10.root: {home / 'empty'} holds no CIFAR-10 data: expected")
    assert "dataset.root" not in error.replace("data.cifar10.root", "")


def test_env_var_and_default_folder_and_download(home, monkeypatch):
    (error,) = pipeline_input_errors(config(cifar10={"root": None, "download": False}))
    assert error.startswith("data.cifar10.root: no CIFAR-10 data: data.cifar10.root and "
                            "$MIXACM_DATA_CIFAR10 are not set and the default folder")
    assert "data.cifar10.download: true" in error
    assert pipeline_input_errors(config(cifar10={"root": None, "download": True})) == []
    monkeypatch.setenv("MIXACM_DATA_CIFAR10", str(home / "gone"))
    (error,) = pipeline_input_errors(config(cifar10={"root": None}))
    assert error.startswith(f"$MIXACM_DATA_CIFAR10 (data.cifar10.root is not set): {home / 'gone'} does not exist.")
    monkeypatch.setenv("MIXACM_DATA_CIFAR10", str(image_folder(home / "ok")))
    assert pipeline_input_errors(config(cifar10={"root": None})) == []


def test_every_problem_at_once_teacher_files_included(home):
    cfg = config(cifar10={"root": str(home / "nowhere")})
    cfg["teachers"]["cifar10"] = {"source": "file", "path": str(home / "teacher.pt")}
    with pytest.raises(PipelineInputError) as err:
        check_pipeline_inputs(cfg)
    assert [e.split(":")[0] for e in err.value.errors] == ["data.cifar10.root", "teachers.cifar10.path"]
    assert f"teacher file {home / 'teacher.pt'} does not exist." in str(err.value)


@pytest.mark.slow
def test_a_wrong_data_root_stops_snakemake_before_any_job(tmp_path):
    import shutil

    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "environment.yml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "--configfile",
         "config/ci.yaml", "--config", f'data={{"cifar10": {{"root": "{tmp_path / "nowhere"}"}}}}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"data.cifar10.root: {tmp_path / 'nowhere'} does not exist." in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    assert "Traceback" not in out


# -- the robustbench extra -------------------------------------------------------------------------


def _versions(**found):
    """An importlib.metadata.version stand-in: the given versions, the rest not installed."""
    from importlib.metadata import PackageNotFoundError

    def version(name):
        if name not in found:
            raise PackageNotFoundError(name)
        return found[name]

    return version


def test_missing_extra_reads_the_declared_requirements():
    import tomllib

    from mixacm.inputs import missing_extra

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["robustbench"]
    assert declared == ["robustbench==1.1.1", "setuptools<81"]  # the messages below quote them
    assert missing_extra("robustbench", _versions(robustbench="1.1.1", setuptools="80.9.0")) == []
    assert missing_extra("robustbench", _versions(setuptools="81.0.0")) == [
        "robustbench==1.1.1 (not installed)", "setuptools<81 (found 81.0.0)"]


def test_a_robustbench_teacher_without_the_extra_is_refused_with_the_install_line():
    from mixacm.inputs import robustbench_errors

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (error,) = robustbench_errors(cfg, _versions(robustbench="1.1.1", setuptools="81.0.0"))
    assert error.startswith("teachers.cifar10.source (and teachers.imagenet): a RobustBench teacher needs the "
                            "`robustbench` extra, missing here: setuptools<81 (found 81.0.0).")
    assert "pip install -e '.[robustbench]'" in error
    assert robustbench_errors(cfg, _versions(robustbench="1.1.1", setuptools="80.9.0")) == []
    # listed with the other inputs before the first job; configs without such a teacher need nothing
    assert robustbench_errors(config(), _versions()) == []
    cfg["teachers"] = {}
    cfg["recipes"]["mixacm"]["teacher"] = {"source": "robustbench", "name": "Carmon2019Unlabeled"}
    (error,) = robustbench_errors(cfg, _versions())
    assert error.startswith("recipes.mixacm.teacher.source: ") and "robustbench==1.1.1 (not installed)" in error


def test_a_dry_run_refuses_a_robustbench_teacher_without_the_extra(tmp_path):
    # The environment `pip install -e . && pip install robustbench` gives: a setuptools >= 81, which
    # robustbench 1.1.1 cannot import with. Its metadata, first on the path, stands for it here.
    import shutil

    fake = tmp_path / "site" / "setuptools-81.0.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: setuptools\nVersion: 81.0.0\n")
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "environment.yml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", "config/config.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # README's plain install (`pip install -e .`) has no robustbench at all; CI's has the extra.
    try:
        importlib.metadata.version("robustbench")
        absent = ""
    except importlib.metadata.PackageNotFoundError:
        absent = "robustbench==1.1.1 (not installed); "
    assert "teachers.cifar10.source (and teachers.imagenet): a RobustBench teacher needs the `robustbench` extra, " \
           f"missing here: {absent}setuptools<81 (found 81.0.0). Install it from the checkout with pip install -e " \
           "'.[robustbench]'" in out, out
    assert "Traceback" not in out and not (tmp_path / "results").exists()
