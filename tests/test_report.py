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
import pandas as pd
import pytest

from mixacm.report import (
    FIGURE_NAMES,
    PAPER_NUMBERS,
    TABLE_KINDS,
    ResultFileError,
    build_table,
    collect_costs,
    collect_results,
    load_paper_numbers,
    make_figures,
    read_table,
    render_report,
    write_table,
)
from mixacm.report.figures import robust_column

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
            assert abs(acc * n / 100 - round(acc * n / 100)) < 1e-9, "a test result must be consistent"
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
        make_result("trades", 0, {"clean": 84.0, "pgd20": 55.0, "autoattack-apgd": 52.4},
                    config_hash="1e50", n=500, teacher=None, commit="0123456"),
        make_result("mixacm", 0, {"clean": 80.0, "pgd20": 45.0}, fraction=0.1, config_hash="f1"),
        make_result("mixacm", 0, {"clean": 85.0, "pgd20": 50.0}, fraction=0.5, config_hash="f5"),
        make_result("mixacm", 0, {"clean": 88.0, "pgd20": 47.0}, variant="acm+kd", config_hash="v0"),
    ]
    cost_dir = tmp_path / "costs"
    costs = []
    # GPU runs: the training loop's wall time (train_time_s) x the GPUs is the cost; the epochs'
    # wall time (scoring included) and the job's benchmark are not
    for h, name, loop, wall, gpus in [("m0", "cifar10/mixacm/seed0", 3000.0, 3600.0, 1),
                                      ("m1", "cifar10/mixacm/seed1", 6000.0, 7200.0, 1),
                                      ("a0", "cifar10/at/seed0", 1500.0, 1800.0, 2)]:
        d = cost_dir / name
        d.mkdir(parents=True)
        (d / "train_summary.json").write_text(json.dumps(
            {"config_hash": h, "name": name, "train_time_s": loop, "wall_time_s": wall,
             "device_hours": wall * gpus / 3600, "world_size": gpus, "device": "cuda",
             "knobs": {"gamma": 50, "p": 2}, "recipe": {"lr": 0.1, "gamma": 0.2}}))
        costs.append(d / "train_summary.json")
    # the AT job's benchmark: 2700 s for the whole job (start-up included)
    bench = tmp_path / "benchmarks" / "train" / "cifar10" / "at" / "seed0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\n2700.0\t0:45:00\t100.0\n")
    costs.append(bench)
    return {"files": files, "costs": costs}


def _row(table, method: str, **where):
    sel = table[(table["method_key"] == method) & (table["status"] == "trained")]
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
    # two of three seeds have a training summary: the loops' (3000 + 6000) / 2 s on one GPU
    assert mix["train_device_hours"] == pytest.approx(4500 / 3600) and mix["cost_runs"] == 2

    at = _row(table, "at")
    assert at["clean_mean"] == pytest.approx(86.5) and at["pgd20_std"] == pytest.approx(0.7071, abs=1e-4)
    assert np.isnan(at["autoattack_mean"]) and at["autoattack_seeds"] == 0
    assert at["diff_robust"] == pytest.approx(48.5 - 47.04) and at["diff_robust_vs"] == "PGD-20"
    # the loop's 1500 s on 2 GPUs; the job's benchmark (2700 s) stays beside it, not in it
    assert at["train_device_hours"] == pytest.approx(2 * 1500 / 3600)
    assert at["cost_source"] == "train_summary (training loop)"
    assert at["train_cost_unit"] == "GPU-hours"
    assert collect_costs(scenario["costs"]).set_index("config_hash").at["a0", "job_wall_s"] == 2700.0
    assert at["ref_autoattack"] == pytest.approx(44.04)

    trades = _row(table, "trades")
    assert np.isnan(trades["clean_std"]) and trades["n_seeds"] == 1
    # the APGD-CE + APGD-T version has its own column; the standard one stays empty
    assert np.isnan(trades["autoattack_mean"]) and trades["autoattack_version"] == ""
    assert trades["autoattack_apgd_mean"] == 52.4 and trades["autoattack_apgd_n"] == 500
    assert trades["diff_robust"] == pytest.approx(52.4 - 56.43)
    assert trades["diff_robust_vs"] == "AutoAttack (APGD-CE+APGD-T)"

    # less-data and ablation runs stay out of the main table
    assert set(table.loc[table.status == "trained", "method_key"]) == {"mixacm", "at", "trades"}
    assert len(table[table.status == "trained"]) == 3


def test_both_autoattack_versions_keep_their_own_columns(make_result):
    # Two seeds with APGD-CE + APGD-T on 1,000 points, one of them also with the standard version
    # on 200: each column aggregates its own seeds, and the difference uses the standard one.
    files = [
        make_result("mixacm", 0, {"clean": 80.0, "pgd20": 60.0, "autoattack-apgd": 58.0},
                    config_hash="m0", n=1000),
        make_result("mixacm", 1, {"clean": 82.0, "pgd20": 62.0, "autoattack-apgd": 60.0},
                    config_hash="m1", n=1000),
        make_result("mixacm", 0, {"autoattack": 55.0}, config_hash="m0", n=200),
    ]
    row = _row(build_table("cifar10", collect_results(files)), "mixacm")
    assert row["autoattack_apgd_mean"] == 59.0 and row["autoattack_apgd_seeds"] == 2
    assert row["autoattack_apgd_n"] == 1000
    assert row["autoattack_mean"] == 55.0 and row["autoattack_seeds"] == 1 and row["autoattack_n"] == 200
    assert row["diff_robust"] == pytest.approx(55.0 - 56.65)
    assert row["diff_robust_vs"] == "AutoAttack (standard)"
    table = build_table("cifar10", collect_results(files))
    assert robust_column(table[table.status == "trained"]) == "autoattack_apgd"


