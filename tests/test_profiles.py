"""The default workflow profile: picked up without a flag, and harmless under the other profiles
(Snakemake layers it over every --profile, key by key)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"
BIN = Path(sys.executable).parent


def load(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def test_default_profile_repeats_what_local_and_slurm_agree_on():
    default, local, slurm = load("default"), load("local"), load("slurm")
    assert {"rerun-incomplete", "show-failed-logs"} <= set(default)
    for key, value in default.items():
        # overriding the slurm or local profile with a different value would change them silently
        assert local.get(key) == value and slurm.get(key) == value, key
    assert not set(default) & set(load("slurm-test"))
    assert "cores" not in default and "jobs" not in default and "executor" not in default


def test_plain_snakemake_uses_the_default_profile(tmp_path):
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "environment.yml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", "results/table_ablation.csv"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Using workflow specific profile workflow/profiles/default" in proc.stderr
    # printshellcmds from the profile: the shell commands appear in the dry run's plan
    assert "mixacm train --config" in proc.stdout + proc.stderr
