"""Result files checked for internal consistency before a table, figure, report or claim uses them.

A result JSON (``mixacm evaluate`` / ``mixacm audit``, docs/architecture.md) states each number
twice: ``accuracy_pct`` and the counts it comes from. A hand-edited 99.0 beside 30 of 40, or a
fraction 0.75 written where a percentage belongs, is refused here, as are a schema this code does
not read, a missing provenance, an eps that disagrees with its text or with the attack's own, a
metric over other points than the file's, a data identity that is missing (schema 2) or counts
other images, and a JSON key written twice (``json`` keeps the last one silently). Every failure
is one ``ResultFileError`` line naming the file and the key.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from mixacm.utils import parse_eps

# 1: before the data identity (results written until 2026-12); 2: with ``data``.
RESULT_SCHEMAS = (1, 2)
# What a result's provenance must hold to say where and how its numbers were made.
PROVENANCE_KEYS = ("git_commit", "torch_version", "device", "wall_time_s")
# The number of classes of the datasets a result may name, and how its data source starts.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
DATASET_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}
# accuracy_pct is written as 100 * correct / n in full float precision.
PCT_TOLERANCE = 1e-6
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ResultFileError(ValueError):
    """A result, cost or paper-numbers file is missing or does not follow its documented format."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ResultFileError(f"key {key!r} is given twice in one object (JSON keeps only the last)")
        out[key] = value
    return out


def read_json(path: Path, what: str = "result file") -> Any:
    """A JSON file, refusing a key given twice in one object; errors name ``what`` and the file."""
    if not path.is_file():
        raise ResultFileError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ResultFileError(f"{what} {path}: not valid JSON ({err})") from None
    except ResultFileError as err:
        raise ResultFileError(f"{what} {path}: {err}") from None


def read_result_file(path: str | Path) -> dict[str, Any]:
    """Read a result JSON and check it (:func:`check_result`); returns the document."""
    path = Path(path)
    doc = read_json(path)
    problem = result_problem(doc)
    if problem:
        raise ResultFileError(f"result file {path}: {problem}")
    return doc


def check_result(doc: Any, path: str | Path) -> None:
    """``ResultFileError`` naming ``path`` and the key when ``doc`` contradicts itself."""
    problem = result_problem(doc)
    if problem:
        raise ResultFileError(f"result file {path}: {problem}")


def result_problem(doc: Any) -> str | None:
    """The first inconsistency of a result document, as ``"key: what is wrong"``, or None."""
    if not isinstance(doc, dict):
        return "top level is not a JSON object"
    if doc.get("schema") not in RESULT_SCHEMAS:
        return f"schema is {doc.get('schema')!r}; this code reads schema {' or '.join(map(str, RESULT_SCHEMAS))}"
    for check in (_eps_problem, _provenance_problem, _metrics_problem, _data_problem, _classes_problem):
        problem = check(doc)
        if problem:
            return problem
    return None


def _eps_problem(doc: Mapping[str, Any]) -> str | None:
    eps = doc.get("eps")
    if not _is_number(eps) or not 0 < eps <= 1:
        return f"eps = {eps!r} is not a fraction in (0, 1]"
    text = doc.get("eps_text")
    if text is not None:
        try:
            value = parse_eps(text)
        except ValueError:
            return f"eps_text = {text!r} is not an eps"
        if abs(value - eps) > 1e-9:
            return f"eps_text = {text!r} is {value:.6g}, but eps = {eps!r}"
    return None


def _provenance_problem(doc: Mapping[str, Any]) -> str | None:
    prov = doc.get("provenance")
    if not isinstance(prov, dict):
        return "provenance is missing: a number without the commit, torch version and device it came from"
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing:
        return f"provenance.{missing[0]} is missing (a result records {', '.join(PROVENANCE_KEYS)})"
    if not _is_number(prov["wall_time_s"]) or prov["wall_time_s"] < 0:
        return f"provenance.wall_time_s = {prov['wall_time_s']!r} is not a duration in seconds"
    return None


