"""The paper's four claims, checked against the generated tables, as Markdown.

    mixacm claims --tables results/table_cifar10.csv results/table_less_data.csv \
        results/table_ablation.csv --out docs/results/cifar10_cpu/claims.md

Reads the tables only, so every figure it prints traces to the result files behind them. The
criteria:

(a) MixACM's clean accuracy is above AT's, and its robust accuracy is "close": at most
    ``close`` points (default 2) below AT's, for every robust attack both rows have; checked for
    the paper's full method and for each named MixACM variant of the table (e.g. a tuned variant,
    a compute-matched budget), each with its own verdict.
(b) MixACM's training cost is a fraction of AT's: the ratio of their training cost (mean over
    seeds; CPU-hours of CPU jobs, GPU-hours of GPU jobs) is below 1.
(c) With less data MixACM keeps more of its robustness than AT: at every fraction below 1, the
    share of its full-data PGD-20 accuracy it keeps is larger than AT's; one verdict per budget
    (the same epochs on less data, and each named variant both have, e.g. fixed steps).
(d) Each loss component adds robustness in the paper's order: PGD-20 accuracy rises from ACM
    only to ACM + KD to ACM + mixup to the full loss, and KD only is below the full loss.

A claim that cannot be evaluated (a table not given, rows missing) is reported as such with the
table and the rows it lacks; the others are still checked.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mixacm.report.tables import COST_AXIS, FULL_VARIANTS, TRAINED, ResultFileError, norm_variant, row_name

# The robust columns claim (a) compares, each beside PGD-20 on its own points where it has them.
ROBUST = [("pgd20", "PGD-20"), ("autoattack_apgd", "APGD-CE+APGD-T"), ("autoattack", "AutoAttack (standard)"),
          ("audited", "Audited (mixacm audit)")]
ABLATION_ORDER = ["ACM only", "ACM + KD", "ACM + mixup", "ACM + KD + mixup"]


def _fmt(mean: float, std: float | None = None) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None and pd.notna(std) else "")


class MissingRows(ResultFileError):
    """A claim needs rows (or a table) that the tables do not have; the message names them all."""

    def __init__(self, table: str, missing: list[str]):
        self.table, self.missing = table, missing
        super().__init__(f"table {table}: " + "; ".join(missing))


def _describe(match: Mapping) -> str:
    def show(v):
        return f"{float(v):g}" if isinstance(v, float) else repr(v)  # numpy floats as plain numbers
    return "a trained row with " + ", ".join(f"{k} = {show(v)}" for k, v in match.items())


def _variant_key(v) -> str:
    """A row's variant for matching: "" for the paper's full method (no variant, or full)."""
    n = norm_variant(v) if isinstance(v, str) or v is None else None
    return "" if not n or n in FULL_VARIANTS else n


def named_variants(table: pd.DataFrame, method_key: str) -> list[str]:
    """The named variants (tuned variant, compute-matched, fixed steps, ...) of one method's
    trained rows, as written in the table, in table order."""
    rows = table[(table["status"] == TRAINED) & (table["method_key"] == method_key)]
    if "variant" not in rows:
        return []
    return list(dict.fromkeys(v for v in rows["variant"] if isinstance(v, str) and _variant_key(v)))


class _Rows:
    """Looks rows up in one table and remembers every one that is not there exactly once.
    ``variant`` matches as ``_variant_key``: "" (the default) is the paper's full method."""

    def __init__(self, name: str, table: pd.DataFrame):
        self.name, self.table, self.missing = name, table, []

    def one(self, variant: str | None = "", **match) -> pd.Series | None:
        rows = self.table[self.table["status"] == TRAINED]
        if variant is not None:  # None: any variant (the ablation rows are named by their label)
            keys = rows["variant"].map(_variant_key) if "variant" in rows else pd.Series("", index=rows.index)
            rows = rows[keys == _variant_key(variant)]
        for k, v in match.items():
            rows = rows[rows[k] == v]
        if len(rows) != 1:
            described = {**match, "variant": variant} if variant else match
            self.missing.append(f"{_describe(described)} (found {len(rows)})")
            return None
        return rows.iloc[0]

    def check(self) -> None:
        if self.missing:
            raise MissingRows(self.name, self.missing)


