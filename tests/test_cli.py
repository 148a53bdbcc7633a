"""The `mixacm` command line: documented options, a TorchScript evaluation whose numbers are
recomputed independently, train -> evaluate provenance, and bad input that exits 2 with one
clear line and writes nothing."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixacm.checkpoint import model_spec, save_model_file
from mixacm.cli import UsageError, _set_path, build_parser, main
from mixacm.data import balanced_first_n, dataset_labels, load_dataset
from mixacm.models import build_model
from mixacm.utils import sha256_file

# TorchScript is deprecated in torch, but it is the format foreign models arrive in.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # Decoded-image cache shared by the tests of this module, outside the repository.
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mixacm-cache"))


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _cli_summary() -> dict[str, str]:
    """docs/architecture.md's command-line summary: subcommand -> its lines (continuations included)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("## Command line and workflow", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    summary: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"mixacm (\S+)", line)
        if m:
            current = m.group(1)
            summary[current] = summary.get(current, "") + line + "\n"
        elif current:
            summary[current] += line + "\n"
    return summary


def test_the_cli_summary_in_the_docs_lists_every_subcommand_and_option():
    summary = _cli_summary()
    assert "--traceback" in summary["[--traceback]"]
    subs = _subcommands()
    assert set(summary) - {"[--traceback]"} == set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            # a --x / --no-x pair is listed as --[no-]x
            forms = longs + [o.replace("--no-", "--[no-]") for o in longs]
            assert not longs or any(re.search(re.escape(f) + r"(?![\w-])", summary[name]) for f in forms), \
                f"docs/architecture.md: mixacm {name} lacks {longs}"


def test_every_subcommand_documents_every_option(capsys):
    subs = _subcommands()
    assert set(subs) == {"train", "evaluate", "audit", "sweep-figure", "teacher", "table", "figures", "report", "claims"}
    for name, sub in subs.items():
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"mixacm {name} --help does not list {flag}"
            if action.option_strings and action.dest != "help":
                assert action.help, f"mixacm {name} {action.option_strings[0]} has no help text"


def test_set_overrides_nested_keys_as_yaml():
    cfg = {"optim": {"lr": 0.1}}
    _set_path(cfg, "optim.epochs=2")
    _set_path(cfg, "method.eps=8/255")
    _set_path(cfg, "train.amp=bf16")
    _set_path(cfg, "teacher=")
    assert cfg == {"optim": {"lr": 0.1, "epochs": 2}, "method": {"eps": "8/255"},
                   "train": {"amp": "bf16"}, "teacher": None}
    with pytest.raises(UsageError, match="expected key.path=value"):
        _set_path(cfg, "optim.epochs")
    with pytest.raises(UsageError, match="optim.lr is not a mapping"):
        _set_path(cfg, "optim.lr.x=1")


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    # Spread the predictions over several classes so that accuracy is not a constant 10 %.
    with torch.no_grad():
        model.fc.bias.copy_(torch.linspace(-1, 1, 10))
    path = tmp_path_factory.mktemp("ts") / "foreign.pt"
    torch.jit.trace(model, torch.rand(2, 3, 32, 32)).save(str(path))
    return path