def test_autoattack_files_pgd20_on_all_points_is_a_companion_not_a_duplicate(make_result):
    """The paper config evaluates clean + PGD-20, APGD-CE + APGD-T and the standard AutoAttack on
    all 10,000 points, each AutoAttack file with PGD-20 on its points: three PGD-20 metrics of one
    run on as many points. The PGD-20 column is the evaluation's own; each AutoAttack column's
    same-points PGD-20 is its file's. A file given twice is still refused."""
    files = [
        make_result("at", 0, {"clean": 80.0, "pgd20": 50.0}, config_hash="a0", n=1000, teacher=None),
        make_result("at", 0, {"pgd20": 50.5, "autoattack-apgd": 47.0}, config_hash="a0", n=1000, teacher=None),
        make_result("at", 0, {"pgd20": 50.2, "autoattack": 46.0}, config_hash="a0", n=1000, teacher=None),
    ]
    row = _row(build_table("cifar10", collect_results(files)), "at")
    assert row["pgd20_mean"] == 50.0 and row["pgd20_n"] == 1000
    assert row["autoattack_apgd_mean"] == 47.0 and row["autoattack_apgd_pgd20_mean"] == 50.5
    assert row["autoattack_mean"] == 46.0 and row["autoattack_pgd20_mean"] == 50.2
    with pytest.raises(ResultFileError, match=r"result2.json both report metric"):
        collect_results([*files, files[1]])


def test_transfer_table_puts_the_teacher_and_the_peers_in_order(make_result):
    files = [
        make_result("rslad", 0, {"clean": 80.0, "pgd20": 50.0}, config_hash="r0"),
        make_result("mixacm", 0, {"clean": 90.0, "pgd20": 55.0}, config_hash="m0"),
        make_result("ard", 0, {"clean": 79.0, "pgd20": 49.0}, config_hash="d0"),
        # A teacher trained in the DAG with the AT student's recipe has its config hash (ci.yaml).
        make_result("teacher", 0, {"clean": 89.7, "pgd20": 61.0}, arch="wrn-28-10", teacher=None,
                    variant="Carmon2019Unlabeled", config_hash="a0"),
        make_result("at", 0, {"clean": 86.0, "pgd20": 48.0}, config_hash="a0", teacher=None),
        make_result("trades", 0, {"clean": 84.0, "pgd20": 55.0}, config_hash="x0", teacher=None),
        make_result("mixacm", 0, {"clean": 88.0, "pgd20": 47.0}, variant="acm", config_hash="v0"),
    ]
    table = build_table("transfer", collect_results(files))
    assert table["method_key"].tolist() == ["teacher", "at", "mixacm", "ard", "rslad"]
    assert table["method"].tolist() == ["Teacher", "AT", "MixACM", "ARD", "RSLAD"]
    assert (table["status"] == "trained").all()
    teacher = table.iloc[0]
    assert teacher["variant"] == "Carmon2019Unlabeled" and teacher["student"] == "wrn-28-10"
    assert table.iloc[2]["pgd20_mean"] == 55.0  # the full MixACM, not the ablation variant
    assert not any(c.startswith(("paper_", "diff_")) for c in table.columns)


def test_named_variants_are_rows_of_their_own_and_ablation_presets_stay_out(make_result):
    files = [
        make_result("mixacm", 0, {"clean": 90.0, "pgd20": 55.0}, config_hash="m0"),
        make_result("mixacm", 0, {"clean": 85.0, "pgd20": 58.0}, variant="best holdout variant", config_hash="b0"),
        make_result("mixacm", 0, {"clean": 88.0, "pgd20": 57.0}, variant="compute-matched", config_hash="c0"),
        make_result("mixacm", 0, {"clean": 88.0, "pgd20": 47.0}, variant="acm+kd", config_hash="v0"),
        make_result("at", 0, {"clean": 86.0, "pgd20": 48.0}, config_hash="a0", teacher=None),
        make_result("at", 0, {"clean": 70.0, "pgd20": 40.0}, fraction=0.1, variant="fixed steps", config_hash="s1"),
        make_result("at", 0, {"clean": 60.0, "pgd20": 30.0}, fraction=0.1, config_hash="e1"),
    ]
    results = collect_results(files)
    main = build_table("cifar10", results)
    rep = main[main.status == "trained"]
    assert sorted(zip(rep["method_key"], rep["variant"])) == [
        ("at", ""), ("mixacm", ""), ("mixacm", "best holdout variant"), ("mixacm", "compute-matched")]
    assert rep[rep.variant == "best holdout variant"].iloc[0]["pgd20_mean"] == 58.0
    less = build_table("less_data", results)
    at_tenth = less[(less.status == "trained") & (less.method_key == "at") & (less.data_fraction == 0.1)]
    assert dict(zip(at_tenth["variant"], at_tenth["pgd20_mean"])) == {"": 30.0, "fixed steps": 40.0}
    transfer = build_table("transfer", results)
    assert "best holdout variant" in set(transfer["variant"]) and "acm+kd" not in set(transfer["variant"])


