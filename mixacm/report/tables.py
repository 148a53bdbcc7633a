"""Result files -> the paper's tables (pandas), built from the files alone.

A row trained here (status ``trained``) aggregates the evaluations of one training set-up
(method, loss variant, student, teacher, dataset, data fraction, eps) over seeds: for each of
clean, PGD-20, AutoAttack and the audit the mean and the sample standard deviation (ddof = 1,
empty for a single seed) of the accuracy in %, the number of test points and the attack's package
and version. AutoAttack and the audit usually run on fewer points than PGD-20 (the first n of the
same class-balanced order); beside each of them stands PGD-20 on its own points
(``{autoattack,autoattack_apgd,audited}_pgd20_mean``), the number to compare it with. Beside the
row stand the paper's reported clean and robust accuracy (``paper_numbers.yaml``) and the
difference trained - paper, only where the row is in the paper's setting (student and eps; else
the differences are empty: a tiny model at 2/255 against WRN-34-10 at 8/255 is no comparison);
the robust difference uses the strongest attack the row has (standard AutoAttack, then APGD-CE +
APGD-T, then PGD-20), and ``diff_robust_vs`` says which. Methods the paper reports but the
pipeline does not train appear as rows with status ``cited``.

Training cost (``train_device_hours``, its unit in ``train_cost_unit``) counts the training
loop's steps only, from the training summary (every epoch of every attempt of a resumed run;
start-up, data decoding, model selection and waiting for a core excluded): a CPU run's CPU time
in the loop (``train_cpu_time_s``, "CPU-hours"), which a loaded machine does not inflate the way
it inflates wall time; a GPU run's loop wall time x its GPUs ("GPU-hours"). Snakemake benchmark
files time the whole job (start-up and data loading included) and only the attempt that
finished; they stand beside the cost as the job's time. Only where a CPU summary predates
``train_cpu_time_s`` are the CPU runs of the set costed by their jobs' CPU time instead ("CPU-hours
(whole job)"; none for a resumed run), so one set of runs never mixes units.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mixacm.report.results import (ResultFileError, check_same_test_points, check_train_summary, read_json,
                                   read_result_file)
from mixacm.utils import YAMLFileError, atomic_write, format_eps, load_yaml

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
TABLE_KINDS = ("cifar10", "imagenet", "less_data", "ablation", "transfer")
# Tables without the paper's numbers (no paper, difference or reference columns).
NO_PAPER_KINDS = ("less_data", "transfer")
# Names of methods that no paper table row names (the transfer table's peers and the teacher).
EXTRA_LABELS = {"teacher": "Teacher", "ard": "ARD", "rslad": "RSLAD", "awp_at": "AT-AWP", "fat": "FAT-AT",
                "standard": "Standard training"}
# A row's status: trained by this pipeline (results exist), or only reported by the paper.
TRAINED, CITED = "trained", "cited"

# Table column -> metric keys of a result file, in order of preference. AutoAttack has two columns
# so that a run evaluated with both versions keeps both: "autoattack" is the standard version (or
# the rand version for randomised defences), "autoattack_apgd" the cheaper APGD-CE + APGD-T one.
ATTACK_COLUMNS: dict[str, tuple[str, ...]] = {
    "clean": ("clean",),
    "pgd20": ("pgd20",),
    "autoattack": ("autoattack", "autoattack-rand"),
    "autoattack_apgd": ("autoattack-apgd",),
    # mixacm audit: the per-point worst case over its attacks (mixacm.audit)
    "audited": ("audited",),
}
ATTACK_TITLES = {"clean": "Clean", "pgd20": "PGD-20", "autoattack": "AutoAttack (standard)",
                 "autoattack_apgd": "APGD-CE + APGD-T", "audited": "Audited robust"}
# Columns measured on their own (usually fewer) points, each with PGD-20 on those points beside it.
PAIRED_COLUMNS = ("autoattack", "autoattack_apgd", "audited")
AUTOATTACK_VERSIONS = {
    "autoattack": "standard",
    "autoattack-apgd": "APGD-CE+APGD-T",
    "autoattack-rand": "rand",
}
# The robust accuracy a row is compared with the paper by: the strongest attack it has.
ROBUST_PREFERENCE = ("autoattack", "autoattack_apgd", "pgd20")


def robust_label(col: str, version: str | None = None) -> str:
    """How the difference column and the figures name a robust column."""
    if col == "autoattack":
        return f"AutoAttack ({version or 'standard'})"
    return "AutoAttack (APGD-CE+APGD-T)" if col == "autoattack_apgd" else "PGD-20"
# A MixACM run without run.variant, or with one of these, is the full method (ACM + KD + mixup).
FULL_VARIANTS = {"full", "acmkdmixup"}
# The loss-ablation presets of mixacm.methods.mixacm.ABLATIONS other than the full loss, as
# norm_variant writes them: their runs belong to the ablation table only. Any other named variant
# (a tuned variant, a compute-matched or fixed-steps budget) is a row of its own in the main and
# less-data tables. (Kept here so that the report does not import torch; a test checks the two agree.)
ABLATION_VARIANTS = {"acm", "acmkd", "acmmixup", "kd"}
_REQUIRED_RUN = ("method", "arch", "dataset", "data_fraction", "seed", "config_hash")
_KNOWN_RUN = set(_REQUIRED_RUN) | {
    "teacher", "data_source", "variant", "checkpoint", "checkpoint_sha256"}


# ---------------------------------------------------------------------------------------------
# Paper numbers

def load_paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict[str, Any]:
    """The paper's numbers (``paper_numbers.yaml``), checked for the keys the tables use."""
    path = Path(path)
    try:
        data = load_yaml(path)
    except YAMLFileError as err:  # unreadable, not YAML, or a key given twice
        raise ResultFileError(f"the paper's numbers: {err}") from None
    tables = data.get("tables") if isinstance(data, dict) else None
    if not isinstance(tables, dict):
        raise ResultFileError(f"{path}: no 'tables' mapping")
    for kind in TABLE_KINDS:
        spec = tables.get(kind)
        if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list):
            raise ResultFileError(f"{path}: tables.{kind} must be a mapping with a 'rows' list")
        for i, row in enumerate(spec["rows"]):
            for key in ("clean", "robust"):
                value = row.get(key)
                if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 100):
                    raise ResultFileError(
                        f"{path}: tables.{kind}.rows[{i}].{key} = {value!r} is not a percentage")
    return data


