"""Tables, figures and the HTML report from hand-made result files.

Every expected number below is computed by hand from the values the factory writes, so a table
that averages the wrong seeds, mixes attacks or subtracts the wrong paper number fails.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mixacm.report import (
    ResultFileError,
    build_table,
    collect_costs,
    collect_results,
    load_paper_numbers,


    write_table,
)

CHROMIUM = Path("/usr/bin/chromium")
ATTACK_PACKAGES = {"clean": ("mixacm", "0.1.0"), "pgd20": ("mixacm", "0.1.0"),
                   "autoattack": ("pyautoattack", "0.2.0"),
                   "autoattack-apgd": ("pyautoattack", "0.2.0")}


class ResultFactory:
    """Writes result JSON files in the documented format (docs/architecture.md, Evaluation)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def __call__(self, method: str, seed: int, accs: dict[str, float], *, n: int = 1000,
                 arch: str = "wrn-34-10", dataset: str = "cifar10", fraction: float = 1.0,
                 variant: str | None = None, eps: float = 8 / 255, eps_text: str = "8/255",
                 teacher: str | None = "teacher.pt", config_hash: str | None = None,
                 commit: str = "abc1234") -> Path:
        self.count += 1
        run = {"method": method, "arch": arch, "teacher": teacher, "dataset": dataset,
               "data_source": "CIFAR-10 (JPEG copy)", "data_fraction": fraction, "seed": seed,
               "config_hash": config_hash or f"h{self.count:04d}", "checkpoint": f"ck{self.count}.pt",
               "checkpoint_sha256": "0" * 64}
        if variant is not None:
            run["variant"] = variant
        metrics = {}
        for key, acc in accs.items():
            package, version = ATTACK_PACKAGES[key]
            metrics[key] = {"accuracy_pct": acc, "correct": round(acc * n / 100), "n": n,
                            "attack": {"name": key, "package": package, "version": version}}
        doc = {"schema": 1, "run": run, "eps": eps, "eps_text": eps_text, "metrics": metrics,
               "provenance": {"git_commit": commit, "torch_version": "2.14.1", "device": "cpu",
                              "wall_time_s": 1.5}}
        path = self.root / f"result{self.count}.json"
        path.write_text(json.dumps(doc))
        return path


@pytest.fixture()
def make_result(tmp_path: Path) -> ResultFactory:
    (tmp_path / "results").mkdir()
    return ResultFactory(tmp_path / "results")


@pytest.fixture()
def scenario(make_result: ResultFactory, tmp_path: Path) -> dict:
    """MixACM over three seeds, AT over two, one TRADES seed with only the APGD AutoAttack,
    a less-data curve, an ablation variant, and training summaries / benchmark files."""
    files = [
        make_result("mixacm", 0, {"clean": 90.0, "pgd20": 55.0, "autoattack": 50.0}, config_hash="m0"),
        make_result("mixacm", 1, {"clean": 91.0, "pgd20": 56.0, "autoattack": 52.0}, config_hash="m1"),
        make_result("mixacm", 2, {"clean": 92.5, "pgd20": 57.5, "autoattack": 51.0}, config_hash="m2"),
        make_result("at", 0, {"clean": 86.0, "pgd20": 48.0}, config_hash="a0", teacher=None),
        make_result("at", 1, {"clean": 87.0, "pgd20": 49.0}, config_hash="a1", teacher=None),
        make_result("trades", 0, {"clean": 84.0, "pgd20": 55.0, "autoattack-apgd": 52.5},
                    config_hash="t0", n=500, teacher=None),
        make_result("mixacm", 0, {"clean": 80.0, "pgd20": 45.0}, fraction=0.1, config_hash="f1"),
        make_result("mixacm", 0, {"clean": 85.0, "pgd20": 50.0}, fraction=0.5, config_hash="f5"),
        make_result("mixacm", 0, {"clean": 88.0, "pgd20": 47.0}, variant="acm+kd", config_hash="v0"),
    ]
    cost_dir = tmp_path / "costs"
    costs = []
    for h, name, wall, dh in [("m0", "cifar10/mixacm/seed0", 3600.0, 1.0),
                              ("m1", "cifar10/mixacm/seed1", 7200.0, 2.0),
                              ("a0", "cifar10/at/seed0", 1800.0, 1.0)]:
        d = cost_dir / name
        d.mkdir(parents=True)
        (d / "train_summary.json").write_text(json.dumps(
            {"config_hash": h, "name": name, "wall_time_s": wall, "device_hours": dh,
             "device": "cuda"}))
        costs.append(d / "train_summary.json")
    # the AT job ran on 2 devices (1800 s, 1 device-hour); its benchmark says 2700 s in all
    bench = tmp_path / "benchmarks" / "train" / "cifar10" / "at" / "seed0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\n2700.0\t0:45:00\t100.0\n")
    costs.append(bench)
    return {"files": files, "costs": costs}