def test_ablation_variants_of_the_report_are_the_methods_presets():
    from mixacm.methods.mixacm import ABLATIONS
    from mixacm.report.tables import ABLATION_VARIANTS, FULL_VARIANTS, norm_variant
    assert {norm_variant(v) for v in ABLATIONS if v != "full"} == ABLATION_VARIANTS
    assert norm_variant("full") in FULL_VARIANTS


def test_less_data_figure_draws_one_curve_per_variant():
    from mixacm.report.figures import draw_less_data
    rows = []
    for variant, pgd in (("", [30.0, 40.0]), ("fixed steps", [35.0, 40.0])):
        for frac, acc in zip((0.1, 1.0), pgd):
            rows.append({"status": "trained", "method": "AT", "variant": variant, "student": "resnet2b",
                         "teacher": "", "eps": "2/255", "data_fraction": frac, "pgd20_mean": acc,
                         "pgd20_std": 0.0, "pgd20_n": 100, "clean_mean": 50.0, "clean_std": 0.0, "data_source": "x"})
    fig = draw_less_data(pd.DataFrame(rows))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["AT (resnet2b, 2/255) PGD-20", "AT [fixed steps] (resnet2b, 2/255) PGD-20"]


def test_an_imported_teacher_without_a_config_hash_is_named_by_its_file(make_result, tmp_path):
    # An imported teacher's model file has no training config: its evaluations carry a null
    # config_hash and the model file's sha256, which then identifies the run.
    files = [make_result("teacher", 0, {"clean": 76.5, "pgd20": 61.5}, arch="resnet4b", teacher=None,
                         variant="resnet4b (resnet4b.pth)"),
             make_result("at", 0, {"clean": 86.0, "pgd20": 48.0}, config_hash="a0", teacher=None)]
    doc = json.loads(files[0].read_text())
    doc["run"].update(config_hash=None, checkpoint_sha256="ab" * 32)
    files[0].write_text(json.dumps(doc))
    table = build_table("transfer", collect_results(files))
    teacher = table[table.method_key == "teacher"].iloc[0]
    assert teacher["clean_mean"] == 76.5 and teacher["config_hashes"] == "sha256:abababababababab"
    doc["run"]["checkpoint_sha256"] = None
    files[0].write_text(json.dumps(doc))
    with pytest.raises(ResultFileError, match="run.config_hash is missing or null"):
        collect_results(files)


def test_a_resumed_run_is_costed_from_its_summary_not_the_last_jobs_benchmark(tmp_path):
    # Snakemake writes a benchmark only for the attempt that finished; the summary adds up the
    # loop's time of every epoch of every attempt.
    from mixacm.report.tables import collect_costs
    run = tmp_path / "cifar10" / "ard" / "seed0"
    run.mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps(
        {"config_hash": "d0", "name": "cifar10/ard/seed0", "wall_time_s": 369.5, "train_time_s": 369.0,
         "train_cpu_time_s": 300.0, "device": "cpu", "resumed_from_epoch": 2}))
    bench = tmp_path / "benchmarks" / "train" / "cifar10" / "ard" / "seed0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     "82.0\t0:01:22\t100\t100\t100\t100\t0\t0\t99\t81.0\n")
    row = collect_costs([run / "train_summary.json", bench]).iloc[0]
    assert row["device_hours"] == pytest.approx(300.0 / 3600) and row["cost_unit"] == "CPU-hours"
    assert (row["job_wall_s"], row["job_cpu_s"], row["resumed_from_epoch"]) == (82.0, 81.0, 2)


def test_every_attempt_of_a_job_counts_where_mixacm_train_recorded_it(tmp_path):
    # A run resumed after a kill: the benchmark saw its last attempt; attempts.jsonl all of them.
    run = tmp_path / "cifar10" / "ard" / "seed0"
    run.mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps(
        {"config_hash": "d0", "name": "cifar10/ard/seed0", "train_time_s": 300.0, "device": "cpu",
         "resumed_from_epoch": 2}))  # written before train_cpu_time_s: costed by the job
    (run / "attempts.jsonl").write_text(
        json.dumps({"wall_s": 250.0, "cpu_s": 200.0, "status": "stopped (exit 143)"}) + "\n"
        + json.dumps({"wall_s": 130.0, "cpu_s": 100.0, "status": "finished"}) + "\n")
    bench = tmp_path / "benchmarks" / "train" / "cifar10" / "ard" / "seed0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\tcpu_time\n130.0\t100.0\n")
    row = collect_costs([run / "train_summary.json", bench]).iloc[0]
    assert (row["attempts"], row["job_wall_s"], row["job_cpu_s"]) == (2, 380.0, 300.0)
    assert row["device_hours"] == pytest.approx(300.0 / 3600) and row["cost_unit"] == "CPU-hours (whole job)"
    (run / "attempts.jsonl").write_text('{"wall_s": 1}\n')
    with pytest.raises(ResultFileError, match=r"attempts\.jsonl: line 1 lacks wall_s or cpu_s"):
        collect_costs([run / "train_summary.json"])


