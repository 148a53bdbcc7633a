"""The robustness audit against facts: a gradient-masked model is flagged (transfer and black-box
attacks beat white-box PGD, the eps sweep stays above 0), an honest model passes, the audited
accuracy is the per-point worst case, and bad settings fail in one line naming the key."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mixacm.audit import AUDIT_DEFAULTS, AuditError, audit_settings, run_audit

EPS = 0.1
FAST = {"n": 40, "batch_size": 20, "pgd_steps": 10, "pgd_restarts": 2, "subset_n": 10, "square_queries": 100,
        "eps_multipliers": [1, 2, 4, 8], "sweep_steps": 10}


class Blobs(Dataset):
    """10 classes, each a fixed +-0.1 pattern around grey plus noise (easy, not trivially robust)."""

    def __init__(self, n: int = 60, seed: int = 1) -> None:
        patterns = torch.randint(0, 2, (10, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
        g = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % 10).tolist()
        y = torch.tensor(self.targets)
        self.images = (0.5 + patterns[y] + 0.03 * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 1)
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    data = Blobs(300, seed=5)
    x, y = data.images, torch.tensor(data.targets)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Masked(nn.Module):
    """The same classifier behind a quantiser: zero input gradients, the textbook gradient masking."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 16) / 16)


def test_gradient_masked_model_is_flagged_with_reasons(net):
    result = run_audit(Masked(net), Blobs(), EPS, sources={"teacher": net}, settings=FAST, device="cpu")
    audit = result["audit"]
    checks = {f["check"] for f in audit["flags"]}
    assert audit["status"] == "flagged"
    assert {"transfer_teacher", "square"} <= checks, audit["flags"]
    acc = audit["accuracy_pct"]
    assert acc["transfer_teacher"] < acc["pgd20"] - FAST.get("margin_pct", AUDIT_DEFAULTS["margin_pct"])
    assert result["metrics"]["audited"]["accuracy_pct"] <= min(acc["transfer_teacher"], acc["pgd20"])
    assert all(f["reason"] for f in audit["flags"])


def test_honest_model_passes_and_audited_is_the_per_point_worst_case(net):
    result = run_audit(net, Blobs(), EPS, sources={"teacher": net}, settings=FAST, device="cpu")
    audit, audited = result["audit"], result["metrics"]["audited"]
    assert audit["flags"] == [] and audit["status"] == "passed"
    acc = audit["accuracy_pct"]
    assert audited["accuracy_pct"] <= min(v for k, v in acc.items() if not k.startswith("subset") and k != "audited")
    assert audited["n"] == 40 and audited["correct"] == round(audited["accuracy_pct"] * 40 / 100)
    assert [r["multiplier"] for r in audit["sweep"]] == [1, 2, 4, 8]
    assert audit["sweep"][-1]["accuracy_pct"] <= AUDIT_DEFAULTS["sweep_max_acc_pct"]
    sweep = [r["accuracy_pct"] for r in audit["sweep"]]
    assert sweep == sorted(sweep, reverse=True)
    # The result file has the evaluation's shape (the report reads "audited" like any metric).
    assert result["precision"] == "fp32" and result["model_check"]["output"] == "tensor"
    json.dumps(result)


def test_autoattack_gap_and_sweep_flags(net):
    result = run_audit(net, Blobs(), 0.02, settings={**FAST, "eps_multipliers": [1], "sweep_max_acc_pct": 0.0},
                       autoattack_acc_pct=0.0, device="cpu")
    checks = {f["check"] for f in result["audit"]["flags"]}
    assert result["audit"]["accuracy_pct"]["pgd20"] > 10  # a small eps: PGD-20 leaves points correct
    assert "autoattack" in checks
    assert "eps_sweep" in checks  # the largest eps is 1 x eps here, where accuracy is above 0


@pytest.mark.parametrize("given,key", [
    ({"n": 0}, "audit.n"), ({"pgd_steps": 2.5}, "audit.pgd_steps"), ({"margin_pct": -1}, "audit.margin_pct"),
    ({"eps_multipliers": [2, 4]}, "audit.eps_multipliers"), ({"subset_n": 50, "n": 10}, "audit.subset_n"),
    ({"steps": 3}, "unknown key"),
])
def test_bad_settings_name_the_key(given, key):
    with pytest.raises(AuditError, match=key):
        audit_settings(given)


# --------------------------------------------------------------------- the command line


@pytest.fixture
def folder_and_models(tmp_path, net, monkeypatch):
    from torchvision.io import encode_png, write_file

    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "cache"))
    data = Blobs(40, seed=2)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(data.images, data.targets)):
            d = tmp_path / "data" / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            write_file(str(d / f"{i:03d}.png"), encode_png((img * 255).round().to(torch.uint8)))
    files = {}
    for name, model in (("masked", Masked(net)), ("net", net)):
        files[name] = tmp_path / f"{name}.pt"
        torch.jit.trace(model, torch.rand(2, 3, 4, 4)).save(str(files[name]))
    return tmp_path / "data", files


