"""The HTML report (``report/paper_tables.html``), rendered with jinja2 from the tables, the
figures and the result files alone.

Every number in the page is a ``<data value="...">`` element holding the value it was formatted
from, so the page can be checked against the tables and the result files by a parser. Figures are
embedded as base64 PNGs and the styles are inline: the file displays anywhere, offline, with no
external scripts or fonts.
"""
from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

import mixacm
from mixacm.report.tables import (
    ATTACK_COLUMNS,
    ATTACK_TITLES,
    CITED,
    CPU_HOURS,
    GPU_HOURS,
    NO_PAPER_KINDS,
    PAIRED_COLUMNS,
    TABLE_KINDS,
    TRAINED,
    JOB_CPU_HOURS,
    load_paper_numbers,
)
from mixacm.utils import atomic_write, portable_path as display_path

TEMPLATE = "paper_tables.html.j2"
# Tables in the order the paper presents them, then the robustness-transfer comparison; the
# less-data curve and the transfer table have no paper column.
REPORT_ORDER = ("cifar10", "imagenet", "ablation", "less_data", "transfer")


# How a run's settings are labelled in the report. The optimiser recipe's lr-decay factor and
# MixACM's ACM weight are both called gamma; the report tells them apart.
SETTING_LABELS = {"knobs": "method knobs", "recipe": "optimiser recipe", "selection": "model selection"}
RECIPE_RENAMES = {"gamma": "lr_decay_gamma"}


def config_header(path: str | Path) -> str:
    """The comment block that opens a config file, without the ``#`` marks."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def training_summary(cost_row) -> str | None:
    """"16 epochs, 480 steps (30 an epoch), 61,440 images seen" from a run's training summary."""
    get = lambda k: _value(cost_row[k]) if k in cost_row else None  # noqa: E731
    epochs, steps, images = get("epochs"), get("steps"), get("images")
    if not epochs or steps is None:
        return None
    text = f"{int(epochs)} epochs, {int(steps)} steps ({int(steps) / int(epochs):g} an epoch)"
    return text + (f", {int(images):,} images seen" if images is not None else "")


def job_record(cost_row) -> dict[str, Any] | None:
    """The training job's own time (``wall_s``, ``cpu_s``: start-up and data loading included),
    over its ``attempts`` where ``mixacm train`` recorded them, else from its Snakemake benchmark
    (the attempt that finished), and the epoch a resumed run resumed after, beside the loop's
    cost; None when neither is known."""
    get = lambda k: _value(cost_row[k]) if k in cost_row else None  # noqa: E731
    record = {"wall_s": get("job_wall_s"), "cpu_s": get("job_cpu_s"), "attempts": get("attempts"),
              "resumed": get("resumed_from_epoch") or None}
    return record if record["wall_s"] is not None or record["resumed"] else None


def run_settings(cost_row) -> dict[str, str]:
    """The run's method knobs, optimiser recipe and model selection, labelled so that equal knob
    names of different parts (``gamma``) cannot be mistaken for each other."""
    out = {}
    for key, label in SETTING_LABELS.items():
        value = _value(cost_row[key]) if key in cost_row else None
        if value is None:
            continue
        if key == "recipe":
            try:
                recipe = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                recipe = None
            if isinstance(recipe, dict):
                value = json.dumps({RECIPE_RENAMES.get(k, k): v for k, v in recipe.items()}, sort_keys=True)
        out[label] = value
    return out


def _value(v: Any) -> Any:
    """Plain Python values for the template: NaN and None become None, numpy scalars unwrap."""
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _row_dict(row: pd.Series) -> dict[str, Any]:
    return {k: _value(v) for k, v in row.items()}