def test_cited_rows_and_paper_order(scenario):
    table = build_table("cifar10", collect_results(scenario["files"]))
    cited = table[table.status == "cited"]
    assert set(cited["method"]) == {"TRADES-AWP", "FAT", "IGAM", "Free-AT"}
    awp = cited[cited.method == "TRADES-AWP"].iloc[0]
    assert (awp["paper_clean"], awp["paper_robust"]) == (85.36, 59.12)
    assert awp["ref_autoattack"] == pytest.approx(56.17) and np.isnan(awp["clean_mean"])
    assert awp["paper_note"] == 'the paper\'s row "AWP"'
    assert list(table["method"]) == ["AT", "TRADES-AWP", "Free-AT", "TRADES", "FAT", "IGAM", "MixACM"]

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
    assert list(abl["status"]) == ["cited", "trained", "cited", "trained", "cited"]
    kd = abl[abl.method == "ACM + KD"].iloc[0]
    assert kd["pgd20_mean"] == 47.0 and kd["diff_robust"] == pytest.approx(47.0 - 49.53)
    full = abl[abl.method == "ACM + KD + mixup"].iloc[0]
    assert full["n_seeds"] == 3 and full["diff_robust"] == pytest.approx(51.0 - 56.65)

    out = write_table(abl, tmp_path / "out" / "table_ablation.csv")
    assert out.read_text().splitlines()[0].startswith("status,method,method_key")
    assert not list(out.parent.glob(".*.tmp"))


def test_tables_round_trip_through_csv(built, tmp_path):
    # The workflow writes the tables as CSV and renders the report from them: text that looks
    # like a number (config hash "1e50", commit "0123456") must come back as text.
    again = {}
    for kind, table in built["tables"].items():
        again[kind] = read_table(write_table(table, tmp_path / f"table_{kind}.csv"))
    trades = again["cifar10"][again["cifar10"]["method_key"] == "trades"].iloc[0]
    assert (trades["config_hashes"], trades["git_commits"], trades["seeds"]) == ("1e50", "0123456", "0")
    html = render_report(again, built["figures"], built["results"], tmp_path / "again.html",
                         costs=built["costs"])
    assert html.read_text() == built["html"].read_text()
    with pytest.raises(ResultFileError, match=r"nothere\.csv does not exist"):
        read_table(tmp_path / "nothere.csv")