def test_evaluate_torchscript_model_file(tmp_path, torchscript_model, cifar10_jpeg_root, capsys):
    out = tmp_path / "result.json"
    rc = main(["evaluate", "--model-file", str(torchscript_model), "--dataset", "cifar10",
               "--data-root", str(cifar10_jpeg_root), "--eps", "2/255", "--attacks", "clean,pgd3",
               "--n", "60", "--batch-size", "25", "--seed", "0", "--device", "cpu", "--no-progress",
               "--run-info", '{"method": "external", "seed": 7}', "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["eps"] == pytest.approx(2 / 255) and result["eps_text"] == "2/255"
    run = result["run"]
    assert run["arch"] == "torchscript" and run["dataset"] == "cifar10"
    assert run["data_source"] == "CIFAR-10 (JPEG copy)"
    assert run["checkpoint_sha256"] == sha256_file(torchscript_model)
    assert run["method"] == "external" and run["seed"] == 7  # --run-info on top of the meta

    # The clean number, recomputed here on the same 60 class-balanced test points.
    data = load_dataset("cifar10", "test", root=cifar10_jpeg_root)
    idx = balanced_first_n(dataset_labels(data), 60)
    x = torch.stack([data[int(i)][0] for i in idx])
    y = torch.tensor([data[int(i)][1] for i in idx])
    model = torch.jit.load(str(torchscript_model))
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    clean = result["metrics"]["clean"]
    assert clean["n"] == 60 and clean["correct"] == correct
    assert clean["accuracy_pct"] == pytest.approx(100 * correct / 60)
    pgd = result["metrics"]["pgd3"]
    assert pgd["n"] == 60 and pgd["attack"]["steps"] == 3
    assert json.loads(capsys.readouterr().out.strip())["accuracy_pct"]["clean"] == clean["accuracy_pct"]


def test_train_then_evaluate_records_the_run(tmp_path, cifar10_jpeg_root):
    cfg = {
        "name": "cli-test", "seed": 3, "device": "cpu",
        "dataset": {"name": "cifar10", "root": str(cifar10_jpeg_root), "fraction": 0.01},
        "model": {"name": "tiny"}, "method": {"name": "standard"},
        "optim": {"epochs": 1, "batch_size": 50},
        "train": {"max_steps_per_epoch": 5, "progress": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    # --set overrides the file: two steps instead of five.
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out-dir", str(tmp_path / "run"),
                 "--set", "train.max_steps_per_epoch=2"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["seed"] == 3

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--dataset", "cifar10",
                 "--data-root", str(cifar10_jpeg_root), "--eps", "0.01", "--attacks", "clean",
                 "--n", "20", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["run"]
    assert run["method"] == "standard" and run["arch"] == "tiny" and run["seed"] == 3
    assert run["config_hash"] == summary["config_hash"] and run["data_fraction"] == 0.01
    assert run["name"] == "cli-test"


def _model_file(path: Path) -> Path:
    torch.manual_seed(0)
    return save_model_file(build_model("tiny"), model_spec("tiny"), path, {"method": "standard"})


BAD_INPUT = {
    "eps-8": (["evaluate", "--model-file", "{ts}", "--dataset", "cifar10", "--data-root", "{data}",
               "--eps", "8", "--out", "{out}"], "did you mean 8/255"),
    "unknown-attack": (["evaluate", "--model-file", "{ts}", "--dataset", "cifar10", "--eps", "2/255",
                        "--attacks", "clean,fgsm", "--out", "{out}"], "unknown attack 'fgsm'"),
    "missing-data-root": (["evaluate", "--model-file", "{ts}", "--dataset", "cifar10", "--data-root",
                           "{tmp}/no-data", "--eps", "2/255", "--out", "{out}"], "MIXACM_DATA_CIFAR10"),
    "corrupt-checkpoint": (["evaluate", "--checkpoint", "{corrupt}", "--dataset", "cifar10", "--eps",
                            "2/255", "--out", "{out}"], "corrupt.pt"),
    "unknown-method": (["train", "--config", "{cfg}", "--set", "method.name=madry", "--out-dir", "{out}"],
                       "method.name: unknown method 'madry'"),
    "unknown-model": (["train", "--config", "{cfg}", "--set", "model.name=wrn-99", "--out-dir", "{out}"],
                      "model.name: unknown model 'wrn-99'"),
    "knob-eps-8": (["train", "--config", "{cfg}", "--set", "method.name=at", "--set", "method.eps=8",
                    "--out-dir", "{out}"], "did you mean 8/255"),
    "missing-teacher": (["train", "--config", "{cfg}", "--set", "method.name=mixacm", "--set",
                         "teacher={tmp}/none.pt", "--out-dir", "{out}"], "none.pt"),
    "wrong-sha256": (["teacher", "--path", "{model}", "--sha256", "0" * 64, "--out", "{out}"],
                     "sha256 mismatch"),
    "url-without-sha256": (["teacher", "--url", "https://example.org/t.pt", "--out", "{out}"],
                           "--url needs --sha256"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, torchscript_model,
                                                            capsys, monkeypatch):
    monkeypatch.delenv("MIXACM_DATA_CIFAR10", raising=False)
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"dataset": {"name": "cifar10", "root": str(tmp_path / "no-data")}, "model": {"name": "tiny"},
         "method": {"name": "standard"}}))
    model = _model_file(tmp_path / "model.pt")
    out = tmp_path / "out" / "target"
    argv, expected = BAD_INPUT[case]
    fill = {"ts": torchscript_model, "data": tmp_path / "no-data", "tmp": tmp_path, "out": out,
            "corrupt": tmp_path / "corrupt.pt", "cfg": tmp_path / "run.yaml", "model": model}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mixacm {argv[0]}: error: "), err
    assert expected in err, err
    assert not out.exists()


def test_console_entry_point_exit_status(tmp_path):
    # The installed process (`python -m mixacm.cli`, as torchrun runs it) reports the same way.
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mixacm.cli", "evaluate", "--model-file", str(tmp_path / "none.pt"),
         "--dataset", "cifar10", "--eps", "2/255", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mixacm evaluate: error: {tmp_path / 'none.pt'}: no such file"
    assert not out.exists()


HELP_WITHOUT_TORCH = """
import sys
from mixacm.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, argv
heavy = sorted(m for m in ("torch", "torchvision", "pandas", "matplotlib") if m in sys.modules)
print("imported:", heavy)
"""


def test_help_imports_no_torch():
    # `mixacm --help` took 3.8 s and 827 MB when the parser imported the registries (torch).
    argvs = [["--help"]] + [[c, "--help"] for c in ("evaluate", "teacher", "table", "figures",
                                                    "report", "claims")]
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH.format(argvs=argvs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imported: []"
    assert "usage: mixacm [-h]" in proc.stdout


def test_train_help_still_lists_the_registries(capsys):
    from mixacm.methods import METHODS
    from mixacm.models import MODELS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert f"methods: {', '.join(METHODS.names())}" in out
    assert f"models: {', '.join(MODELS.names())}" in out


def test_evaluate_threads_default_to_omp_num_threads_else_one(monkeypatch, torchscript_model, tmp_path):
    import mixacm.evaluate
    from mixacm.cli import default_threads

    seen = []

    def fake_evaluate(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise UsageError("stop here")

    monkeypatch.setattr(mixacm.evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr("mixacm.data.load_dataset", lambda *a, **k: None)
    before = torch.get_num_threads()
    argv = ["evaluate", "--model-file", str(torchscript_model), "--dataset", "cifar10", "--eps",
            "2/255", "--attacks", "clean", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 1
    assert main(argv) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    assert main(argv + ["--threads", "3"]) == 2
    assert seen == [1, 3]
    assert torch.get_num_threads() == before  # restored for the rest of the process
    assert main(argv + ["--threads", "0"]) == 2 and seen == [1, 3]


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        model.fc.bias.copy_(torch.linspace(-1, 1, 10))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("export") / "foreign.pt2"
    torch.export.save(program, str(path))
    return path, model


def test_evaluate_torch_export_model_file(tmp_path, exported_model, cifar10_jpeg_root):
    from mixacm.checkpoint import ExportedModel, load_any_model
    from mixacm.evaluate import evaluate

    path, original = exported_model
    loaded, info = load_any_model(path)
    assert isinstance(loaded, ExportedModel) and info["format"] == "torch.export"
    out = tmp_path / "result.json"
    assert main(["evaluate", "--model-file", str(path), "--dataset", "cifar10", "--data-root",
                 str(cifar10_jpeg_root), "--eps", "2/255", "--attacks", "clean,pgd3", "--n", "40",
                 "--batch-size", "20", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["run"]["arch"] == "torch.export"
    assert result["run"]["checkpoint_sha256"] == sha256_file(path)
    # the same counts as the module it was exported from, attacks included
    data = load_dataset("cifar10", "test", root=cifar10_jpeg_root)
    ref = evaluate(original, data, ["clean", "pgd3"], "2/255", n=40, batch_size=20, seed=0,
                   device="cpu", progress=False)
    for name in ("clean", "pgd3"):
        assert result["metrics"][name]["correct"] == ref["metrics"][name]["correct"], name
    assert 0 < ref["metrics"]["clean"]["correct"] < 40


def test_every_attempt_of_mixacm_train_is_recorded_however_it_ends(tmp_path):
    # Snakemake writes a benchmark only for the attempt that finishes; mixacm train records each.
    import os
    import signal

    from mixacm.cli import ATTEMPTS_FILE, recorded_attempt

    with recorded_attempt(tmp_path):
        sum(i * i for i in range(10000))
    with pytest.raises(RuntimeError), recorded_attempt(tmp_path):
        raise RuntimeError("loss is nan")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit), recorded_attempt(tmp_path):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's kill or time limit
        signal.pause()
    assert signal.getsignal(signal.SIGTERM) is before
    lines = [json.loads(line) for line in (tmp_path / ATTEMPTS_FILE).read_text().splitlines()]
    assert [line["status"] for line in lines] == ["finished", "failed", f"stopped (exit {128 + signal.SIGTERM})"]
    assert all(line["wall_s"] >= 0 and line["cpu_s"] > 0 and line["started"] for line in lines)
    with recorded_attempt(tmp_path / "not-made"):  # bad input: train() never made the folder
        pass
    assert not (tmp_path / "not-made").exists()