def _run_details(row: Mapping[str, Any], results: pd.DataFrame,
                 costs: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Per training run behind a trained row: seed, config, commit, each metric, cost."""
    files = set((row.get("files") or "").split(";"))
    hashes = set((row.get("config_hashes") or "").split(";"))
    sel = results[results["file"].isin(files) & results["config_hash"].isin(hashes)]
    cost = costs.set_index("config_hash") if costs is not None and len(costs) else None
    runs = []
    for (config_hash, seed), g in sel.groupby(["config_hash", "seed"], sort=True):
        first = g.iloc[0]
        metrics = []
        for key in [k for keys in ATTACK_COLUMNS.values() for k in keys] + sorted(
                set(g["metric"]) - {k for keys in ATTACK_COLUMNS.values() for k in keys}):
            for _, m in g[g["metric"] == key].iterrows():
                metrics.append({k: _value(m[k]) for k in (
                    "metric", "accuracy_pct", "correct", "n", "attack_name", "attack_package",
                    "attack_version", "attack_params", "file")})
        c = cost.loc[config_hash] if cost is not None and config_hash in cost.index else None
        extra = json.loads(first["run_extra"] or "{}")
        runs.append({
            "seed": int(seed), "config_hash": config_hash, "git_commit": _value(first["git_commit"]),
            "git_dirty": _value(first["git_dirty"]), "eps_text": first["eps_text"],
            "checkpoint": _value(first["checkpoint"]), "metrics": metrics,
            "extra": {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in extra.items()},
            "device_hours": None if c is None else _value(c["device_hours"]),
            "cost_source": None if c is None else c["cost_source"],
            "cost_unit": None if c is None or "cost_unit" not in c else _value(c["cost_unit"]),
            "cost_file": None if c is None else c["cost_file"],
            "settings": {} if c is None else run_settings(c),
            "training": None if c is None else training_summary(c),
            "job": None if c is None else job_record(c),
        })
    return runs


# What each badge and mark on the page means (the page defines every one it shows).
BADGES = {
    TRAINED: ("trained here", "trained and evaluated by this pipeline; the numbers are this run's, in "
                              "the setting its row names (student, eps, data), which may not be the paper's"),
    CITED: ("paper only", "reported by the paper; not trained by this pipeline"),
}
COST_UNITS = {
    CPU_HOURS: "CPU time of the training loop's steps (all threads of the process), in hours",
    GPU_HOURS: "wall time of the training loop's steps x the GPUs of the run, in hours",
    JOB_CPU_HOURS: "CPU time of the whole training job from its Snakemake benchmark, in hours: start-up "
                   "and data loading included (the cost of runs whose training summaries predate the "
                   "loop's own CPU time; none for a resumed run, whose benchmark timed its last attempt only)",
}


def _attack_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accuracy columns of a section: those some row has a value in (a column the config
    never fills is not shown; none in a section of cited rows only). A paired column (AutoAttack,
    audited) says whether its cells carry PGD-20 on their own points: where some row's points
    are fewer than its PGD-20 column's."""
    have = [c for c in ATTACK_COLUMNS if any(r.get(f"{c}_mean") is not None for r in rows)]
    cols = []
    for c in have:
        paired = c in PAIRED_COLUMNS and any(
            r.get(f"{c}_pgd20_mean") is not None and r.get(f"{c}_n") != r.get("pgd20_n") for r in rows)
        ns = sorted({r[f"{c}_n"] for r in rows if r.get(f"{c}_n") is not None})
        cols.append({"key": c, "title": ATTACK_TITLES[c], "paired": paired,
                     "points": ", ".join(f"{n:,}" for n in ns)})
    return cols


def _filled_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper, difference and cost columns some row has a value in (others are not shown),
    and the cost unit when every costed row shares one (then the header carries it)."""
    filled = lambda col: any(r.get(col) is not None for r in rows)  # noqa: E731
    units = {r.get("train_cost_unit") for r in rows if r.get("train_device_hours") is not None}
    return {"paper_columns": [c for c in ("clean", "robust") if filled(f"paper_{c}")],
            "diff_columns": [c for c in ("clean", "robust") if filled(f"diff_{c}")],
            "has_cost": filled("train_device_hours"),
            "cost_unit": units.pop() if len(units) == 1 else None}


def section_heading(kind: str, spec: Mapping[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """What ran ("Main comparison: resnet2b student, L-inf 2/255, CIFAR-10 (JPEG copy)") and,
    beside it, the paper's setting ("the paper: CIFAR-10, WRN-34-10 student, L-inf 8/255")."""
    trained = [r for r in rows if r["status"] == TRAINED]
    name = spec.get("name") or kind
    if trained:
        settings = sorted({(r["student"], r["eps"]) for r in trained})
        sources = sorted({r["data_source"] for r in trained if r.get("data_source")})
        ran = "; ".join(f"{s} student, L-inf {e}" for s, e in settings) + (f", {', '.join(sources)}" if sources else "")
        title = f"{name}: {ran}"
    else:
        title = f"{name}: nothing trained here"
    paper = f"the paper: {spec['title']}" if spec.get("title") and kind not in NO_PAPER_KINDS else ""
    return {"title": title, "paper": paper}


def definitions(paper: Mapping[str, Any], sections: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, definition) of every method name the tables show, from ``paper_numbers.yaml``;
    a name without a definition is listed with none, which the tests refuse."""
    known = paper.get("definitions") or {}
    names = []
    for section in sections:
        for r in section["rows"]:
            base = str(r["method"])
            if base not in names:
                names.append(base)
    return [(n, known.get(n)) for n in names]


def _figure(path: Path) -> dict[str, str]:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"name": Path(path).name, "src": f"data:image/png;base64,{data}"}


def render_report(tables: Mapping[str, pd.DataFrame], figures: Iterable[str | Path],
                  results: pd.DataFrame, out_path: str | Path,
                  paper: Mapping[str, Any] | None = None,
                  costs: pd.DataFrame | None = None,
                  teachers: list[dict[str, Any]] | None = None,
                  config_path: str | Path | None = None) -> Path:
    """Render ``report/paper_tables.html`` (atomically) and return its path.

    ``config_path`` names the pipeline config the results came from; the report shows its name
    and its header comment, where each config states its scale (and whether it is a smoke run).

    ``tables`` maps table kinds to ``build_table`` output, ``figures`` are PNG paths (embedded),
    ``results`` is ``collect_results`` output and ``costs`` ``collect_costs`` output; the last two
    give each trained row its per-run details (seed, config hash, commit, attacks, cost);
    ``teachers`` (``mixacm.report.teachers.teacher_records``) adds the teachers' import checks.
    """
    paper = load_paper_numbers() if paper is None else paper
    unknown = set(tables) - set(TABLE_KINDS)
    if unknown:
        raise ValueError(f"unknown table kind(s) {sorted(unknown)}; valid kinds: {TABLE_KINDS}")
    sections = []
    for kind in [k for k in REPORT_ORDER if k in tables]:
        spec = paper["tables"][kind]
        rows = []
        for _, r in tables[kind].iterrows():
            row = _row_dict(r)
            row["runs"] = _run_details(row, results, costs) if row["status"] == TRAINED else []
            rows.append(row)
        sections.append({"kind": kind, **section_heading(kind, spec, rows), "source": spec.get("source"),
                         "student": spec.get("student"), "eps": spec.get("eps"),
                         "has_paper": kind not in NO_PAPER_KINDS, "rows": rows,
                         "description": spec.get("description"),
                         "attack_columns": _attack_columns(rows), **_filled_columns(rows)})
    units = sorted({u for t in tables.values() if "train_cost_unit" in t
                    for v in t["train_cost_unit"].dropna() for u in str(v).split(";") if u})
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mixacm.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template(TEMPLATE).render(
        sections=sections,
        figures=[_figure(p) for p in figures],
        robustbench=paper.get("robustbench", {}),
        teachers=[{k: _value(v) for k, v in t.items()} for t in (teachers or [])],
        paper_citation=paper.get("paper", ""),
        n_files=int(results["file"].nunique()) if len(results) else 0,
        version=mixacm.__version__,
        config=None if config_path is None else {"path": display_path(config_path),
                                                 "header": config_header(config_path)},
        badges=BADGES, trained=TRAINED, definitions=definitions(paper, sections),
        cost_units=[(u, COST_UNITS.get(u, "")) for u in units],
    )
    return atomic_write(out_path, lambda p: p.write_text(html, encoding="utf-8"))