def claim_a(main: pd.DataFrame, close: float) -> list[str]:
    need = _Rows("cifar10", main)
    at = need.one(method_key="at")
    mixes = {"MixACM": need.one(method_key="mixacm")}
    for v in named_variants(main, "mixacm"):
        mixes[f"MixACM [{v}]"] = need.one(method_key="mixacm", variant=v)
    need.check()
    out: list[str] = []
    for name, mix in mixes.items():
        d_clean = mix["clean_mean"] - at["clean_mean"]
        lines = [f"| | {name} | AT | difference | seeds | points |", "|---|---|---|---|---|---|",
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
            lines += _same_points_line(mix, at, col, title)
        holds = d_clean > 0 and all(g >= -close for g in gaps)
        verdict = (f"{name}: **{'Holds' if holds else 'Does not hold'}** (criterion: clean above AT's and "
                   f"robust at most {close:g} points below AT's under every attack).")
        flags = [f"{who}: {row['audit_flags']}" for who, row in ((name, mix), ("AT", at))
                 if isinstance(row.get("audit_flags"), str) and row["audit_flags"]]
        if flags:
            verdict += " Audit flags — " + "; ".join(flags) + "."
        out += ([""] if out else []) + lines + ["", verdict]
    return out


def _same_points_line(mix: pd.Series, at: pd.Series, col: str, title: str) -> list[str]:
    """PGD-20 on the points of column ``col`` (fewer than PGD-20's own), where both rows have it."""
    key = f"{col}_pgd20_mean"
    if key not in mix or pd.isna(mix.get(key)) or pd.isna(at.get(key)) or mix[f"{col}_n"] == mix["pgd20_n"]:
        return []
    return [f"| PGD-20 on the same {mix[f'{col}_n']} points as {title} | "
            f"{_fmt(mix[key], mix.get(f'{col}_pgd20_std'))} | "
            f"{_fmt(at[key], at.get(f'{col}_pgd20_std'))} | {mix[key] - at[key]:+.2f} | "
            f"{mix[f'{col}_seeds']} / {at[f'{col}_seeds']} | {mix[f'{col}_n']} |"]


def claim_b(main: pd.DataFrame) -> list[str]:
    need = _Rows("cifar10", main)
    mix, at = need.one(method_key="mixacm"), need.one(method_key="at")
    need.check()
    costless = [r["method"] for r in (mix, at) if pd.isna(r["train_device_hours"])]
    if costless:
        raise MissingRows("cifar10", [f"the training cost (train_device_hours) of {', '.join(costless)}"])
    units = sorted({str(u) for u in main.get("train_cost_unit", pd.Series(dtype=str)).dropna() if u})
    if len(units) > 1 or mix.get("train_cost_unit") != at.get("train_cost_unit"):
        raise MissingRows("cifar10", [f"training costs in one unit (found {', '.join(units)})"])
    lines = [f"| method | training cost, {COST_AXIS.get(units[0], units[0]) if units else 'no unit'} "
             "(mean over seeds) | relative to AT |", "|---|---|---|"]
    for _, row in main[main["status"] == TRAINED].iterrows():
        cost = row["train_device_hours"]
        lines.append(f"| {row_name(row)} | {_fmt(cost) if pd.isna(cost) else f'{cost:.4f}'} | "
                     f"{_fmt(cost / at['train_device_hours'])} |")
    ratio = mix["train_device_hours"] / at["train_device_hours"]
    return lines + ["", f"MixACM / AT = **{ratio:.2f}** (AT costs {1 / ratio:.1f} times MixACM). "
                        f"**{'Holds' if ratio < 1 else 'Does not hold'}**."]


def claim_c(less: pd.DataFrame) -> list[str]:
    """One verdict per training budget: the plain runs (same epochs on less data) and each named
    variant that both MixACM and AT have (e.g. "fixed steps": the full-data run's steps)."""
    budgets = [""] + [v for v in named_variants(less, "mixacm") if v in named_variants(less, "at")]
    out: list[str] = []
    for budget in budgets:
        lines = _claim_c_budget(less, budget)
        out += ([""] if out else []) + ([f"**Budget: {budget}**", ""] if budget else []) + lines
    return out


def _claim_c_budget(less: pd.DataFrame, variant: str) -> list[str]:
    need = _Rows("less_data", less)
    rows = less[less["status"] == TRAINED]
    if "variant" in rows:
        rows = rows[rows["variant"].map(_variant_key) == _variant_key(variant)]
    lines = ["| fraction | MixACM clean | MixACM PGD-20 | kept | AT clean | AT PGD-20 | kept |",
             "|---|---|---|---|---|---|---|"]
    fractions = sorted(rows["data_fraction"].unique())
    if not any(f < 1 for f in fractions):
        need.missing.append("trained rows at a data_fraction below 1")
    # A budget without full-data rows of its own (e.g. fixed steps, which on all the data is the
    # plain run) is compared with the plain full-data runs.
    own_full = variant and any(abs(f - 1.0) < 1e-9 for f in fractions)
    full_variant = variant if own_full or not variant else ""
    for frac in [1.0, *(f for f in fractions if f != 1.0)]:
        for m in ("mixacm", "at"):
            need.one(method_key=m, data_fraction=frac, variant=full_variant if frac == 1.0 else variant)
    need.check()
    full = {m: need.one(method_key=m, data_fraction=1.0, variant=full_variant) for m in ("mixacm", "at")}
    holds = True
    for frac in sorted({*fractions, 1.0}):
        cells, kept = [f"{frac:g}"], {}
        for m in ("mixacm", "at"):
            r = full[m] if frac == 1.0 else need.one(method_key=m, data_fraction=frac, variant=variant)
            kept[m] = r["pgd20_mean"] / full[m]["pgd20_mean"]
            cells += [_fmt(r["clean_mean"], r["clean_std"]), _fmt(r["pgd20_mean"], r["pgd20_std"]),
                      f"{100 * kept[m]:.0f} %"]
        if frac < 1:
            holds &= kept["mixacm"] > kept["at"]
        lines.append("| " + " | ".join(cells) + " |")
    if variant and not own_full:
        lines.append("| | (1: the plain full-data runs, which take the same steps) | | | | | |")
    return lines + ["", f"'kept' = PGD-20 accuracy as a share of the same method's full-data one. "
                        f"**{'Holds' if holds else 'Does not hold'}** (criterion: MixACM keeps a larger "
                        f"share than AT at every fraction below 1)."]


def claim_d(abl: pd.DataFrame) -> list[str]:
    need = _Rows("ablation", abl)
    for label in ABLATION_ORDER + ["KD only"]:
        need.one(method=label, variant=None)
    need.check()
    lines = ["| loss | clean | PGD-20 | paper (robust, WRN-34-10, 8/255) |", "|---|---|---|---|"]
    acc = {}
    for label in ABLATION_ORDER + ["KD only"]:
        r = need.one(method=label, variant=None)
        acc[label] = r["pgd20_mean"]
        lines.append(f"| {label} | {_fmt(r['clean_mean'], r.get('clean_std'))} | {_fmt(r['pgd20_mean'], r.get('pgd20_std'))} | "
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
    tables (``build_table`` or ``read_table`` output), one Markdown section per claim.

    A claim whose table is not given, or whose table lacks rows it needs, gets a section that
    says so and names the table and every missing row; the other claims are still evaluated."""
    claims = [
        ("(a) Clean accuracy above AT's, robust accuracy close to it", "cifar10",
         lambda t: claim_a(t, close)),
        ("(b) Training cost a fraction of AT's", "cifar10", claim_b),
        ("(c) With less data, MixACM keeps more of its robustness than AT", "less_data", claim_c),
        ("(d) Each loss component adds robustness, in the paper's order", "ablation", claim_d),
    ]
    sections = []
    for title, kind, claim in claims:
        if kind not in tables:
            lines = [f"**Not evaluated**: needs table {kind} (table_{kind}.csv), which was not given."]
        else:
            try:
                lines = claim(tables[kind])
            except MissingRows as err:
                lines = [f"**Not evaluated**: table {err.table} lacks:", "",
                         *(f"- {m}" for m in err.missing)]
        sections.append(f"### {title}\n\n" + "\n".join(lines))
    return "\n\n".join(sections) + "\n"
