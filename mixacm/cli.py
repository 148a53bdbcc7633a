"""The ``mixacm`` command line: one subcommand per pipeline stage.

    mixacm train     --config RUN.yaml --out-dir DIR [--set key.path=value ...]
    mixacm evaluate  (--checkpoint MODEL.pt | --model-file MODEL.pt2) --dataset cifar10 ...
    mixacm audit     (--checkpoint MODEL.pt | --model-file MODEL.pt2) --dataset cifar10 --eps E [--source N=M.pt]
    mixacm sweep-figure --audits AUDIT.json ... --out FIGURE.png   (the audit's eps sweep)
    mixacm teacher   (--robustbench NAME | --url URL --sha256 HEX | --path FILE | --source-json J)
    mixacm table | figures | report      (tables, figures and the HTML report from result files)
    mixacm claims    --tables TABLE.csv ...  (the paper's claims checked on the tables, Markdown)

Each subcommand is a thin wrapper around a library function (``mixacm.train.train``,
``mixacm.evaluate.evaluate``, ``mixacm.teachers.acquire_teacher``, ``mixacm.report``), so
everything the workflow runs can also be called from Python. Bad input (unknown method or
model, eps outside (0, 1], a missing data root, a corrupt checkpoint, a wrong sha256) prints one
line to stderr and exits with status 2 before anything is written; ``--traceback`` shows the
full Python traceback instead. Heavy modules (torch above all) are imported inside the commands,
so ``mixacm --help`` and the help of every command but ``train`` (whose epilog lists the
registries) import no torch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input detected by the CLI itself; reported as one line, exit status 2."""


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input" (reported in one line), not a bug in the code."""
    from mixacm.checkpoint import CheckpointError
    from mixacm.config import ConfigError
    from mixacm.data import DataError

    from mixacm.teachers import TeacherError
    from mixacm.utils import WriteFailed

    errors: list[type[BaseException]] = [
        UsageError, ConfigError, CheckpointError, DataError, TeacherError, ValueError, KeyError,
        FileNotFoundError, WriteFailed,
    ]
    try:
        from mixacm.report import ResultFileError
    except ImportError:  # the report needs pandas/matplotlib; training does not
        pass
    else:
        errors.append(ResultFileError)
    return tuple(errors)


def _message(err: BaseException) -> str:
    # KeyError's str() wraps the message in quotes; show the text itself.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


# -- train -----------------------------------------------------------------------------------------


