"""Inputs of a pipeline config checked before any job: data roots, teacher files, what the
data folders say about themselves, and the packages a RobustBench teacher needs.

A wrong data root used to fail inside a training job, minutes into a run, in a job log, naming
the run-config key ``dataset.root``. :func:`pipeline_input_errors` finds every such problem at
once, without loading any data, and names the pipeline's own keys (``data.cifar10.root``,
``teachers.cifar10.path``). The workflow calls :func:`check_pipeline_inputs` before its first job
(``onstart``: real runs only, a dry run needs no data), then :func:`check_pipeline_data`, which
reads the data (``mixacm.data.verify_dataset``: every image checked, splits compared), and
:func:`robustbench_errors` while it reads the config (dry runs too: a missing package is no data,
and the plan is worthless without it); all plain Python, callable from a test or a notebook with
the config dict.
"""
from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}
# torchvision's folder inside a root that holds its files (datasets it can download).
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class PipelineInputError(ValueError):
    """One or more inputs of the pipeline config are missing; one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("inputs of the config are missing or wrong:\n" + "\n".join(f"  - {e}" for e in errors))


def env_var(dataset: str) -> str:
    return f"MIXACM_DATA_{dataset.upper()}"


def datasets_used(cfg: Mapping) -> list[str]:
    """Datasets whose data some job reads: every experiment's, and those of teachers trained in the DAG."""
    used = [exp["dataset"] for exp in cfg.get("experiments", {}).values() if exp.get("recipes")]
    used += [ds for ds, t in cfg.get("teachers", {}).items() if t.get("source") == "train"]
    return sorted(set(used))


def _has_data(dataset: str, root: Path) -> bool:
    """An image folder (``train/<class>/`` and ``test/`` or ``val/``) or torchvision's files."""
    train = root / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()) and (
            (root / "test").is_dir() or (root / "val").is_dir()):
        return True
    folder = TORCHVISION_FOLDERS.get(dataset)
    return folder is not None and (root / folder).is_dir()


def _layout(dataset: str) -> str:
    text = "an image folder (train/<class>/<image> and test/ or val/)"
    if dataset in TORCHVISION_FOLDERS:
        text += f" or torchvision's files ({TORCHVISION_FOLDERS[dataset]}/)"
    return text


def data_error(dataset: str, section: Mapping | None, env: Mapping[str, str] | None = None) -> str | None:
    """Why the data of ``dataset`` cannot be found under the pipeline config's ``data.<dataset>``
    section, or None when it can (or torchvision may download it)."""
    from mixacm.data import default_data_dir

    env = os.environ if env is None else env
    section = section or {}
    key = f"data.{dataset}.root"
    pretty = PRETTY.get(dataset, dataset)
    download = bool(section.get("download", False)) and dataset in TORCHVISION_FOLDERS
    if section.get("root"):
        root, origin = Path(str(section["root"])).expanduser(), f"{key}"
    elif env.get(env_var(dataset)):
        root, origin = Path(env[env_var(dataset)]).expanduser(), f"${env_var(dataset)} ({key} is not set)"
    else:
        if download:
            return None
        root = default_data_dir(dataset)
        if _has_data(dataset, root):
            return None
        how = f"set {key} (or ${env_var(dataset)}) to a local copy of {pretty}"
        if dataset in TORCHVISION_FOLDERS:
            how += f", or set data.{dataset}.download: true to let torchvision download it (needs internet)"
        return (f"{key}: no {pretty} data: {key} and ${env_var(dataset)} are not set and the default "
                f"folder {root} holds none. {how[0].upper()}{how[1:]}.")
    if not root.exists():
        return f"{origin}: {root} does not exist. Point it at {_layout(dataset)} of {pretty}."
    if not root.is_dir():
        return f"{origin}: {root} is not a folder. Point it at {_layout(dataset)} of {pretty}."
    if _has_data(dataset, root) or download:
        return None
    return f"{origin}: {root} holds no {pretty} data: expected {_layout(dataset)}."


def teacher_errors(cfg: Mapping, datasets: Iterable[str] | None = None) -> list[str]:
    """A sentence for each teacher file the config names that does not exist (of ``datasets``'
    teachers only, when given)."""
    errors = []
    for ds, teacher in cfg.get("teachers", {}).items():
        if datasets is not None and ds not in datasets:
            continue
        if teacher.get("source") == "file":
            path = Path(str(teacher.get("path", ""))).expanduser()
            if not path.is_file():
                errors.append(f"teachers.{ds}.path: teacher file {path} does not exist.")
    return errors


# The optional dependencies of RobustBench teachers (pyproject.toml's `robustbench` extra) and the
# install line that works from a checkout: mixacm is not on PyPI, and a bare `pip install
# robustbench` does not import (robustbench 1.1.1 needs pkg_resources, gone from setuptools >= 81).
ROBUSTBENCH_EXTRA = "robustbench"
ROBUSTBENCH_INSTALL = "pip install -e '.[robustbench]'"