def _metrics_problem(doc: Mapping[str, Any]) -> str | None:
    metrics = doc.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return "'metrics' is missing or empty"
    total = doc.get("n")
    if total is not None and (not _is_count(total) or total <= 0):
        return f"n = {total!r} is not a positive integer"
    for key, m in metrics.items():
        where = f"metrics.{key}"
        if not isinstance(m, dict):
            return f"{where} is not an object"
        acc, n, correct = m.get("accuracy_pct"), m.get("n"), m.get("correct")
        if not _is_number(acc) or not 0 <= acc <= 100:
            return f"{where}.accuracy_pct = {acc!r} is not a percentage in [0, 100]"
        if not _is_count(n) or n <= 0:
            return f"{where}.n = {n!r} is not a positive integer"
        if not _is_count(correct) or not 0 <= correct <= n:
            return f"{where}.correct = {correct!r} is not an integer in [0, n = {n}]"
        expected = 100.0 * correct / n
        if abs(acc - expected) > PCT_TOLERANCE:
            hint = " (a fraction where a percentage belongs?)" if abs(acc - correct / n) <= PCT_TOLERANCE else ""
            return (f"{where}.accuracy_pct = {acc!r}, but correct / n = {correct} / {n} = {expected:.6g} %"
                    f"{hint}")
        if total is not None and n != total:
            return f"{where}.n = {n}, but the result is over n = {total} points"
        attack = m.get("attack")
        if not isinstance(attack, dict) or not attack.get("name") or not attack.get("package"):
            return f"{where}.attack must be an object with 'name' and 'package'"
        if "eps" in attack and (not _is_number(attack["eps"]) or abs(attack["eps"] - doc["eps"]) > 1e-9):
            return f"{where}.attack.eps = {attack['eps']!r}, but the result's eps = {doc['eps']!r}"
    return None


def _data_problem(doc: Mapping[str, Any]) -> str | None:
    data = doc.get("data")
    if doc["schema"] < 2 and data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) or not _HEX64.fullmatch(data["sha256"]):
        return "data.sha256 is missing: the identity of the evaluated images (schema 2)"
    total = doc.get("n")
    if total is not None and data.get("images") != total:
        return f"data.images = {data.get('images')!r}, but the result is over n = {total} points"
    return None


def _classes_problem(doc: Mapping[str, Any]) -> str | None:
    run = doc.get("run") if isinstance(doc.get("run"), dict) else {}
    dataset = run.get("dataset")
    if dataset not in DATASET_CLASSES:
        return None
    source = run.get("data_source")
    if isinstance(source, str) and source.split(" (")[0] != DATASET_PRETTY[dataset]:
        return f"run.data_source = {source!r} is not {DATASET_PRETTY[dataset]}, but run.dataset = {dataset!r}"
    check = doc.get("model_check")
    if isinstance(check, dict) and check.get("num_classes") not in (None, DATASET_CLASSES[dataset]):
        return (f"model_check.num_classes = {check['num_classes']!r}, but {DATASET_PRETTY[dataset]} has "
                f"{DATASET_CLASSES[dataset]} classes")
    return None


def check_same_test_points(rows: list[Mapping[str, Any]]) -> None:
    """Results of one dataset over the same number of points were evaluated on the same images.

    Every evaluation takes the first ``n`` class-balanced points of the test split, so two result
    files of one dataset and one ``n`` with different ``data_sha256`` were evaluated on different
    data (two data folders, a re-encoded copy): a table mixing them compares numbers of different
    test sets. Rows are ``collect_results``' (``dataset``, ``n``, ``data_sha256``, ``file``);
    schema 1 rows (no identity) are not compared."""
    seen: dict[tuple[Any, Any], Mapping[str, Any]] = {}
    for row in rows:
        if row.get("data_sha256") is None:
            continue
        first = seen.setdefault((row["dataset"], row["n"]), row)
        if first["data_sha256"] != row["data_sha256"]:
            raise ResultFileError(
                f"result files {first['file']} and {row['file']} evaluate {row['n']} {row['dataset']} test "
                f"points, but on different images (data.sha256 {first['data_sha256'][:12]}... vs "
                f"{row['data_sha256'][:12]}...): were they evaluated on two data folders?")


def check_train_summary(summary: Any, path: str | Path) -> None:
    """A training summary's cost figures agree with each other (``ResultFileError`` otherwise):
    ``device_hours`` = ``wall_time_s`` x devices / 3600, ``images_per_s`` = ``images`` /
    ``train_time_s``, none negative."""
    where = f"training summary {path}"
    if not isinstance(summary, dict):
        raise ResultFileError(f"{where}: top level is not a JSON object")
    for key in ("wall_time_s", "train_time_s", "device_hours", "images", "images_per_s", "epochs", "steps"):
        value = summary.get(key)
        if value is not None and (not _is_number(value) or value < 0):
            raise ResultFileError(f"{where}: {key} = {value!r} is not a non-negative number")
    wall, dh, devices = summary.get("wall_time_s"), summary.get("device_hours"), summary.get("world_size")
    if _is_number(wall) and _is_number(dh) and _is_count(devices) and devices > 0:
        if abs(dh - wall * devices / 3600) > 1e-6 * max(1.0, dh):
            raise ResultFileError(f"{where}: device_hours = {dh!r}, but wall_time_s x world_size / 3600 = "
                                  f"{wall * devices / 3600:.6g}")
    images, t, rate = summary.get("images"), summary.get("train_time_s"), summary.get("images_per_s")
    if _is_number(images) and _is_number(t) and t > 0 and _is_number(rate):
        if abs(rate - images / t) > 1e-6 * max(1.0, rate):
            raise ResultFileError(f"{where}: images_per_s = {rate!r}, but images / train_time_s = {images / t:.6g}")
