"""Figures of the report, drawn with matplotlib's Agg canvas from the tables alone.

- ``less_data.png``: clean and robust (PGD-20, and AutoAttack where evaluated) accuracy against
  the fraction of the training set (ticks at the fractions used), one line per method and
  student, error bars = std over seeds (the title says "one seed" where there is no second).
- ``clean_vs_robust.png``: clean against robust accuracy per dataset; reproduced rows filled,
  the paper's points hollow circles, RobustBench reference points hollow squares, all labelled
  (labels moved apart by :func:`place_labels`); titles name the paper's and the reproduced setting.
  Robust is the strongest attack every reproduced row of the table has, all its seeds included
  (standard AutoAttack, then APGD-CE + APGD-T, then PGD-20), so the points compare like with like.
- ``training_cost.png``: training cost per reproduced row (mean over seeds), in the unit the
  table gives (CPU-hours of CPU jobs, GPU-hours of GPU jobs).
- ``transfer.png``: robust accuracy against training cost (the table's unit, log scale) of the
  robustness-transfer table's rows (the teacher, AT, MixACM, IGAM, ARD, RSLAD); robust is the
  strongest attack every row has; a row without a recorded cost (a teacher from a file) is
  drawn as a horizontal line at its robust accuracy.

Figures use ``matplotlib.figure.Figure`` directly (no pyplot), so no global backend or state is
touched and the functions are safe to call from tests and notebooks.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixacm.report.tables import ROBUST_PREFERENCE, load_paper_numbers, robust_label, row_name
from mixacm.utils import atomic_write

FIGURE_NAMES = ("less_data.png", "clean_vs_robust.png", "training_cost.png", "transfer.png")
_NO_DATA = "no reproduced results yet"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    # No timestamp or version in the PNG metadata, so equal inputs give equal files.
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110,
                                                    metadata={"Software": None}))


def _empty(ax, text: str = _NO_DATA) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _reproduced(table: pd.DataFrame | None) -> pd.DataFrame:
    if table is None or table.empty:
        return pd.DataFrame()
    return table[table["status"] == "reproduced"]


def _sources(rows: pd.DataFrame) -> str:
    """A title suffix naming the data the reproduced rows were computed on."""
    if rows.empty or "data_source" not in rows:
        return ""
    return "\nreproduced on " + ", ".join(sorted(set(rows["data_source"].dropna().astype(str))))


def _seeds_note(rows: pd.DataFrame) -> str:
    """"(mean ± std over seeds)" only where some point has two seeds or more."""
    if rows.empty or "n_seeds" not in rows:
        return ""
    most = int(rows["n_seeds"].max())
    return " (mean ± std over seeds)" if most >= 2 else " (one seed: no error bars)"


def _settings(rows: pd.DataFrame) -> str:
    """The reproduced setting(s): student and eps of the rows, e.g. "resnet2b at 2/255"."""
    if rows.empty:
        return ""
    pairs = sorted({f"{r['student']} at {r['eps']}" for _, r in rows.iterrows()})
    return "reproduced: " + ", ".join(pairs)


# Offsets (points) tried for a label, nearest first: right-above, right-below, left-above, ...
_LABEL_OFFSETS = [(dx * r, dy * r, ha) for r in (1, 2, 3, 4)
                  for dx, dy, ha in ((4, 3, "left"), (4, -10, "left"), (-4, 3, "right"),
                                     (-4, -10, "right"), (0, 9, "center"), (0, -16, "center"))]


def place_labels(fig: Figure, annotations: list) -> list:
    """Move each annotation to the nearest offset where its box overlaps no label placed before
    it, no labelled point and nothing outside its axes (greedy, deterministic; the least overlap
    when no offset is free). Returns the final label boxes in display coordinates."""
    from matplotlib.transforms import Bbox

    FigureCanvasAgg(fig)
    fig.canvas.draw()  # final layout, so that boxes are where they will be drawn
    renderer = fig.canvas.get_renderer()
    placed: list = []
    points = []
    for ann in annotations:  # the labelled markers, as boxes of about their drawn size
        x, y = ann.axes.transData.transform(ann.xy)
        points.append(Bbox.from_extents(x - 5, y - 5, x + 5, y + 5))

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for ann in annotations:
        frame = ann.axes.get_window_extent(renderer)
        best = None
        for dx, dy, ha in _LABEL_OFFSETS:
            ann.set_position((dx, dy))
            ann.set_horizontalalignment(ha)
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - overlap(box, frame)
            cost = (sum(overlap(box, other) for other in placed)
                    + sum(overlap(box, p) for p in points) + 10 * outside)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, box)
            if cost == 0:
                break
        _, dx, dy, ha, box = best
        ann.set_position((dx, dy))
        ann.set_horizontalalignment(ha)
        placed.append(box)
    return placed


def robust_column(rows: pd.DataFrame) -> str:
    """The strongest attack column that every row has for all of its seeds (PGD-20 otherwise)."""
    for col in ROBUST_PREFERENCE:
        if f"{col}_mean" in rows and len(rows) and rows[f"{col}_mean"].notna().all() and (
                rows[f"{col}_seeds"] == rows["n_seeds"]).all():
            return col
    return "pgd20"


def less_data_figure(table: pd.DataFrame | None, path: Path) -> Path:
    return _save(draw_less_data(table), path)


def draw_less_data(table: pd.DataFrame | None) -> Figure:
    rows = _reproduced(table)
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax_rob, ax_clean = fig.subplots(1, 2, sharex=True)
    if rows.empty:
        _empty(ax_rob)
        _empty(ax_clean)
    else:
        rows = rows.assign(name=[row_name(r) for _, r in rows.iterrows()])
        for (name, student, teacher, eps), g in rows.groupby(["name", "student", "teacher", "eps"], sort=True):
            g = g.sort_values("data_fraction")
            label = f"{name} ({student}, {eps})"
            line = ax_rob.errorbar(g["data_fraction"], g["pgd20_mean"], yerr=g["pgd20_std"],
                                   marker="o", capsize=3, label=f"{label} PGD-20")
            for col, marker in (("autoattack", "s"), ("autoattack_apgd", "^")):
                if f"{col}_mean" in g and g[f"{col}_mean"].notna().any():
                    ax_rob.errorbar(g["data_fraction"], g[f"{col}_mean"], yerr=g[f"{col}_std"],
                                    marker=marker, ls="--", capsize=3, color=line.lines[0].get_color(),
                                    label=f"{label} {robust_label(col)}")
            ax_clean.errorbar(g["data_fraction"], g["clean_mean"], yerr=g["clean_std"],
                              marker="o", capsize=3, color=line.lines[0].get_color(), label=label)
        fractions = sorted(rows["data_fraction"].unique())
        for ax, title in ((ax_rob, "Robust accuracy"), (ax_clean, "Clean accuracy")):
            ax.set_xscale("log")
            # ticks at the fractions used, not at log decades none of them sits on
            ax.set_xticks(fractions, [f"{100 * f:g} %" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("fraction of the training set")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
    fig.suptitle("Less data: accuracy against training-set fraction" + _seeds_note(rows)
                 + _sources(rows))
    return fig


def clean_vs_robust_figure(tables: Mapping[str, pd.DataFrame], paper: Mapping[str, Any],
                           path: Path) -> Path:
    return _save(draw_clean_vs_robust(tables, paper)[0], path)


def draw_clean_vs_robust(tables: Mapping[str, pd.DataFrame], paper: Mapping[str, Any]) -> tuple[Figure, list]:
    """The figure and the final boxes of its labels (display coordinates)."""
    kinds = [k for k in ("cifar10", "imagenet") if k in paper["tables"]]
    fig = Figure(figsize=(5.5 * len(kinds), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    refs = paper.get("robustbench", {}).get("models", [])
    labels = []
    for ax, kind in zip(axes, kinds):
        spec = paper["tables"][kind]
        points = [p for p in spec["rows"] if p.get("clean") is not None and p.get("robust") is not None]
        for i, prow in enumerate(points):
            ax.scatter(prow["clean"], prow["robust"], s=55, facecolors="none",
                       edgecolors="tab:blue", label="paper" if i == 0 else None)
            labels.append(ax.annotate(prow["label"], (prow["clean"], prow["robust"]), fontsize=7,
                                      xytext=(4, 3), textcoords="offset points", color="tab:blue"))
        shown = False
        for ref in refs:
            if ref.get("dataset") == spec["dataset"]:
                ax.scatter(ref["clean"], ref["autoattack"], marker="s", s=45, facecolors="none",
                           edgecolors="tab:green", label=None if shown else "RobustBench (AutoAttack)")
                labels.append(ax.annotate(ref.get("model") or ref["label"], (ref["clean"], ref["autoattack"]),
                                          fontsize=6, xytext=(4, -8), textcoords="offset points",
                                          color="tab:green"))
                shown = True
        drawn = 0
        rows = _reproduced(tables.get(kind))
        col = robust_column(rows)
        for _, row in rows.iterrows():
            robust, attack = float(row[f"{col}_mean"]), robust_label(col, row.get("autoattack_version"))
            if np.isnan(robust) or pd.isna(row["clean_mean"]):
                continue
            ax.scatter(row["clean_mean"], robust, s=55, color="tab:red", zorder=3,
                       label=None if drawn else "reproduced")
            drawn += 1
            labels.append(ax.annotate(f"{row_name(row)} ({row['student']}, {row['eps']}, {attack})",
                                      (row["clean_mean"], robust), fontsize=7, xytext=(4, 3),
                                      textcoords="offset points", color="tab:red"))
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%)")
        setting = _settings(rows)
        ax.set_title("paper: " + spec.get("title", kind) + (f"\n{setting}" if setting else "")
                     + _sources(rows), fontsize=9)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.08)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle("Clean against robust accuracy: reproduced (filled) and reported (hollow)")
    boxes = place_labels(fig, labels)
    return fig, boxes


def training_cost_figure(tables: Mapping[str, pd.DataFrame], path: Path) -> Path:
    bars: dict[str, float] = {}
    units: list[str] = []
    seen: set[str] = set()
    for kind in ("cifar10", "imagenet", "less_data", "ablation"):
        for _, row in _reproduced(tables.get(kind)).iterrows():
            # The full-data runs appear in several tables; draw each set of runs once.
            if pd.notna(row.get("train_device_hours")) and row["config_hashes"] not in seen:
                seen.add(row["config_hashes"])
                label = f"{row_name(row)} · {row['student']} · {row['dataset']}"
                if row["data_fraction"] < 1:
                    label += f" · {row['data_fraction']:g} of data"
                bars[label] = float(row["train_device_hours"])
                unit = row.get("train_cost_unit")
                if isinstance(unit, str) and unit and unit not in units:
                    units.append(unit)
    fig = Figure(figsize=(8, 1.2 + 0.35 * max(len(bars), 2)), layout="constrained")
    ax = fig.subplots()
    if not bars:
        _empty(ax, "no training cost recorded yet")
    else:
        labels = list(bars)
        ax.barh(labels, [bars[k] for k in labels], color="tab:gray")
        ax.invert_yaxis()
        ax.set_xlabel(f"training cost ({', '.join(units) or 'device-hours'}, mean over seeds)")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("Training cost per method")
    return _save(fig, path)


def transfer_figure(table: pd.DataFrame | None, path: Path) -> Path:
    rows = _reproduced(table)
    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.subplots()
    labels = []
    if rows.empty:
        _empty(ax)
    else:
        col = robust_column(rows)
        costed = rows[rows["train_device_hours"].notna() & (rows["train_device_hours"] > 0)]
        for _, row in rows.iterrows():
            robust = float(row[f"{col}_mean"])
            if np.isnan(robust):
                continue
            label = f"{row['method']} ({row['student']})"
            if row.name in costed.index:
                ax.scatter(row["train_device_hours"], robust, s=55, color="tab:red", zorder=3)
                labels.append(ax.annotate(label, (row["train_device_hours"], robust), fontsize=7, xytext=(4, 3),
                                          textcoords="offset points", color="tab:red"))
            else:
                ax.axhline(robust, color="tab:gray", ls="--", lw=1)
                ax.annotate(label + ", cost not recorded", (0.01, robust), xycoords=("axes fraction", "data"),
                            fontsize=7, xytext=(0, 3), textcoords="offset points", color="tab:gray")
        if len(costed):
            ax.set_xscale("log")
        eps = ", ".join(sorted(set(rows["eps"].astype(str))))
        units = sorted({u for v in costed.get("train_cost_unit", pd.Series(dtype=object)).dropna()
                        for u in str(v).split(";") if u})
        ax.set_xlabel(f"training cost ({', '.join(units) or 'device-hours'}, mean over seeds)")
        ax.set_ylabel(f"robust accuracy (%), {robust_label(col)} at {eps}")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    ax.set_title("Robustness transfer: robust accuracy against training cost" + _sources(rows), fontsize=9)
    place_labels(fig, labels)
    return _save(fig, path)


def make_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path,
                 paper: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the figures (``FIGURE_NAMES``) into ``out_dir`` from ``build_table`` output.

    ``tables`` maps a table kind (``cifar10``, ``imagenet``, ``less_data``, ``ablation``,
    ``transfer``) to its table; missing kinds are treated as empty, and an empty figure says so
    in its canvas.
    """
    paper = load_paper_numbers() if paper is None else paper
    out = Path(out_dir)
    less, scatter, cost, transfer = (out / name for name in FIGURE_NAMES)
    return [less_data_figure(tables.get("less_data"), less),
            clean_vs_robust_figure(tables, paper, scatter),
            training_cost_figure(tables, cost),
            transfer_figure(tables.get("transfer"), transfer)]
