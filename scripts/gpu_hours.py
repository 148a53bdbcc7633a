"""The estimated GPU-hours of a pipeline config, per run and in total (mixacm.cost).

Prints what `snakemake -n` prints before its plan, then the Markdown table per run of
docs/benchmarks.md; with --write, replaces that table in the given file (between its
``<!-- gpu-hours: CONFIG -->`` and ``<!-- /gpu-hours -->`` markers) instead of printing it.

    python scripts/gpu_hours.py config/config.yaml
    python scripts/gpu_hours.py config/config.yaml --write docs/benchmarks.md

The config is validated against workflow/schemas/config.schema.yaml first, which fills in the
defaults, as the workflow does.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from mixacm.cost import markdown_table, summary

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load_pipeline_config(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(SCHEMA))
    return cfg


def section(config_name: str, table: str) -> str:
    return f"<!-- gpu-hours: {config_name} -->\n{table}\n<!-- /gpu-hours -->"


def replace_section(text: str, config_name: str, table: str) -> str:
    """``text`` with the table between the markers of ``config_name`` replaced; ValueError when
    the markers are missing."""
    pattern = re.compile(rf"<!-- gpu-hours: {re.escape(config_name)} -->\n(?:.*?\n)?<!-- /gpu-hours -->", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- gpu-hours: {config_name} --> ... <!-- /gpu-hours --> section")
    return pattern.sub(lambda _: section(config_name, table), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="a pipeline config, e.g. config/config.yaml")
    ap.add_argument("--write", type=Path, help="a Markdown file whose gpu-hours section to replace")
    args = ap.parse_args(argv)
    cfg = load_pipeline_config(args.config)
    table = markdown_table(cfg)
    print(summary(cfg))
    if args.write is None:
        print(table)
        return 0
    try:
        args.write.write_text(replace_section(args.write.read_text(), args.config.as_posix(), table))
    except (OSError, ValueError) as err:
        print(f"gpu_hours.py: error: {args.write}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