# ---------------------------------------------------------------------------------------------
# Result files

def _fail(path: Path, msg: str) -> ResultFileError:
    return ResultFileError(f"result file {path}: {msg}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_doc(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A result file's top level and its ``run`` section, checked (``run.config_hash`` filled in
    from the model file's sha256 for a model without a training config)."""
    doc = read_result_file(path)  # every count, eps, schema and provenance agrees with itself
    run = doc.get("run")
    if not isinstance(run, dict):
        raise _fail(path, "'run' is missing or not an object")
    if run.get("config_hash") is None and isinstance(run.get("checkpoint_sha256"), str):
        # A model file without a training config (an imported teacher, a foreign model): the
        # file itself is the run's identity.
        run = {**run, "config_hash": f"sha256:{run['checkpoint_sha256'][:16]}"}
    for key in _REQUIRED_RUN:
        if run.get(key) is None:
            raise _fail(path, f"run.{key} is missing or null")
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
        raise _fail(path, f"run.seed = {run['seed']!r} is not an integer")
    if not _is_number(run["data_fraction"]) or not 0 < run["data_fraction"] <= 1:
        raise _fail(path, f"run.data_fraction = {run['data_fraction']!r} is not in (0, 1]")
    eps = doc.get("eps")
    if not _is_number(eps) or not 0 < eps <= 1:
        raise _fail(path, f"eps = {eps!r} is not a fraction in (0, 1]")
    if not isinstance(doc.get("metrics"), dict) or not doc["metrics"]:
        raise _fail(path, "'metrics' is missing or empty")
    return doc, run


def _pgd20_on_same_points(doc: Mapping[str, Any], key: str, n: int) -> float | None:
    """PGD-20 accuracy on the points of metric ``key`` (``n`` of them), where the file has it:
    the file's own ``pgd20`` metric on as many points (an AutoAttack evaluation that runs PGD-20
    too), or the audit's PGD-20 on its points (``audit.accuracy_pct.pgd20``)."""
    if key in ("clean", "pgd20"):
        return None
    own = doc["metrics"].get("pgd20")
    if isinstance(own, dict) and own.get("n") == n and _is_number(own.get("accuracy_pct")):
        return float(own["accuracy_pct"])
    audit = doc.get("audit") if key == "audited" and isinstance(doc.get("audit"), dict) else {}
    value = (audit.get("accuracy_pct") or {}).get("pgd20")
    return float(value) if _is_number(value) else None


def _metric_row(path: Path, doc: Mapping[str, Any], key: str, m: Any) -> dict[str, Any]:
    where = f"metrics.{key}"
    if not isinstance(m, dict):
        raise _fail(path, f"{where} is not an object")
    acc, n = m.get("accuracy_pct"), m.get("n")
    if not _is_number(acc) or not 0 <= acc <= 100:
        raise _fail(path, f"{where}.accuracy_pct = {acc!r} is not a percentage in [0, 100]")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise _fail(path, f"{where}.n = {n!r} is not a positive integer")
    correct = m.get("correct")
    if correct is not None and not (isinstance(correct, int) and 0 <= correct <= n):
        raise _fail(path, f"{where}.correct = {correct!r} is not an integer in [0, n]")
    attack = m.get("attack")
    if not isinstance(attack, dict) or not attack.get("name") or not attack.get("package"):
        raise _fail(path, f"{where}.attack must be an object with 'name' and 'package'")
    params = {k: v for k, v in attack.items() if k not in ("name", "package", "version")}
    return {
        "metric": str(key), "accuracy_pct": float(acc), "correct": correct, "n": n,
        "pgd20_same_points_pct": _pgd20_on_same_points(doc, key, n),
        "attack_name": str(attack["name"]), "attack_package": str(attack["package"]),
        "attack_version": None if attack.get("version") is None else str(attack["version"]),
        "attack_params": json.dumps(params, sort_keys=True),
    }


def _read_result(path: Path) -> list[dict[str, Any]]:
    """One row per metric of a result file (``RESULT_COLUMNS``), the run's keys on each."""
    doc, run = _read_doc(path)
    prov = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    variant = run.get("variant")
    base = {
        "file": str(path),
        "method": str(run["method"]),
        "variant": None if variant is None else str(variant),
        "arch": str(run["arch"]),
        "teacher": run.get("teacher"),
        "dataset": str(run["dataset"]),
        "data_source": run.get("data_source") or str(run["dataset"]),
        "data_fraction": float(run["data_fraction"]),
        "seed": int(run["seed"]),
        "config_hash": str(run["config_hash"]),
        "checkpoint": run.get("checkpoint"),
        "eps": float(doc["eps"]),
        "eps_text": doc.get("eps_text") or format_eps(doc["eps"]),
        "git_commit": prov.get("git_commit"),
        "git_dirty": prov.get("git_dirty"),
        "eval_device": prov.get("device"),
        "data_sha256": (doc.get("data") or {}).get("sha256"),
        # Knobs and other run keys (e.g. MixACM's CHOICE values) travel to the report as they are.
        "run_extra": json.dumps({k: v for k, v in run.items() if k not in _KNOWN_RUN}, sort_keys=True),
    }
    aa_file = any("autoattack" in key for key in doc["metrics"])
    # PGD-20 inside an AutoAttack result is the companion of its AutoAttack metric (the same
    # points, for pgd20_same_points_pct), not a PGD-20 evaluation of its own.
    return [{**base, **_metric_row(path, doc, key, m), "companion": aa_file and key == "pgd20"}
            for key, m in doc["metrics"].items()]


RESULT_COLUMNS = [
    "file", "method", "variant", "arch", "teacher", "dataset", "data_source", "data_fraction",
    "seed", "config_hash", "checkpoint", "eps", "eps_text", "git_commit", "git_dirty",
    "eval_device", "data_sha256", "run_extra", "metric", "accuracy_pct", "correct", "n", "pgd20_same_points_pct", "companion",
    "attack_name", "attack_package", "attack_version", "attack_params",
]


def collect_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Read result JSON files into one row per (result file, metric) (``RESULT_COLUMNS``).

    Raises ``ResultFileError`` naming the file and key for a missing file or a malformed one,
    and naming both files when two report the same metric of the same run (method, config hash,
    seed, eps) on as many points: the same attack on a subset (PGD-20 beside AutoAttack on its
    points) is a measurement of its own, and so is an AutoAttack file's PGD-20 (``companion``)
    beside the clean + PGD-20 evaluation's on as many points (the paper config: all 10,000).
    """
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for p in paths:
        for row in _read_result(Path(p)):
            # The method is part of the key: a teacher trained in the DAG with the same recipe
            # as a student (config/ci.yaml) shares its config hash but is its own result.
            key = (row["method"], row["config_hash"], row["seed"], row["eps"], row["metric"], row["n"],
                   row["companion"] and row["file"])
            if key in seen:
                raise ResultFileError(
                    f"result files {seen[key]} and {row['file']} both report metric "
                    f"{row['metric']!r} of run {row['config_hash']} seed {row['seed']} on {row['n']} points")
            seen[key] = row["file"]
            rows.append(row)
    check_same_test_points(rows)  # one table, one test set: no two data folders mixed
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Training cost

COST_COLUMNS = ["config_hash", "name", "device_hours", "cost_unit", "train_time_s", "train_cpu_time_s",
                "devices", "device", "cost_source", "cost_file", "job_wall_s", "job_cpu_s", "job_file", "attempts",
                "epochs", "steps", "images", "resumed_from_epoch", "knobs", "recipe", "selection"]
CPU_HOURS, GPU_HOURS, JOB_CPU_HOURS = "CPU-hours", "GPU-hours", "CPU-hours (whole job)"
# How a figure's axis names each unit.
COST_AXIS = {CPU_HOURS: "CPU-hours of the training loop", GPU_HOURS: "GPU-hours of the training loop",
             JOB_CPU_HOURS: "CPU-hours of the whole training job"}


def _devices(summary: Mapping[str, Any]) -> int:
    # The summary's own device_hours / wall time is the number of devices it counted (DDP).
    if summary.get("world_size"):
        return int(summary["world_size"])
    dh, wall = summary.get("device_hours"), summary.get("wall_time_s")
    if _is_number(dh) and _is_number(wall) and wall > 0:
        return max(1, round(dh * 3600 / wall))
    return 1


def read_benchmark(path: str | Path) -> float:
    """Wall seconds of a Snakemake ``benchmark:`` file (the mean over repeats)."""
    return read_benchmark_times(path)[0]


def read_benchmark_times(path: str | Path) -> tuple[float, float | None]:
    """Wall seconds and CPU seconds (``cpu_time``; None where absent) of a Snakemake benchmark
    file, each the mean over repeats."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ResultFileError(f"benchmark file {path}: cannot be read ({err})") from None
    if "s" not in frame.columns or frame.empty:
        raise ResultFileError(f"benchmark file {path}: no 's' column or no rows")
    cpu = frame["cpu_time"].mean() if "cpu_time" in frame.columns else None
    return float(frame["s"].mean()), (float(cpu) if cpu is not None and pd.notna(cpu) else None)


def _is_cpu(summary: Mapping[str, Any]) -> bool:
    return str(summary.get("device") or "cpu").startswith("cpu")


def loop_cost(summary: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """(hours, unit) of a training summary's loop: a CPU run's CPU time in the loop, a GPU run's
    loop wall time, x the devices (DDP ranks) either way. (None, None) where the summary lacks it
    (a CPU run's summary written before ``train_cpu_time_s`` was recorded)."""
    devices = _devices(summary)
    if _is_cpu(summary):
        cpu = summary.get("train_cpu_time_s")
        return (cpu * devices / 3600, CPU_HOURS) if _is_number(cpu) else (None, None)
    if _is_number(summary.get("train_time_s")):
        return summary["train_time_s"] * devices / 3600, GPU_HOURS
    return None, None


def _read_summaries(paths: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    summaries = []
    for p in paths:
        summary = read_json(p, "training summary")
        check_train_summary(summary, p)
        if not summary.get("config_hash"):
            raise ResultFileError(f"training summary {p}: config_hash is missing")
        summaries.append((p, summary))
    # students before teachers, each by name: the row a shared config keeps does not depend on
    # the order the files were given in
    return sorted(summaries, key=lambda ps: (str(ps[1].get("name") or "").startswith("teachers/"),
                                             str(ps[1].get("name"))))


def read_attempts(path: Path) -> list[dict[str, Any]]:
    """The attempts ``mixacm train`` recorded in a run folder (``attempts.jsonl``: one JSON line
    each, with ``wall_s`` and ``cpu_s``); [] where there is no such file."""
    if not path.is_file():
        return []
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ResultFileError(f"attempts file {path}: a line is not JSON ({err})") from None
    for i, line in enumerate(lines):
        if not (isinstance(line, dict) and _is_number(line.get("wall_s")) and _is_number(line.get("cpu_s"))):
            raise ResultFileError(f"attempts file {path}: line {i + 1} lacks wall_s or cpu_s")
    return lines


def _cost_row(path: Path, s: Mapping[str, Any]) -> dict[str, Any]:
    hours, unit = loop_cost(s)
    attempts = read_attempts(path.parent / "attempts.jsonl")
    return {
        "config_hash": s["config_hash"], "name": s.get("name"), "device_hours": hours, "cost_unit": unit,
        "train_time_s": s.get("train_time_s"), "train_cpu_time_s": s.get("train_cpu_time_s"),
        "devices": _devices(s), "device": s.get("device"), "cost_file": str(path),
        "cost_source": "train_summary (training loop)" if unit else None,
        # the job's own time over every attempt (mixacm train records each), where recorded
        "job_wall_s": sum(a["wall_s"] for a in attempts) if attempts else None,
        "job_cpu_s": sum(a["cpu_s"] for a in attempts) if attempts else None,
        "job_file": str(path.parent / "attempts.jsonl") if attempts else None, "attempts": len(attempts) or None,
        # how much training the cost bought: "epochs: 2" alone hides 30 steps an epoch
        **{k: s.get(k) for k in ("epochs", "steps", "images", "resumed_from_epoch")},
        # The values a run used (MixACM's CHOICE knobs, the optimiser recipe, checkpoint
        # selection) travel to the report's per-run details.
        **{k: json.dumps(s[k], sort_keys=True) if k in s else None for k in ("knobs", "recipe", "selection")}}


def _attach_benchmarks(benchmarks: Iterable[Path], rows: Mapping[str, dict], aliases: Mapping[str, dict]) -> None:
    """Each benchmark's job time on the cost row of the run whose name ends its path."""
    def ends_with(stem: str, name: str | None) -> bool:
        return bool(name) and (stem == name or stem.endswith("/" + name))

    for b in benchmarks:
        stem = (b.parent if b.name == "benchmark_train.tsv" else b.with_suffix("")).as_posix()
        match = [r for r in rows.values() if ends_with(stem, r["name"])]
        alias = [r for name, r in aliases.items() if ends_with(stem, name)]
        if not match and len(alias) == 1:
            # the second run of a config: the first run's cost row stands
            continue
        if len(match) != 1:
            names = ", ".join(sorted([str(r["name"]) for r in rows.values()] + list(map(str, aliases)))) or "none"
            raise ResultFileError(
                f"benchmark file {b} matches {len(match)} training summaries; its path without "
                f"the suffix must end with exactly one run name (run names given: {names})")
        if match[0]["attempts"]:
            continue  # every attempt's record beats the benchmark of the last one
        seconds, cpu_seconds = read_benchmark_times(b)
        match[0].update(job_wall_s=seconds, job_cpu_s=cpu_seconds, job_file=str(b))


def _cost_by_job(row: dict[str, Any]) -> None:
    """A CPU run without the loop's CPU time: the job's CPU time (every attempt's, or its
    benchmark's), unless the run resumed and only the benchmark of its last attempt is known, or
    it has none: then no cost."""
    ok = row["job_cpu_s"] is not None and (bool(row["attempts"]) or not row["resumed_from_epoch"])
    row.update(device_hours=row["job_cpu_s"] / 3600 if ok else None, cost_unit=JOB_CPU_HOURS if ok else None,
               cost_source="benchmark (whole job: start-up and data loading included)" if ok else
               "none: a resumed run's benchmark timed its last attempt only" if row["job_cpu_s"] is not None
               else None)


def collect_costs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Training cost per run (``COST_COLUMNS``), from ``train_summary.json`` files; the job's own
    time stands beside it: every attempt's from the ``attempts.jsonl`` that ``mixacm train``
    writes beside the summary, else the Snakemake benchmark TSV's (the attempt that finished).

    The cost is the training loop's (``loop_cost``): CPU-hours for CPU runs, GPU-hours for GPU
    runs. If any CPU summary lacks ``train_cpu_time_s`` (written before it was recorded), every
    CPU run of the set is costed by its job's CPU time from its benchmark instead ("CPU-hours
    (whole job)"; none for a resumed run, whose benchmark timed its last attempt only), so the
    CPU runs of one set share one unit. A benchmark file belongs to the run whose name ends its
    path without the suffix (``benchmarks/train/cifar10/mixacm/tiny/seed0.tsv`` for run
    ``cifar10/mixacm/tiny/seed0``), or, named ``benchmark_train.tsv``, to the run whose name ends
    its folder (a teacher trained in the DAG). One row per training config: where two runs share
    one (a teacher trained with a student's recipe), the student's name is kept.
    """
    paths = list(map(Path, paths))
    summaries = _read_summaries(p for p in paths if p.suffix == ".json")
    rows: dict[str, dict[str, Any]] = {}
    aliases: dict[str, dict[str, Any]] = {}  # run name -> the cost row of its training config
    for p, s in summaries:
        if s["config_hash"] in rows:
            # The same training config twice (a teacher trained in the DAG with a student's
            # recipe, config/ci.yaml): one cost row; the first summary given keeps its name.
            aliases[s.get("name")] = rows[s["config_hash"]]
            continue
        rows[s["config_hash"]] = _cost_row(p, s)
    _attach_benchmarks([p for p in paths if p.suffix != ".json"], rows, aliases)
    cpu_rows = [r for r in rows.values() if str(r["device"] or "cpu").startswith("cpu")]
    if any(r["cost_unit"] is None for r in cpu_rows):
        for row in cpu_rows:
            _cost_by_job(row)
    return pd.DataFrame(list(rows.values()), columns=COST_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Tables

def norm_variant(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else \
        re.sub(r"[^a-z0-9]", "", str(v).lower())


def row_name(row: Mapping[str, Any]) -> str:
    """A table row's method with its named variant (e.g. "MixACM [compute-matched]"); the full
    method and the ablation presets (already in the method label) add nothing."""
    variant = row.get("variant")
    n = norm_variant(variant)
    if not n or n in FULL_VARIANTS or n in ABLATION_VARIANTS:
        return str(row["method"])
    return f"{row['method']} [{variant}]"


def _select(kind: str, results: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    r = results[results["dataset"] == spec["dataset"]]
    full_data = (r["data_fraction"] - 1.0).abs() < 1e-9
    if kind == "ablation":
        methods = {row["method"] for row in spec["rows"] if row.get("method")}
        return r[full_data & r["method"].isin(methods)]
    not_ablation = ~r["variant"].map(lambda v: norm_variant(v) in ABLATION_VARIANTS).astype(bool)
    if kind == "transfer":
        # The teacher's own evaluation names the teacher in run.variant: it is no loss variant.
        keep = r["method"].isin(spec.get("methods", [])) & (not_ablation | (r["method"] == "teacher"))
        return r[full_data & keep]
    return r[not_ablation] if kind == "less_data" else r[not_ablation & full_data]


def _unique(values: Iterable[Any]) -> list[Any]:
    out = []
    for v in values:
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v not in out:
            out.append(v)
    return out


def _round(x: float | None, nd: int = 4) -> float:
    return float("nan") if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def _attack_cells(col: str, key: str | None, group: pd.DataFrame) -> dict[str, Any]:
    """One accuracy column of a row: mean / std over seeds, points, seeds, package; per seed the
    measurement on the most points (PGD-20 on all points, not the one beside AutoAttack; on as
    many points, the evaluation's own PGD-20 before an AutoAttack file's companion)."""
    m = (group[group["metric"] == key].sort_values(["seed", "n", "companion"], ascending=[True, True, False])
         .groupby("seed").tail(1))
    acc = m["accuracy_pct"]
    cells = {f"{col}_mean": _round(acc.mean() if len(m) else None),
             f"{col}_std": _round(acc.std(ddof=1) if len(m) > 1 else None),
             f"{col}_n": int(m["n"].min()) if len(m) else None,
             f"{col}_seeds": int(m["seed"].nunique()),
             f"{col}_package": "; ".join(_unique(
                 f"{p} {v}" if v else p for p, v in zip(m["attack_package"], m["attack_version"])))}
    if col in PAIRED_COLUMNS:
        same = m["pgd20_same_points_pct"].dropna().astype(float)
        # only where every seed has it: a mean over some seeds is not the column's points
        complete = len(same) == len(m) and len(m) > 0
        cells[f"{col}_pgd20_mean"] = _round(same.mean() if complete else None)
        cells[f"{col}_pgd20_std"] = _round(same.std(ddof=1) if complete and len(same) > 1 else None)
    if col == "autoattack":
        cells["autoattack_version"] = AUTOATTACK_VERSIONS.get(key, "") if len(m) else ""
    if col == "audited":
        # mixacm audit's failed checks, each with its reason (mixacm.audit), per seed.
        flags = [f"seed {sd}: {reason}" for sd, p in zip(m["seed"], m["attack_params"])
                 for reason in json.loads(p).get("flags", [])]
        cells["audit_flags"] = " | ".join(flags) if len(m) else ""
    return cells


def _cost_cells(hashes: list[str], costs: pd.DataFrame | None) -> dict[str, Any]:
    """Mean training cost over the runs (config hashes) that have one, with its unit(s)."""
    dh, src, units, steps = [], [], [], []
    if costs is not None and len(costs):
        c = costs.set_index("config_hash")
        for h in hashes:
            if h not in c.index:
                continue
            src.append(c.at[h, "cost_source"])  # also why a run has no cost
            if pd.notna(c.at[h, "device_hours"]):
                dh.append(float(c.at[h, "device_hours"]))
                units.append(c.at[h, "cost_unit"] if "cost_unit" in c.columns else None)
                if "steps" in c.columns and pd.notna(c.at[h, "steps"]):
                    steps.append(float(c.at[h, "steps"]))
    return {"train_device_hours": _round(sum(dh) / len(dh), 6) if dh else float("nan"),
            # the work the cost bought: optimiser steps, mean over the costed runs
            "train_steps": _round(sum(steps) / len(steps), 1) if steps and len(steps) == len(dh) else float("nan"),
            "train_cost_unit": ";".join(_unique(u for u in units if isinstance(u, str))),
            "cost_runs": len(dh), "cost_source": ";".join(_unique(x for x in src if isinstance(x, str)))}


def _aggregate(group: pd.DataFrame, costs: pd.DataFrame | None) -> dict[str, Any]:
    """One trained row: per-attack mean / std over seeds, test points, package, cost."""
    by_seed = group.groupby("seed")["config_hash"].nunique()
    if (by_seed > 1).any():
        seed = int(by_seed[by_seed > 1].index[0])
        files = ", ".join(_unique(group[group["seed"] == seed]["file"]))
        raise ResultFileError(
            f"result files {files} are different runs (config hashes) with the same set-up and "
            f"seed {seed}; give them distinct run.variant values to keep them apart")
    row: dict[str, Any] = {"n_seeds": int(group["seed"].nunique()),
                           "seeds": ";".join(map(str, sorted(group["seed"].unique())))}
    for col, keys in ATTACK_COLUMNS.items():
        row.update(_attack_cells(col, next((k for k in keys if (group["metric"] == k).any()), None), group))
    hashes = _unique(group["config_hash"])
    row.update(_cost_cells(hashes, costs))
    row["config_hashes"] = ";".join(hashes)
    row["git_commits"] = ";".join(_unique(group["git_commit"]))
    row["files"] = ";".join(_unique(group["file"]))
    return row


_GROUP_KEYS = ["method", "variant_key", "arch", "teacher", "dataset", "data_source",
               "data_fraction", "eps_text"]

TABLE_COLUMNS = [
    "status", "method", "method_key", "variant", "student", "teacher", "dataset", "data_source",
    "data_fraction", "eps", "n_seeds", "seeds",
    *[f"{c}_{s}" for c in ATTACK_COLUMNS for s in ("mean", "std", "n", "seeds", "package")],
    *[f"{c}_pgd20_{s}" for c in PAIRED_COLUMNS for s in ("mean", "std")],
    "autoattack_version", "audit_flags",
    "paper_student", "paper_eps", "same_setting", "paper_clean", "paper_robust", "paper_note",
    "paper_source", "diff_clean", "diff_robust", "diff_robust_vs",
    "ref_clean", "ref_autoattack", "ref_source",
    "train_device_hours", "train_cost_unit", "train_steps", "cost_runs", "cost_source", "config_hashes",
    "git_commits", "files",
]
# Whole numbers: a nullable integer type, so that the empty cells of cited rows do not turn them
# into floats ("50.0 test points") in the CSV.
_COUNT_COLUMNS = ["n_seeds", "cost_runs", *[f"{c}_{s}" for c in ATTACK_COLUMNS for s in ("n", "seeds")]]
_PAPER_ONLY = [c for c in TABLE_COLUMNS if c.startswith(("paper_", "diff_", "ref_"))] + ["same_setting"]


def _paper_key(kind: str, method: Any, variant: Any) -> tuple[str, str | None]:
    if kind != "ablation":
        return (str(method), None)
    v = norm_variant(variant)
    return (str(method), "full" if v is None or v in FULL_VARIANTS else v)


def _paper_columns(prow: Mapping[str, Any] | None, spec: Mapping[str, Any],
                   refs: list[Mapping[str, Any]], source: str) -> dict[str, Any]:
    if prow is None:
        return {"paper_student": spec.get("student"), "paper_eps": spec.get("eps"),
                "paper_source": source}
    ref = next((r for r in refs if r.get("paper_label") == prow["label"]), None)
    return {
        "paper_student": spec.get("student"), "paper_eps": spec.get("eps"),
        "paper_clean": prow.get("clean"), "paper_robust": prow.get("robust"),
        "paper_note": prow.get("note", ""), "paper_source": source,
        "ref_clean": ref["clean"] if ref else None,
        "ref_autoattack": ref["autoattack"] if ref else None,
        "ref_source": (f"RobustBench {ref.get('model') or ref['label']} "
                       f"({ref.get('arch')}, {ref.get('eps')})" if ref else ""),
    }


def method_labels(paper: Mapping[str, Any], dataset: str) -> dict[str, str]:
    """Registry name -> the name the tables give a method: the paper's label in a full-data
    table of the dataset, else ``EXTRA_LABELS`` (methods no paper row names)."""
    return {**EXTRA_LABELS, **{r["method"]: r["label"] for t in paper["tables"].values()
                               if t.get("dataset") == dataset for r in t["rows"]
                               if r.get("method") and not r.get("variant")}}


def _differences(row: dict[str, Any], prow: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
    """Fill ``same_setting`` and, only in the paper's setting, the differences trained - paper:
    across settings (another student or eps) the numbers stand side by side, no difference."""
    row["same_setting"] = row["student"] == spec.get("student") and row["eps"] == spec.get("eps")
    if not row["same_setting"]:
        return
    if prow.get("clean") is not None:
        row["diff_clean"] = _round(row["clean_mean"] - prow["clean"])
    robust_col = next((c for c in ROBUST_PREFERENCE if pd.notna(row[f"{c}_mean"])), "pgd20")
    if prow.get("robust") is not None and pd.notna(row[f"{robust_col}_mean"]):
        row["diff_robust"] = _round(row[f"{robust_col}_mean"] - prow["robust"])
        row["diff_robust_vs"] = robust_label(robust_col, row["autoattack_version"])


def _order(kind: str, table: pd.DataFrame, spec: Mapping[str, Any]) -> pd.DataFrame:
    if kind == "less_data":
        return table.sort_values(["method", "student", "teacher", "eps", "data_fraction"],
                                 kind="stable", ignore_index=True)
    if kind == "transfer":
        order = {m: i for i, m in enumerate(spec.get("methods", []))}
        return table.sort_values(["method_key", "student", "eps"], key=lambda c: c.map(order) if c.name ==
                                 "method_key" else c, kind="stable", ignore_index=True)
    return table


def build_table(kind: str, results: pd.DataFrame, paper: Mapping[str, Any] | None = None,
                costs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One of the paper's tables (``TABLE_KINDS``) from ``collect_results`` output.

    ``costs`` is ``collect_costs`` output (joined on the run's config hash). Columns are
    ``TABLE_COLUMNS``; the less-data table has no paper, difference or reference columns.
    Accuracies are in %, rounded to 4 decimals; ``*_std`` is empty for a single seed. Rows the
    pipeline trained have status ``trained`` (in the paper's order, then the others), rows only
    the paper reports ``cited``.
    """
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown table kind {kind!r}; valid kinds: {', '.join(TABLE_KINDS)}")
    paper = load_paper_numbers() if paper is None else paper
    spec = paper["tables"][kind]
    source = f"{paper.get('paper', 'paper')}: {spec.get('source', '')}"
    refs = [r for r in paper.get("robustbench", {}).get("models", []) if r.get("dataset") == spec["dataset"]]
    labels = method_labels(paper, spec["dataset"])
    paper_rows = {_paper_key(kind, prow.get("method") or f"cited:{prow['label']}", v): prow
                  for prow in spec["rows"] for v in [prow.get("variant"), *prow.get("aliases", [])]}

    sel = _select(kind, results, spec).copy()
    sel["variant_key"] = sel["variant"].map(norm_variant)
    sel["teacher"] = sel["teacher"].where(sel["teacher"].notna(), "")
    trained: dict[int, list[dict[str, Any]]] = {}
    extra: list[dict[str, Any]] = []
    for key, group in sel.groupby(_GROUP_KEYS, dropna=False, sort=True):
        ident = dict(zip(_GROUP_KEYS, key))
        prow = paper_rows.get(_paper_key(kind, ident["method"], group["variant"].iloc[0]))
        row = {
            "status": TRAINED,
            "method": prow["label"] if prow else labels.get(ident["method"], ident["method"]),
            "method_key": ident["method"],
            "variant": "" if pd.isna(group["variant"].iloc[0]) else group["variant"].iloc[0],
            "student": ident["arch"], "teacher": ident["teacher"] or "",
            "dataset": ident["dataset"], "data_source": ident["data_source"],
            "data_fraction": ident["data_fraction"], "eps": ident["eps_text"],
            **_aggregate(group, costs), **_paper_columns(prow, spec, refs, source),
        }
        if prow is None:
            extra.append(row)
            continue
        _differences(row, prow, spec)
        trained.setdefault(id(prow), []).append(row)

    rows = []
    for prow in spec["rows"]:
        rows.extend(trained.get(id(prow)) or [{
            "status": CITED, "method": prow["label"], "method_key": prow.get("method") or "",
            "variant": prow.get("variant") or "", "dataset": spec["dataset"],
            **_paper_columns(prow, spec, refs, source)}])
    columns = [c for c in TABLE_COLUMNS if kind not in NO_PAPER_KINDS or c not in _PAPER_ONLY]
    return _order(kind, _with_count_types(pd.DataFrame(rows + extra, columns=columns)), spec)


def _with_count_types(frame: pd.DataFrame) -> pd.DataFrame:
    counts = [c for c in _COUNT_COLUMNS if c in frame.columns]
    frame[counts] = frame[counts].astype("Int64")
    return frame


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV, atomically (a crash leaves the old file or the new one)."""
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


# Columns that hold text even when a value looks like a number (a hex config hash "1e50...",
# a seed list "0", a commit "1234567").
_TEXT_COLUMNS = [c for c in TABLE_COLUMNS if c.endswith("_package") or c in (
    "status", "method", "method_key", "variant", "student", "teacher", "dataset", "data_source",
    "eps", "seeds", "autoattack_version", "audit_flags", "paper_student", "paper_eps", "paper_note",
    "paper_source", "diff_robust_vs", "ref_source", "cost_source", "train_cost_unit", "config_hashes",
    "git_commits", "files")]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by ``write_table`` back with the types ``build_table`` gave it."""
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"table file {path} does not exist")
    frame = pd.read_csv(path, dtype={c: "string" for c in _TEXT_COLUMNS}, keep_default_na=False,
                        na_values={c: [""] for c in TABLE_COLUMNS if c not in _TEXT_COLUMNS})
    missing = [c for c in ("status", "method", "method_key") if c not in frame.columns]
    if missing:
        raise ResultFileError(f"table file {path}: columns {missing} are missing")
    text = [c for c in frame.columns if c in _TEXT_COLUMNS]
    frame[text] = frame[text].astype(object)
    return _with_count_types(frame)
