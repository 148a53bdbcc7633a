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


def test_torch_pins_admit_the_cpu_only_builds(repo_root):
    # README "Installing without a GPU": PyTorch's CPU index serves 2.14.1+cpu / 0.29.1+cpu; a pin
    # without a local label matches them, so `pip install -e .` keeps a CPU-only torch.
    from packaging.requirements import Requirement

    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    pins = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    readme = (repo_root / "README.md").read_text()
    for name in ("torch", "torchvision"):
        (version,) = [s.version for s in pins[name]]
        assert pins[name].contains(f"{version}+cpu")
        assert f"{name}=={version}" in readme.split("## Installing without a GPU")[1].split("\n## ")[0]


def test_ci_runs_the_readmes_test_command(repo_root):
    import re

    ci = (repo_root / ".ci" / "run").read_text()
    (line,) = [l for l in ci.splitlines() if l.startswith("python -m pytest")]
    tests = (repo_root / "README.md").read_text().split("\n## Tests\n")[1].split("\n## ")[0]
    assert re.search(rf"^{re.escape(line.removeprefix('python -m '))}\s+#", tests, re.M), line


def test_xdist_keeps_a_group_on_one_worker(tmp_path):
    """CI's `-n 2 --dist loadgroup` keeps the tests of one shared run (and one SLURM cluster) on
    one worker; with pytest 9.2 and pytest-xdist 3.8 the groups were silently ignored."""
    import subprocess
    import sys

    (tmp_path / "test_groups.py").write_text(
        "import os, pytest\n"
        + "".join(f"@pytest.mark.xdist_group('g')\ndef test_{i}():\n    print('WORKER', os.environ['PYTEST_XDIST_WORKER'])\n"
                  for i in range(4)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                           "-rP", "-c", "/dev/null", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    workers = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("WORKER")}
    assert len(workers) == 1, proc.stdout[-2000:]