def _audit_args(data, model, out, *extra):
    return ["audit", "--model-file", str(model), "--dataset", "imagefolder", "--data-root", str(data),
            "--eps", "0.1", "--settings", json.dumps({k: v for k, v in FAST.items() if k != "n"}),
            "--n", "40", "--out", str(out), *extra]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_cli_audit_writes_flags_and_the_run_section(folder_and_models, tmp_path, capsys):
    from mixacm.cli import main

    data, files = folder_and_models
    out = tmp_path / "audit.json"
    assert main(_audit_args(data, files["masked"], out, "--source", f"teacher={files['net']}")) == 0
    result = json.loads(out.read_text())
    assert result["run"]["checkpoint"] == str(files["masked"]) and result["audit"]["status"] == "flagged"
    assert result["audit"]["source_files"] == {"teacher": str(files["net"])}
    assert "transfer_teacher" in json.loads(capsys.readouterr().out)["flags"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_cli_audit_takes_the_evaluations_auto_batch_size(folder_and_models, tmp_path):
    """The workflow passes evaluation.<dataset>.batch_size, "auto" in the paper config, to the
    audit as to the evaluations: the same rule resolves it (256 on the CPU) and the result says so."""
    from mixacm.cli import main

    data, files = folder_and_models
    out = tmp_path / "audit.json"
    assert main(_audit_args(data, files["net"], out, "--batch-size", "auto")) == 0
    result = json.loads(out.read_text())
    assert result["batch_size"] == 256 and result["audit"]["settings"]["batch_size_rule"]["rule"] == "auto: 256 on the cpu"
    with pytest.raises(AuditError, match="audit.batch_size"):
        audit_settings({"batch_size": "big"})


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("extra,match", [
    (["--source", "teacher"], "--source 'teacher': expected NAME=MODEL.pt"),
    (["--source", "teacher=/nonexistent/t.pt"], "/nonexistent/t.pt: no such file"),
    (["--settings", '{"pgd_steps": 0}'], "audit.pgd_steps"),
    (["--autoattack-result", "/nonexistent/r.json"], "--autoattack-result /nonexistent/r.json"),
    (["--eps", "8"], "eps"),
])
def test_cli_audit_bad_input_exits_2_in_one_line_with_no_file(folder_and_models, tmp_path, capsys, extra, match):
    from mixacm.cli import main

    data, files = folder_and_models
    out = tmp_path / "audit.json"
    assert main(_audit_args(data, files["net"], out) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert not out.exists() and len(err.splitlines()) == 1 and match in err, err


def test_table_and_report_show_the_audited_column_and_flags(net, tmp_path):
    from mixacm.evaluate import evaluate
    from mixacm.report import build_table, collect_results, render_report

    run = {"method": "mixacm", "arch": "mlp", "teacher": "net", "dataset": "cifar10", "data_source": "CIFAR-10 (blobs)",
           "data_fraction": 1.0, "seed": 0, "config_hash": "abc", "recipe": "mixacm"}
    ev = evaluate(Masked(net), Blobs(), ["clean", "pgd20"], EPS, n=40, batch_size=20, progress=False, device="cpu")
    audit = run_audit(Masked(net), Blobs(), EPS, sources={"teacher": net}, settings=FAST, device="cpu")
    files = []
    for name, result in (("eval", ev), ("audit", audit)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"schema": 1, "run": run, **result}))
    table = build_table("cifar10", collect_results(files))
    row = table[table["status"] == "trained"].iloc[0]
    assert row["audited_mean"] == pytest.approx(audit["metrics"]["audited"]["accuracy_pct"], abs=0.01)
    assert row["audited_mean"] <= row["pgd20_mean"]
    # PGD-20 on the audit's own points travels beside it: here the evaluation's points and seeds
    assert row["audited_pgd20_mean"] == pytest.approx(audit["audit"]["accuracy_pct"]["pgd20"], abs=1e-4)
    assert row["audited_pgd20_mean"] == pytest.approx(row["pgd20_mean"], abs=1e-4)
    assert "gradient masking suspected" in row["audit_flags"] and row["audit_flags"].startswith("seed 0:")
    html = render_report({"cifar10": table}, [], collect_results(files), tmp_path / "r.html").read_text()
    assert "Audited robust" in html and "flagged:" in html
    # what a flag means, and that a smoke run's flags say little, beside the table
    assert "Audited robust: per point, the worst case" in html and "smoke run" in html
    plain = render_report({"cifar10": build_table("cifar10", collect_results(files[:1]))}, [],
                          collect_results(files[:1]), tmp_path / "plain.html").read_text()
    assert "Audited robust: per point" not in plain


def test_sweep_figure_from_audit_files(net, tmp_path, repo_root):
    from mixacm.cli import main
    from mixacm.report.figures import draw_eps_sweep, smoke_note

    result = run_audit(net, Blobs(), EPS, settings=FAST, device="cpu")
    paths = []
    for seed, (method, variant) in enumerate([("at", None), ("mixacm", "compute-matched"), ("mixacm", None)]):
        paths.append(tmp_path / f"a{seed}.json")
        paths[-1].write_text(json.dumps({"run": {"recipe": method, "method": method, "variant": variant,
                                                 "arch": "mlp", "data_source": "blobs", "seed": 0}, **result}))
    out = tmp_path / "fig" / "eps_sweep.png"
    assert main(["sweep-figure", "--audits", *map(str, paths), "--config", str(repo_root / "config" / "quick.yaml"),
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = draw_eps_sweep(paths, smoke_note(repo_root / "config" / "quick.yaml"))
    ax = fig.axes[0]
    # the tables' names, not recipe keys; what ran and how many points; the smoke-run note
    assert ax.get_legend_handles_labels()[1] == ["AT", "MixACM", "MixACM [compute-matched]"]
    title = " ".join(ax.get_title().split())
    assert "blobs" in title and "student mlp" in title and f"{FAST['n']} test points" in title
    assert "smoke run" in fig.get_supxlabel()
    # ticks at the eps of the points only, a y range that fits them
    eps = sorted(row["eps"] for row in result["audit"]["sweep"])
    assert list(ax.get_xticks()) == pytest.approx([e * 255 for e in eps])
    top = max(row["accuracy_pct"] for row in result["audit"]["sweep"])
    assert top <= ax.get_ylim()[1] <= top + 13
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["sweep-figure", "--audits", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