def _row(table, method: str, **where):
    sel = table[(table["method_key"] == method) & (table["status"] == "reproduced")]
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ------------------------------------------------------------------------------ tables


def test_cifar10_table_mean_std_and_differences(scenario):
    results = collect_results(scenario["files"])
    costs = collect_costs(scenario["costs"])
    table = build_table("cifar10", results, costs=costs)

    mix = _row(table, "mixacm")
    assert mix["method"] == "MixACM" and mix["n_seeds"] == 3 and mix["seeds"] == "0;1;2"
    assert mix["clean_mean"] == pytest.approx((90.0 + 91.0 + 92.5) / 3)
    assert mix["clean_std"] == pytest.approx(np.std([90.0, 91.0, 92.5], ddof=1), abs=1e-4)
    assert mix["autoattack_mean"] == pytest.approx(51.0)
    assert mix["autoattack_std"] == pytest.approx(1.0)
    assert mix["autoattack_version"] == "standard"
    assert mix["autoattack_package"] == "pyautoattack 0.2.0" and mix["autoattack_n"] == 1000
    # paper MixACM: 90.76 / 56.65; robust compared against AutoAttack since the row has it
    assert mix["diff_clean"] == pytest.approx(91.1667 - 90.76, abs=1e-4)
    assert mix["diff_robust"] == pytest.approx(51.0 - 56.65)
    assert mix["diff_robust_vs"] == "AutoAttack (standard)"
    assert bool(mix["same_setting"]) is True
    # two of three seeds have a training summary: (1 + 2) / 2 device-hours
    assert mix["train_device_hours"] == pytest.approx(1.5) and mix["cost_runs"] == 2

    at = _row(table, "at")
    assert at["clean_mean"] == pytest.approx(86.5) and at["pgd20_std"] == pytest.approx(0.7071, abs=1e-4)
    assert np.isnan(at["autoattack_mean"]) and at["autoattack_seeds"] == 0
    assert at["diff_robust"] == pytest.approx(48.5 - 47.04) and at["diff_robust_vs"] == "PGD-20"
    # the benchmark (2700 s) replaces the summary, on the summary's 2 devices: 1.5 device-hours
    assert at["train_device_hours"] == pytest.approx(1.5) and at["cost_source"] == "benchmark"
    assert at["ref_autoattack"] == pytest.approx(44.04)

    trades = _row(table, "trades")
    assert np.isnan(trades["clean_std"]) and trades["n_seeds"] == 1
    assert trades["autoattack_version"] == "APGD-CE+APGD-T" and trades["autoattack_n"] == 500
    assert trades["diff_robust"] == pytest.approx(52.5 - 56.43)

    # less-data and ablation runs stay out of the main table
    assert set(table.loc[table.status == "reproduced", "method_key"]) == {"mixacm", "at", "trades"}
    assert len(table[table.status == "reproduced"]) == 3


