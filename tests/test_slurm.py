"""The SLURM profile against a real single-node SLURM on localhost (scripts/slurm/start.sh).

Two fast checks run by default: the test profile overrides only laptop settings, and both profiles
parse as Snakemake options (a dry run). The rest is marked ``slurm`` (root, Debian packages; run
with ``-m slurm``): config/ci.yaml through ``--profile workflow/profiles/slurm --profile
workflow/profiles/slurm-test``, with every job checked against SLURM's own records; a training
job cancelled with scancel resumes from its checkpoint on the re-run; a missing partition and a
request for more GPUs than the node has are refused with SLURM's message and nothing in results/.
Every workflow runs in a copy of workflow/ and config/ under tmp, so the repository's results/
stays untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"
SLURM_PROFILES = (PROFILES / "slurm", PROFILES / "slurm-test")
START, STOP = REPO / "scripts" / "slurm" / "start.sh", REPO / "scripts" / "slurm" / "stop.sh"
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"
SLURM_DIR = Path(os.environ.get("MIXACM_SLURM_DIR", "/tmp/mixacm-slurm"))
LOCAL_PARTITION = "local"
GPU_RULES = {"train_teacher", "train_student", "evaluate_model", "audit_model"}
# What a laptop may change in the real profile (the issue allows status-check delays and the like).
LAPTOP_KEYS = {"default-resources", "slurm-init-seconds-before-status-checks",
               "slurm-status-command", "latency-wait"}


def load_profile(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def copy_workflow(dest: Path, gpus: int = 1, **recipe_overrides) -> Path:
    """workflow/, config/ and environment.yml under ``dest``, plus config/test.yaml: config/ci.yaml
    with two of its experiments (cifar10 with MixACM and AT, less_data), ``gpus`` GPUs for every
    training and evaluation job and the given recipe changes."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, dest / name)
    shutil.copy(REPO / "environment.yml", dest)
    cfg = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    # Every kind of job, fewer of each: what goes through sbatch is the point here, and
    # tests/test_workflow.py runs the whole ci DAG locally.
    cfg["experiments"] = {"cifar10": {**cfg["experiments"]["cifar10"], "recipes": ["mixacm", "at"]},
                          "less_data": cfg["experiments"]["less_data"]}
    for kind in ("teacher", "train", "evaluate", "autoattack"):
        cfg["resources"]["cifar10"][kind]["gpu"] = gpus
    for recipe, changes in recipe_overrides.items():
        for section, values in changes.items():
            cfg["recipes"][recipe].setdefault(section, {}).update(values)
    (dest / "config" / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def snakemake_cmd(workdir: Path, *args: str, profiles=SLURM_PROFILES) -> list[str]:
    cmd = [str(SNAKEMAKE), "-s", str(workdir / "workflow" / "Snakefile"), "--directory", str(workdir)]
    for p in profiles:
        cmd += ["--profile", str(p)]
    # --configfile takes several files: targets must come before it.
    return cmd + list(args) + ["--configfile", str(workdir / "config" / "test.yaml")]


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


# --- default suite: the profiles themselves ------------------------------------------------------

def test_test_profile_overrides_only_laptop_settings():
    real, test = load_profile(PROFILES / "slurm"), load_profile(PROFILES / "slurm-test")
    assert real["executor"] == "slurm"
    assert set(test) <= LAPTOP_KEYS, f"slurm-test changes more than a laptop needs: {set(test) - LAPTOP_KEYS}"
    # default-resources is replaced as a whole: apart from where jobs go (partition, account) it
    # must repeat the real profile's values.
    where = {"slurm_partition", "slurm_account"}
    keep = lambda d: {k: v for k, v in d.items() if k not in where}  # noqa: E731
    assert keep(test["default-resources"]) == keep(real["default-resources"])
    assert test["default-resources"]["slurm_partition"] == LOCAL_PARTITION
    assert {"slurm_partition", "slurm_account"} <= set(real["default-resources"])
    assert test["slurm-init-seconds-before-status-checks"] <= 2


def test_profiles_layer_in_a_dry_run(tmp_path):
    """Every key of both profiles is a valid option (argparse rejects unknown ones), and the
    layering sends jobs to the local partition without the placeholder account."""
    work = copy_workflow(tmp_path / "wf")
    proc = subprocess.run(snakemake_cmd(work, "-n", "results/teachers/cifar10/trained/model.pt"),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(out)
    block = out[out.index("rule train_teacher:"):]
    resources = re.search(r"resources: (.*)", block).group(1)
    assert f"slurm_partition={LOCAL_PARTITION}" in resources
    assert "gpu=1" in resources
    assert "slurm_account" not in resources


def _with_threads(work: Path, train: int) -> None:
    cfg = yaml.safe_load((work / "config" / "test.yaml").read_text())
    cfg["resources"]["cifar10"]["train"]["threads"] = train
    (work / "config" / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_plan_shows_the_threads_to_submit_and_warns_of_the_placeholder_account(tmp_path):
    # the real profile alone, as a user runs it first: `snakemake -n --profile workflow/profiles/slurm`
    work = copy_workflow(tmp_path / "wf")
    _with_threads(work, 3)
    proc = subprocess.run(snakemake_cmd(work, "-n", "results/cifar10/at/tiny/frac1.0/seed0/model.pt",
                                        profiles=(PROFILES / "slurm",)),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(out)
    assert "never awaited" not in out and "RuntimeWarning" not in out, tail(out)
    assert "default-resources.slurm_account is the placeholder 'CHANGE_ME'" in out
    block = out[out.index("rule train_student:"):]
    block = block[:block.index("Shell command:") + 200]
    assert "threads: 3" in block and "OMP_NUM_THREADS=3 mixacm train" in block, block


def test_the_placeholder_account_stops_a_real_run_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    # the local executor stands in for sbatch: the refusal comes before any executor submits
    proc = subprocess.run(snakemake_cmd(work, "--executor", "local", "--cores", "1",
                                        "results/teachers/cifar10/trained/run.yaml", profiles=(PROFILES / "slurm",)),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "default-resources.slurm_account is the placeholder 'CHANGE_ME'" in out, tail(out)
    assert not (work / "results").exists()


# --- the real cluster ------------------------------------------------------------------------------

def _daemon_pids() -> dict[str, int]:
    pairs = (line.split() for line in (SLURM_DIR / "pids").read_text().splitlines())
    return {name: int(pid) for name, pid in pairs}


def _runs(name: str, pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, started for the session and stopped afterwards (left running when it
    was already up before the session)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root (packages, munged, slurmd)")
    have_slurm = all(shutil.which(c) for c in ("munged", "slurmctld", "slurmd", "sbatch"))
    if not have_slurm and not shutil.which("apt-get"):
        pytest.skip("SLURM (munge, slurmctld, slurmd, slurm-client) is not installed and apt-get is not available")
    env = dict(os.environ, MIXACM_SLURM_DIR=str(SLURM_DIR), MIXACM_SLURM_PARTITION=LOCAL_PARTITION)
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        if "apt-get" in proc.stderr:
            pytest.skip(f"SLURM packages could not be installed: {proc.stderr.strip()}")
        if "already in use" in proc.stderr or "its own SLURM configuration" in proc.stderr:
            pytest.skip(f"another SLURM runs on this machine: {proc.stderr.strip()}")
        pytest.fail(f"start.sh failed:\n{proc.stderr}")
    already_up = "already running" in proc.stderr
    env["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
    yield env
    if not already_up:
        subprocess.run(["bash", str(STOP)], env=env, check=True, timeout=120)


def _slurm(env, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def _job_record(env, slurm_id: str) -> dict[str, str]:
    """`scontrol -o -d show job ID` as a dict (one line of KEY=VALUE fields)."""
    line = _slurm(env, "scontrol", "-o", "-d", "show", "job", slurm_id)
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _workflow_env(cluster_env, data_root: Path) -> dict[str, str]:
    # sbatch --export=ALL hands this environment to the jobs: the venv's commands, the data and
    # the decoded-image cache the other tests fill.
    return dict(cluster_env, PATH=f"{VENV_BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
                MIXACM_DATA_CIFAR10=str(data_root),
                MIXACM_CACHE_DIR=os.environ.get("MIXACM_CACHE_DIR", str(REPO / ".cache" / "mixacm")))


def _jobs_in_log(out: str) -> dict[int, tuple[str, str]]:
    """Snakemake job id -> ("rule" | "localrule", rule name), from the job headers it prints."""
    jobs, current = {}, None
    for line in out.splitlines():
        m = re.match(r"^(localrule|rule) (\w+):$", line)
        if m:
            current = m.groups()
            continue
        m = re.match(r"^\s+jobid: (\d+)$", line)
        if m and current:
            jobs[int(m.group(1))] = current
            current = None
    return jobs


@pytest.mark.slurm
def test_start_twice_is_harmless(slurm_cluster):
    before = _daemon_pids()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, env=slurm_cluster, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    assert _daemon_pids() == before
    assert all(_runs(name, pid) for name, pid in before.items())
    assert "idle" in _slurm(slurm_cluster, "sinfo", "-h", "-o", "%T")


@pytest.mark.slurm
def test_fake_gpus_reach_jobs(slurm_cluster, tmp_path):
    log = tmp_path / "job.log"
    jid = _slurm(slurm_cluster, "sbatch", "--parsable", "--gpus=2", "-o", str(log),
                 "--wrap", "echo seen=$CUDA_VISIBLE_DEVICES").strip()
    for _ in range(120):
        if _job_record(slurm_cluster, jid)["JobState"] == "COMPLETED":
            break
        time.sleep(0.5)
    assert "seen=0,1" in log.read_text()
    refused = subprocess.run(["sbatch", "--gpus=3", "--wrap", "true"], env=slurm_cluster,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "Requested node configuration is not available" in refused.stderr


@pytest.mark.slurm
def test_ci_workflow_runs_every_job_through_sbatch(slurm_cluster, cifar10_jpeg_root, tmp_path):
    work = copy_workflow(tmp_path / "wf")
    env = _workflow_env(slurm_cluster, cifar10_jpeg_root)
    proc = subprocess.run(snakemake_cmd(work), env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(out)
    assert (work / "report" / "paper_tables.html").is_file()

    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    jobs = _jobs_in_log(out)
    submitted = {int(j): s for j, s in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)}
    remote = {j for j, (kind, _) in jobs.items() if kind == "rule"}
    # Every job that is not a local rule went through sbatch, and SLURM knows no other job of this run.
    assert remote and set(submitted) == remote
    assert {jobs[j][1] for j in remote} == GPU_RULES
    in_slurm = _slurm(env, "squeue", "--states=all", "--name", run_id, "-h", "-o", "%i").split()
    assert sorted(in_slurm) == sorted(submitted.values())

    for job, slurm_id in submitted.items():
        rule = jobs[job][1]
        rec = _job_record(env, slurm_id)
        assert rec["JobName"] == run_id
        assert rec["JobState"] == "COMPLETED", (rule, rec)
        assert rec["Partition"] == LOCAL_PARTITION
        assert rec["Comment"].startswith(f"rule_{rule}")
        # The GPU rules asked SLURM for a GPU, and the job was given one.
        assert rec["TresPerJob"] == "gres:gpu:1", (rule, rec)
        assert rec["JOB_GRES"] == "gpu:1", (rule, rec)
        job_log = Path(rec["StdOut"]).read_text()
        assert re.search(rf"job {slurm_id} step batch CUDA_VISIBLE_DEVICES=[01]\b", job_log), job_log[-2000:]


@pytest.mark.slurm
def test_cancelled_training_resumes_on_rerun(slurm_cluster, cifar10_jpeg_root, tmp_path):
    epochs = 6
    work = copy_workflow(tmp_path / "wf", at={"optim": {"epochs": epochs}, "train": {"max_steps_per_epoch": 20}})
    env = _workflow_env(slurm_cluster, cifar10_jpeg_root)
    run = work / "results" / "cifar10" / "at" / "tiny" / "frac1.0" / "seed0"
    # --retries 0: the cancelled job is not resubmitted in this run; the re-run below resumes it.
    cmd = snakemake_cmd(work, "--retries", "0", str(run.relative_to(work) / "model.pt"))
    log = tmp_path / "first.log"
    with log.open("w") as fh:
        first = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            # Cancel once the first epoch's checkpoint is on disk (state.pt is written before
            # metrics.jsonl).
            deadline = time.monotonic() + 600
            while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
                assert first.poll() is None, f"snakemake ended before training started:\n{tail(log.read_text())}"
                assert time.monotonic() < deadline, "training did not finish an epoch in 600 s"
                time.sleep(0.3)
            running = _slurm(env, "squeue", "-h", "-t", "RUNNING", "-o", "%i %k").splitlines()
            slurm_id = next(line.split()[0] for line in running if line.split()[1].startswith("rule_train_student"))
            _slurm(env, "scancel", slurm_id)
            rc = first.wait(timeout=600)
        finally:
            if first.poll() is None:
                first.kill()
    out = log.read_text()
    assert rc != 0 and "CANCELLED" in out, tail(out)
    assert _job_record(env, slurm_id)["JobState"] == "CANCELLED"
    assert not (run / "model.pt").exists()
    done = torch.load(run / "state.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= done < epochs, f"the cancel came after epoch {done} of {epochs}: not halfway"

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, tail(second.stdout + second.stderr)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == done
    assert summary["epochs"] == epochs
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, epochs + 1))


@pytest.mark.slurm
@pytest.mark.parametrize("bad_profile, refusal", [
    ({"default-resources": {"slurm_partition": "nosuchpartition", "runtime": 60, "mem_mb": 4000}},
     "invalid partition specified: nosuchpartition"),
    ({"set-resources": {"train_teacher": {"gpu": 3}}},
     "Requested node configuration is not available"),
], ids=["missing-partition", "too-many-gpus"])
def test_refused_submission_is_a_clear_error(slurm_cluster, cifar10_jpeg_root, tmp_path, bad_profile, refusal):
    work = copy_workflow(tmp_path / "wf")
    bad = tmp_path / "bad-profile"
    bad.mkdir()
    (bad / "config.yaml").write_text(yaml.safe_dump(bad_profile))
    target = "results/teachers/cifar10/trained/model.pt"
    proc = subprocess.run(snakemake_cmd(work, target, profiles=(*SLURM_PROFILES, bad)),
                          env=_workflow_env(slurm_cluster, cifar10_jpeg_root),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SLURM sbatch failed" in out and refusal in out, tail(out)
    # Only what the local rule finished before submitting is there: the run config (complete,
    # readable) and that rule's benchmark record; nothing of the refused job.
    files = sorted(p.relative_to(work).as_posix() for p in (work / "results").rglob("*") if p.is_file())
    assert files == ["results/benchmarks/write_teacher_config/cifar10.tsv",
                     "results/teachers/cifar10/trained/run.yaml"]
    run_yaml = work / "results/teachers/cifar10/trained/run.yaml"
    assert yaml.safe_load(run_yaml.read_text())["name"] == "teachers/cifar10/trained"


@pytest.mark.slurm
def test_stop_ends_exactly_the_daemons_it_started(slurm_cluster):
    pids = _daemon_pids()
    subprocess.run(["bash", str(STOP)], env=slurm_cluster, check=True, capture_output=True, timeout=120)
    try:
        assert not any(_runs(name, pid) for name, pid in pids.items())
        assert not (SLURM_DIR / "pids").exists()
        assert not Path("/etc/slurm/slurm.conf").exists()
        again = subprocess.run(["bash", str(STOP)], env=slurm_cluster, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing to stop" in again.stderr
    finally:
        # Leave the cluster as the session fixture expects it.
        subprocess.run(["bash", str(START)], env=slurm_cluster, check=True, capture_output=True, timeout=300)