def _set_path(cfg: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` override; the value is parsed as YAML (8/255 stays a string)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {assignment!r}: expected key.path=value")
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    from mixacm.utils import YAMLFileError, load_yaml

    try:
        node[parts[-1]] = load_yaml(f"--set {key.strip()}", text=raw) if raw.strip() else None
    except YAMLFileError as err:  # not YAML, or a flow mapping with a key twice
        raise UsageError(str(err)) from None


def _apply_overrides(cfg: dict, assignments: Sequence[str]) -> None:
    """All ``--set`` overrides, in order; the same key set twice is refused (which would win?)."""
    seen: dict[str, str] = {}
    for assignment in assignments:
        key = assignment.partition("=")[0].strip()
        if key in seen:
            raise UsageError(f"--set {key} is given twice ({seen[key]!r} and {assignment!r}): keep one")
        seen[key] = assignment
        _set_path(cfg, assignment)


def _read_run_config(source: str) -> dict:
    from mixacm.config import parse_run_config

    if source == "-":
        return parse_run_config(sys.stdin.read(), "standard input")
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--config {source}: no such file")
    return parse_run_config(path.read_text(), str(path))


def cmd_train(args: argparse.Namespace) -> int:
    from mixacm.config import load_run_config
    from mixacm.train import train

    cfg = _read_run_config(args.config)
    _apply_overrides(cfg, args.set)
    # Validate fully before train() creates the output directory: bad input writes nothing.
    load_run_config(cfg)
    if cfg.get("teacher") and not Path(cfg["teacher"]).is_file():
        raise UsageError(f"teacher: model file {cfg['teacher']} does not exist")
    with recorded_attempt(Path(args.out_dir)):
        summary = train(cfg, Path(args.out_dir))
    print(json.dumps({k: summary[k] for k in ("epochs", "wall_time_s") if k in summary}))
    return 0


ATTEMPTS_FILE = "attempts.jsonl"


@contextlib.contextmanager
def recorded_attempt(out_dir: Path):
    """Append this process's run of ``mixacm train`` to ``out_dir/attempts.jsonl``, whether it
    finishes, fails or is stopped by SIGTERM (a scheduler's kill or time limit): start time,
    wall and CPU seconds (the process's threads and waited-for children, start-up included), and
    how it ended. Snakemake's benchmark times only the attempt that finishes; this file keeps every
    attempt a kill or a failure would otherwise lose (not one killed with SIGKILL). Rank 0 only."""
    import datetime
    import os
    import resource
    import signal
    import time

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    status = "failed"
    try:
        yield
        status = "finished"
    except SystemExit as exc:
        status = f"stopped (exit {exc.code})"
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        cpu = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
        line = {"started": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t0, 3),
                "cpu_s": round(cpu, 3), "status": status}
        if out_dir.is_dir():  # bad input stops before train() makes the folder: no attempt
            with open(out_dir / ATTEMPTS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")


# -- evaluate --------------------------------------------------------------------------------------


def _run_section(path: Path, info: dict, dataset: Any, dataset_name: str, extra: dict) -> dict:
    """The result's ``run`` section: the model file's metadata, then ``--run-info`` on top."""
    from mixacm.data import dataset_source
    from mixacm.utils import portable_path, sha256_file

    meta = info.get("meta") or {}
    run_meta = meta.get("run") if isinstance(meta.get("run"), dict) else meta
    ds_meta = run_meta.get("dataset") if isinstance(run_meta.get("dataset"), dict) else {}
    teacher = run_meta.get("teacher")
    run = {
        "method": run_meta.get("method") if not isinstance(run_meta.get("method"), dict)
        else run_meta["method"].get("name"),
        "arch": (info.get("model") or {}).get("name"),
        "teacher": teacher if not isinstance(teacher, dict) else teacher.get("name"),
        "dataset": dataset_name,
        "data_source": dataset_source(dataset),
        "data_fraction": run_meta.get("data_fraction", ds_meta.get("fraction")),
        "seed": run_meta.get("seed"),
        "config_hash": run_meta.get("config_hash"),
        "name": run_meta.get("name"),
        "checkpoint": portable_path(path),
        "checkpoint_sha256": sha256_file(path),
    }
    run.update(extra)
    return run


def _parse_run_info(text: str | None) -> dict:
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--run-info is not valid JSON: {err}") from None
    if not isinstance(extra, dict):
        raise UsageError("--run-info must be a JSON object, e.g. '{\"method\": \"mixacm\"}'")
    return extra


def default_threads() -> int:
    """CPU threads of ``mixacm evaluate``: ``$OMP_NUM_THREADS`` when set, else 1."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from mixacm.attacks import build_attack
    from mixacm.checkpoint import load_any_model
    from mixacm.data import load_dataset
    from mixacm.evaluate import evaluate, write_result
    from mixacm.utils import parse_linf_eps, resolve_device

    # Everything that can be checked cheaply is checked before loading models or data.
    eps = parse_linf_eps(args.eps, allow_large=args.allow_large_eps)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks:
        raise UsageError("--attacks: give at least one attack, e.g. clean,pgd20")
    for name in attacks:
        build_attack(name, eps)
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n {args.n}: must be at least 1")
    if args.batch_size != "auto" and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1 (or auto)")
    extra = _parse_run_info(args.run_info)
    threads = args.threads if args.threads is not None else default_threads()
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    device = resolve_device(args.device)

    path = Path(args.checkpoint or args.model_file)
    model, info = load_any_model(path, device=device)
    dataset = load_dataset(args.dataset, "test", root=args.data_root, download=args.download)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = evaluate(
            model, dataset, attacks, eps=args.eps, n=args.n, batch_size=args.batch_size,
            seed=args.seed, device=device, state_path=args.state_file, progress=args.progress,
            precision=args.precision,
        )
    finally:
        torch.set_num_threads(previous)  # main() is also called in-process (tests, notebooks)
    result = {"schema": result.get("schema", 1),
              "run": _run_section(path, info, dataset, args.dataset, extra), **result}
    write_result(result, args.out)
    summary = {name: m["accuracy_pct"] for name, m in result["metrics"].items()}
    print(json.dumps({"out": str(args.out), "accuracy_pct": summary}))
    return 0


# -- audit -----------------------------------------------------------------------------------------


def _parse_sources(items: Sequence[str]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--source {item!r}: expected NAME=MODEL.pt, e.g. teacher=results/teachers/cifar10/file/model.pt")
        if name in sources:
            raise UsageError(f"--source {name!r} given twice")
        sources[name] = Path(file)
    return sources


def _autoattack_accuracy(path: str | None, eps: float) -> float | None:
    """The AutoAttack accuracy of an evaluation result file (standard, else APGD-CE + APGD-T)."""
    if not path:
        return None
    from mixacm.report.results import ResultFileError, read_result_file

    try:  # a result contradicting itself (counts, eps, schema, provenance) is not used
        result = read_result_file(path)
    except ResultFileError as err:
        raise UsageError(f"--autoattack-result {str(err).removeprefix('result file ')}") from None
    metrics = result.get("metrics") if isinstance(result, dict) else None
    if not isinstance(metrics, dict):
        raise UsageError(f"--autoattack-result {path}: no metrics")
    if abs(float(result.get("eps", -1)) - eps) > 1e-9:
        raise UsageError(f"--autoattack-result {path}: eps {result.get('eps')} is not this audit's eps {eps}")
    for name in ("autoattack", "autoattack-apgd", "autoattack-rand"):
        if name in metrics:
            return float(metrics[name]["accuracy_pct"])
    raise UsageError(f"--autoattack-result {path}: no AutoAttack metric (found {sorted(metrics)})")


def cmd_audit(args: argparse.Namespace) -> int:
    from mixacm.audit import audit_settings, run_audit, write_audit
    from mixacm.checkpoint import load_any_model
    from mixacm.data import load_dataset
    from mixacm.utils import parse_linf_eps, portable_path, resolve_device

    # Cheap checks first: settings, eps, sources named, the AutoAttack result readable.
    eps = parse_linf_eps(args.eps, allow_large=args.allow_large_eps)
    try:
        given = json.loads(args.settings) if args.settings else {}
    except json.JSONDecodeError as err:
        raise UsageError(f"--settings is not valid JSON: {err}") from None
    if not isinstance(given, dict):
        raise UsageError("--settings must be a JSON object, e.g. '{\"n\": 1000}'")
    if args.n is not None:
        given["n"] = args.n
    if args.batch_size is not None:
        given["batch_size"] = args.batch_size
    settings = audit_settings(given)
    sources = _parse_sources(args.source)
    aa = _autoattack_accuracy(args.autoattack_result, eps)
    extra = _parse_run_info(args.run_info)
    device = resolve_device(args.device)

    path = Path(args.checkpoint or args.model_file)
    model, info = load_any_model(path, device=device)
    source_models = {name: load_any_model(file, device=device)[0] for name, file in sources.items()}
    dataset = load_dataset(args.dataset, "test", root=args.data_root, download=args.download)
    result = run_audit(model, dataset, args.eps, sources=source_models, settings=settings,
                       autoattack_acc_pct=aa, seed=args.seed, device=device)
    result["audit"]["source_files"] = {name: portable_path(file) for name, file in sources.items()}
    result = {"schema": result["schema"], "run": _run_section(path, info, dataset, args.dataset, extra), **result}
    write_audit(result, args.out)
    print(json.dumps({"out": str(args.out), "audited_pct": result["metrics"]["audited"]["accuracy_pct"],
                      "flags": [f["check"] for f in result["audit"]["flags"]]}))
    return 0


def cmd_sweep_figure(args: argparse.Namespace) -> int:
    from mixacm.report.figures import eps_sweep_figure, smoke_note

    eps_sweep_figure(args.audits, args.out, smoke_note(args.config))
    return 0


# -- teacher ---------------------------------------------------------------------------------------


def _teacher_source(args: argparse.Namespace) -> dict:
    """One source description for ``acquire_teacher`` from the flags (or --source-json)."""
    if args.source_json:
        try:
            source = json.loads(args.source_json)
        except json.JSONDecodeError as err:
            raise UsageError(f"--source-json is not valid JSON: {err}") from None
        if not isinstance(source, dict):
            raise UsageError("--source-json must be a JSON object")
        return source
    given = [flag for flag, value in (("--robustbench", args.robustbench), ("--url", args.url),
                                      ("--path", args.path)) if value]
    if len(given) != 1:
        raise UsageError(
            "give exactly one teacher source: --robustbench NAME, --url URL --sha256 HEX, --path FILE "
            f"or --source-json (got {', '.join(given) or 'none'})"
        )
    if args.url and not args.sha256:
        raise UsageError("--url needs --sha256: downloads are always checked")
    if args.robustbench:
        source = {"robustbench": args.robustbench, "dataset": args.dataset, "threat_model": args.threat_model}
        if args.model_dir:
            source["model_dir"] = args.model_dir
    elif args.url:
        source = {"url": args.url, "sha256": args.sha256}
    else:
        source = {"path": args.path}
        if args.sha256:
            source["sha256"] = args.sha256
    if args.arch:
        source["arch"] = args.arch
    if args.key and not args.robustbench:
        source["key"] = args.key
    if args.normalization:
        source["normalization"] = _parse_normalization(args.normalization)
    if args.stated_acc is not None:
        source["stated_clean_acc"] = args.stated_acc
    check = {k: v for k, v in (("n", args.check_n), ("margin_pct", args.margin),
                               ("on_mismatch", args.on_mismatch)) if v is not None}
    if check:
        source["check"] = check
    return source


def _parse_normalization(text: str) -> Any:
    """``none`` or ``MEAN/STD`` with comma-separated channels, e.g. ``0.5,0.5,0.5/0.25,0.25,0.25``."""
    if text == "none":
        return "none"
    try:
        mean, std = text.split("/")
        return {"mean": [float(v) for v in mean.split(",")], "std": [float(v) for v in std.split(",")]}
    except ValueError:
        raise UsageError(f"--normalization {text!r}: expected none or MEAN/STD, e.g. "
                         "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616") from None


def cmd_teacher(args: argparse.Namespace) -> int:
    from mixacm.teachers import acquire_teacher

    from mixacm.checkpoint import load_model_file

    source = _teacher_source(args)
    out = acquire_teacher(source, Path(args.out), data_root=args.data_root)
    check = load_model_file(out)[1]["meta"].get("accuracy_check")
    print(json.dumps({"out": str(out), "source": source, "accuracy_check": check}))
    return 0


# -- tables, figures, report -----------------------------------------------------------------------


def _read_tables(paths: Sequence[str]) -> dict:
    """Table CSVs keyed by their kind, which the file name carries: ``table_<kind>.csv``."""
    from mixacm.report import TABLE_KINDS, read_table

    tables = {}
    for p in map(Path, paths):
        kind = p.stem.removeprefix("table_")
        if not p.stem.startswith("table_") or kind not in TABLE_KINDS:
            raise UsageError(f"--tables {p}: expected a file named table_<kind>.csv with kind in "
                             f"{', '.join(TABLE_KINDS)}")
        if not p.is_file():
            raise UsageError(f"--tables {p}: no such file")
        tables[kind] = read_table(p)
    return tables


def cmd_table(args: argparse.Namespace) -> int:
    from mixacm.report import build_table, collect_costs, collect_results, write_table

    results = collect_results(args.results)
    costs = collect_costs(args.costs) if args.costs else None
    write_table(build_table(args.table, results, costs=costs), args.out)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from mixacm.report import make_figures

    make_figures(_read_tables(args.tables), args.out_dir, config=args.config)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixacm.report import collect_costs, collect_results, render_report

    tables = _read_tables(args.tables)
    results = collect_results(args.results)
    costs = collect_costs(args.costs) if args.costs else None
    teachers = None
    if args.teachers:
        from mixacm.report.teachers import teacher_records

        teachers = teacher_records(args.teachers)
    render_report(tables, args.figures, results, args.out, costs=costs, teachers=teachers, config_path=args.config)
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from mixacm.report.claims import claims_markdown
    from mixacm.utils import atomic_write

    text = claims_markdown(_read_tables(args.tables), close=args.close)
    print(text)
    if args.out:
        atomic_write(args.out, lambda p: p.write_text(text))
    return 0


# -- parser ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is printed: the
    registries it lists import torch (seconds, ~800 MB), which ``mixacm --help`` must not."""

    epilog_fn: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_fn is not None and self.epilog is None:
            self.epilog = self.epilog_fn()
        return super().format_help()


def _registry_epilog() -> str:
    """Registered names, so ``mixacm train --help`` shows what the config accepts."""
    try:
        from mixacm.methods import METHODS
        from mixacm.models import MODELS
    except ImportError:
        return ""
    return f"methods: {', '.join(METHODS.names())}\nmodels: {', '.join(MODELS.names())}"


def _add_costs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--costs", nargs="*", default=[], metavar="FILE",
                   help="training cost files: train_summary.json and Snakemake benchmark TSVs named "
                        "<...>/<run name>.tsv (a benchmark replaces its run's summary figure)")


def _add_config_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", metavar="CONFIG.yaml", help=f"the pipeline config the results came from: {what}")


def _add_tables_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tables", nargs="+", required=True, metavar="TABLE.csv",
                   help="table CSVs named table_<kind>.csv (mixacm table)")


def _add_model_and_data_arguments(p: argparse.ArgumentParser) -> None:
    """The model, test data and threat model of `evaluate` and `audit`: one definition."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="MODEL.pt", help="mixacm model file (mixacm train / teacher)")
    src.add_argument("--model-file", metavar="MODEL.pt2",
                     help="foreign model taking [0, 1] images, returning logits: a torch.export "
                          "program (torch.export.save, .pt2) or TorchScript (deprecated in torch)")
    p.add_argument("--dataset", required=True, choices=("cifar10", "cifar100", "imagenet", "imagefolder"),
                   help="dataset whose test split is used")
    p.add_argument("--data-root", metavar="DIR",
                   help="local data folder; default $MIXACM_DATA_<DATASET>, then the download folder")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR if missing")
    p.add_argument("--eps", required=True,
                   help="L-inf radius as a fraction of the [0, 1] range: 8/255 or 0.031")
    p.add_argument("--allow-large-eps", action="store_true", help="accept an --eps above 64/255")


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or auto") from None


def _add_train(sub, fmt) -> None:
    p = sub.add_parser("train", formatter_class=fmt, help="train one run from a run config",
                       description="Train one run (mixacm.train.train). OUT_DIR receives state.pt "
                                   "(resume point, every epoch), model.pt, metrics.jsonl and "
                                   "train_summary.json; re-running with the same config resumes.")
    p.epilog_fn = _registry_epilog
    p.add_argument("--config", required=True, metavar="RUN.yaml",
                   help="run config (docs/architecture.md, 'The run config'); '-' reads standard input")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder of the run")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, value parsed as YAML (e.g. optim.epochs=2, "
                        "method.eps=8/255); repeatable")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub, fmt) -> None:
    p = sub.add_parser("evaluate", formatter_class=fmt, help="clean / PGD / AutoAttack accuracy, one JSON",
                       description="Evaluate a model on the test split and write one result JSON "
                                   "with provenance (mixacm.evaluate). A mixacm model file or a "
                                   "foreign model that takes [0, 1] images: a torch.export program "
                                   "(.pt2) or a TorchScript file.")
    _add_model_and_data_arguments(p)
    p.add_argument("--attacks", default="clean,pgd20",
                   help="comma-separated: clean, pgd<K> (e.g. pgd20), autoattack, autoattack-apgd, "
                        "autoattack-rand (default: %(default)s)")
    p.add_argument("--n", type=int, default=None,
                   help="number of test points, class-balanced (default: the whole test split)")
    p.add_argument("--batch-size", type=_int_or_auto, default="auto",
                   help="evaluation batch size, or auto: 256 on the CPU, sized to the free memory on a GPU "
                        "(mixacm.evaluate.resolve_batch_size) (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="arithmetic of the attacks: fp32 (autocast off; TF32 where torch allows it on "
                        "Ampere+ GPUs, recorded) or bf16 autocast (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else 1, as in the pipeline's "
                        "jobs: torch's own default of one thread per core made PGD on a small "
                        "model about twice as slow on a busy 2-core machine; raise it for large "
                        "models on an idle machine)")
    p.add_argument("--out", required=True, metavar="RESULT.json", help="where the result JSON goes")
    p.add_argument("--run-info", metavar="JSON",
                   help="JSON object merged into the result's run section (method, arch, teacher, "
                        "data_fraction, seed, ...); default: the model file's metadata")
    p.add_argument("--state-file", metavar="PATH",
                   help="per-batch progress file; an interrupted evaluation resumes from it")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default: on)")
    p.set_defaults(func=cmd_evaluate)


def _add_audit(sub, fmt) -> None:
    p = sub.add_parser("audit", formatter_class=fmt, help="robustness audit: checks for gradient masking",
                       description="Audit a model on the evaluation's points (mixacm.audit): PGD with "
                                   "more steps and restarts, APGD-DLR and Square on a subset, transfer "
                                   "attacks from source models, an eps sweep; the per-point worst case "
                                   "is the 'audited' metric, failed checks are flags with reasons.")
    _add_model_and_data_arguments(p)
    p.add_argument("--source", action="append", default=[], metavar="NAME=MODEL.pt",
                   help="a model whose PGD-20 examples are transferred (e.g. teacher=..., at=...); repeatable")
    p.add_argument("--autoattack-result", metavar="RESULT.json",
                   help="the model's AutoAttack evaluation, for the PGD-20 vs AutoAttack check")
    p.add_argument("--settings", metavar="JSON",
                   help="audit settings over mixacm.audit.AUDIT_DEFAULTS, e.g. '{\"subset_n\": 200}'")
    p.add_argument("--n", type=int, default=None, help="points (default: settings n, 1000)")
    p.add_argument("--batch-size", type=_int_or_auto, default=None,
                   help="batch size, or auto (the rule of mixacm evaluate) (default: settings batch_size, 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--run-info", metavar="JSON", help="JSON object merged into the result's run section")
    p.add_argument("--out", required=True, metavar="AUDIT.json", help="where the audit result goes")
    p.set_defaults(func=cmd_audit)


def _add_sweep_figure(sub, fmt) -> None:
    p = sub.add_parser("sweep-figure", formatter_class=fmt, help="robust accuracy against eps (PNG)",
                       description="One line per audited row from audit results (mixacm audit), named "
                                   "as the tables name it: PGD accuracy at each multiple of eps, "
                                   "averaged over the row's files (its seeds) (mixacm.report.figures).")
    p.add_argument("--audits", nargs="*", default=[], metavar="AUDIT.json", help="audit result files")
    _add_config_argument(p, "the figure says so when it calls itself a smoke run")
    p.add_argument("--out", required=True, metavar="FIGURE.png", help="where the PNG goes")
    p.set_defaults(func=cmd_sweep_figure)


def _add_teacher(sub, fmt) -> None:
    p = sub.add_parser("teacher", formatter_class=fmt, help="fetch or import a robust teacher",
                       description="Write a teacher as a mixacm model file (mixacm.teachers): by "
                                   "RobustBench name, by URL with a required sha256, or from a "
                                   "local file. A wrong checksum or unreadable file leaves no file.")
    p.add_argument("--source-json", metavar="JSON",
                   help="the whole source as JSON (mixacm.teachers.acquire_teacher), e.g. "
                        "'{\"path\": \"resnet4b.pth\", \"arch\": \"resnet4b\"}'")
    p.add_argument("--robustbench", metavar="NAME", help="RobustBench model name, e.g. Carmon2019Unlabeled")
    p.add_argument("--threat-model", default="Linf", choices=("Linf", "L2"),
                   help="RobustBench threat model (default: %(default)s)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="RobustBench model folder: checkpoints at DIR/<dataset>/<threat model>/<name>.pt are "
                        "loaded without a download (default: $MIXACM_ROBUSTBENCH_DIR, else ./models)")
    p.add_argument("--url", help="download URL (needs --sha256)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the downloaded (or local) file")
    p.add_argument("--path", metavar="FILE", help="local model file or state dict")
    p.add_argument("--arch", help="project model the weights load into (mixacm.models), e.g. wrn-28-10")
    p.add_argument("--key", metavar="KEY",
                   help="entry of a foreign checkpoint that holds the weights (default: state_dict)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "imagenet"),
                   help="RobustBench dataset of the teacher (default: %(default)s)")
    p.add_argument("--normalization", metavar="none|MEAN/STD",
                   help="the network's input normalisation: none (it takes raw [0, 1] pixels) or "
                        "MEAN/STD per channel, e.g. 0.5,0.5,0.5/0.25,0.25,0.25 (default: the file's "
                        "RobustBench normaliser, else the architecture's)")
    p.add_argument("--stated-acc", type=float, metavar="PCT",
                   help="the clean accuracy (percent) the teacher should have (default: the file's "
                        "test_acc / clean_acc entry)")
    p.add_argument("--data-root", metavar="DIR",
                   help="test data for the accuracy check (default $MIXACM_DATA_<DATASET>; none: not run)")
    p.add_argument("--check-n", type=int, metavar="N", help="test points of the accuracy check (default 1000)")
    p.add_argument("--margin", type=float, metavar="PCT",
                   help="largest accepted |measured - stated| in points (default 3)")
    p.add_argument("--on-mismatch", choices=("refuse", "warn"),
                   help="beyond the margin: refuse (default, nothing written) or warn and record")
    p.add_argument("--out", required=True, metavar="TEACHER.pt", help="where the model file goes")
    p.set_defaults(func=cmd_teacher)


def _add_table(sub, fmt) -> None:
    p = sub.add_parser("table", formatter_class=fmt, help="one paper table (CSV) from result files",
                       description="Render one of the paper's tables, reproduced beside paper-reported "
                                   "numbers, from evaluation result JSONs (mixacm.report).")
    p.add_argument("--table", required=True, choices=("cifar10", "imagenet", "less_data", "ablation", "transfer"),
                   help="which table")
    p.add_argument("--results", nargs="*", default=[], metavar="RESULT.json",
                   help="evaluation result files of the table's runs (none: only cited rows)")
    _add_costs_argument(p)
    p.add_argument("--out", required=True, metavar="TABLE.csv", help="where the CSV goes")
    p.set_defaults(func=cmd_table)


def _add_figures(sub, fmt) -> None:
    p = sub.add_parser("figures", formatter_class=fmt, help="figures (PNG) from the table CSVs",
                       description="Less-data curve, clean against robust accuracy (one panel per "
                                   "setting, with the paper's points), training cost per row, and "
                                   "robust accuracy against training cost (mixacm.report.figures).")
    _add_tables_argument(p)
    _add_config_argument(p, "every figure says so when it calls itself a smoke run")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="folder for the PNG files")
    p.set_defaults(func=cmd_figures)


def _add_report(sub, fmt) -> None:
    p = sub.add_parser("report", formatter_class=fmt, help="the HTML report from tables and results",
                       description="Render report/paper_tables.html with jinja2 from the tables, "
                                   "figures and result files alone (mixacm.report).")
    _add_tables_argument(p)
    p.add_argument("--figures", nargs="*", default=[], metavar="FIGURE.png", help="figure files")
    p.add_argument("--results", nargs="*", default=[], metavar="RESULT.json",
                   help="result files, for each number's config, seed, attack, commit and cost")
    _add_costs_argument(p)
    p.add_argument("--teachers", nargs="*", default=[], metavar="TEACHER.pt",
                   help="teacher model files: their import accuracy checks get a section")
    _add_config_argument(p, "the report names it and shows its header comment (its scale; whether it is "
                            "a smoke run)")
    p.add_argument("--out", required=True, metavar="REPORT.html", help="where the HTML goes")
    p.set_defaults(func=cmd_report)


def _add_claims(sub, fmt) -> None:
    p = sub.add_parser("claims", formatter_class=fmt, help="the paper's claims checked on the tables",
                       description="Claims (a)-(d) of README.md (clean above AT, cost ratio, less "
                                   "data, loss ablation) from the cifar10, less_data and ablation "
                                   "table CSVs, as Markdown (mixacm.report.claims).")
    _add_tables_argument(p)
    p.add_argument("--close", type=float, default=2.0,
                   help="claim (a): robust accuracy at most this many points below AT's is 'close'")
    p.add_argument("--out", metavar="CLAIMS.md", help="also write the Markdown here")
    p.set_defaults(func=cmd_claims)


# One function a subcommand, in the order `mixacm --help` lists them.
SUBCOMMANDS = (_add_train, _add_evaluate, _add_audit, _add_sweep_figure, _add_teacher, _add_table, _add_figures,
               _add_report, _add_claims)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mixacm", formatter_class=fmt,
        description="MixACM benchmark: train students and teachers, evaluate robustness, render the "
                    "paper's tables. Each stage of the Snakemake workflow calls one subcommand.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="on bad input, show the full Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.traceback:
        return func(args)
    try:
        return func(args)
    except _input_errors() as err:
        print(f"mixacm {args.command}: error: {_message(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # `python -m mixacm.cli` (torchrun launches it this way)
    sys.exit(main())
