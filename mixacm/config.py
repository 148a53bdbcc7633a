"""The run config of one training run: defaults, validation and the resolved optimiser recipe.

The schema lives in ``mixacm/schemas/run_config.schema.yaml`` (JSON schema written as YAML, with
the defaults in it). ``load_run_config`` fills the defaults, validates with ``jsonschema`` and
converts the selection eps (``"8/255"``) to a float once, here at the boundary. Errors are
``ConfigError`` naming the key path, e.g. ``optim.lr: -1 is less than the minimum of 0``.

Method knobs are checked by the method class (``Method.resolve``: unknown knob or bad value ->
error naming it). ``resolve_recipe`` merges ``optim`` over the method's official recipe for the
dataset over the schema's recipe defaults (``$defs/recipe``).

The pipeline config (``workflow/schemas/config.schema.yaml``, validated with its defaults by the
Snakefile) meets the package here and only here: ``pipeline_run_config`` turns one of its recipes
into a run config, ``check_pipeline_recipe`` validates that run config as ``mixacm train`` will
(errors keyed by the pipeline config's key), ``teacher_source`` turns a ``teachers.<dataset>``
block into ``mixacm.teachers.acquire_teacher``'s form.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema

from mixacm.utils import YAMLFileError, config_hash, load_yaml, parse_linf_eps

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "run_config.schema.yaml"

RECIPE_REQUIRED = ("epochs", "batch_size", "lr")

# Keys that do not change what is trained: left out of the config hash so that renaming a run,
# silencing progress bars or moving it to another device does not block its resume. CUDA graphs
# replay the eager step's kernels: bit-equal to it in bf16 on an H200, and an fp32 eager step is
# not bit-reproducible itself (tests/test_graphs.py, docs/benchmarks.md).
_HASH_EXCLUDED = (("name",), ("device",), ("train", "progress"), ("train", "log_every"),
                  ("train", "num_workers"), ("train", "cuda_graphs"))


# How a config gets past the eps sanity bound (mixacm.utils.parse_linf_eps): it does not.
_EPS_IN_CONFIGS = "configs stay within it (write eps as a fraction of the pixel range, e.g. 8/255)"


class ConfigError(ValueError):
    """An invalid run config; the message names the offending key path."""


@lru_cache(maxsize=1)
def run_config_schema() -> dict:
    return load_yaml(SCHEMA_PATH)


def _with_defaults(validator_class: type) -> type:
    """A validator that writes each property's ``default`` into the instance before checking it.

    Parent defaults (``{}``) are set first, so nested defaults are filled in the same pass: the
    recipe from the ``jsonschema`` FAQ.
    """
    check_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key_path(path, prefix: tuple = ()) -> str:
    return ".".join(str(p) for p in (*prefix, *path)) or "(top level)"


def _describe(error: jsonschema.ValidationError, prefix: tuple = ()) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        unknown = [k for k in error.instance if k not in allowed]
        names = ", ".join(_key_path((*error.absolute_path, k), prefix) for k in unknown)
        return f"{names}: unknown key(s); valid keys here: {', '.join(allowed)}"
    return f"{_key_path(error.absolute_path, prefix)}: {error.message}"


def validate(instance: dict, schema: Mapping[str, Any], what: str = "run config", prefix: tuple = ()) -> None:
    """Validate (filling defaults in place); all problems in one ``ConfigError``.

    ``prefix`` is prepended to key paths when ``instance`` is a part of a larger config.
    """
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [_describe(e, prefix) for e in errors]
        raise ConfigError(lines[0] if len(lines) == 1 else f"{what}: " + "; ".join(lines))


def _read(source: str | os.PathLike | Mapping[str, Any]) -> dict:
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read run config {path}: {err.strerror or err}") from None
    return parse_run_config(text, str(path))


def parse_run_config(text: str, where: str) -> dict:
    """The mapping in a run config's YAML text; ``where`` names its origin in errors."""
    try:
        data = load_yaml(where, text=text)
    except YAMLFileError as err:  # a syntax error, or a key given twice (line numbers of both)
        raise ConfigError(f"run config {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"run config {where} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_run_config(source: str | os.PathLike | Mapping[str, Any]) -> dict:
    """Read (a YAML file or a dict), fill defaults, validate; return a new, complete config."""
    cfg = _read(source)
    validate(cfg, run_config_schema())
    try:
        cfg["train"]["selection_eps"] = parse_linf_eps(cfg["train"]["selection_eps"], beyond=_EPS_IN_CONFIGS)
    except ValueError as err:
        raise ConfigError(f"train.selection_eps: {err}") from None
    if cfg["train"]["selection"] == "best_pgd" and cfg["dataset"]["holdout"] < 1:
        raise ConfigError(
            "train.selection: best_pgd scores a holdout split each epoch; set dataset.holdout > 0 "
            "(e.g. 1000) or use selection: last"
        )
    _check_model(cfg)
    _check_method(cfg)
    if cfg["name"] is None:
        cfg["name"] = f"{cfg['dataset']['name']}/{cfg['method']['name']}/{cfg['model']['name']}/seed{cfg['seed']}"
    return cfg


def _check_model(cfg: dict) -> None:
    from mixacm.models import MODELS

    if cfg["model"]["name"] not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg['model']['name']!r}; valid: {', '.join(MODELS.names())}")


