"""The paper's four claims, checked against the generated tables, as Markdown.

    mixacm claims --tables results/table_cifar10.csv results/table_less_data.csv \
        results/table_ablation.csv --out docs/results/cifar10_cpu/claims.md

Reads the tables only, so every figure it prints traces to the result files behind them. The
criteria:

(a) MixACM's clean accuracy is above AT's, and its robust accuracy is "close": at most
    ``close`` points (default 2) below AT's, for every robust attack both rows have.
(b) MixACM's training cost is a fraction of AT's: the ratio of their training device-hours
    (mean over seeds) is below 1.
(c) With less data MixACM keeps more of its robustness than AT: at every fraction below 1, the
    share of its full-data PGD-20 accuracy it keeps is larger than AT's.
(d) Each loss component adds robustness in the paper's order: PGD-20 accuracy rises from ACM
    only to ACM + KD to ACM + mixup to the full loss, and KD only is below the full loss.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mixacm.report.tables import ResultFileError

ROBUST = [("pgd20", "PGD-20"), ("autoattack_apgd", "APGD-CE+APGD-T"), ("autoattack", "AutoAttack (standard)")]
ABLATION_ORDER = ["ACM only", "ACM + KD", "ACM + mixup", "ACM + KD + mixup"]


def _fmt(mean: float, std: float | None = None) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None and pd.notna(std) else "")


def _one(table: pd.DataFrame, **match) -> pd.Series:
    rows = table[(table["status"] == "reproduced")]
    for k, v in match.items():
        rows = rows[rows[k] == v]
    if len(rows) != 1:
        raise ResultFileError(f"claims: expected one reproduced row with {match}, found {len(rows)}")
    return rows.iloc[0]


def claim_a(main: pd.DataFrame, close: float) -> list[str]:
    mix, at = _one(main, method_key="mixacm"), _one(main, method_key="at")
    d_clean = mix["clean_mean"] - at["clean_mean"]
    lines = ["| | MixACM | AT | MixACM − AT | seeds | points |", "|---|---|---|---|---|---|",
             f"| Clean | {_fmt(mix['clean_mean'], mix['clean_std'])} | {_fmt(at['clean_mean'], at['clean_std'])} "
             f"| {d_clean:+.2f} | {mix['clean_seeds']} / {at['clean_seeds']} | {mix['clean_n']} |"]
    gaps = []
    for col, title in ROBUST:
        if pd.isna(mix[f"{col}_mean"]) or pd.isna(at[f"{col}_mean"]):
            continue
        gap = mix[f"{col}_mean"] - at[f"{col}_mean"]
        gaps.append(gap)
        lines.append(f"| {title} | {_fmt(mix[f'{col}_mean'], mix[f'{col}_std'])} | "
                     f"{_fmt(at[f'{col}_mean'], at[f'{col}_std'])} | {gap:+.2f} | "
                     f"{mix[f'{col}_seeds']} / {at[f'{col}_seeds']} | {mix[f'{col}_n']} |")
    holds = d_clean > 0 and all(g >= -close for g in gaps)
    verdict = (f"**{'Holds' if holds else 'Does not hold'}** (criterion: clean above AT's and robust "
               f"at most {close:g} points below AT's under every attack).")
    return lines + ["", verdict]


def claim_b(main: pd.DataFrame) -> list[str]:
    mix, at = _one(main, method_key="mixacm"), _one(main, method_key="at")
    lines = ["| method | training device-hours (mean over seeds) | relative to AT |", "|---|---|---|"]
    for _, row in main[main["status"] == "reproduced"].iterrows():
        lines.append(f"| {row['method']} | {row['train_device_hours']:.4f} | "
                     f"{row['train_device_hours'] / at['train_device_hours']:.2f} |")
    ratio = mix["train_device_hours"] / at["train_device_hours"]
    return lines + ["", f"MixACM / AT = **{ratio:.2f}** (AT costs {1 / ratio:.1f} times MixACM). "
                        f"**{'Holds' if ratio < 1 else 'Does not hold'}**."]


def claim_c(less: pd.DataFrame) -> list[str]:
    rows = less[less["status"] == "reproduced"]
    lines = ["| fraction | MixACM clean | MixACM PGD-20 | kept | AT clean | AT PGD-20 | kept |",
             "|---|---|---|---|---|---|---|"]
    full = {m: _one(rows, method_key=m, data_fraction=1.0) for m in ("mixacm", "at")}
    holds = True
    for frac in sorted(rows["data_fraction"].unique()):
        cells, kept = [f"{frac:g}"], {}
        for m in ("mixacm", "at"):
            r = _one(rows, method_key=m, data_fraction=frac)
            kept[m] = r["pgd20_mean"] / full[m]["pgd20_mean"]
            cells += [_fmt(r["clean_mean"]), _fmt(r["pgd20_mean"]), f"{100 * kept[m]:.0f} %"]
        if frac < 1:
            holds &= kept["mixacm"] > kept["at"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", f"'kept' = PGD-20 accuracy as a share of the same method's full-data one. "
                        f"**{'Holds' if holds else 'Does not hold'}** (criterion: MixACM keeps a larger "
                        f"share than AT at every fraction below 1)."]


def claim_d(abl: pd.DataFrame) -> list[str]:
    rows = abl[abl["status"] == "reproduced"]
    lines = ["| loss | clean | PGD-20 | paper (robust, WRN-34-10, 8/255) |", "|---|---|---|---|"]
    acc = {}
    for label in ABLATION_ORDER + ["KD only"]:
        r = _one(rows, method=label)
        acc[label] = r["pgd20_mean"]
        lines.append(f"| {label} | {_fmt(r['clean_mean'])} | {_fmt(r['pgd20_mean'])} | "
                     f"{_fmt(r['paper_robust'])} |")
    order = [acc[k] for k in ABLATION_ORDER]
    increasing = all(a < b for a, b in zip(order, order[1:]))
    kd_below = acc["KD only"] < acc["ACM + KD + mixup"]
    return lines + ["", f"PGD-20 rises along the paper's order: **{'yes' if increasing else 'no'}**; "
                        f"KD only below the full loss: **{'yes' if kd_below else 'no'}**. "
                        f"**{'Holds' if increasing and kd_below else 'Does not hold'}**."]


CLAIM_TABLES = ("cifar10", "less_data", "ablation")


def claims_markdown(tables: Mapping[str, pd.DataFrame], close: float = 2.0) -> str:
    """The evidence for claims (a)-(d) from the ``cifar10``, ``less_data`` and ``ablation``
    tables (``build_table`` or ``read_table`` output), one Markdown section per claim."""
    missing = [k for k in CLAIM_TABLES if k not in tables]
    if missing:
        raise ResultFileError(f"claims: tables {missing} are missing")
    sections = [
        ("(a) Clean accuracy above AT's, robust accuracy close to it",
         claim_a(tables["cifar10"], close)),
        ("(b) Training cost a fraction of AT's", claim_b(tables["cifar10"])),
        ("(c) With less data, MixACM keeps more of its robustness than AT",
         claim_c(tables["less_data"])),
        ("(d) Each loss component adds robustness, in the paper's order",
         claim_d(tables["ablation"])),
    ]
    return "\n\n".join(f"### {title}\n\n" + "\n".join(lines) for title, lines in sections) + "\n"