def test_bad_result_files_name_the_file_and_key(make_result, tmp_path):
    good = make_result("mixacm", 0, {"clean": 90.0})
    with pytest.raises(ResultFileError, match=r"missing\.json does not exist"):
        collect_results([good, tmp_path / "missing.json"])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ResultFileError, match=r"broken\.json: not valid JSON"):
        collect_results([broken])
    for mutate, message in [
        (lambda d: d.update(schema=3), "schema is 3"),
        (lambda d: d["run"].pop("seed"), r"run\.seed is missing"),
        (lambda d: d["run"].update(config_hash=None, checkpoint_sha256=None), r"run\.config_hash is missing or null"),
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


# ------------------------------------------------------------------------------ figures, HTML


@pytest.fixture()
def built(scenario, tmp_path) -> dict:
    results = collect_results(scenario["files"])
    costs = collect_costs(scenario["costs"])
    tables = {k: build_table(k, results, costs=costs) for k in TABLE_KINDS}
    figures = make_figures(tables, tmp_path / "results" / "figures")
    html = render_report(tables, figures, results, tmp_path / "report" / "paper_tables.html",
                         costs=costs)
    return {"results": results, "costs": costs, "tables": tables, "figures": figures,
            "html": html, "files": scenario["files"], "cost_files": scenario["costs"]}


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return imread(path)[..., :3]


def test_figures_are_nonblank_pngs_and_show_the_results(built, tmp_path):
    assert [p.name for p in built["figures"]] == list(FIGURE_NAMES)
    empty = make_figures({}, tmp_path / "empty")
    for full, blank in zip(built["figures"], empty):
        img = _pixels(full)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.05  # not a single flat colour
        # the trained points, curves and bars change the picture
        other = _pixels(blank)
        assert img.shape != other.shape or not np.allclose(img, other)
    # the scatter draws trained points filled in red: present only when there are results
    red = np.array([0xD6, 0x27, 0x28]) / 255  # matplotlib's tab:red
    is_red = lambda im: (np.abs(im - red).sum(-1) < 0.02).sum()  # noqa: E731
    assert is_red(_pixels(built["figures"][1])) > 50 and is_red(_pixels(empty[1])) == 0


class _ReportParser(HTMLParser):
    """Collects <data value> elements per results table, and the rest of each cell's text."""

    def __init__(self) -> None:
        super().__init__()
        self.kind: str | None = None
        self.in_td = 0
        self.in_data: str | None = None
        self.data: list[tuple[str | None, str, str]] = []  # (table kind, value, text)
        self.cell_text: list[str] = []
        self.srcs: list[str] = []
        self.tags: set[str] = set()
        self._text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.srcs += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "table" and "data-kind" in attrs:
            self.kind = attrs["data-kind"]
        elif tag == "td":
            self.in_td += 1
        elif tag == "data":
            self.in_data, self._text = attrs["value"], ""

    def handle_endtag(self, tag):
        if tag == "data":
            self.data.append((self.kind, self.in_data, self._text))
            self.in_data = None
        elif tag == "td":
            self.in_td -= 1
        elif tag == "table":
            self.kind = None

    def handle_data(self, text):
        if self.in_data is not None:
            self._text += text
        elif self.in_td:
            self.cell_text.append(text)


_DISPLAYED = ["n_seeds", "data_fraction", "train_device_hours", "paper_clean", "paper_robust",
              "diff_clean", "diff_robust", "ref_clean", "ref_autoattack"] + [
    f"{c}_{s}" for c in ("clean", "pgd20", "autoattack", "autoattack_apgd") for s in ("mean", "std", "n")] + [
    f"{c}_pgd20_{s}" for c in ("autoattack", "autoattack_apgd") for s in ("mean", "std")]


def _numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_html_numbers_trace_to_tables_results_and_paper(built):
    html = built["html"].read_text()
    parser = _ReportParser()
    parser.feed(html)

    # every table is headed with what ran (student, eps, data), the paper's setting beside it
    headings = dict(re.findall(r'<h2 id="(\w+)">([^<]*)', html))
    assert headings["cifar10"] == "Main comparison: wrn-34-10 student, L-inf 8/255, CIFAR-10 (JPEG copy)"
    assert headings["imagenet"] == "ImageNet comparison: nothing trained here"
    assert '<span class="paper">the paper: CIFAR-10, WRN-34-10 student, L-inf 8/255</span>' in html
    # every badge and every method name shown is defined on the page
    assert "trained here</span>" in html and "paper only</span>" in html and "reproduced" not in html
    defined = dict(re.findall(r"<dt>([^<]*)</dt><dd>([^<]*)</dd>", html))
    for table in built["tables"].values():
        for name in table["method"]:
            assert defined.get(name) and "no definition" not in defined[name], name
    assert "TRADES-AWP" in defined and "FreeAT" not in html
    # self-contained: no scripts, no external resources, figures embedded
    assert "script" not in parser.tags and "link" not in parser.tags
    assert [s for s in parser.srcs if not s.startswith(("#", "data:image/png;base64,"))] == []
    assert sum(s.startswith("data:image/png") for s in parser.srcs) == len(FIGURE_NAMES)

    allowed = set(_numbers(load_paper_numbers()))
    for path in built["files"]:
        allowed |= set(_numbers(json.loads(Path(path).read_text())["metrics"]))
        allowed |= set(_numbers(json.loads(Path(path).read_text())["run"]))
    for col in ("device_hours", "job_wall_s", "job_cpu_s", "resumed_from_epoch"):  # each run's cost, job
        allowed |= set(built["costs"][col].dropna().astype(float))
    shown: dict[str, list[float]] = {}
    for kind, table in built["tables"].items():
        cols = [c for c in _DISPLAYED if c in table.columns]
        values = [float(v) for v in table[cols].to_numpy().ravel() if pd_notna(v)]
        allowed |= set(values)
        shown[kind] = values
    allowed_arr = np.array(sorted(allowed))

    for kind, value, text in parser.data:
        v = float(value)
        # the value is one the tables computed or a file holds ...
        assert np.abs(allowed_arr - v).min() < 1e-9, (kind, value, text)
        # ... and the text shows that value, rounded to the digits it displays
        digits = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        assert abs(float(text) - v) <= 0.5 * 10.0 ** -digits + 1e-9 * max(1, abs(v)), (value, text)

    # every number of every table appears in that table's HTML
    for kind, values in shown.items():
        in_html = np.array([float(v) for k, v, _ in parser.data if k == kind])
        for v in values:
            assert np.abs(in_html - v).min() < 1e-9, (kind, v)

    # digits outside <data> elements are identifiers copied from the inputs (arch, eps, versions)
    inputs = built["files"] + built["cost_files"]
    blob = " ".join(Path(p).read_text() for p in inputs) + PAPER_NUMBERS.read_text()
    for table in built["tables"].values():
        text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
        blob += " ".join(str(v) for v in table[text].to_numpy().ravel())
    for token in " ".join(parser.cell_text).split():
        token = token.strip("()·,;:")
        if re.search(r"\d", token):
            assert token in blob, token


def pd_notna(v) -> bool:
    return v is not None and v is not pd.NA and not (isinstance(v, float) and np.isnan(v))


def _chromium(url: str, tmp_path: Path, name: str) -> tuple[Path, str]:
    shot = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / ('chrome-' + name)}",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1400,1000",
         f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # console messages (console.error, uncaught exceptions) are logged as INFO:CONSOLE lines
    console = "\n".join(line for line in proc.stderr.splitlines() if ":CONSOLE" in line)
    return shot, console


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                    "(apt-get install chromium) so the page cannot be opened headless")
def test_report_opens_in_headless_chromium(built, tmp_path):
    # control: the console capture does see a page's errors
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); undefinedFn();</script></body></html>")
    _, console = _chromium(bad.as_uri(), tmp_path, "control")
    assert "boom" in console and "Uncaught ReferenceError" in console

    shot, console = _chromium(built["html"].as_uri(), tmp_path, "report")
    assert console == ""
    img = np.round(_pixels(shot) * 255).astype(int)
    assert img.shape[:2] == (1000, 1400)

    def count(rgb: str) -> int:
        colour = np.array([int(rgb[i:i + 2], 16) for i in (0, 2, 4)])
        return int((np.abs(img - colour).sum(-1) == 0).sum())

    # the first screen shows the CIFAR-10 table: its header, paper and difference cells and the
    # "trained here" badges, each drawn in its own background colour from the template
    assert count("f6f8fa") > 5000 and count("f3f7fc") > 5000 and count("fdf8ef") > 5000
    assert count("dafbe1") > 500


