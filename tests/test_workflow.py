"""The Snakemake workflow: dry runs of every config and target, lint, config validation before
any job, a real end-to-end run of config/ci.yaml (slow) and kill-and-resume of training (slow).

Every test runs on a copy of workflow/, config/ and environment.yml in a tmp dir, so the
repository's results/ is never touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = [
    "results/table_cifar10.csv",
    "results/table_imagenet.csv",
    "results/table_less_data.csv",
    "results/table_ablation.csv",
    "report/paper_tables.html",
]
CONFIGS = ["config", "quick", "ci"]


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "workflow", dest / "workflow")
    shutil.copytree(REPO / "config", dest / "config")
    shutil.copy(REPO / "environment.yml", dest / "environment.yml")
    return dest


def snakemake_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", **extra)
    return env


def snakemake(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=cwd, env=env or snakemake_env(),
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def wf(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("wf"))


# -- dry runs and lint ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_every_target(wf, name, request):
    # No data, no teacher files, no MIXACM_DATA_* variables: a dry run needs none of them (the
    # packages of config.yaml's RobustBench teachers it does need).
    if name == "config":
        request.getfixturevalue("robustbench_extra")
    proc = snakemake(wf, *TARGETS, "-n", "-p", "--configfile", f"config/{name}.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout + proc.stderr
    for rule in ("train_student", "evaluate_model", "render_table", "render_report"):
        assert rule in out, f"{name}: no {rule} job planned"
    for result in ("eval_clean_pgd.json", "eval_autoattack.json"):
        assert result in out, f"{name}: no {result} planned"
    teacher_rule = "fetch_teacher_robustbench" if name == "config" else "train_teacher"
    assert teacher_rule in out
    assert not (wf / "results").exists(), "a dry run must write nothing"
    if name == "config":
        # ImageNet students train on 4 GPUs under torchrun; CIFAR-10 ones as one process.
        assert "torchrun --standalone --nproc-per-node 4 -m mixacm.cli train" in out
        assert "mixacm train --config results/cifar10/mixacm/wrn-34-10/frac1.0/seed0/run.yaml" in out
    else:
        assert "torchrun" not in out


def test_cpu_claims_config_plans_each_evaluation_once(tmp_path, shared_models):
    # config/cifar10_cpu.yaml names the shared teacher file by a path relative to the checkout,
    # so the copy gets a ../shared beside it.
    wf = copy_workflow(tmp_path / "repo")
    (tmp_path / "shared").symlink_to(shared_models.parent)
    proc = snakemake(wf, *TARGETS, "teacher_evaluation", "-n", "--configfile", "config/cifar10_cpu.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cfg = yaml.safe_load((wf / "config" / "cifar10_cpu.yaml").read_text())
    exps = cfg["experiments"]

    def runs_of(name):
        e = exps[name]
        return {(r, f, s) for r in e["recipes"]
                for f in e.get("recipe_fractions", {}).get(r, e.get("fractions", [1.0]))
                for s in e.get("recipe_seeds", {}).get(r, e.get("seeds", cfg["seeds"]))}

    runs = set().union(*(runs_of(name) for name in exps))
    main = runs_of("cifar10")
    # three seeds for MixACM (paper-faithful and best variant) and AT, two for the rest; the
    # fixed-steps curve has no full-data runs of its own (they would repeat the plain ones)
    assert not any(r.endswith("_fixed_steps") and f == 1.0 for r, f, _ in runs)
    assert {s for r, _, s in main if r == "at"} == {0, 1, 2} and {s for r, _, s in main if r == "trades"} == {0, 1}
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    # one training and one clean + PGD job per run
    assert int(counts["train_student"]) == len(runs)
    planned = set(re.findall(r"^\s+output: (results/\S+/eval_\w+\.json)$", proc.stdout, re.M))
    # the audit of every main-comparison run (shared with the transfer table) and of the teacher
    audits = {p for p in planned if p.endswith("/eval_audit.json")}
    assert int(counts["audit_model"]) == len(main) and int(counts["audit_teacher"]) == 1
    assert "results/teachers/cifar10/eval_audit.json" in audits and len(audits) == len(main) + 1
    planned -= audits
    student = [p for p in planned if not p.startswith("results/teachers/")]
    assert len([p for p in student if p.endswith("/eval_clean_pgd.json")]) == len(runs)
    attacked = [(r, f, s) for r, f, s in main if r in exps["cifar10"]["autoattack"]]
    assert len([p for p in student if p.endswith("/eval_autoattack.json")]) == len(attacked)
    # the dataset's teacher and each trained recipe's own teacher, imported once each
    own = {r for r, _, _ in runs if cfg["recipes"][r].get("teacher")}
    assert int(counts["import_teacher_file"]) == 1 + len(own)
    # the teacher on the same test data: clean + PGD, AA
    assert sorted(p for p in planned if p.startswith("results/teachers/")) == [
        "results/teachers/cifar10/eval_autoattack.json", "results/teachers/cifar10/eval_clean_pgd.json"]
    assert int(counts["evaluate_model"]) == len(planned)


def test_autoattack_and_audit_lists_plan_only_the_listed_recipes(wf):
    # quick.yaml: AutoAttack and the audit for the MixACM and AT runs of the main table only.
    cfg = yaml.safe_load((wf / "config" / "quick.yaml").read_text())
    main = cfg["experiments"]["cifar10"]
    assert main["autoattack"] == main["audit"] == ["mixacm", "at"]
    proc = snakemake(wf, "-n", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    planned = set(re.findall(r"^\s+output: (results/\S+/eval_\w+\.json)$", proc.stdout, re.M))
    for kind in ("autoattack", "audit"):
        runs = sorted(p.split("/")[2] for p in planned
                      if p.endswith(f"/eval_{kind}.json") and not p.startswith("results/teachers/"))
        assert runs == ["at", "mixacm"], kind
    # every run still gets clean + PGD-20
    assert {p.split("/")[2] for p in planned if p.endswith("/eval_clean_pgd.json")} >= set(main["recipes"])


def test_nested_config_overrides_are_read_as_yaml(wf):
    # Snakemake hands nested --config values over as strings; the workflow reads them as YAML,
    # so the number reaches the checks (a string 0 would fail the type check instead).
    proc = snakemake(wf, "-n", "--configfile", "config/quick.yaml", "--config", "recipes={at: {optim: {epochs: 0}}}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key recipes.at.optim.epochs: 0 is less than the minimum of 1" in out, out
    proc = snakemake(wf, "-n", "--configfile", "config/quick.yaml",
                     "--config", "recipes={at: {optim: {epochs: 1, lr: 0.1}}}", "seeds=[0, 1]")
    assert proc.returncode == 0, proc.stderr
    assert "results/cifar10/at/tiny/frac1.0/seed1/model.pt" in proc.stdout
    # strings YAML would read as something else than a scalar stay strings: here a value the
    # schema then rejects by name, not a YAML traceback
    proc = snakemake(wf, "-n", "--configfile", "config/quick.yaml", "--config", "teachers={cifar10: {recipe: '@x'}}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out and "ScannerError" not in out
    assert "@x" in out, out


def test_lint_is_clean(wf):
    proc = snakemake(wf, "--lint", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_job_rule_declares_resources_log_and_benchmark():
    blocks = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        blocks += [(smk.name, b) for b in re.split(r"\n(?=rule \w+:)", text)[1:]]
    jobs = [(f, b) for f, b in blocks if "\n    shell:" in b or "\n    run:" in b]
    assert len(jobs) >= 11  # every rule file was read (one evaluation rule, three teacher sources)
    for f, block in jobs:
        name = block.split(":", 1)[0]
        for directive in ("threads:", "resources:", "log:", "benchmark:"):
            assert f"\n    {directive}" in block, f"{f}: {name} has no {directive}"
        resources = block.split("\n    resources:", 1)[1].split("\n    log:", 1)[0]
        for key in ("mem_mb=", "runtime=", "gpu="):
            assert key in resources, f"{f}: {name} declares no {key[:-1]}"


# -- bad configs stop before any job -------------------------------------------------------------


def _bad(cfg: dict, path: list, value) -> dict:
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (["evaluation", "cifar10", "epz"], "8/255", "'epz' was unexpected"),
        (["recipes", "at", "optim", "lr"], "fast", "recipes.at.optim.lr"),
        (["evaluation", "cifar10", "eps"], 8, "evaluation.cifar10.eps"),
        pytest.param(["evaluation", "cifar10", "eps"], "300/255", "evaluation.cifar10.eps",
                     marks=pytest.mark.slow),
        (["experiments", "less_data", "fractions"], [0.5, 1.5], "experiments.less_data.fractions.1"),
        (["teachers", "cifar10"], {"source": "file", "path": "missing/teacher.pt", "arch": "tiny"},
         "teachers.cifar10.path"),
        pytest.param(["recipes", "at", "knobs", "eps"], 8, "recipes.at.knobs", marks=pytest.mark.slow),
        (["recipes", "unused"], {"method": "at", "knobs": {"eps": 8}}, "recipes.unused.knobs"),
        (["recipes", "unused"], {"method": "at", "optim": {"schedule": "linear"}}, "recipes.unused.optim.schedule"),
        (["recipes", "unused"], {"method": "adv_at"}, "recipes.unused.method: unknown method 'adv_at'"),
        (["experiments", "cifar10", "autoattack_standard"], ["standard"],
         "experiments.cifar10.autoattack_standard[0]"),
        (["experiments", "cifar10", "autoattack_standard"], ["mixacm"],
         "evaluation.cifar10.autoattack_standard.n"),
        (["experiments", "cifar10", "autoattack"], ["mixacm", "ard"], "experiments.cifar10.autoattack[1]"),
        (["experiments", "cifar10", "audit"], ["awp"], "experiments.cifar10.audit[0]"),
        (["recipes", "mixacm", "teacher"], {"source": "file", "path": "missing/teacher.pt", "arch": "tiny"},
         "recipes.mixacm.teacher.path: teacher file 'missing/teacher.pt' does not exist"),
        (["recipes", "mixacm", "teacher"], {"source": "train", "recipe": "at", "arch": "tiny"},
         "recipes.mixacm.teacher.source: a recipe's own teacher is imported"),
        (["recipes", "at", "teacher"], {"source": "url", "url": "https://example.org/t.pt", "sha256": "0" * 64, "arch": "tiny"},
         "recipes.at.teacher: method 'at' does not distil from a teacher"),
        (["experiments", "less_data", "recipe_fractions"], {"trades": [0.5]},
         "experiments.less_data.recipe_fractions.trades: recipe 'trades' is not one of this experiment's recipes"),
        (["experiments", "cifar10", "recipe_seeds"], {"mixacm": [0, 1, 2], "ard": [0]},
         "experiments.cifar10.recipe_seeds.ard: recipe 'ard' is not one of this experiment's recipes"),
        (["experiments", "imagenet"], {"dataset": "imagenet", "arch": "tiny", "recipes": ["at"]},
         "experiments.imagenet.recipes[0]: method 'at' (recipe 'at') has no recipe for dataset 'imagenet'"),
        (["recipes", "mixacm", "knobs"], {"terms": [{"term": "crd"}]},
         "knob 'terms' of method 'mixacm'[0].term: unknown distillation term 'crd'; "
         "valid: acm, at, fitnet, kd, sp"),
        (["recipes", "mixacm", "knobs"], {"terms": [{"term": "at", "blocks": [["layer3", "layer4"]]}]},
         "the teacher has no feature(s) ['layer4']; valid: ['stem', 'layer1', 'layer2', 'layer3']"),
    ],
    ids=["unknown-key", "wrong-type", "eps-8", "eps-300/255", "fraction-1.5", "missing-teacher-file",
         "knob-eps-8", "unused-recipe-knob", "unused-recipe-optim", "unknown-method", "standard-aa-unknown-recipe",
         "standard-aa-without-n", "aa-list-unknown-recipe", "audit-list-unknown-recipe", "recipe-teacher-missing-file", "recipe-teacher-trained",
         "recipe-teacher-non-distilling", "recipe-fractions-unknown-recipe", "recipe-seeds-unknown-recipe", "no-recipe-for-dataset", "unknown-term", "missing-block"],
)
def test_bad_config_stops_before_any_job(wf, path, value, expected):
    cfg = _bad(yaml.safe_load((wf / "config" / "quick.yaml").read_text()), path, value)
    (wf / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wf, "--cores", "1", "--configfile", "bad.yaml")
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "Building DAG" not in proc.stdout + proc.stderr
    assert not (wf / "results").exists() and not (wf / "logs").exists()


# -- real runs (slow) ----------------------------------------------------------------------------

REQUIRED_COLUMNS = [
    "status", "method", "student", "teacher", "data_fraction", "n_seeds",
    "clean_mean", "clean_n", "clean_package", "pgd20_mean", "pgd20_n", "pgd20_package",
    "autoattack_mean", "autoattack_n", "autoattack_package", "autoattack_version",
    "autoattack_apgd_mean", "autoattack_apgd_n", "autoattack_apgd_package",
    "train_device_hours", "files",
]
PAPER_COLUMNS = ["paper_clean", "paper_robust", "diff_clean", "diff_robust"]


@pytest.mark.slow
def test_ci_config_end_to_end(tmp_path, cifar10_jpeg_root):
    wf = copy_workflow(tmp_path / "wf")
    env = snakemake_env(MIXACM_DATA_CIFAR10=str(cifar10_jpeg_root),
                        MIXACM_CACHE_DIR=str(tmp_path / "cache"))
    # (a hang guard: CI runs it beside another pytest worker on the same two cores)
    proc = snakemake(wf, "--profile", "workflow/profiles/local", "--cores", "2",
                     "--configfile", "config/ci.yaml", env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (wf / "report" / "paper_tables.html").stat().st_size > 0
    for fig in ("less_data", "clean_vs_robust", "training_cost", "transfer", "eps_sweep"):
        assert (wf / "results" / "figures" / f"{fig}.png").stat().st_size > 0
    # The main comparison is audited: every run has an audited robust accuracy, at most its PGD-20.
    main = pd.read_csv(wf / "results" / "table_cifar10.csv")
    main = main[main["status"] == "trained"]
    assert main["audited_mean"].notna().all() and (main["audited_mean"] <= main["pgd20_mean"]).all()

    ci = yaml.safe_load((wf / "config" / "ci.yaml").read_text())
    for kind in ("cifar10", "imagenet", "less_data", "ablation", "transfer"):
        table = pd.read_csv(wf / "results" / f"table_{kind}.csv")
        columns = REQUIRED_COLUMNS + (PAPER_COLUMNS if kind not in ("less_data", "transfer") else [])
        assert set(columns) <= set(table.columns), (kind, set(columns) - set(table.columns))
        reproduced = table[table["status"] == "trained"]
        exp = ci["experiments"].get(kind)
        expected_rows = 0 if exp is None else len(exp["recipes"]) * len(exp.get("fractions", [1.0]))
        if kind == "transfer":
            expected_rows += 1  # the teacher's own row
            assert reproduced["method_key"].tolist() == ["teacher", "at", "mixacm", "igam", "ard", "rslad"]
        assert len(reproduced) == expected_rows, kind
        if kind == "cifar10":  # the paper's AWP, FAT and IGAM rows are trained, not cited
            cited = set(table.loc[table["status"] == "cited", "method"])
            assert not cited & {"TRADES-AWP", "FAT", "IGAM"}, cited
            assert "AT-AWP" in set(table.loc[table["status"] == "trained", "method"])
        for _, row in reproduced.iterrows():
            files = [wf / f for f in row["files"].split(";")]
            docs = [json.loads(f.read_text()) for f in files]
            # Every number in the row is the one in its result files.
            attacks = (("clean", ["clean"]), ("pgd20", ["pgd20"]))
            aa = exp.get("autoattack", True)
            if aa is True or (isinstance(aa, list) and row["method_key"] in aa):
                attacks += (("autoattack_apgd", ["autoattack-apgd"]),)
            for col, keys in attacks:
                # PGD-20 on all the points; the AutoAttack file's PGD-20 on its own fewer points
                # is the autoattack_apgd_pgd20 column
                metrics = sorted((d["metrics"][k] for d in docs for k in keys if k in d["metrics"]),
                                 key=lambda m: -m["n"])
                if col == "pgd20" and len(metrics) == 2:
                    assert row["autoattack_apgd_pgd20_mean"] == pytest.approx(metrics[1]["accuracy_pct"], abs=1e-4)
                    assert metrics[1]["n"] == row["autoattack_apgd_n"] < metrics[0]["n"]
                    metrics = metrics[:1]
                assert len(metrics) == 1, (kind, col)
                assert row[f"{col}_mean"] == pytest.approx(metrics[0]["accuracy_pct"], abs=1e-4)
                assert row[f"{col}_n"] == metrics[0]["n"]
                assert metrics[0]["correct"] == round(metrics[0]["accuracy_pct"] * metrics[0]["n"] / 100)
            assert row["data_fraction"] == docs[0]["run"]["data_fraction"]
            assert row["student"] == docs[0]["run"]["arch"] == "tiny"
            assert row["train_device_hours"] > 0  # the teacher's too: it is trained in the DAG
    assert (table := pd.read_csv(wf / "results" / "table_cifar10.csv"))["autoattack_apgd_n"].max() == 10

    # A second run has nothing to do: nothing is retrained needlessly.
    proc = snakemake(wf, "--profile", "workflow/profiles/local", "-n", "--configfile", "config/ci.yaml",
                     env=env)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_training_resumes_and_matches_uninterrupted_run(tmp_path, cifar10_jpeg_root):
    wf = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config" / "ci.yaml").read_text())
    # One training job long enough to be killed after its first epoch's checkpoint.
    cfg["recipes"]["teacher_at"]["optim"]["epochs"] = 3
    cfg["recipes"]["teacher_at"]["train"]["max_steps_per_epoch"] = 40
    (wf / "kill.yaml").write_text(yaml.safe_dump(cfg))
    env = snakemake_env(MIXACM_DATA_CIFAR10=str(cifar10_jpeg_root),
                        MIXACM_CACHE_DIR=str(tmp_path / "cache"))
    run_dir = wf / "results" / "teachers" / "cifar10" / "trained"
    target = "results/teachers/cifar10/trained/model.pt"
    cmd = [str(BIN / "snakemake"), target, "--profile", "workflow/profiles/local", "--cores", "1",
           "--configfile", "kill.yaml"]

    proc = subprocess.Popen(cmd, cwd=wf, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "state.pt").exists():
            assert proc.poll() is None, "snakemake ended before the first checkpoint"
            assert time.monotonic() < deadline, "no state.pt after 300 s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its job, as a scheduler would
        proc.wait()
    assert (run_dir / "state.pt").exists() and not (run_dir / "model.pt").exists()

    assert snakemake(wf, "--unlock", "--configfile", "kill.yaml", env=env).returncode == 0
    done = snakemake(wf, target, "--profile", "workflow/profiles/local", "--cores", "1",
                     "--configfile", "kill.yaml", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] >= 1

    # The same run config, uninterrupted, gives the same weights.
    ref = subprocess.run(
        [str(BIN / "mixacm"), "train", "--config", str(run_dir / "run.yaml"), "--out-dir", str(tmp_path / "ref")],
        cwd=wf, env=env, capture_output=True, text=True, timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed, straight = _state_dict(run_dir / "model.pt"), _state_dict(tmp_path / "ref" / "model.pt")
    assert resumed.keys() == straight.keys()
    for key in resumed:
        assert torch.equal(resumed[key], straight[key]), key


def test_a_recipe_with_its_own_teacher_distils_from_it(tmp_path, shared_models):
    # quick.yaml trains its dataset teacher; a copy of the mixacm recipe names the shared
    # resnet2b file as its own teacher (the same-architecture variant of cifar10_cpu.yaml).
    wf = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config" / "quick.yaml").read_text())
    own = {"source": "file", "path": str(shared_models / "resnet2b.pth"), "arch": "resnet2b"}
    cfg["recipes"]["mixacm_same_arch"] = {**cfg["recipes"]["mixacm"], "teacher": own, "variant": "same-arch teacher"}
    cfg["experiments"]["cifar10"]["recipes"].append("mixacm_same_arch")
    cfg["experiments"]["cifar10"]["arch"] = "resnet2b"
    (wf / "own.yaml").write_text(yaml.safe_dump(cfg))
    runs = ["results/cifar10/mixacm_same_arch/resnet2b/frac1.0/seed0/run.yaml",
            "results/cifar10/mixacm/resnet2b/frac1.0/seed0/run.yaml"]
    target = "results/teachers/cifar10/mixacm_same_arch/file/model.pt"
    proc = snakemake(wf, target, *runs, "--cores", "1", "--configfile", "own.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mixacm.checkpoint import load_model_file
    _, info = load_model_file(wf / target)
    assert info["model"]["name"] == "resnet2b"
    assert yaml.safe_load((wf / runs[0]).read_text())["teacher"] == target
    assert yaml.safe_load((wf / runs[1]).read_text())["teacher"] == "results/teachers/cifar10/trained/model.pt"
    # the results name the recipe's teacher; its training and audit read that file
    proc = snakemake(wf, "-n", "-p", runs[0].replace("run.yaml", "eval_audit.json"), "--configfile", "own.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"teacher": "resnet2b (resnet2b.pth)"' in proc.stdout
    assert f"--source teacher={target}" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("source", ["file", "url"])
def test_teacher_rules_write_model_files(tmp_path, shared_models, cifar10_jpeg_root, source):
    from mixacm.checkpoint import load_model_file

    wf = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config" / "ci.yaml").read_text())
    checkpoint = shared_models / "resnet4b.pth"
    sha = "6158f9668935890e832d4e0fdc3b6cece2386ec826319eac36f329490b7729e7"  # models/README.md
    cfg["teachers"]["cifar10"] = (
        {"source": "file", "path": str(checkpoint), "arch": "resnet4b", "check": {"n": 200}} if source == "file"
        else {"source": "url", "url": checkpoint.as_uri(), "sha256": sha, "arch": "resnet4b"}
    )
    if source == "file":  # the import's accuracy check reads the test data from data.cifar10.root
        cfg["data"]["cifar10"]["root"] = str(cifar10_jpeg_root)
    (wf / "teacher.yaml").write_text(yaml.safe_dump(cfg))
    target = f"results/teachers/cifar10/{source}/model.pt"
    proc = snakemake(wf, target, "--cores", "1", "--configfile", "teacher.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, info = load_model_file(wf / target)
    assert info["model"]["name"] == "resnet4b"
    assert info["meta"]["source_sha256"] == sha
    # The import measured the teacher where ci.yaml's test data is, against the file's test_acc.
    check = info["meta"]["accuracy_check"]
    assert check["stated_clean_acc_pct"] == pytest.approx(77.2)
    if source == "file":
        assert check["status"] == "agrees" and check["n"] == 200
    # A distilling student's run config points at that file; a baseline's has no teacher.
    runs = ["results/cifar10/mixacm/tiny/frac1.0/seed0/run.yaml", "results/cifar10/at/tiny/frac1.0/seed0/run.yaml"]
    proc = snakemake(wf, *runs, "--cores", "1", "--configfile", "teacher.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((wf / runs[0]).read_text())["teacher"] == target
    assert yaml.safe_load((wf / runs[1]).read_text())["teacher"] is None
