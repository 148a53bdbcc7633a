"""Figures of the report, drawn with matplotlib's Agg canvas from the tables and result files alone.

- ``less_data.png``: clean and robust (PGD-20, and AutoAttack where evaluated) accuracy against
  the fraction of the training set (ticks at the fractions used), one line per method and
  student, error bars = std over seeds (the title says "one seed" where there is no second).
- ``clean_vs_robust.png``: clean against robust accuracy, one panel per setting: each setting
  that ran here (student, eps, data), then the paper's setting per dataset with the paper's points
  (hollow circles), the RobustBench references (hollow squares) and any row trained in that
  setting. Every point is labelled, each label tied to its point by a leader line and placed where
  it covers no other label or point (:func:`place_labels`). Robust is the strongest attack every
  trained row of the panel has for all its seeds (standard AutoAttack, then APGD-CE + APGD-T, then
  PGD-20), named with its number of points in the panel's title.
- ``training_cost.png``: training cost per trained row (mean over seeds) in the tables' unit, one
  panel per unit.
- ``transfer.png``: robust accuracy against training cost (log scale) of the robustness-transfer
  table's rows (the teacher, AT, MixACM, IGAM, ARD, RSLAD), one unit on the axis; a row without
  a cost in that unit (a teacher from a file) is a horizontal line at its robust accuracy.
- ``eps_sweep.png`` (:func:`eps_sweep_figure`, from audit results): PGD accuracy against eps,
  one line per audited row, named as the tables name it.

Given the pipeline config (``config``), every figure says under its title when the config calls
itself a smoke run, so a figure shared on its own is not read as a result.

Figures use ``matplotlib.figure.Figure`` directly (no pyplot), so no global backend or state is
touched and the functions are safe to call from tests and notebooks.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text

from mixacm.report.tables import (
    COST_AXIS,
    ROBUST_PREFERENCE,
    TRAINED,
    ResultFileError,
    load_paper_numbers,
    method_labels,
    robust_label,
    row_name,
)
from mixacm.utils import atomic_write, format_eps

FIGURE_NAMES = ("less_data.png", "clean_vs_robust.png", "training_cost.png", "transfer.png")
SWEEP_FIGURE = "eps_sweep.png"
_NO_DATA = "no results of runs trained here yet"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    # No timestamp or version in the PNG metadata, so equal inputs give equal files.
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110,
                                                    metadata={"Software": None}))


def _empty(ax, text: str = _NO_DATA) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _trained(table: pd.DataFrame | None) -> pd.DataFrame:
    if table is None or table.empty:
        return pd.DataFrame()
    return table[table["status"] == TRAINED]


def _sources(rows: pd.DataFrame) -> str:
    """The data the trained rows were computed on, e.g. "CIFAR-10 (JPEG copy)"."""
    if rows.empty or "data_source" not in rows:
        return ""
    return ", ".join(sorted(set(rows["data_source"].dropna().astype(str))))


def _seeds_note(rows: pd.DataFrame) -> str:
    """"(mean ± std over seeds)" only where some point has two seeds or more."""
    if rows.empty or "n_seeds" not in rows:
        return ""
    most = int(rows["n_seeds"].max())
    return " (mean ± std over seeds)" if most >= 2 else " (one seed: no error bars)"


def ran_setting(rows: pd.DataFrame) -> str:
    """What the trained rows ran: "resnet2b student, L-inf 2/255, CIFAR-10 (JPEG copy)" (", teacher
    resnet4b" where the teacher's own row is among them)."""
    if rows.empty:
        return ""
    is_teacher = rows["method_key"].eq("teacher") if "method_key" in rows else pd.Series(False, index=rows.index)
    students = ", ".join(sorted(set(rows.loc[~is_teacher, "student"].astype(str))))
    teachers = ", ".join(sorted(set(rows.loc[is_teacher, "student"].astype(str))))
    eps = ", ".join(sorted(set(rows["eps"].astype(str))))
    source = _sources(rows)
    return (f"{students} student" if students else "") + (f", teacher {teachers}" if teachers else "") + \
        f", L-inf {eps}" + (f", {source}" if source else "")


def smoke_note(config: str | os.PathLike | None) -> str:
    """"config/quick.yaml is a smoke run: ..." when the config's header comment calls it one
    (quick.yaml, ci.yaml do), else ""."""
    if config is None:
        return ""
    from mixacm.report.html import config_header, display_path

    if "smoke run" not in config_header(config).lower():
        return ""
    return (f"{display_path(config)} is a smoke run: these accuracies exercise the pipeline "
            "and say nothing about the methods")


def _footnote(fig: Figure, note: str) -> None:
    if note:
        fig.supxlabel(note, fontsize=8, color="tab:red")


def _wrap(text: str, width: int = 26) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


# ---------------------------------------------------------------------------------------------
# Labels tied to their points

@dataclass
class PointLabel:
    """A label drawn for one point: its annotation (``xy`` is the point; a leader line runs from
    the text to it) and what it names (``kind``: trained, paper or reference; ``name``; the
    ``dataset`` of its panel)."""
    annotation: Annotation
    kind: str
    name: str
    dataset: str = ""


# Directions tried for a label around its point (unit vectors) and the distances (points), nearest
# ring first; text aligns away from the point.
_DIRECTIONS = [(1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0, 1), (0, -1), (1, 0), (-1, 0),
               (0.7, 1), (-0.7, 1), (0.7, -1), (-0.7, -1)]
_RADII = (6, 14, 24, 36, 50, 66, 84)
_MARKER_PX = 6  # half the size of a drawn marker's box, in display pixels at 100 dpi


def _label(ax, text: str, xy: tuple[float, float], color: str, fontsize: float = 7) -> Annotation:
    return ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", fontsize=fontsize, color=color,
                       va="center", arrowprops={"arrowstyle": "-", "color": color, "lw": 0.7, "alpha": 0.8,
                                                "shrinkA": 1, "shrinkB": 4})


