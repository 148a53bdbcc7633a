"""The Method interface shared by every training method, its knobs and its optimiser recipe.

A method says how to compute one step's loss (``loss(x, y) -> (loss, metrics)``) and declares
what it needs (a teacher, minibatch replays); the one training loop in ``mixacm.train`` owns
epochs, the optimiser and checkpoints. Each method's hyperparameters ("knobs") are a frozen
dataclass whose fields carry their default, unit and valid range; ``knobs()`` lists them for the
CLI and the report, ``resolved_knobs()`` gives the values a run actually used.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from mixacm.registry import Registry
from mixacm.utils import parse_linf_eps

METHODS: Registry[type["Method"]] = Registry("method")


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Register a Method subclass under ``name`` (also its ``name`` attribute)."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


# ---------------------------------------------------------------------------------------------
# Knobs: dataclass fields with a kind, a unit and a range, validated in one place.

KINDS = ("float", "int", "bool", "eps", "choice", "any")


def knob(
    default: Any,
    help: str,
    *,
    kind: str,
    unit: str = "",
    choices: tuple[Any, ...] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field describing one knob (``kind`` in KINDS; ``eps`` accepts "8/255")."""
    assert kind in KINDS, kind
    meta = {"help": help, "kind": kind, "unit": unit, "choices": choices, "gt": gt, "ge": ge, "le": le}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _coerce(method: str, name: str, value: Any, meta: dict[str, Any]) -> Any:
    where = f"knob {name!r} of method {method!r}"
    kind = meta["kind"]
    if kind == "eps":
        # An eps knob with ge=0 (e.g. MixACM's input_noise) may be switched off with 0.
        if meta["ge"] == 0 and not isinstance(value, bool) and str(value).strip() in ("0", "0.0", "0/255"):
            return 0.0
        try:  # the sanity bound too: `eps: 1` in a config is 255/255, not 1/255
            return parse_linf_eps(value, beyond="configs stay within it (write eps as a fraction, e.g. 8/255)")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "choice":
        if value not in meta["choices"]:
            raise ValueError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
        return value
    if kind == "any":
        return value
    # Numbers: YAML reads 1e-3 as a string, so numeric strings are accepted; booleans are not.
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if kind == "int":
        if number != int(number):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        number = int(number)
    bounds = [("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<=")]
    for key, ok, sign in bounds:
        if meta[key] is not None and not ok(number, meta[key]):
            raise ValueError(f"{where} must be {sign} {meta[key]}, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class NoKnobs:
    """A method without knobs."""


@contextmanager
def attack_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run an attack with the model in ``mode`` ("eval" or "train"), then restore its mode.

    Eval mode makes the attack use BatchNorm's running statistics and leaves them untouched
    by the adversarial forward passes; train mode attacks the very function being trained.
    """
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Recipes: per dataset, dicts of optimiser settings (milestones and schedule points are fractions
# of training), the source they come from, and the method's knob defaults for that dataset
# (attack settings: ImageNet trains at eps 4/255, CIFAR at 8/255).

RECIPE_KEYS = (
    "epochs", "batch_size", "lr", "momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma",
    "lr_peak", "lr_points", "weight_decay_exempt",
)
# Keys of a recipe that are not optimiser settings.
RECIPE_META_KEYS = ("source", "knobs", "replays", "drop_every_budget_epochs")


class RecipeError(ValueError):
    """A method has no recipe for the dataset a run asks for (no silent fallback)."""


def sgd_recipe(source: str = "", knobs: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """An SGD recipe: the CIFAR defaults of method.md section 3 (lr 0.1, momentum 0.9, batch 128,
    step schedule, lr / 10 at each milestone) with ``kw`` replacing some of them.

    ``source`` names where the values come from (paper section or official script and its
    defaults); ``knobs`` are the method's knob defaults for the dataset (e.g. eps 4/255).
    ``weight_decay_exempt`` lists the parameters the official code leaves out of weight decay:
    ``"batchnorm"`` (BatchNorm scales and shifts) and ``"bias"`` (every parameter named bias); ``[]``
    (PyTorch's ``SGD(model.parameters(), weight_decay=...)``) decays all of them.
    """
    recipe = {
        "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "nesterov": False, "schedule": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "weight_decay_exempt": [],
    }
    unknown = set(kw) - set(RECIPE_KEYS) - set(RECIPE_META_KEYS)
    if unknown:
        raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; valid: {list(RECIPE_KEYS)}")
    recipe.update(kw)
    if recipe["schedule"] != "step":
        recipe.pop("milestones")
        recipe.pop("gamma")
    recipe["source"] = source
    recipe["knobs"] = dict(knobs or {})
    return recipe


class Method:
    """Base class. Subclasses set ``Knobs`` (a frozen dataclass of ``knob`` fields) and ``recipes``
    (one ``sgd_recipe`` per dataset the method supports: ``"cifar10"``, ``"cifar100"``,
    ``"imagenet"``, each with its source), and implement ``loss``. A dataset without a recipe is
    an error (``RecipeError``), never a fallback to another dataset's recipe.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    # Whether ``use_cuda_graphs`` can capture the step's network calls (``train.cuda_graphs``):
    # methods whose calls have fixed shapes and no attack loop of their own.
    supports_cuda_graphs: ClassVar[bool] = False
    graphs: Any = None
    replays: int = 1
    Knobs: ClassVar[type] = NoKnobs
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, dataset: str = "cifar10",
                 **knobs: Any) -> None:
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher: set `teacher:` in the run config")
        if not self.needs_teacher and teacher is not None:
            raise ValueError(f"method {self.name!r} does not use a teacher, but one was given")
        self.model = model
        self.teacher = teacher
        self.dataset = dataset
        self.knobs = self.resolve(knobs, dataset)
        self.recipe = self.recipe_for(dataset)

    # -- knobs ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, given: dict[str, Any], dataset: str | None = None) -> Any:
        """Validate ``given`` knob values and fill in the defaults; errors name the knob.

        With ``dataset``, the knob defaults of the method's recipe for that dataset (e.g. eps
        4/255 on ImageNet) come between the class defaults and ``given``.
        """
        fields = {f.name: f for f in dataclasses.fields(cls.Knobs)}
        if dataset is not None:
            given = {**cls.base_recipe(dataset)["knobs"], **given}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown knob(s) {unknown} for method {cls.name!r}; valid: {sorted(fields) or 'none'}"
            )
        values = {k: _coerce(cls.name, k, v, fields[k].metadata) for k, v in given.items()}
        for k, f in fields.items():
            if k not in values:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                values[k] = _coerce(cls.name, k, default, f.metadata)
        return cls.Knobs(**values)

    @classmethod
    def knobs(cls) -> list[dict[str, Any]]:
        """Every knob with its default, kind, unit, choices and help (for ``--help`` and reports)."""
        out = []
        for f in dataclasses.fields(cls.Knobs):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append({"name": f.name, "default": default, **f.metadata})
        return out

    def resolved_knobs(self) -> dict[str, Any]:
        """The knob values this instance uses (eps values as floats), for the run's records."""
        return dataclasses.asdict(self.knobs)

    def run_details(self) -> dict[str, Any]:
        """What the knobs resolved to on these networks, for the run's records (not knobs)."""
        return {}

    # -- recipe -----------------------------------------------------------------------------
    @classmethod
    def recipe_datasets(cls) -> list[str]:
        """The datasets this method has an official recipe for."""
        return sorted(cls.recipes)

    @classmethod
    def base_recipe(cls, dataset: str) -> dict[str, Any]:
        """A copy of the declared recipe for ``dataset``; ``RecipeError`` when there is none."""
        if dataset not in cls.recipes:
            have = ", ".join(cls.recipe_datasets()) or "none"
            raise RecipeError(
                f"method {cls.name!r} has no recipe for dataset {dataset!r} (it has recipes for: {have}); "
                f"add one with its source to {cls.__name__}.recipes, or use another method"
            )
        return copy.deepcopy(cls.recipes[dataset])

    def recipe_for(self, dataset: str = "cifar10") -> dict[str, Any]:
        """The official recipe for ``dataset`` (a copy; the loop merges ``optim`` overrides), after
        ``adjust_recipe`` (knob-dependent values). ``RecipeError`` for a dataset without one."""
        return self.adjust_recipe(self.base_recipe(dataset))

    @classmethod
    def check_feature_names(cls, given: dict[str, Any], student_names: Any, teacher_names: Any) -> None:
        """Check knobs that name network features (MixACM's block pairs) against the feature
        names of the student and the teacher, before any job; errors are ValueErrors naming the
        knob and the valid names. Most methods name no features."""

    @classmethod
    def check_recipe(cls, knobs: Any, recipe: dict[str, Any]) -> None:
        """Check resolved ``knobs`` against the run's resolved ``recipe`` before any job (e.g. a
        phase that starts at a fraction of the epochs and so would never start); ValueError
        naming the knob. ``mixacm.config.resolve_recipe`` calls it; most methods check nothing."""

    def adjust_recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Hook for recipes that depend on knobs (Free-AT: epochs = budget / replays)."""
        return recipe

    # -- one step ---------------------------------------------------------------------------
    def extra_modules(self) -> nn.ModuleDict:
        """Trainable parts outside the model (trained and checkpointed, not exported)."""
        return nn.ModuleDict()

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's loss and its metrics (``detach_metrics``: raw values and the ``term_*``
        that sum to the loss). No host read: no ``.item()``, ``float(t)``, ``bool(t)``,
        ``if tensor`` or boolean-mask indexing here, in ``after_backward`` or in an attack."""
        raise NotImplementedError

    def use_cuda_graphs(self) -> None:
        """Replay the step's network calls from CUDA graphs (``train.cuda_graphs``; see
        ``mixacm.graphs``). ValueError for a method that does not support it."""
        raise ValueError(f"train.cuda_graphs: method {self.name!r} does not support CUDA graphs "
                         "(supported: the methods whose network calls have fixed shapes, e.g. mixacm)")

    def after_backward(self) -> None:
        """Called by the loop after ``loss.backward()`` and before the optimiser step."""

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before each epoch (0-based ``epoch`` of ``epochs``, also after a
        resume): for knobs that follow the epoch, e.g. AWP's warm-up or FAT's dynamic tau."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")