def method_class(cfg: Mapping[str, Any]) -> type:
    from mixacm.methods import METHODS

    name = cfg["method"]["name"]
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; valid: {', '.join(METHODS.names())}")
    return METHODS.get(name)


def method_knobs(cfg: Mapping[str, Any]) -> dict:
    """The method's knobs as given in the config (everything in ``method`` but ``name``)."""
    return {k: v for k, v in cfg["method"].items() if k != "name"}


def check_recipe_exists(cls: type, dataset: str) -> None:
    """``ConfigError`` naming the method and the dataset when the method has no recipe for it."""
    datasets = getattr(cls, "recipe_datasets", None)
    if callable(datasets) and dataset not in datasets():
        have = ", ".join(datasets()) or "none"
        raise ConfigError(
            f"method.name: method {cls.name!r} has no recipe for dataset {dataset!r} (it has recipes for: "
            f"{have}); no other dataset's recipe is used in its place"
        )


def _check_method(cfg: dict) -> None:
    cls = method_class(cfg)
    dataset = cfg["dataset"]["name"]
    check_recipe_exists(cls, dataset)
    resolve = getattr(cls, "resolve", None)
    if callable(resolve):
        # The class validates its own knobs: unknown names and out-of-range values, by name.
        try:
            resolve(method_knobs(cfg), dataset=dataset)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"method: {err}") from None
    if getattr(cls, "needs_teacher", False) and not cfg["teacher"]:
        raise ConfigError(
            f"teacher: method {cfg['method']['name']!r} needs a teacher model file "
            "(write one with `mixacm teacher`)"
        )
    if cfg["train"]["cuda_graphs"] is not False and not getattr(cls, "supports_cuda_graphs", False):
        raise ConfigError(f"train.cuda_graphs: method {cfg['method']['name']!r} does not support CUDA graphs "
                          "(its network calls change shape or run inside an attack loop); set it to false")
    if cfg["train"]["cuda_graphs"] is not False and cfg["model"]["kwargs"].get("dropout", 0):
        raise ConfigError("train.cuda_graphs: the student uses dropout (model.kwargs.dropout); a CUDA graph "
                          "would replay one dropout mask every step")
    _check_feature_names(cfg, cls)