def test_cited_rows_and_paper_order(scenario):
    table = build_table("cifar10", collect_results(scenario["files"]))
    cited = table[table.status == "cited"]
    assert set(cited["method"]) == {"AWP", "FAT", "IGAM", "FreeAT"}
    awp = cited[cited.method == "AWP"].iloc[0]
    assert (awp["paper_clean"], awp["paper_robust"]) == (85.36, 59.12)
    assert awp["ref_autoattack"] == pytest.approx(56.17) and np.isnan(awp["clean_mean"])
    assert list(table["method"]) == ["AT", "AWP", "FreeAT", "TRADES", "FAT", "IGAM", "MixACM"]

    imagenet = build_table("imagenet", collect_results(scenario["files"]))
    assert list(imagenet["status"]) == ["cited"] * 3
    assert list(imagenet["paper_robust"]) == [31.82, 31.39, 33.63]


def test_less_data_and_ablation_tables(scenario, tmp_path):
    results = collect_results(scenario["files"])
    less = build_table("less_data", results)
    assert not any(c.startswith(("paper_", "diff_")) for c in less.columns)
    mix = less[less.method_key == "mixacm"]
    assert list(mix["data_fraction"]) == [0.1, 0.5, 1.0]
    assert list(mix["clean_mean"]) == pytest.approx([80.0, 85.0, 91.1667], abs=1e-4)

    abl = build_table("ablation", results)
    assert list(abl["method"]) == ["ACM only", "ACM + KD", "ACM + mixup", "ACM + KD + mixup", "KD only"]
    assert list(abl["status"]) == ["cited", "reproduced", "cited", "reproduced", "cited"]
    kd = abl[abl.method == "ACM + KD"].iloc[0]
    assert kd["pgd20_mean"] == 47.0 and kd["diff_robust"] == pytest.approx(47.0 - 49.53)
    full = abl[abl.method == "ACM + KD + mixup"].iloc[0]
    assert full["n_seeds"] == 3 and full["diff_robust"] == pytest.approx(51.0 - 56.65)

    out = write_table(abl, tmp_path / "out" / "table_ablation.csv")
    assert out.read_text().splitlines()[0].startswith("status,method,method_key")
    assert not list(out.parent.glob(".*.tmp"))


def test_bad_result_files_name_the_file_and_key(make_result, tmp_path):
    good = make_result("mixacm", 0, {"clean": 90.0})
    with pytest.raises(ResultFileError, match=r"missing\.json does not exist"):
        collect_results([good, tmp_path / "missing.json"])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ResultFileError, match=r"broken\.json: not valid JSON"):
        collect_results([broken])
    for mutate, message in [
        (lambda d: d.update(schema=2), "schema is 2"),
        (lambda d: d["run"].pop("seed"), r"run\.seed is missing"),
        (lambda d: d["metrics"]["clean"].update(accuracy_pct=0.9 * 1000), r"metrics\.clean\.accuracy_pct"),
        (lambda d: d["metrics"]["clean"].update(n=0), r"metrics\.clean\.n = 0"),
        (lambda d: d["run"].update(data_fraction=1.5), r"run\.data_fraction = 1\.5"),
        (lambda d: d["metrics"]["clean"]["attack"].pop("package"), r"metrics\.clean\.attack"),
    ]:
        doc = json.loads(good.read_text())
        mutate(doc)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        with pytest.raises(ResultFileError, match=rf"bad\.json: {message}"):
            collect_results([bad])
    dup = tmp_path / "dup.json"
    shutil.copy(good, dup)
    with pytest.raises(ResultFileError, match=r"both report metric 'clean'"):
        collect_results([good, dup])
    orphan = tmp_path / "orphan.tsv"
    orphan.write_text("s\n1.0\n")
    with pytest.raises(ResultFileError, match=r"orphan\.tsv matches 0 training summaries"):
        collect_costs([orphan])
    with pytest.raises(ValueError, match="unknown table kind 'cifar100'"):
        build_table("cifar100", collect_results([good]))