def missing_extra(extra: str, version: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The requirements of mixacm's optional dependency group ``extra`` (its installed metadata,
    i.e. pyproject.toml) that this environment does not meet, each as ``"<requirement> (not
    installed | found <version>)"``; empty when all are met. ``version`` looks up an installed
    distribution's version (``importlib.metadata.version``; raises PackageNotFoundError)."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("mixacm") or []
    except importlib.metadata.PackageNotFoundError:
        return ["mixacm (not installed)"]
    missing = []
    for line in declared:
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker) or not req.marker.evaluate({"extra": extra}):
            continue
        try:
            found = version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{req.name}{req.specifier} (not installed)")
            continue
        if not req.specifier.contains(found, prereleases=True):
            missing.append(f"{req.name}{req.specifier} (found {found})")
    return missing


def robustbench_teachers(cfg: Mapping) -> list[str]:
    """The config keys of the teacher blocks that load a RobustBench model by name: the
    datasets' (``teachers.<dataset>``) and the recipes' own (``recipes.<name>.teacher``)."""
    blocks = [(f"teachers.{ds}", t) for ds, t in cfg.get("teachers", {}).items()]
    blocks += [(f"recipes.{name}.teacher", r["teacher"]) for name, r in cfg.get("recipes", {}).items()
               if r.get("teacher")]
    return [key for key, block in blocks if block.get("source") == "robustbench"]


def robustbench_errors(cfg: Mapping, version: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """A sentence naming the first RobustBench teacher of ``cfg`` when the ``robustbench`` extra
    is not installed here (what is missing, and the install line); empty otherwise."""
    keys = robustbench_teachers(cfg)
    missing = missing_extra(ROBUSTBENCH_EXTRA, version) if keys else []
    if not missing:
        return []
    also = f" (and {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return [f"{keys[0]}.source{also}: a RobustBench teacher needs the `{ROBUSTBENCH_EXTRA}` extra, "
            f"missing here: {'; '.join(missing)}. Install it from the checkout with {ROBUSTBENCH_INSTALL} "
            "(a bare `pip install robustbench` does not import)."]


def pipeline_input_errors(cfg: Mapping, env: Mapping[str, str] | None = None,
                          datasets: Iterable[str] | None = None) -> list[str]:
    """Every missing input of a (schema-validated) pipeline config, one sentence each naming its
    pipeline key (the robustbench extra included); empty when all are there. ``datasets`` limits the check to the datasets the
    jobs about to run use (a run of the CIFAR-10 table needs no ImageNet). Relative paths are
    taken from the working directory (Snakemake's: the checkout)."""
    wanted = set(datasets_used(cfg)) if datasets is None else set(datasets) & set(datasets_used(cfg))
    errors = [e for ds in sorted(wanted)
              if (e := data_error(ds, cfg.get("data", {}).get(ds), env)) is not None]
    return errors + teacher_errors(cfg, None if datasets is None else set(datasets)) + robustbench_errors(cfg)


def check_pipeline_inputs(cfg: Mapping, env: Mapping[str, str] | None = None,
                          datasets: Iterable[str] | None = None) -> None:
    """Raise :class:`PipelineInputError` listing every missing input, before any job runs."""
    errors = pipeline_input_errors(cfg, env, datasets)
    if errors:
        raise PipelineInputError(errors)


def pipeline_data_errors(cfg: Mapping, datasets: Iterable[str] | None = None) -> list[str]:
    """What the data folders of a (schema-valid) pipeline config say against themselves, one
    sentence each naming ``data.<dataset>.root``: :func:`mixacm.data.verify_dataset` on each
    dataset the jobs read (every image of a folder of small images decoded and checked once, into
    the cache the jobs then read; class folders; images shared by the splits). Call it once
    :func:`pipeline_input_errors` finds the data; it reads it."""
    from mixacm.data import DataError, verify_dataset

    wanted = set(datasets_used(cfg)) if datasets is None else set(datasets) & set(datasets_used(cfg))
    errors = []
    for ds in sorted(wanted):
        section = cfg.get("data", {}).get(ds) or {}
        try:
            verify_dataset(ds, section.get("root") or None, download=bool(section.get("download", False)),
                           cache=bool(section.get("cache", True)))
        except (DataError, ValueError) as err:
            errors.append(f"data.{ds}.root: {' '.join(str(err).split())}")
    return errors


def check_pipeline_data(cfg: Mapping, datasets: Iterable[str] | None = None) -> None:
    """Raise :class:`PipelineInputError` listing what :func:`pipeline_data_errors` finds."""
    errors = pipeline_data_errors(cfg, datasets)
    if errors:
        raise PipelineInputError(errors)