def phase_start(fraction: float, epochs: int) -> int:
    """The first (0-based) epoch of a phase that starts at ``fraction`` of ``epochs`` training
    epochs (rounded to the nearest epoch, so a shortened recipe keeps the proportion)."""
    return round(fraction * epochs)


def check_phase_starts(method: str, knob_name: str, fraction: float, epochs: int, what: str) -> None:
    """ValueError when a phase starting at ``fraction`` of ``epochs`` would never start."""
    start = phase_start(fraction, epochs)
    if start >= epochs:
        raise ValueError(
            f"knob {knob_name!r}={fraction:g} of method {method!r} leaves no epoch of the {epochs} with {what} "
            f"(it would start at epoch round({fraction:g} x {epochs}) + 1 = {start + 1}); lower it or train longer"
        )


def build_method(name: str, model: nn.Module, teacher: nn.Module | None = None, **knobs: Any) -> Method:
    """Look ``name`` up in METHODS and construct it (unknown names list the valid ones)."""
    return METHODS.get(name)(model, teacher, **knobs)


def detach_metrics(**values: Tensor | float) -> dict[str, Tensor]:
    """Metrics as detached float32 tensors on the step's device; nothing is read back to the host
    (the loop sums them on the device and reads them once per logging interval). Python numbers
    that never were tensors (an epoch-level tau, a 0/1 flag) become 0-d tensors on that device
    through a fill, not a host-to-device copy.

    Keys ``term_<name>`` are the weighted loss terms whose sum is the loss (the loop turns them
    into each term's share of the loss); the other keys are raw diagnostics.
    """
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return {k: v.detach().to(torch.float32) if isinstance(v, torch.Tensor)
            else torch.full((), float(v), device=device, dtype=torch.float32) for k, v in values.items()}
