"""The teachers' import records for the report: measured against stated clean accuracy.

``mixacm teacher`` stores an ``accuracy_check`` in each imported teacher's model file
(``mixacm.teachers.check_teacher_accuracy``); the report shows it per teacher, so a teacher that
lost accuracy on import (a second normalisation, a wrong architecture) is visible beside the
tables it feeds.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from mixacm.report.tables import ResultFileError
from mixacm.utils import portable_path


def teacher_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per teacher model file: file, architecture, source, stated / measured accuracy."""
    rows = []
    for path in paths:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ResultFileError(f"{path}: not a readable teacher model file ({type(exc).__name__})") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict):
            raise ResultFileError(f"{path}: not a mixacm model file (no meta)")
        meta, check = blob["meta"], blob["meta"].get("accuracy_check") or {}
        source = meta.get("teacher_source") or {}
        rows.append({
            "file": portable_path(path),
            "arch": (blob.get("model") or {}).get("name"),
            "source": source.get("path") or source.get("url") or source.get("robustbench")
            or ("trained in the workflow" if meta.get("role") != "teacher" else None),
            "normalization": source.get("normalization", "file / architecture default"),
            "stated_clean_acc_pct": check.get("stated_clean_acc_pct"),
            "stated_from": check.get("stated_from"),
            "measured_clean_acc_pct": check.get("measured_clean_acc_pct"),
            "n": check.get("n"),
            "margin_pct": check.get("margin_pct"),
            "status": check.get("status", "no import check"),
            "reason": check.get("reason"),
        })
    return rows