def _gap(box, x: float, y: float) -> float:
    """Distance (display pixels) from a point to a box; 0 inside it."""
    return math.hypot(max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1))


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _obstacles(ax, marks: Iterable[tuple], half: float) -> tuple[list[tuple[float, float]], list]:
    """Display positions of the drawn points and the boxes a label must not cover: each marker
    and, where given (``(x, y, xerr, yerr)``, data units), its error bars."""
    from matplotlib.transforms import Bbox

    centres, boxes = [], []
    for mark in marks:
        x, y, xerr, yerr = (*mark, 0, 0)[:4]
        cx, cy = ax.transData.transform((x, y))
        centres.append((cx, cy))
        boxes.append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
        for dx, dy in ((xerr or 0, 0), (0, yerr or 0)):
            if dx or dy:
                (x0, y0), (x1, y1) = ax.transData.transform([(x - dx, y - dy), (x + dx, y + dy)])
                boxes.append(Bbox.from_extents(min(x0, x1) - 1, min(y0, y1) - 1, max(x0, x1) + 1, max(y0, y1) + 1))
    return centres, boxes


def place_labels(fig: Figure, labels: list[PointLabel], markers: Mapping[Any, list[tuple]],
                 fixed: Iterable[Text] = ()) -> list:
    """Move each label to the nearest offset where its text covers no label placed before it,
    no marker or error bar (``markers``: axes -> drawn points ``(x, y)`` or ``(x, y, xerr,
    yerr)``, data coordinates), no ``fixed`` text and nothing outside its axes, and where no other
    point is nearer to it than its own (greedy, deterministic; the least bad offset when none is
    free). Returns the final text boxes (display coordinates)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()  # final layout, so that boxes are where they will be drawn
    renderer = fig.canvas.get_renderer()
    drawn = {ax: _obstacles(ax, marks, _MARKER_PX * fig.dpi / 100) for ax, marks in markers.items()}
    placed: list = [t.get_window_extent(renderer) for t in fixed]
    for label in labels:
        ann, ax = label.annotation, label.annotation.axes
        own = tuple(ax.transData.transform(ann.xy))
        centres, obstacles = drawn.get(ax, ([], []))
        others = [p for p in centres if math.dist(p, own) > 0.5]
        frame = ax.get_window_extent(renderer)
        best = None
        for r in _RADII:
            for ux, uy in _DIRECTIONS:
                ann.set_position((r * ux, r * uy))
                ann.set_horizontalalignment("left" if ux > 0 else "right" if ux < 0 else "center")
                ann.set_verticalalignment("bottom" if uy > 0.6 else "top" if uy < -0.6 else "center")
                box = Text.get_window_extent(ann, renderer)
                outside = box.width * box.height - _overlap(box, frame)
                mine = _gap(box, *own)
                cost = (sum(_overlap(box, other) for other in placed) + sum(_overlap(box, o) for o in obstacles)
                        + 10 * outside + 500 * sum(_gap(box, *p) < mine for p in others) + r / 10)
                if best is None or cost < best[0]:
                    best = (cost, r * ux, r * uy, ann.get_horizontalalignment(), ann.get_verticalalignment(), box)
        _, dx, dy, ha, va, box = best
        ann.set_position((dx, dy))
        ann.set_horizontalalignment(ha)
        ann.set_verticalalignment(va)
        placed.append(box)
    fig.canvas.draw()
    return placed[len(placed) - len(labels):]


# ---------------------------------------------------------------------------------------------
# Less data

def robust_column(rows: pd.DataFrame) -> str:
    """The strongest attack column that every row has for all of its seeds (PGD-20 otherwise)."""
    for col in ROBUST_PREFERENCE:
        if f"{col}_mean" in rows and len(rows) and rows[f"{col}_mean"].notna().all() and (
                rows[f"{col}_seeds"] == rows["n_seeds"]).all():
            return col
    return "pgd20"


def _robust_title(rows: pd.DataFrame, col: str) -> str:
    """"PGD-20 on 100 points" ("on 500-1,000 points" where the rows' counts differ)."""
    n = rows[f"{col}_n"].dropna().astype(int)
    version = rows["autoattack_version"].dropna().iloc[0] if col == "autoattack" and len(rows) else None
    points = "" if not len(n) else f" on {n.min():,} points" if n.min() == n.max() else \
        f" on {n.min():,}-{n.max():,} points"
    return robust_label(col, version) + points


def less_data_figure(table: pd.DataFrame | None, path: Path, note: str = "") -> Path:
    return _save(draw_less_data(table, note), path)


def draw_less_data(table: pd.DataFrame | None, note: str = "") -> Figure:
    rows = _trained(table)
    fig = Figure(figsize=(9, 4.2), layout="constrained")
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
        for ax, title in ((ax_rob, f"Robust accuracy (PGD-20 on {int(rows['pgd20_n'].min()):,} points)"),
                          (ax_clean, "Clean accuracy")):
            ax.set_xscale("log")
            # ticks at the fractions used, not at log decades none of them sits on
            ax.set_xticks(fractions, [f"{100 * f:g} %" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("fraction of the training set")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
    fig.suptitle("Less data: accuracy against training-set fraction" + _seeds_note(rows)
                 + (f"\n{ran_setting(rows)}" if not rows.empty else ""), fontsize=11)
    _footnote(fig, note)
    return fig


# ---------------------------------------------------------------------------------------------
# Clean against robust accuracy

def _panels(tables: Mapping[str, pd.DataFrame], paper: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One panel per setting: the settings that ran (student, eps, data) not the paper's, then
    the paper's setting of each dataset, with any trained rows in it."""
    panels, paper_panels = [], []
    for kind in [k for k in ("cifar10", "imagenet") if k in paper["tables"]]:
        spec = paper["tables"][kind]
        rows = _trained(tables.get(kind))
        in_paper = (rows["student"] == spec.get("student")) & (rows["eps"] == spec.get("eps")) \
            if not rows.empty else pd.Series(dtype=bool)
        if not rows.empty:
            for (student, eps, source), g in rows[~in_paper].groupby(["student", "eps", "data_source"], sort=True):
                panels.append({"kind": kind, "spec": spec, "rows": g, "paper": False})
        paper_panels.append({"kind": kind, "spec": spec, "rows": rows[in_paper] if not rows.empty else rows,
                             "paper": True})
    return panels + paper_panels


def _draw_panel(ax, panel: Mapping[str, Any], refs: list[Mapping[str, Any]], labels: list[PointLabel],
                markers: list[tuple]) -> None:
    spec, rows = panel["spec"], panel["rows"]
    if panel["paper"]:
        points = [p for p in spec["rows"] if p.get("clean") is not None and p.get("robust") is not None]
        for i, prow in enumerate(points):
            ax.scatter(prow["clean"], prow["robust"], s=55, facecolors="none", edgecolors="tab:blue",
                       label="the paper's numbers" if i == 0 else None)
            markers.append((prow["clean"], prow["robust"]))
            labels.append(PointLabel(_label(ax, prow["label"], (prow["clean"], prow["robust"]), "tab:blue"),
                                     "paper", prow["label"], spec["dataset"]))
        shown = [r for r in refs if r.get("dataset") == spec["dataset"]]
        for i, ref in enumerate(shown):
            name = ref.get("model") or ref["label"]
            ax.scatter(ref["clean"], ref["autoattack"], marker="s", s=45, facecolors="none",
                       edgecolors="tab:green", label="RobustBench (AutoAttack)" if i == 0 else None)
            markers.append((ref["clean"], ref["autoattack"]))
            labels.append(PointLabel(_label(ax, name, (ref["clean"], ref["autoattack"]), "tab:green", 6),
                                     "reference", name, spec["dataset"]))
    col = robust_column(rows)
    for i, (_, row) in enumerate(rows.iterrows()):
        robust = row[f"{col}_mean"]
        if pd.isna(robust) or pd.isna(row["clean_mean"]):
            continue
        xerr = row["clean_std"] if pd.notna(row["clean_std"]) else None
        yerr = row[f"{col}_std"] if pd.notna(row[f"{col}_std"]) else None
        ax.errorbar(row["clean_mean"], robust, xerr=xerr, yerr=yerr, fmt="o", ms=7, color="tab:red",
                    ecolor="tab:red", elinewidth=0.8, capsize=2, zorder=3, label="trained here" if i == 0 else None)
        markers.append((row["clean_mean"], robust, xerr, yerr))
        labels.append(PointLabel(_label(ax, _wrap(row_name(row)), (row["clean_mean"], robust), "tab:red"),
                                 TRAINED, row_name(row), spec["dataset"]))
    what = (f"ran here: {ran_setting(rows)}" if not panel["paper"] else
            f"the paper's setting: {spec.get('title', panel['kind'])}")
    robust_text = _robust_title(rows, col) if not rows.empty else "as the paper reports it"
    ax.set_title(_wrap(what, 70) + f"\nrobust: {robust_text}" + _seeds_note(rows), fontsize=9)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)


def clean_vs_robust_figure(tables: Mapping[str, pd.DataFrame], paper: Mapping[str, Any],
                           path: Path, note: str = "") -> Path:
    return _save(draw_clean_vs_robust(tables, paper, note)[0], path)


def draw_clean_vs_robust(tables: Mapping[str, pd.DataFrame], paper: Mapping[str, Any],
                         note: str = "") -> tuple[Figure, list[PointLabel]]:
    """The figure and its labels (each with the point it names; see :class:`PointLabel`)."""
    panels = _panels(tables, paper)
    fig = Figure(figsize=(5.6 * len(panels), 5.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    refs = paper.get("robustbench", {}).get("models", [])
    labels: list[PointLabel] = []
    markers: dict[Any, list[tuple]] = {}
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, refs, labels, markers.setdefault(ax, []))
    fig.suptitle("Clean against robust accuracy, one panel per setting: trained here (filled) "
                 "and reported (hollow)", fontsize=11)
    _footnote(fig, note)
    place_labels(fig, labels, markers)
    return fig, labels


# ---------------------------------------------------------------------------------------------
# Training cost

def _cost_bars(tables: Mapping[str, pd.DataFrame]) -> tuple[dict[str, dict[str, float]], pd.DataFrame, list[str]]:
    """unit -> {bar label: cost}, each set of runs once (the full-data runs are in several tables);
    the rows drawn; and the names of rows without a cost, with why where the table says."""
    bars: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    drawn, missing = [], []
    for kind in ("cifar10", "imagenet", "less_data", "ablation", "transfer"):
        for _, row in _trained(tables.get(kind)).iterrows():
            if row["config_hashes"] in seen:
                continue
            seen.add(row["config_hashes"])
            if pd.isna(row.get("train_device_hours")):
                source = row.get("cost_source")
                why = source.removeprefix("none: ") if isinstance(source, str) and source.startswith("none: ") \
                    else "not recorded"
                missing.append(f"{row_name(row)} ({why})")
                continue
            label = _wrap(row_name(row), 34)
            if row["data_fraction"] < 1:
                label += f" · {100 * row['data_fraction']:g} % of the data"
            if pd.notna(row.get("train_steps")):
                label += f" · {row['train_steps']:,.0f} steps"
            unit = row.get("train_cost_unit")
            bars.setdefault(unit if isinstance(unit, str) and unit else "unit not recorded", {})[label] = \
                float(row["train_device_hours"])
            drawn.append(row)
    return bars, pd.DataFrame(drawn), missing


def training_cost_figure(tables: Mapping[str, pd.DataFrame], path: Path, note: str = "") -> Path:
    bars, rows, missing = _cost_bars(tables)
    heights = [max(len(b), 2) for b in bars.values()] or [2]
    fig = Figure(figsize=(8.5, 1.6 + 0.34 * sum(heights)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(heights), 1, height_ratios=heights))
    if not bars:
        _empty(axes[0], "no training cost recorded yet")
    for ax, (unit, b) in zip(axes, bars.items()):
        labels = list(b)
        ax.barh(labels, [b[k] for k in labels], color="tab:gray")
        ax.tick_params(axis="y", labelsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{COST_AXIS.get(unit, unit)} (mean over seeds)")
        ax.grid(axis="x", alpha=0.3)
    lines = ["Training cost per trained row", ran_setting(rows) if not rows.empty else "",
             _wrap("no cost: " + "; ".join(missing), 100) if missing else ""]
    fig.suptitle("\n".join(line for line in lines if line), fontsize=10)
    _footnote(fig, note)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Robustness transfer

def transfer_figure(table: pd.DataFrame | None, path: Path, note: str = "") -> Path:
    return _save(draw_transfer(table, note)[0], path)


def draw_transfer(table: pd.DataFrame | None, note: str = "") -> tuple[Figure, list[PointLabel]]:
    rows = _trained(table)
    fig = Figure(figsize=(7, 5.2), layout="constrained")
    ax = fig.subplots()
    labels: list[PointLabel] = []
    markers: list[tuple[float, float]] = []
    notes = []  # the lines of rows without a cost on the axis, with their text
    if rows.empty:
        _empty(ax)
    else:
        col = robust_column(rows)
        costed = rows[rows["train_device_hours"].notna() & (rows["train_device_hours"] > 0)]
        units = costed["train_cost_unit"].fillna("").astype(str)
        unit = units.mode().iloc[0] if len(units) else ""
        on_axis = costed[units == unit]
        for _, row in rows.iterrows():
            robust = float(row[f"{col}_mean"])
            if np.isnan(robust):
                continue
            name = row_name(row)
            if row.name in on_axis.index:
                ax.scatter(row["train_device_hours"], robust, s=55, color="tab:red", zorder=3)
                markers.append((row["train_device_hours"], robust))
                labels.append(PointLabel(_label(ax, _wrap(name), (row["train_device_hours"], robust), "tab:red"),
                                         TRAINED, name))
            else:
                source = row.get("cost_source")
                why = (f"cost in {row['train_cost_unit']}" if row.name in costed.index else
                       f"no cost ({source.removeprefix('none: ')})" if isinstance(source, str)
                       and source.startswith("none: ") else "cost not recorded")
                ax.axhline(robust, color="tab:gray", ls="--", lw=1)
                notes.append(ax.annotate(f"{name}, {why}", (0.01, robust), xycoords=("axes fraction", "data"),
                                         fontsize=7, xytext=(0, 3), textcoords="offset points", color="tab:gray"))
        if len(on_axis):
            ax.set_xscale("log")
            # plain numbers; between decades only at 2 and 5 x 10^k, so that labels do not collide
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(f"training cost, {COST_AXIS.get(unit, unit or 'no unit recorded')} (mean over seeds)")
        ax.set_ylabel(f"robust accuracy (%), {_robust_title(rows, col)}")
        ax.grid(alpha=0.3)
        ax.margins(x=0.3, y=0.12)
    ax.set_title("Robustness transfer: robust accuracy against training cost"
                 + (f"\n{ran_setting(rows)}" if not rows.empty else ""), fontsize=10)
    _footnote(fig, note)
    _place_notes(fig, ax, notes, markers)
    place_labels(fig, labels, {ax: markers}, fixed=notes)
    return fig, labels


def _place_notes(fig: Figure, ax, notes: list, markers: list[tuple]) -> None:
    """Put each line's note at the end of its line (left or right, above or below it) where it
    covers no point and no note placed before it."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    _, points = _obstacles(ax, markers, _MARKER_PX * fig.dpi / 100)
    placed: list = []
    for note in notes:
        best = None
        for x, ha in ((0.01, "left"), (0.99, "right")):
            for dy, va in ((3, "bottom"), (-3, "top")):
                note.xy = (x, note.xy[1])
                note.set_position((0, dy))
                note.set_horizontalalignment(ha)
                note.set_verticalalignment(va)
                box = note.get_window_extent(renderer)
                cost = sum(_overlap(box, o) for o in [*points, *placed])
                if best is None or cost < best[0]:
                    best = (cost, x, dy, ha, va, box)
        _, x, dy, ha, va, box = best
        note.xy = (x, note.xy[1])
        note.set_position((0, dy))
        note.set_horizontalalignment(ha)
        note.set_verticalalignment(va)
        placed.append(box)


# ---------------------------------------------------------------------------------------------
# The audit's eps sweep

def _read_audit(path: str | os.PathLike) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResultFileError(f"audit result {path}: cannot be read ({err})") from None
    sweep = (result.get("audit") or {}).get("sweep") if isinstance(result, dict) else None
    if not isinstance(sweep, list) or not sweep:
        raise ResultFileError(f"audit result {path}: no audit.sweep (not written by mixacm audit?)")
    return result


def _audit_name(run: Mapping[str, Any], labels: Mapping[str, str], path: str | os.PathLike) -> str:
    """The tables' name of an audited run: "MixACM", "MixACM [compute-matched]", "Teacher [resnet4b]"."""
    method = str(run.get("method") or run.get("recipe") or Path(path).stem)
    return row_name({"method": labels.get(method, method), "variant": run.get("variant")})


def _sweep_setting(runs: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]) -> str:
    """What the audited runs were: data, models, points, the sweep's PGD, seeds per line."""
    def join(values) -> str:
        return ", ".join(sorted({str(v) for v in values if v is not None}))

    students = join(run.get("arch") for name, run, _ in runs if run.get("method") != "teacher")
    teachers = join(run.get("arch") for name, run, _ in runs if run.get("method") == "teacher")
    seeds = [sum(1 for other, _, _ in runs if other == name) for name in {name for name, _, _ in runs}]
    parts = [join(run.get("data_source") for _, run, _ in runs),
             f"student {students}" if students else "", f"teacher {teachers}" if teachers else "",
             f"{join(result.get('n') for _, _, result in runs)} test points",
             f"PGD-{join(result['audit'].get('settings', {}).get('sweep_steps') for _, _, result in runs)} "
             "at each eps (PGD-20 at the audit's own eps)",
             ("one seed" if max(seeds) == 1 else f"mean over {min(seeds)}-{max(seeds)} seeds" if min(seeds) < max(seeds)
              else f"mean over {max(seeds)} seeds")]
    return "; ".join(p for p in parts if p)


def draw_eps_sweep(paths: Iterable[str | os.PathLike], note: str = "") -> Figure:
    """PGD accuracy against eps, one line per audited row (mean over its files: its seeds)."""
    labels = method_labels(load_paper_numbers(), "cifar10")
    curves: dict[str, dict[float, list[float]]] = {}
    runs = []
    for p in paths:
        result = _read_audit(p)
        run = result.get("run") or {}
        name = _audit_name(run, labels, p)
        runs.append((name, run, result))
        for row in result["audit"]["sweep"]:
            curves.setdefault(name, {}).setdefault(round(float(row["eps"]) * 255, 6), []).append(
                float(row["accuracy_pct"]))
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    if not curves:
        _empty(ax, "no audit results")
    # up to 20 lines in distinct colours (tab20's dark shades, then its light ones), markers cycling
    colours = matplotlib.colormaps["tab20"].colors
    top = 0.0
    for i, (name, points) in enumerate(sorted(curves.items())):
        xs = sorted(points)
        ys = [sum(points[x]) / len(points[x]) for x in xs]
        top = max(top, *ys)
        ax.plot(xs, ys, marker="osd^v<>"[i % 7], color=colours[(2 * i) % 20 + (i // 10) % 2], label=name)
    eps = sorted({x for pts in curves.values() for x in pts})
    if eps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [format_eps(x / 255) for x in eps])  # ticks only where points are
        ax.minorticks_off()
        ax.set_ylim(0, min(100, 10 * math.ceil((top + 3) / 10)))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.set_xlabel("eps (L-inf, fraction of the [0, 1] range)")
    ax.set_ylabel("accuracy under PGD (%)")
    ax.grid(alpha=0.3)
    fig.suptitle("Robust accuracy against eps (the robustness audit's sweep)", fontsize=11)
    if curves:
        ax.set_title(_wrap(_sweep_setting(runs), 90), fontsize=8)
    _footnote(fig, note)
    return fig


def eps_sweep_figure(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike, note: str = "") -> Path:
    """Write :func:`draw_eps_sweep` of the audit result files ``paths`` to ``out_path`` (PNG)."""
    return _save(draw_eps_sweep(paths, note), Path(out_path))


# ---------------------------------------------------------------------------------------------

def make_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path,
                 paper: Mapping[str, Any] | None = None, config: str | os.PathLike | None = None) -> list[Path]:
    """Write the figures (``FIGURE_NAMES``) into ``out_dir`` from ``build_table`` output.

    ``tables`` maps a table kind (``cifar10``, ``imagenet``, ``less_data``, ``ablation``,
    ``transfer``) to its table; missing kinds are treated as empty, and an empty figure says so
    in its canvas. ``config`` is the pipeline config the results came from: a smoke run's
    figures say so (:func:`smoke_note`).
    """
    paper = load_paper_numbers() if paper is None else paper
    note = smoke_note(config)
    out = Path(out_dir)
    less, scatter, cost, transfer = (out / name for name in FIGURE_NAMES)
    return [less_data_figure(tables.get("less_data"), less, note),
            clean_vs_robust_figure(tables, paper, scatter, note),
            training_cost_figure(tables, cost, note),
            transfer_figure(tables.get("transfer"), transfer, note)]