def test_less_data_figure_draws_autoattack_ticks_the_fractions_and_counts_seeds(built):
    from mixacm.report.figures import draw_less_data

    less = built["tables"]["less_data"].copy()
    rows = less["status"] == "trained"
    less.loc[rows, "autoattack_mean"] = less.loc[rows, "pgd20_mean"] - 3
    fig = draw_less_data(less)
    ax_rob = fig.axes[0]
    labels = ax_rob.get_legend_handles_labels()[1]
    assert any("AutoAttack" in label for label in labels), labels
    fractions = sorted(less.loc[rows, "data_fraction"].unique())
    assert list(ax_rob.get_xticks()) == pytest.approx(fractions)
    assert [t.get_text() for t in ax_rob.get_xticklabels()] == ["10 %", "50 %", "100 %"]
    # the full-data point has 3 seeds: mean ± std; a one-seed curve says so instead
    assert "mean ± std over seeds" in fig._suptitle.get_text()
    one_seed = less.assign(n_seeds=1)
    assert "one seed" in draw_less_data(one_seed)._suptitle.get_text()
    assert "mean ± std" not in draw_less_data(one_seed)._suptitle.get_text()


def _expected_points(tables, paper) -> dict[tuple, set]:
    """(dataset, kind, name) -> the points a label of that name may mark, from the inputs."""
    from mixacm.report.tables import row_name

    points: dict[tuple, set] = {}
    for kind in ("cifar10", "imagenet"):
        spec = paper["tables"][kind]
        for prow in spec["rows"]:
            if prow.get("clean") is not None and prow.get("robust") is not None:
                points.setdefault((spec["dataset"], "paper", prow["label"]), set()).add((prow["clean"], prow["robust"]))
        for ref in paper["robustbench"]["models"]:
            points.setdefault((ref["dataset"], "reference", ref["model"] or ref["label"]), set()).add(
                (ref["clean"], ref["autoattack"]))
        rows = tables[kind][tables[kind]["status"] == "trained"]
        col = robust_column(rows)
        for _, r in rows.iterrows():
            points.setdefault((spec["dataset"], "trained", row_name(r)), set()).add((r["clean_mean"], r[f"{col}_mean"]))
    return points


def _check_labels(fig, labels, expected) -> None:
    """Each label marks its own point (its anchor and leader line), covers no other label or point,
    stays inside its axes, and is either nearest to its own point or tied to it by a visible line."""
    from matplotlib.text import Text

    from mixacm.report.figures import _gap

    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(lab.annotation, renderer) for lab in labels]
    drawn = {}
    for lab in labels:
        drawn.setdefault(lab.annotation.axes, []).append(tuple(lab.annotation.axes.transData.transform(lab.annotation.xy)))
    for lab, box in zip(labels, boxes):
        ann, ax = lab.annotation, lab.annotation.axes
        assert tuple(map(float, ann.xy)) in {tuple(map(float, p)) for p in expected[(lab.dataset, lab.kind, lab.name)]}, \
            (lab.name, ann.xy)
        assert ann.xycoords == "data" and ann.arrow_patch is not None  # the leader line ends at xy
        own = tuple(ax.transData.transform(ann.xy))
        others = [p for p in drawn[ax] if np.hypot(p[0] - own[0], p[1] - own[1]) > 0.5]
        frame = ax.get_window_extent(renderer)
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, \
            f"{lab.name} runs out of its panel"
        assert all(_gap(box, *p) > 0 for p in drawn[ax]), f"{lab.name} covers a point"
        nearest_is_own = all(_gap(box, *p) > _gap(box, *own) for p in others)
        assert nearest_is_own or _gap(box, *own) >= 8, f"{lab.name} sits nearer another point than its own"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("setting", ["the paper's", "another"])
def test_clean_vs_robust_labels_mark_their_own_points_one_panel_per_setting(built, setting):
    from mixacm.report.figures import draw_clean_vs_robust

    # crowd the trained points onto each other
    main = built["tables"]["cifar10"].copy()
    rows = main["status"] == "trained"
    main.loc[rows, "clean_mean"] = 60.0
    if setting == "another":
        main.loc[rows, "student"], main.loc[rows, "eps"] = "tiny", "2/255"
    tables, paper = {**built["tables"], "cifar10": main}, load_paper_numbers()
    fig, labels = draw_clean_vs_robust(tables, paper)
    assert sum(lab.kind == "trained" for lab in labels) == rows.sum()
    _check_labels(fig, labels, _expected_points(tables, paper))
    titles = [ax.get_title() for ax in fig.axes]
    paper_panel = next(t for t in titles if t.startswith("the paper's setting: CIFAR-10, WRN-34-10"))
    if setting == "another":  # what ran has a panel of its own, titled with what ran
        assert len(titles) == 3 and titles[0].startswith("ran here: tiny student, L-inf 2/255")
        assert "robust: PGD-20 on 500-1,000 points" in titles[0]
        assert not any(lab.kind == "trained" and lab.annotation.axes.get_title() == paper_panel for lab in labels)
    else:  # trained in the paper's setting: beside the paper's points
        assert len(titles) == 2 and "robust: PGD-20 on 500-1,000 points" in paper_panel


