"""AutoAttack (Croce & Hein, ICML 2020) through one adapter over its two Python packagings.

* ``pyautoattack`` (PyPI): ``AutoAttack(model, *, attacks=, device=, eps=, norm=, seed=, version=)``
  and ``run_standard_evaluation(x, y, *, batch_size=) -> (x_adv, y_adv)``; progress goes to
  ``logging.getLogger("auto-attack")`` at DEBUG level.
* upstream ``autoattack`` (fra31/auto-attack from git): ``AutoAttack(model, norm=, eps=, version=,
  device=, seed=, attacks_to_run=, verbose=, log_path=)`` and
  ``run_standard_evaluation(x, y, bs=) -> x_adv``.

Both contain the same attack code (pyautoattack 0.2.0 = upstream commit a392200). pyautoattack is
preferred when both are installed. Versions (read from pyautoattack 0.2.0's source):

* ``standard``: APGD-CE (1 restart), APGD-T (9 target classes), FAB-T (9), Square (5,000 queries);
* ``rand``: APGD-CE and APGD-DLR with 20 EOT iterations (for randomised defences);
* ``custom``: the given attack list with the package's constructor defaults, i.e. APGD-CE with
  5 restarts and APGD-T with 9 target classes, 1 restart.

Class counts (``adapt_to_classes``, called by ``mixacm.evaluate`` with the dataset's classes
before anything runs): APGD-T and FAB-T attack ``min(9, K - 1)`` target classes for K classes
(the packages' 9 needs K >= 10 and fails inside with an IndexError below that); APGD-T's
targeted DLR loss needs K >= 4 and APGD-DLR's K >= 3, so those attacks are refused below that,
naming the attack and the count. The rule and the target counts used go into ``spec``.

The seed is always explicit (both packages fall back to the wall clock otherwise), and the
packages' ``torch.manual_seed`` calls are confined to a forked RNG so the caller's random stream
is unchanged. The packages' own resume (``state_path``) is broken, so it is not used here:
``mixacm.evaluate`` resumes per batch.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mixacm.provenance import package_version
from mixacm.utils import parse_eps

# Preference order: the PyPI packaging first, then upstream from git.
BACKENDS = ("pyautoattack", "autoattack")
VERSIONS = ("standard", "rand", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# What each fixed version runs (mirrors the packages' _set_version).
VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
# Smallest class count each attack works with (DLR losses index the 3rd / 4th largest logit).
MIN_CLASSES = {"apgd-ce": 2, "apgd-dlr": 3, "apgd-t": 4, "fab": 2, "fab-t": 2, "square": 2}
DEFAULT_TARGETS = 9
TARGET_RULE = "APGD-T and FAB-T target min(9, classes - 1) classes"


def find_backend(prefer: str | None = None) -> tuple[str, ModuleType]:
    """Import the AutoAttack package to use: ``prefer`` if given, else the first of ``BACKENDS``."""
    names = (prefer,) if prefer else BACKENDS
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown AutoAttack backend {name!r}; valid: {', '.join(BACKENDS)}")
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        f"no AutoAttack package found (tried {', '.join(names)}): install it with "
        "`pip install pyautoattack`, or upstream with "
        "`pip install git+https://github.com/fra31/auto-attack`"
    )


def _package_version(name: str, module: ModuleType) -> str | None:
    # Upstream installed from a checkout may have no distribution metadata.
    return package_version(name) or getattr(module, "__version__", None)


def _forked_rng(device: torch.device):
    """Restore the CPU RNG (and ``device``'s, for an accelerator) after the block."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


class AutoAttackAdapter:
    """Run AutoAttack on one batch: ``adapter(model, x, y, seed=...) -> x_adv``.

    The model must already be on ``x``'s device and in the mode the caller wants (eval);
    AutoAttack runs on ``x.device``.
    """

    def __init__(
        self,
        eps: float,
        *,
        version: str = "standard",
        attacks: Sequence[str] | None = None,
        norm: str = "Linf",
        backend: str | None = None,
        verbose: bool = False,
        square_queries: int | None = None,
    ) -> None:
        parse_eps(eps)
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
        if version == "custom":
            if not attacks:
                raise ValueError("AutoAttack version 'custom' needs a list of attacks, e.g. ['apgd-ce', 'apgd-t']")
            bad = [a for a in attacks if a not in ATTACK_NAMES]
            if bad:
                raise ValueError(f"unknown AutoAttack attack(s) {bad}; valid: {', '.join(ATTACK_NAMES)}")
            self.attacks = tuple(attacks)
        elif attacks is not None:
            raise ValueError(f"an attack list is only allowed with version='custom', not {version!r}")
        else:
            self.attacks = VERSION_ATTACKS[version]
        self.eps = float(eps)
        self.version = version
        self.norm = norm
        self.verbose = verbose
        self.backend, self._module = find_backend(backend)
        self.package_version = _package_version(self.backend, self._module)
        if square_queries is not None and (isinstance(square_queries, bool) or int(square_queries) < 1):
            raise ValueError(f"square_queries={square_queries!r} must be a positive integer")
        # Square's query budget; None keeps the package's (5,000 in the standard version).
        self.square_queries = None if square_queries is None else int(square_queries)
        self.num_classes: int | None = None
        self.n_target_classes = DEFAULT_TARGETS

    def adapt_to_classes(self, num_classes: int) -> None:
        """Fit the targeted attacks to ``num_classes`` classes, or refuse (ValueError) an attack
        that cannot run with so few (see the module docstring for the rule)."""
        k = int(num_classes)
        for name in self.attacks:
            if k < MIN_CLASSES[name]:
                raise ValueError(
                    f"AutoAttack {self.version!r} runs {name}, which needs at least {MIN_CLASSES[name]} "
                    f"classes; the dataset has {k}. Use attacks without it (e.g. autoattack-apgd "
                    "needs 4, pgd20 works with any count)")
        self.num_classes = k
        self.n_target_classes = min(DEFAULT_TARGETS, k - 1)

    @property
    def spec(self) -> dict[str, Any]:
        """What a result file records about this attack."""
        spec = {
            "name": "autoattack",
            "aa_version": self.version,
            "attacks": list(self.attacks),
            "norm": self.norm,
            "eps": self.eps,
            "package": self.backend,
            "version": self.package_version,
        }
        if self.square_queries is not None:
            spec["square_queries"] = self.square_queries
        if self.num_classes is not None and any(a in ("apgd-t", "fab-t") for a in self.attacks):
            spec.update(num_classes=self.num_classes, n_target_classes=self.n_target_classes,
                        target_rule=TARGET_RULE)
        return spec

    def _build(self, model: nn.Module, device: torch.device, seed: int) -> Any:
        custom = list(self.attacks) if self.version == "custom" else None
        if self.backend == "pyautoattack":
            return self._module.AutoAttack(
                model, attacks=custom, device=str(device), eps=self.eps, norm=self.norm,
                seed=seed, version=self.version,
            )
        return self._module.AutoAttack(
            model, norm=self.norm, eps=self.eps, seed=seed, verbose=self.verbose,
            attacks_to_run=custom or [], version=self.version, device=str(device), log_path=None,
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, seed: int) -> Tensor:
        device = x.device
        adversary = self._build(model, device, int(seed))
        # Set after construction: the packages' version presets write 9 in the constructor.
        adversary.apgd_targeted.n_target_classes = self.n_target_classes
        adversary.fab.n_target_classes = self.n_target_classes
        if self.square_queries is not None:
            adversary.square.n_queries = self.square_queries
        with _forked_rng(device):
            if self.backend == "pyautoattack":
                x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
            else:
                x_adv = adversary.run_standard_evaluation(x, y, bs=len(x))
        return x_adv.detach()
