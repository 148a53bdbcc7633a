"""The AutoAttack adapter breaks a briefly trained model through pyautoattack and through the
upstream ``autoattack`` API (a stand-in module that records its calls and runs pyautoattack's
attack code), passes device, seed, version and attack list right, and fails clearly without
either package."""
from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.attacks import build_attack
from mixacm.attacks.autoattack import AutoAttackAdapter, find_backend

pyautoattack = pytest.importorskip("pyautoattack")

EPS = 0.1  # the class means differ by 0.2 per pixel: eps 0.1 reaches the midpoint


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes, each a fixed +-0.1 pattern around grey plus a little noise: easy to learn."""
    patterns = torch.randint(0, 2, (10, 3, 6, 6), generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = (0.5 + patterns[y] + 0.03 * torch.randn(n, 3, 6, 6, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = synthetic(500, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x_test, y_test = synthetic(30, seed=2)
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert clean >= 0.95, f"the test model did not train ({clean:.2f} clean accuracy)"
    return model, x_test, y_test


def robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def check_perturbation(x_adv, x, eps=EPS):
    assert (x_adv - x).abs().max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


class FakeUpstream:
    """The upstream ``autoattack.AutoAttack`` signature, recording calls, running pyautoattack's code."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=[],
                 version="standard", is_tf_model=False, device="cuda", log_path=None):
        FakeUpstream.calls.append(("init", dict(norm=norm, eps=eps, seed=seed, verbose=verbose,
                                                attacks_to_run=list(attacks_to_run), version=version,
                                                device=device, log_path=log_path)))
        if version != "custom" and attacks_to_run:  # upstream's own rule
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        self._aa = pyautoattack.AutoAttack(model, attacks=attacks_to_run or None, device=device, eps=eps,
                                           norm=norm, seed=seed, version=version)
        # Upstream's attack objects, as attributes of the same names.
        self.apgd_targeted, self.fab = self._aa.apgd_targeted, self._aa.fab

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        FakeUpstream.calls.append(("run", dict(bs=bs, n=len(x_orig), return_labels=return_labels,
                                               state_path=state_path)))
        x_adv, _ = self._aa.run_standard_evaluation(x_orig, y_orig, batch_size=bs)
        return x_adv


@pytest.fixture
def fake_upstream(monkeypatch):
    module = types.ModuleType("autoattack")
    module.AutoAttack = FakeUpstream
    module.__version__ = "0.1-test"
    FakeUpstream.calls = []
    monkeypatch.setitem(sys.modules, "autoattack", module)
    return module


def test_pyautoattack_apgd_breaks_trained_model(trained):
    model, x, y = trained
    attack = build_attack("autoattack-apgd", EPS)
    assert attack.spec == {
        "name": "autoattack", "aa_version": "custom", "attacks": ["apgd-ce", "apgd-t"], "norm": "Linf",
        "eps": EPS, "package": "pyautoattack", "version": metadata.version("pyautoattack")}
    rng_before = torch.get_rng_state()
    x_adv = attack(model, x, y, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the packages' manual_seed stays inside
    check_perturbation(x_adv, x)
    assert robust_acc(model, x_adv, y) <= 0.2
    # explicit seed: the same call gives the same images
    assert torch.equal(attack(model, x, y, seed=0), x_adv)
    # before/after: at a budget far below the class separation the same model stays robust
    small = build_attack("autoattack-apgd", 0.01)
    x_small = small(model, x, y, seed=0)
    check_perturbation(x_small, x, eps=0.01)
    assert robust_acc(model, x_small, y) >= 0.9


def test_custom_version_settings_as_documented(trained):
    # The adapter's docstring states what 'custom' runs; check it against the installed package.
    model, _, _ = trained
    adv = AutoAttackAdapter(EPS, version="custom", attacks=["apgd-ce", "apgd-t"])._build(
        model, torch.device("cpu"), seed=7)
    assert adv.attacks_to_run == ["apgd-ce", "apgd-t"] and adv.version == "custom"
    assert adv.apgd.n_restarts == 5 and adv.apgd_targeted.n_target_classes == 9
    assert adv.apgd_targeted.n_restarts == 1 and adv.seed == 7 and adv.device == "cpu"
    std = AutoAttackAdapter(EPS)._build(model, torch.device("cpu"), seed=7)
    assert std.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert std.apgd_targeted.n_target_classes == 9 and std.apgd.n_restarts == 1
    rand = AutoAttackAdapter(EPS, version="rand")._build(model, torch.device("cpu"), seed=7)
    assert rand.attacks_to_run == ["apgd-ce", "apgd-dlr"] and rand.apgd.eot_iter == 20


def test_upstream_api_gets_the_right_arguments_and_breaks_model(trained, fake_upstream):
    model, x, y = trained
    attack = build_attack("autoattack-apgd", EPS, backend="autoattack")
    assert attack.spec["package"] == "autoattack" and attack.spec["version"] == "0.1-test"
    x_adv = attack(model, x, y, seed=123)
    assert FakeUpstream.calls == [
        ("init", dict(norm="Linf", eps=EPS, seed=123, verbose=False, attacks_to_run=["apgd-ce", "apgd-t"],
                      version="custom", device="cpu", log_path=None)),
        ("run", dict(bs=len(x), n=len(x), return_labels=False, state_path=None)),
    ]
    check_perturbation(x_adv, x)
    assert robust_acc(model, x_adv, y) <= 0.2


def test_upstream_standard_and_rand_pass_no_attack_list(trained, fake_upstream):
    model, x, y = trained
    for name, version in (("autoattack", "standard"), ("autoattack-rand", "rand")):
        FakeUpstream.calls = []
        attack = build_attack(name, EPS, backend="autoattack")
        attack._build(model, torch.device("cpu"), seed=5)
        (_, kwargs), = FakeUpstream.calls
        assert kwargs["version"] == version and kwargs["attacks_to_run"] == [] and kwargs["seed"] == 5


def test_backend_preference_and_missing_packages(monkeypatch, fake_upstream):
    assert find_backend()[0] == "pyautoattack"          # both present: the PyPI package wins
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` fail
    assert find_backend()[0] == "autoattack"
    assert AutoAttackAdapter(0.1).spec["package"] == "autoattack"
    monkeypatch.setitem(sys.modules, "autoattack", None)
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        AutoAttackAdapter(0.1)
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        build_attack("autoattack", 0.1)


def test_adapter_rejects_bad_settings():
    with pytest.raises(ValueError, match="version"):
        AutoAttackAdapter(0.1, version="plus-plus")
    with pytest.raises(ValueError, match="needs a list"):
        AutoAttackAdapter(0.1, version="custom")
    with pytest.raises(ValueError, match="apgd-xx"):
        AutoAttackAdapter(0.1, version="custom", attacks=["apgd-xx"])
    with pytest.raises(ValueError, match="only allowed with version='custom'"):
        AutoAttackAdapter(0.1, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="outside"):
        AutoAttackAdapter(8.0)
    with pytest.raises(ValueError, match="backend"):
        AutoAttackAdapter(0.1, backend="foolbox")


# Fast here because APGD-CE breaks every point and the later attacks (FAB-T, Square) are skipped.
@pytest.mark.parametrize("name", ["autoattack", "autoattack-rand"])
def test_standard_and_rand_break_trained_model(trained, name):
    model, x, y = trained
    x_adv = build_attack(name, EPS)(model, x, y, seed=0)
    check_perturbation(x_adv, x)
    assert robust_acc(model, x_adv, y) <= 0.2