def test_transfer_figure_names_each_row_and_has_one_unit():
    from mixacm.report.figures import draw_transfer

    rows = [{"status": "trained", "method": "MixACM", "method_key": "mixacm", "variant": v, "student": "resnet2b",
             "eps": "2/255", "data_source": "x", "n_seeds": 1, "pgd20_mean": acc, "pgd20_std": np.nan, "pgd20_n": 100,
             "pgd20_seeds": 1, "clean_mean": 50.0, "train_device_hours": cost, "train_cost_unit": unit}
            for v, acc, cost, unit in (("", 30.0, 0.02, "CPU-hours"), ("compute-matched", 31.0, 0.05, "CPU-hours"),
                                       ("other unit", 33.0, 0.01, "GPU-hours"))]
    fig, labels = draw_transfer(pd.DataFrame(rows))
    names = [lab.name for lab in labels]
    assert names == ["MixACM", "MixACM [compute-matched]"]  # distinct; the GPU-hours row is no point
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("training cost, CPU-hours") and "GPU" not in ax.get_xlabel()
    assert any("cost in GPU-hours" in t.get_text() for t in ax.texts)


def _cost_files(tmp_path: Path, runs: dict) -> list[Path]:
    """A training summary and a job benchmark per run: name -> (summary keys, job wall s, job CPU s)."""
    paths = []
    for i, (name, (summary, job_wall, job_cpu)) in enumerate(runs.items()):
        d = tmp_path / "results" / name
        d.mkdir(parents=True)
        (d / "train_summary.json").write_text(json.dumps(
            {"config_hash": summary.pop("config_hash", f"h{i}"), "name": name, "device": "cpu", "world_size": 1,
             **summary}))
        bench = (d / "benchmark_train.tsv" if name.startswith("teachers/")
                 else tmp_path / "results" / "benchmarks" / "train" / f"{name}.tsv")
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{job_wall}\t0:10:00\t100.0\t{job_cpu}\n")
        paths += [d / "train_summary.json", bench]
    return paths


def test_cpu_runs_cost_the_cpu_time_of_their_training_loop(tmp_path):
    # The 5 % run's job paid start-up and the image decoding (its benchmark: 30 CPU-s, more than
    # the full run's 25) and waited for a core (loop wall 40 s); its loop did a twentieth of the work.
    paths = _cost_files(tmp_path, {
        "cifar10/mixacm/frac0.05/seed0": ({"train_time_s": 40.0, "train_cpu_time_s": 1.0, "wall_time_s": 41.0}, 90.0, 30.0),
        "cifar10/mixacm/frac1.0/seed0": ({"train_time_s": 21.0, "train_cpu_time_s": 20.0, "wall_time_s": 22.0}, 28.0, 25.0)})
    costs = collect_costs(paths).set_index("name")
    assert list(costs["cost_unit"]) == ["CPU-hours", "CPU-hours"]
    assert costs.at["cifar10/mixacm/frac0.05/seed0", "device_hours"] == pytest.approx(1 / 3600)
    assert costs.at["cifar10/mixacm/frac1.0/seed0", "device_hours"] == pytest.approx(20 / 3600)
    assert costs.at["cifar10/mixacm/frac0.05/seed0", "job_cpu_s"] == 30.0  # the job's time, kept beside
    # one summary written before train_cpu_time_s: every CPU run falls back to its job's CPU time
    # (the benchmark), so the set keeps one unit; a resumed run's last-attempt benchmark is no cost
    old = json.loads(paths[0].read_text())
    del old["train_cpu_time_s"]
    paths[0].write_text(json.dumps(old))
    costs = collect_costs(paths).set_index("name")
    assert list(costs["cost_unit"]) == ["CPU-hours (whole job)", "CPU-hours (whole job)"]
    assert costs.at["cifar10/mixacm/frac1.0/seed0", "device_hours"] == pytest.approx(25 / 3600)
    resumed = json.loads(paths[2].read_text())
    paths[2].write_text(json.dumps({**resumed, "resumed_from_epoch": 1}))
    costs = collect_costs(paths).set_index("name")
    assert pd.isna(costs.at["cifar10/mixacm/frac1.0/seed0", "device_hours"])
    assert costs.at["cifar10/mixacm/frac1.0/seed0", "cost_source"].startswith("none: a resumed run")


@pytest.mark.parametrize("same_config", [False, True], ids=["own-config", "a-students-config"])
def test_a_teacher_trained_in_the_dag_costs_cpu_hours_like_its_students(tmp_path, same_config):
    # The transfer table puts the teacher beside its students: one cost unit for all of them.
    # In config/ci.yaml the teacher trains with a student's recipe: one config, one cost row.
    paths = _cost_files(tmp_path, {
        "cifar10/at/tiny/frac1.0/seed0": ({"config_hash": "h0", "train_time_s": 400.0, "train_cpu_time_s": 300.0}, 600, 310),
        "teachers/cifar10/trained": ({"config_hash": "h0" if same_config else "h1", "train_time_s": 500.0,
                                      "train_cpu_time_s": 450.0}, 900, 460)})
    costs = collect_costs(paths).set_index("name")
    # the same rows whatever the order of the files
    assert collect_costs(paths[::-1]).set_index("name").sort_index().equals(costs.sort_index())
    assert set(costs["cost_unit"]) == {"CPU-hours"}
    assert costs.at["cifar10/at/tiny/frac1.0/seed0", "device_hours"] == pytest.approx(300 / 3600)
    if same_config:
        assert len(costs) == 1
    else:
        assert costs.at["teachers/cifar10/trained", "device_hours"] == pytest.approx(450 / 3600)
        assert costs.at["teachers/cifar10/trained", "job_wall_s"] == 900


