"""The claims check (mixacm.report.claims) on hand-made tables: each verdict and ratio by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd

from mixacm.cli import main
from mixacm.report import read_table, write_table
from mixacm.report.claims import claims_markdown


def _row(method, key, clean, pgd, *, frac=1.0, apgd=np.nan, aa=np.nan, audited=np.nan, hours=np.nan, paper=np.nan):
    row = {"status": "trained", "method": method, "method_key": key, "data_fraction": frac,
           "train_device_hours": hours, "paper_robust": paper}
    for col, value in (("clean", clean), ("pgd20", pgd), ("autoattack_apgd", apgd), ("autoattack", aa),
                       ("audited", audited)):
        row.update({f"{col}_mean": value, f"{col}_std": np.nan, f"{col}_n": 1000,
                    f"{col}_seeds": 0 if np.isnan(value) else 2})
    return row


def tables(mix_clean=60.0, mix_apgd=40.0, at_hours=0.4, less_mix=30.0):
    main_t = pd.DataFrame([
        _row("MixACM", "mixacm", mix_clean, 42.0, apgd=mix_apgd, hours=0.1),
        _row("AT", "at", 55.0, 43.0, apgd=41.0, hours=at_hours),
        {"status": "cited", "method": "AWP", "method_key": ""},
    ])
    less = pd.DataFrame([
        _row("MixACM", "mixacm", 50.0, less_mix, frac=0.1), _row("MixACM", "mixacm", 60.0, 42.0),
        _row("AT", "at", 40.0, 25.8, frac=0.1), _row("AT", "at", 55.0, 43.0),
    ])
    # as build_table writes them: each ablation row carries its preset in `variant`
    abl = pd.DataFrame([
        {**_row("ACM only", "mixacm", 50.0, 30.0), "variant": "acm"},
        {**_row("ACM + KD", "mixacm", 52.0, 33.0), "variant": "acm+kd"},
        {**_row("ACM + mixup", "mixacm", 55.0, 35.0), "variant": "acm+mixup"},
        {**_row("ACM + KD + mixup", "mixacm", 60.0, 42.0), "variant": ""},
        {**_row("KD only", "mixacm", 58.0, 36.0), "variant": "kd"},
    ])
    return {"cifar10": main_t, "less_data": less, "ablation": abl}


def test_all_four_claims_hold():
    text = claims_markdown(tables())
    # (a) clean +5; PGD-20 -1 and APGD -1 are within 2 points
    assert "| Clean | 60.00 | 55.00 | +5.00 |" in text and "| PGD-20 | 42.00 | 43.00 | -1.00 |" in text
    # (b) 0.1 / 0.4 device-hours
    assert "MixACM / AT = **0.25** (AT costs 4.0 times MixACM)" in text
    # (c) MixACM keeps 30 / 42 = 71 %, AT 25.8 / 43 = 60 %
    assert "| 0.1 | 50.00 | 30.00 | 71 % | 40.00 | 25.80 | 60 % |" in text
    # (d) 30 < 33 < 35 < 42 and KD only 36 < 42
    assert text.count("**Holds**") == 4


def test_claim_a_shows_pgd20_on_the_points_of_each_smaller_attack_and_b_refuses_mixed_units():
    t = tables()
    main_t = t["cifar10"]
    main_t["autoattack_apgd_n"] = 500  # APGD on 500 of PGD-20's 1000 points, PGD-20 on them beside it
    main_t.loc[main_t.method_key == "mixacm", "autoattack_apgd_pgd20_mean"] = 41.5
    main_t.loc[main_t.method_key == "at", "autoattack_apgd_pgd20_mean"] = 42.0
    text = claims_markdown(t)
    assert "| PGD-20 on the same 500 points as APGD-CE+APGD-T | 41.50 | 42.00 | -0.50 |" in text
    main_t["train_cost_unit"] = ["CPU-hours", "GPU-hours", None]
    section_b = claims_markdown(t).split("### (b)")[1].split("### (c)")[0]
    assert "**Not evaluated**" in section_b and "training costs in one unit (found CPU-hours, GPU-hours)" in section_b


def test_each_claim_can_fail():
    text = claims_markdown(tables(mix_clean=54.0, mix_apgd=38.5, at_hours=0.05, less_mix=20.0))
    assert text.count("**Does not hold**") == 3  # (a) clean below, (b) ratio 2, (c) 48 % < 60 %
    abl = tables()["ablation"]
    abl.loc[abl.method == "ACM + KD", "pgd20_mean"] = 29.0
    assert "rises along the paper's order: **no**" in claims_markdown({**tables(), "ablation": abl})


def test_robust_gap_over_the_threshold_fails_claim_a():
    text = claims_markdown(tables(mix_apgd=38.9))  # APGD 2.1 points below AT's
    assert text.split("### (b)")[0].count("**Does not hold**") == 1
    assert "**Holds**" in claims_markdown(tables(mix_apgd=38.9), close=2.5).split("### (b)")[0]


def test_a_missing_row_stops_only_its_claim_and_is_named():
    t = tables()
    t["less_data"] = t["less_data"][t["less_data"].method_key != "at"]
    text = claims_markdown(t)
    assert text.count("**Holds**") == 3  # (a), (b), (d) still evaluated
    section_c = text.split("### (c)")[1].split("### (d)")[0]
    assert "**Not evaluated**: table less_data lacks:" in section_c
    # every missing row, not just the first
    assert "- a trained row with method_key = 'at', data_fraction = 1 (found 0)" in section_c
    assert "- a trained row with method_key = 'at', data_fraction = 0.1 (found 0)" in section_c


def test_claims_on_a_run_without_at_or_the_other_tables():
    # the default (quick) run's shape: no AT row, no training cost, only the main table given
    main_t = tables()["cifar10"]
    main_t = main_t[main_t.method_key != "at"].assign(train_device_hours=np.nan)
    text = claims_markdown({"cifar10": main_t})
    assert text.count("**Not evaluated**") == 4 and "**Holds**" not in text
    assert "table cifar10 lacks:\n\n- a trained row with method_key = 'at' (found 0)" in text
    assert "needs table less_data (table_less_data.csv), which was not given" in text
    assert "needs table ablation (table_ablation.csv), which was not given" in text
    # with AT present but no costs, (a) is evaluated and (b) names the missing cost
    t = tables()
    t["cifar10"] = t["cifar10"].assign(train_device_hours=np.nan)
    text = claims_markdown(t)
    assert text.count("**Holds**") == 3
    assert "- the training cost (train_device_hours) of MixACM, AT" in text


def test_less_data_without_a_smaller_fraction_is_not_evaluated():
    t = tables()
    t["less_data"] = t["less_data"][t["less_data"].data_fraction == 1.0]
    section_c = claims_markdown(t).split("### (c)")[1].split("### (d)")[0]
    assert "- trained rows at a data_fraction below 1" in section_c


def test_cli_reads_the_table_csvs(tmp_path, capsys):
    paths = []
    for kind, table in tables().items():
        paths.append(str(write_table(table, tmp_path / f"table_{kind}.csv")))
    assert read_table(paths[0])["method"].tolist()[:2] == ["MixACM", "AT"]
    out = tmp_path / "claims.md"
    assert main(["claims", "--tables", *paths, "--out", str(out)]) == 0
    assert out.read_text().count("**Holds**") == 4
    assert "### (d)" in capsys.readouterr().out


def test_named_variants_get_their_own_verdicts():
    t = tables()
    main_t = pd.concat([t["cifar10"], pd.DataFrame([
        {**_row("MixACM", "mixacm", 50.0, 43.5, apgd=41.0, hours=0.4), "variant": "compute-matched"}])],
        ignore_index=True)
    less = pd.concat([t["less_data"], pd.DataFrame([
        {**_row("MixACM", "mixacm", 45.0, 20.0, frac=0.1), "variant": "fixed steps"},
        {**_row("MixACM", "mixacm", 60.0, 42.0), "variant": "fixed steps"},
        {**_row("AT", "at", 50.0, 35.0, frac=0.1), "variant": "fixed steps"},
        {**_row("AT", "at", 55.0, 43.0), "variant": "fixed steps"}])], ignore_index=True)
    text = claims_markdown({**t, "cifar10": main_t, "less_data": less})
    # (a): the full method holds (clean +5); the compute-matched variant's clean 50 < 55 does not
    assert "MixACM: **Holds**" in text and "MixACM [compute-matched]: **Does not hold**" in text
    # (b) names the variant's cost row: 0.4 / 0.4
    assert "| MixACM [compute-matched] | 0.4000 | 1.00 |" in text
    # (c): same epochs holds (71 % > 60 %); fixed steps: 20 / 42 = 48 % < 35 / 43 = 81 %
    assert "**Budget: fixed steps**" in text
    assert "| 0.1 | 45.00 | 20.00 | 48 % | 50.00 | 35.00 | 81 % |" in text
    section_c = text[text.index("### (c)"):text.index("### (d)")]
    assert section_c.count("**Holds**") == 1 and section_c.count("**Does not hold**") == 1


def test_claim_a_checks_the_audited_accuracy_and_names_the_flags():
    t = tables()
    main_t = t["cifar10"].copy()
    main_t.loc[main_t.method_key == "mixacm", "audited_mean"] = 37.0  # 4 points below AT's 41
    main_t.loc[main_t.method_key == "at", "audited_mean"] = 41.0
    main_t["audit_flags"] = ""
    main_t.loc[main_t.method_key == "mixacm", "audit_flags"] = "seed 0: square (Square 3 points below PGD-20)"
    text = claims_markdown({**t, "cifar10": main_t})
    assert "| Audited (mixacm audit) | 37.00 | 41.00 | -4.00 |" in text
    assert "MixACM: **Does not hold**" in text
    assert "Audit flags — MixACM: seed 0: square (Square 3 points below PGD-20)." in text


def test_a_budget_without_full_data_rows_is_compared_with_the_plain_full_data_runs():
    t = tables()
    less = pd.concat([t["less_data"], pd.DataFrame([
        {**_row("MixACM", "mixacm", 45.0, 21.0, frac=0.1), "variant": "fixed steps"},
        {**_row("AT", "at", 50.0, 21.5, frac=0.1), "variant": "fixed steps"}])], ignore_index=True)
    text = claims_markdown({**t, "less_data": less})
    section = text[text.index("**Budget: fixed steps**"):text.index("### (d)")]
    # kept: 21 / 42 = 50 % (MixACM), 21.5 / 43 = 50 %: not larger, so it does not hold
    assert "| 0.1 | 45.00 | 21.00 | 50 % | 50.00 | 21.50 | 50 % |" in section
    assert "| 1 | 60.00 | 42.00 | 100 % | 55.00 | 43.00 | 100 % |" in section
    assert "the plain full-data runs, which take the same steps" in section
    assert "**Does not hold**" in section and "Not evaluated" not in section
