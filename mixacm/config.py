"""The run config of one training run: defaults, validation and the resolved optimiser recipe.

The schema lives in ``mixacm/schemas/run_config.schema.yaml`` (JSON schema written as YAML, with
the defaults in it). ``load_run_config`` fills the defaults, validates with ``jsonschema`` and
converts the selection eps (``"8/255"``) to a float once, here at the boundary. Errors are
``ConfigError`` naming the key path, e.g. ``optim.lr: -1 is less than the minimum of 0``.

Method knobs are checked against the method class (unknown knob -> error naming it); their
values are checked by the class's constructor when training starts. ``resolve_recipe`` merges
``optim`` over the method's official recipe for the dataset.
"""
from __future__ import annotations

import copy
import inspect
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from mixacm.utils import config_hash, parse_eps

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "run_config.schema.yaml"

# Filled in under the method's recipe when neither the recipe nor `optim` sets them.
RECIPE_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 0.0,
    "nesterov": False,
    "schedule": "step",
    "milestones": [],
    "gamma": 0.1,
    "warmup_epochs": 0,
}
RECIPE_REQUIRED = ("epochs", "batch_size", "lr")

# Keys that do not change what is trained: left out of the config hash so that renaming a run,
# silencing progress bars or moving it to another device does not block its resume.
_HASH_EXCLUDED = (("name",), ("device",), ("train", "progress"))


class ConfigError(ValueError):
    """An invalid run config; the message names the offending key path."""


@lru_cache(maxsize=1)
def run_config_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"run config {where} is not valid YAML: {err}") from None
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
        cfg["train"]["selection_eps"] = parse_eps(cfg["train"]["selection_eps"])
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


def _check_method(cfg: dict) -> None:
    cls = method_class(cfg)
    resolve = getattr(cls, "resolve", None)
    if callable(resolve):
        # The class validates its own knobs: unknown names and out-of-range values, by name.
        try:
            resolve(method_knobs(cfg))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"method: {err}") from None
    if getattr(cls, "needs_teacher", False) and not cfg["teacher"]:
        raise ConfigError(
            f"teacher: method {cfg['method']['name']!r} needs a teacher model file "
            "(write one with `mixacm teacher`)"
        )
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
        method = cls.__new__(cls)
        method.knobs = cls.resolve(method_knobs(cfg))
    recipe_for = getattr(method, "recipe_for", None)
    return dict(recipe_for(dataset) if callable(recipe_for) else getattr(method, "recipe", {}))


def resolve_recipe(cfg: Mapping[str, Any], method: Any = None) -> dict:
    """The optimiser recipe a run uses: defaults < the method's recipe for the dataset < ``optim``.

    ``method`` is the constructed method when the caller has one (its recipe may depend on its
    knobs). Keys the optimiser does not use (e.g. a recipe's ``replays``) are dropped here; the
    method keeps its own copy.
    """
    schema = run_config_schema()["properties"]["optim"]
    recipe = {k: v for k, v in _method_recipe(cfg, method).items() if k in schema["properties"]}
    merged = {**RECIPE_DEFAULTS, **recipe, **cfg["optim"]}
    missing = [k for k in RECIPE_REQUIRED if k not in merged]
    if missing:
        raise ConfigError(
            f"optim.{missing[0]}: method {cfg['method']['name']!r} has no recipe value for "
            f"{', '.join(missing)} on {cfg['dataset']['name']}; set it under optim"
        )
    validate(merged, schema, what="resolved recipe", prefix=("optim",))
    merged["milestones"] = sorted(float(m) for m in merged["milestones"])
    return merged


def run_config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes what is trained (not the name, device or progress bars)."""
    cfg = copy.deepcopy(dict(cfg))
    for path in _HASH_EXCLUDED:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return config_hash(cfg)