def _check_feature_names(cfg: dict, cls: type) -> None:
    """Knobs naming features the student or the teacher lacks (MixACM's block pairs), checked
    from the architectures alone; the teacher's is read from its model file when it exists."""
    check = getattr(cls, "check_feature_names", None)
    teacher = cfg["teacher"]
    if not callable(check) or not getattr(cls, "needs_teacher", False) or not teacher or not Path(teacher).is_file():
        return
    import torch

    from mixacm.distill import arch_feature_names

    try:
        spec = torch.load(teacher, map_location="cpu", weights_only=True, mmap=True)["model"]
        t_names = arch_feature_names(spec["name"], spec.get("num_classes", 10), **spec.get("kwargs", {}))
    except Exception:  # not a readable model file: loading the teacher reports it, by file name
        return
    s_names = arch_feature_names(cfg["model"]["name"], **cfg["model"]["kwargs"])
    try:
        check(method_knobs(cfg), s_names, t_names)
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None


def _method_recipe(cfg: Mapping[str, Any], method: Any = None) -> dict:
    dataset = cfg["dataset"]["name"]
    if method is None:
        cls = method_class(cfg)
        if isinstance(inspect.getattr_static(cls, "recipe_for", None), (classmethod, staticmethod)):
            return dict(cls.recipe_for(dataset))
        # recipe_for may depend on the knobs (Free-AT: epochs = budget / replays) but never on
        # the networks, so a knobs-only instance answers it without building any model.
        check_recipe_exists(cls, dataset)
        method = cls.__new__(cls)
        method.dataset = dataset
        method.knobs = cls.resolve(method_knobs(cfg), dataset=dataset)
    recipe_for = getattr(method, "recipe_for", None)
    return dict(recipe_for(dataset) if callable(recipe_for) else getattr(method, "recipe", {}))


def resolve_recipe(cfg: Mapping[str, Any], method: Any = None) -> dict:
    """The optimiser recipe a run uses: the schema's defaults (``$defs/recipe``) < the method's
    recipe for the dataset < ``optim``.

    ``method`` is the constructed method when the caller has one (its recipe may depend on its
    knobs). Keys the optimiser does not use (e.g. a recipe's ``replays``) are dropped here; the
    method keeps its own copy.
    """
    defs = run_config_schema()["$defs"]
    recipe = {k: v for k, v in _method_recipe(cfg, method).items() if k in defs["recipe_keys"]["properties"]}
    merged = {**recipe, **cfg["optim"]}
    _check_optim_is_used(cfg["optim"], merged.get("schedule", "step"))
    missing = [k for k in RECIPE_REQUIRED if k not in merged]
    if missing:
        raise ConfigError(
            f"optim.{missing[0]}: method {cfg['method']['name']!r} has no recipe value for "
            f"{', '.join(missing)} on {cfg['dataset']['name']}; set it under optim"
        )
    # The schema's $defs/recipe fills in the defaults (momentum, schedule, ...) while validating.
    validate(merged, {"$defs": defs, "$ref": "#/$defs/recipe"}, what="resolved recipe", prefix=("optim",))
    merged["milestones"] = sorted(float(m) for m in merged["milestones"])
    if merged["schedule"] == "piecewise":
        points = [(float(f), float(v)) for f, v in merged["lr_points"]]
        if len(points) < 2 or points[0][0] != 0.0 or points[-1][0] != 1.0 or any(
                b[0] <= a[0] for a, b in zip(points, points[1:])):
            raise ConfigError(
                "optim.lr_points: the piecewise schedule needs [fraction, lr factor] points with fractions "
                f"increasing from 0 to 1, got {merged['lr_points']!r}"
            )
    _check_method_recipe(cfg, method, merged)
    return merged


def _check_method_recipe(cfg: Mapping[str, Any], method: Any, recipe: Mapping[str, Any]) -> None:
    """The method's own check of its knobs against the resolved recipe (``Method.check_recipe``:
    e.g. a phase that would start after the last epoch), as a ConfigError naming the knob. A
    budget in ``steps`` fixes the epochs only once the data is known: the method checks again
    when training starts."""
    cls = type(method) if method is not None else method_class(cfg)
    check = getattr(cls, "check_recipe", None)
    if not callable(check) or recipe.get("steps"):
        return
    try:
        knobs = method.knobs if method is not None else cls.resolve(method_knobs(cfg), dataset=cfg["dataset"]["name"])
        check(knobs, dict(recipe))
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None