def test_training_cost_grows_with_the_training_work(tmp_path):
    # Real runs of the training loop: three times the steps cost more, though both pay the same
    # start-up and data loading (which the cost leaves out).
    import torch

    from mixacm.train import train
    from test_train import make_image_folder, run_config

    data = make_image_folder(tmp_path / "data", per_class=12)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summaries = [train({**run_config(data, {"name": "at", "eps": 2 / 255, "steps": 2, "step_size": 1 / 255}),
                            "train": {"progress": False, "max_steps_per_epoch": steps}, "name": f"at{steps}"},
                           tmp_path / f"run{steps}") for steps in (2, 6)]
    finally:
        torch.set_num_threads(before)
    assert [s["steps"] for s in summaries] == [3 * 2, 3 * 6]
    costs = collect_costs([tmp_path / f"run{steps}" / "train_summary.json" for steps in (2, 6)]).set_index("name")
    assert set(costs["cost_unit"]) == {"CPU-hours"}
    assert costs.at["at2", "device_hours"] < costs.at["at6", "device_hours"]
    assert all(0 < s["train_cpu_time_s"] <= s["wall_time_s"] * 1.5 for s in summaries)


def test_no_difference_across_settings(make_result):
    # a small student at 2/255 beside the paper's WRN-34-10 at 8/255: numbers side by side, no difference
    files = [make_result("mixacm", 0, {"clean": 20.0, "pgd20": 15.0}, arch="resnet2b",
                         eps=2 / 255, eps_text="2/255")]
    table = build_table("cifar10", collect_results(files))
    mix = table[(table.status == "trained") & (table.method_key == "mixacm")].iloc[0]
    assert bool(mix["same_setting"]) is False
    assert pd.isna(mix["diff_clean"]) and pd.isna(mix["diff_robust"])
    assert mix["paper_clean"] > 80  # the paper's number is still shown


# Widths, and the most lines any header's own text (its title, not the point count under it) takes.
WIDTH_PROBE = ("<script>const t = document.querySelector('table[data-kind]');"
               "const lines = [...t.querySelectorAll('thead th')].map(th => { const tops = new Set();"
               " for (const n of th.childNodes) { if (n.nodeType !== 3 || !n.textContent.trim()) continue;"
               " const r = document.createRange(); r.selectNodeContents(n);"
               " for (const b of r.getClientRects()) tops.add(Math.round(b.top)); } return tops.size; });"
               "document.title = [document.documentElement.scrollWidth, t.getBoundingClientRect().right,"
               " document.documentElement.clientWidth, Math.max(...lines)].join(' ');</script>")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                    "(apt-get install chromium) so the page cannot be measured")
def test_main_table_fits_a_1366_px_window(repo_root, tmp_path):
    # the widest real report: the documented CPU run's 34 result files, its costs and a RobustBench column
    example = repo_root / "docs" / "results" / "cifar10_cpu" / "runs" / "results"
    results = collect_results(sorted((example / "cifar10").rglob("eval_*.json")))
    costs = collect_costs(sorted((example / "cifar10").rglob("train_summary.json"))
                          + sorted((example / "benchmarks" / "train").rglob("*.tsv")))
    tables = {k: build_table(k, results, costs=costs) for k in TABLE_KINDS}
    html = render_report(tables, [], results, tmp_path / "report.html", costs=costs)
    # the report has no scripts; a copy gets one that writes the widths into the title
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1366,900", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page_width, table_right, client_width, header_lines = map(
        float, re.search(r"<title>([^<]*)</title>", proc.stdout).group(1).split())
    assert page_width <= client_width, "the page scrolls sideways at 1366 px"
    assert table_right <= client_width, f"the main table ends at {table_right} px of {client_width}"
    assert header_lines <= 2, f"a column header wraps over {header_lines:.0f} lines"


def test_run_details_tell_the_two_gammas_apart(built):
    html = built["html"].read_text()
    # MixACM's ACM weight under the method knobs, the lr decay under the optimiser recipe
    assert "method knobs: <code>{&#34;gamma&#34;: 50, &#34;p&#34;: 2}</code>" in html
    assert "optimiser recipe: <code>{&#34;lr&#34;: 0.1, &#34;lr_decay_gamma&#34;: 0.2}</code>" in html


def test_report_names_its_config_and_how_much_each_run_trained(built, repo_root, tmp_path):
    from mixacm.report.html import training_summary

    costs = built["costs"].copy()
    costs.loc[costs["config_hash"] == "m0", ["epochs", "steps", "images"]] = [2, 60, 7680]
    html = render_report(built["tables"], built["figures"], built["results"], tmp_path / "r.html",
                         costs=costs, config_path=repo_root / "config" / "quick.yaml").read_text()
    assert "Config: <code>" in html and "quick.yaml</code>" in html
    assert "A smoke run: its accuracies" in html  # the config's own header, shown as written
    assert "training: 2 epochs, 60 steps (30 an epoch), 7,680 images seen" in html
    assert training_summary(pd.Series({"epochs": None, "steps": None, "images": None})) is None
