"""environment.yml and pyproject.toml are one dependency list: they must agree exactly."""
from __future__ import annotations

import tomllib

import yaml


def test_environment_yml_and_pyproject_list_the_same_dependencies(repo_root):
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    assert pip_section == project["dependencies"]
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"]


def test_console_script_points_at_the_cli(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"mixacm": "mixacm.cli:main"}