# Optimiser settings only one schedule reads (mixacm.train.make_lr_scheduler).
_SCHEDULE_KEYS = {"milestones": "step", "gamma": "step", "lr_peak": "cyclic", "lr_points": "piecewise"}


def _check_optim_is_used(optim: Mapping[str, Any], schedule: str) -> None:
    """``optim`` (what the user wrote) must not hold a setting the run would drop: a schedule
    setting another schedule reads, or ``epochs`` beside ``steps`` (the budget decides)."""
    if optim.get("steps") is not None and "epochs" in optim:
        raise ConfigError("optim.epochs: optim.steps is set too, and a budget in steps decides the epochs; "
                          "give one of them")
    for key, reader in _SCHEDULE_KEYS.items():
        if key in optim and schedule != reader:
            raise ConfigError(f"optim.{key}: only the {reader} schedule reads it, and this run's schedule is "
                              f"{schedule!r}; drop it, or set optim.schedule: {reader}")


def recipe_record(cfg: Mapping[str, Any], method: Any, recipe: Mapping[str, Any]) -> dict:
    """What a run records of its recipe: the resolved optimiser settings, the recipe's source, the
    keys ``optim`` overrode, Free-AT's replays, and the checkpoint selection."""
    dataset = cfg["dataset"]["name"]
    try:
        declared = type(method).base_recipe(dataset)
    except (AttributeError, ValueError):
        declared = {}
    record = dict(recipe)
    record["dataset"] = dataset
    record["source"] = declared.get("source") or None
    record["overrides"] = sorted(cfg["optim"])
    if getattr(method, "replays", 1) != 1:
        record["replays"] = int(method.replays)
    record["selection"] = cfg["train"]["selection"]
    return record


