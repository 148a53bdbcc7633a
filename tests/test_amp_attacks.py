"""Mixed precision changes speed, never attack strength.

On a confident model the input gradient of the cross-entropy underflows to zero in fp16 without
loss scaling, so a PGD step ``sign(0) = 0`` leaves the example where it is. The project's attacks
switch autocast off (``mixacm.attacks.fp32_attack``), so under ``train.amp: fp16`` they find the
same adversarial examples as in fp32; every training method's attack passes run without autocast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.attacks import build_attack, fp32_attack, pgd_linf
from mixacm.methods import METHODS, build_method
from mixacm.models import build_model

FP16 = dict(device_type="cpu", dtype=torch.float16)


@pytest.fixture(scope="module")
def confident():
    """A net that fits its 256 training points, its logits then scaled up 8 times (confident)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.rand(256, 3, 4, 4), torch.randint(0, 10, (256,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        net[3].weight.mul_(8)
        net[3].bias.mul_(8)
    net.eval()
    assert (net(x).argmax(1) == y).all()
    return net, x, y


def unperturbed(x_adv, x) -> int:
    return int(((x_adv - x).flatten(1).abs().amax(1) == 0).sum())


def test_premise_fp16_input_gradients_underflow_on_a_confident_model(confident):
    net, x, y = confident
    zero = {}
    for amp in (False, True):
        xg = x.clone().requires_grad_(True)
        with torch.autocast(**FP16, enabled=amp):
            (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
        zero[amp] = int((g.flatten(1).abs().amax(1) == 0).sum())
    assert zero[False] == 0 and zero[True] > 100, zero


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_under_fp16_autocast_equals_fp32(confident, random_start):
    net, x, y = confident
    kw = dict(eps=0.03, steps=10, step_size=0.0075, random_start=random_start)
    fp32 = pgd_linf(net, x, y, generator=torch.Generator().manual_seed(1), **kw)
    with torch.autocast(**FP16):
        fp16 = pgd_linf(net, x, y, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(fp16, fp32)
    assert unperturbed(fp16, x) == 0
    with torch.no_grad():
        acc = {k: float((net(v).argmax(1) == y).float().mean()) for k, v in (("fp32", fp32), ("fp16", fp16))}
    assert acc["fp16"] == acc["fp32"] < 0.9, acc


def test_evaluation_attacks_ignore_the_callers_autocast(confident):
    net, x, y = confident
    attack = build_attack("pgd10", 0.03)
    with torch.autocast(**FP16):
        fp16 = attack(net, x, y, seed=3)
    assert torch.equal(fp16, attack(net, x, y, seed=3))


def test_fp32_attack_switches_autocast_off_and_back():
    with torch.autocast(**FP16):
        with fp32_attack("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


# Free-AT's perturbation gradient is that of the training backward itself, which the loop scales
# with its GradScaler under fp16 (no underflow); it has no separate attack pass.
TRAINING_PASS_ATTACK = {"free_at"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_attacks_with_autocast_off(name):
    """A forward whose input requires a gradient is an attack pass: it must run without autocast."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    teacher = build_model("tiny", widths=(8, 16, 32)) if cls.needs_teacher else None
    method = build_method(name, build_model("tiny"), teacher)
    passes = []

    def record(module, args):
        passes.append((bool(args[0].requires_grad), torch.is_autocast_enabled("cpu")))

    handles = [m.register_forward_pre_hook(record) for m in (method.model, teacher) if m is not None]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.model.train()
    with torch.autocast(**FP16):
        method.loss(x, y)
    for h in handles:
        h.remove()
    attack_passes = [amp for needs_grad, amp in passes if needs_grad]
    if name in TRAINING_PASS_ATTACK:
        return
    assert not any(attack_passes), f"{name}: {sum(attack_passes)} attack pass(es) ran under fp16 autocast"


def test_free_at_delta_survives_a_non_finite_scaled_gradient():
    # Under fp16 the loop's GradScaler may produce inf/NaN gradients (the step is then skipped);
    # the carried perturbation must stay finite and inside the eps ball.
    torch.manual_seed(0)
    method = build_method("free_at", build_model("tiny"), replays=2)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, _ = method.loss(x, y)
    loss.backward()
    method._leaf.grad[0, 0, 0, 0] = float("nan")
    method._leaf.grad[1, 0, 0, 0] = float("inf")
    method.after_backward()
    assert torch.isfinite(method.delta).all() and method.delta.abs().max() <= method.knobs.eps + 1e-7