def run_config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes what is trained (not the name, device or progress bars)."""
    cfg = copy.deepcopy(dict(cfg))
    for path in _HASH_EXCLUDED:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return config_hash(cfg)


# ----------------------------------------------------------------------------- the pipeline config
# The workflow validates its config against workflow/schemas/config.schema.yaml (which fills in
# the defaults) before any job; the functions below read that validated config and are the one
# place where a recipe of it becomes a run config.


def pipeline_run_config(pipeline: Mapping[str, Any], *, dataset: str, recipe: str, arch: str,
                        fraction: float = 1.0, seed: int = 0, teacher: str | None = None,
                        name: str | None = None) -> dict:
    """The run config (``mixacm train --config``) of one training run of the pipeline config.

    ``pipeline`` is the validated pipeline config; ``recipe`` names an entry of its ``recipes``
    (a method, its knobs, ``optim`` overrides and ``train`` settings); ``dataset`` selects
    ``data.<dataset>``. Only what the pipeline sets is written: everything else takes the run
    config schema's defaults when ``load_run_config`` reads it. Progress bars are off (job logs).
    """
    r = pipeline["recipes"][recipe]
    data = pipeline["data"][dataset]
    return {
        "name": name,
        "seed": int(seed),
        "device": pipeline["device"],
        "dataset": {
            "name": dataset, "root": data["root"], "download": data["download"], "fraction": float(fraction),
            "subset_seed": data["subset_seed"], "holdout": data["holdout"], "cache": data["cache"], "augment": True,
        },
        "model": {"name": arch, "kwargs": {}},
        "teacher": teacher,
        "method": {"name": r["method"], **r["knobs"]},
        "optim": dict(r["optim"]),
        "train": {"progress": False, **r["train"]},
    }


def experiment_runs(pipeline: Mapping[str, Any], name: str) -> list[tuple[str, str, str, float, int]]:
    """(dataset, recipe, arch, fraction, seed) of every training run behind experiment ``name``
    of the validated pipeline config (none when it has no such experiment): each recipe at each
    of its fractions (``recipe_fractions`` over ``fractions``) and seeds (``recipe_seeds`` over
    the experiment's ``seeds`` over the config's)."""
    exp = pipeline["experiments"].get(name)
    if exp is None:
        return []
    seeds = exp.get("seeds", pipeline["seeds"])
    recipe_seeds = exp.get("recipe_seeds", {})
    recipe_fractions = exp.get("recipe_fractions", {})
    return [
        (exp["dataset"], recipe, exp["arch"], fraction, seed)
        for recipe in exp["recipes"]
        for fraction in recipe_fractions.get(recipe, exp["fractions"])
        for seed in recipe_seeds.get(recipe, seeds)
    ]


def evaluated_runs(pipeline: Mapping[str, Any], name: str, key: str) -> list[tuple[str, str, str, float, int]]:
    """The runs of experiment ``name`` that get evaluation ``key``: "autoattack"
    (``experiments.<name>.autoattack``, default true) or "audit" (``experiments.<name>.audit``,
    default true for ``experiments.cifar10``, the main comparison, false otherwise). true: every
    run; false: none; a list: the runs of those recipes."""
    exp = pipeline["experiments"].get(name) or {}
    value = exp.get(key, True if key == "autoattack" else name == "cifar10")
    runs = experiment_runs(pipeline, name)
    if isinstance(value, bool):
        return runs if value else []
    return [run for run in runs if run[1] in value]


# Where a run config key comes from in the pipeline config's recipe.
_RECIPE_KEYS = {"method": "knobs", "optim": "optim", "train": "train"}


def training_gpus(pipeline: Mapping[str, Any], dataset: str) -> int:
    """GPUs (processes) of a training job of ``dataset`` in the pipeline config (at least 1)."""
    return max(1, int(pipeline.get("resources", {}).get(dataset, {}).get("train", {}).get("gpu", 1) or 1))


def check_pipeline_recipe(pipeline: Mapping[str, Any], recipe: str, *, dataset: str, arch: str,
                          teacher: str | None = None) -> dict:
    """Validate recipe ``recipe`` for ``dataset`` and ``arch`` exactly as ``mixacm train`` will
    (run config schema, the method's knobs, the resolved optimiser recipe); errors name the
    pipeline config's key (``recipes.<name>.knobs``, ``recipes.<name>.optim.lr``, ...).
    Returns the complete run config."""
    cfg = pipeline_run_config(pipeline, dataset=dataset, recipe=recipe, arch=arch, teacher=teacher)
    try:
        cfg = load_run_config(cfg)
        resolve_recipe(cfg)
        gpus = training_gpus(pipeline, dataset)
        if cfg["train"]["cuda_graphs"] is True and gpus > 1:
            raise ConfigError(f"train.cuda_graphs: one process only, but resources.{dataset}.train.gpu is {gpus} "
                              "(DDP's gradient hooks are not captured)")
    except ConfigError as err:
        msg = str(err)
        head, _, rest = msg.partition(":")
        top, _, sub = head.partition(".")
        if top in _RECIPE_KEYS and " " not in head:
            key = f"recipes.{recipe}.{_RECIPE_KEYS[top]}" + (f".{sub}" if sub and top != "method" else "")
            raise ConfigError(f"{key}:{rest}") from None
        raise ConfigError(f"recipes.{recipe} ({dataset}, {arch}): {msg}") from None
    return cfg


def check_recipe_block(pipeline: Mapping[str, Any], recipe: str) -> None:
    """Validate recipe ``recipe`` of a pipeline config without a dataset or architecture (for
    recipes no experiment trains): the method is registered, its knobs resolve, and ``optim`` /
    ``train`` hold what the run config's schema allows there (their one declaration). Errors
    name the pipeline key (``recipes.<name>.optim.lr``)."""
    from mixacm.methods import METHODS

    block = pipeline["recipes"][recipe]
    try:
        cls = METHODS.get(block["method"])
    except KeyError as err:
        raise ConfigError(f"recipes.{recipe}.method: {err.args[0]}") from None
    try:
        cls.resolve(dict(block.get("knobs", {})))
    except (ValueError, KeyError) as err:
        raise ConfigError(f"recipes.{recipe}.knobs: {err}") from None
    schema = run_config_schema()
    parts = {"optim": {"$defs": schema["$defs"], "$ref": "#/$defs/recipe_keys"},
             "train": {**schema["properties"]["train"], "$defs": schema["$defs"]}}
    for section, sub in parts.items():
        try:
            validate(copy.deepcopy(dict(block.get(section, {}))), sub, what=f"recipes.{recipe}.{section}",
                     prefix=("recipes", recipe, section))
        except ConfigError as err:
            raise ConfigError(str(err)) from None
    eps = block.get("train", {}).get("selection_eps")
    if eps is not None:
        try:
            parse_linf_eps(eps, beyond=_EPS_IN_CONFIGS)
        except ValueError as err:
            raise ConfigError(f"recipes.{recipe}.train.selection_eps: {err}") from None


def check_recipe_label(pipeline: Mapping[str, Any], recipe: str) -> None:
    """A recipe's ``variant`` (the label its rows carry) must not contradict its ``knobs.ablation``
    preset: ``variant: full`` over ``ablation: acm`` would put an ACM-only run in the full method's
    row. ``ConfigError`` naming ``recipes.<name>.variant``."""
    from mixacm.methods.mixacm import ABLATIONS

    block = pipeline["recipes"][recipe]
    variant, ablation = block.get("variant"), (block.get("knobs") or {}).get("ablation")
    if variant is None or block["method"] != "mixacm" or ablation == "custom":
        return
    squash = {re.sub(r"[^a-z0-9]", "", k): k for k in ABLATIONS}
    named = squash.get(re.sub(r"[^a-z0-9]", "", str(variant).lower()))
    trained = ablation or "full"
    if (named is not None and named != trained) or (named is None and trained != "full"):
        raise ConfigError(
            f"recipes.{recipe}.variant: {variant!r} labels its rows, but knobs.ablation is {trained!r} "
            f"(the loss actually trained); drop the variant or make them agree")


# The pipeline's teachers.<dataset>.source -> the key that names the source in
# ``mixacm.teachers.acquire_teacher``'s form, and the block's key holding its value.
_TEACHER_SOURCES = {"robustbench": ("robustbench", "name"), "url": ("url", "url"), "file": ("path", "path")}
# What an imported teacher's block passes on besides its location: the architecture and its
# keyword arguments, the input normalisation, and the accuracy check (mixacm.teachers).
_TEACHER_COMMON = ("arch", "kwargs", "normalization", "check", "stated_clean_acc")
_TEACHER_PASSED = {"robustbench": ("threat_model", *_TEACHER_COMMON), "url": ("sha256", *_TEACHER_COMMON),
                   "file": ("sha256", *_TEACHER_COMMON)}


def teacher_source(block: Mapping[str, Any], dataset: str) -> dict:
    """The ``acquire_teacher`` source of a validated ``teachers.<dataset>`` block with
    ``source: robustbench | url | file`` (``train`` teachers are trained in the DAG)."""
    kind = block["source"]
    if kind not in _TEACHER_SOURCES:
        raise ConfigError(f"teachers.{dataset}.source: {kind!r} teachers are not acquired; "
                          f"sources acquired: {', '.join(_TEACHER_SOURCES)}")
    key, field_name = _TEACHER_SOURCES[kind]
    source = {key: block[field_name], "dataset": dataset}
    source.update({k: block[k] for k in _TEACHER_PASSED[kind] if block.get(k) is not None})
    return source
