"""AWP, FAT, IGAM, ARD and RSLAD against facts: AWP with gamma 0 is its base method and puts the
weights back; FAT with a large tau is AT; the robust-distillation losses with a teacher identical
to the student; IGAM's input gradients against the analytic ones."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.attacks import pgd_linf
from mixacm.losses import ard_loss, kd_kl, kl_class_mean, rslad_loss
from mixacm.methods import METHODS, build_method
from mixacm.methods.awp import _weights, weight_perturbation
from mixacm.methods.fat import early_stopped_pgd
from mixacm.methods.igam import (
    GradientDiscriminator, discriminator_ce, gradient_matching, input_gradient, standardize_gradient,
)
from mixacm.models import build_model


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny")


def params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def one_step(method, x, y, seed: int = 3) -> float:
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.model.train()
    torch.manual_seed(seed)
    opt.zero_grad()
    loss, _ = method.loss(x, y)
    loss.backward()
    method.after_backward()
    opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- AWP


@pytest.mark.parametrize(("awp", "base", "knobs"), [
    ("awp_at", "at", {"eps": "2/255", "steps": 3, "step_size": "1/255"}),
    ("awp_trades", "trades", {"eps": "2/255", "steps": 3, "step_size": "1/255"}),
])
def test_awp_with_gamma_zero_is_its_base_methods_step(awp, base, knobs):
    x, y = batch()
    a = build_method(awp, tiny(), gamma=0.0, warmup_fraction=0.0, **knobs)
    b = build_method(base, tiny(), **knobs)
    assert one_step(a, x, y) == one_step(b, x, y)
    assert all(torch.equal(p, q) for p, q in zip(params(a.model), params(b.model)))


@pytest.mark.parametrize("name", ["awp_at", "awp_trades"])
def test_awp_perturbs_each_layer_by_gamma_of_its_norm_and_restores_the_weights(name):
    x, y = batch()
    gamma = 0.02
    method = build_method(name, tiny(), gamma=gamma, warmup_fraction=0.0, eps="2/255", steps=2, step_size="1/255")
    model = method.model.train()
    before = params(model)
    weights_before = [p.detach().clone() for _, p in _weights(model)]
    loss, m = method.loss(x, y)
    assert m["awp"] == 1.0
    # While the loss is computed the weights are w + v, with ||v_l|| = gamma ||w_l||.
    for (_, p), w, v in zip(_weights(model), weights_before, method._delta):
        assert torch.allclose(p.detach() - w, v, atol=1e-7)
        assert v.norm().item() == pytest.approx(gamma * w.norm().item(), rel=1e-4)
    loss.backward()
    method.after_backward()
    assert all(torch.equal(p, q) for p, q in zip(before, params(model))), "weights not restored exactly"
    # Every perturbed layer received the gradient taken at w + v.
    assert all(p.grad is not None for _, p in _weights(model))


def test_awp_direction_is_the_normalised_loss_gradient():
    w = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [0.0]])]  # norms 5 and 1
    g = [torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0], [-0.5]])]
    v = weight_perturbation(w, g, gamma=0.1)
    assert torch.allclose(v[0], torch.tensor([[0.0, 0.5]]))
    assert torch.allclose(v[1], torch.tensor([[0.0], [-0.1]]))


def test_awp_warmup_follows_the_epochs():
    method = build_method("awp_trades", tiny())  # official: AWP from epoch 10 of 200 (1-based)
    method.begin_epoch(8, 200)
    assert not method._active
    method.begin_epoch(9, 200)
    assert method._active
    x, y = batch()
    method.begin_epoch(0, 200)
    method.model.train()
    before = params(method.model)
    _, m = method.loss(x, y)
    assert m["awp"] == 0.0 and all(torch.equal(p, q) for p, q in zip(before, params(method.model)))


# ----------------------------------------------------------------------------- FAT


def test_fat_with_a_large_tau_equals_at():
    x, y = batch()
    knobs = {"eps": "2/255", "steps": 4, "step_size": "1/255"}
    fat = build_method("fat", tiny(), tau=100, dynamic_tau=False, omega=0.0, **knobs)
    at = build_method("at", tiny(), attack_mode="eval", **knobs)  # FAT attacks in eval mode, as AT may not
    assert one_step(fat, x, y) == pytest.approx(one_step(at, x, y), abs=1e-7)
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(params(fat.model), params(at.model)))


def test_early_stopped_pgd_stops_misclassified_examples_after_tau_steps():
    # A linear model whose prediction is class 1 unless x[0] is large: example 0 starts
    # misclassified (label 0), example 1 correct (label 1) and never becomes wrong with eps 0.01.
    class Lin(nn.Module):
        def forward(self, x):
            s = x.flatten(1)[:, :1]
            return torch.cat([s - 0.9, torch.zeros_like(s)], dim=1)

    x = torch.tensor([[0.5], [0.1]]).reshape(2, 1, 1, 1)
    y = torch.tensor([0, 1])
    for tau, expected_steps in [(0, [0, 5]), (2, [2, 5]), (10, [5, 5])]:
        x_adv, taken = early_stopped_pgd(Lin(), x, y, eps=0.01, steps=5, step_size=0.001, tau=tau)
        assert taken.tolist() == expected_steps
        assert (x_adv - x).abs().max() <= 0.01 + 1e-7
    # Example 0 ascends CE of class 0: its x[0] decreases by the step size per step taken.
    assert x_adv[0].item() == pytest.approx(0.5 - 0.005)


def test_fat_tau_with_the_dynamic_schedule_on_is_an_error():
    for name in ("fat", "fat_trades"):
        with pytest.raises(ValueError, match="'tau'.*dynamic_tau"):
            build_method(name, tiny(), tau=2)
        assert build_method(name, tiny(), tau=2, dynamic_tau=False).tau == 2


def test_fat_dynamic_tau_schedule():
    method = build_method("fat", tiny())
    got = []
    for epoch in (0, 49, 50, 89, 90, 119):
        method.begin_epoch(epoch, 120)
        got.append(method.tau)
    assert got == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- ARD and RSLAD


def twins():
    """A batch-norm-free student and a teacher with the same weights (train mode = eval mode)."""
    torch.manual_seed(0)
    student = build_model("resnet2b")
    return student, copy.deepcopy(student)


def test_ard_and_rslad_losses_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])  # p_t = (1/4, 3/4)
    kl = 0.25 * torch.log(torch.tensor(0.25 / 0.5)) + 0.75 * torch.log(torch.tensor(0.75 / 0.5))
    assert kl_class_mean(s, t).item() == pytest.approx(kl.item() / 2, rel=1e-6)
    assert rslad_loss(s, t, t).item() == pytest.approx(5 / 6 * kl.item() / 2, rel=1e-6)
    y = torch.tensor([1])
    assert ard_loss(s, s, t, y, alpha=0.0).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert ard_loss(s, None, t, y, alpha=1.0, T=1.0).item() == pytest.approx(kl.item() / 2, rel=1e-6)


def test_rslad_with_the_student_as_teacher():
    student, teacher = twins()
    method = build_method("rslad", student, teacher, eps="2/255", steps=2, step_size="1/255")
    x, y = batch()
    torch.manual_seed(7)
    loss, m = method.loss(x, y)
    assert m["kl_nat"] == pytest.approx(0.0, abs=1e-7)  # the same network on the same inputs
    torch.manual_seed(7)
    x_init = x + 0.001 * torch.randn_like(x)
    with torch.no_grad():
        t_logits = teacher(x)
    x_adv = pgd_linf(teacher, x, t_logits, eps=2 / 255, steps=2, step_size=1 / 255, random_start=False,
                     loss_fn=kd_kl, x_init=x_init)
    with torch.no_grad():
        expected = 5 / 6 * kd_kl(teacher(x_adv), t_logits).item() / 10
    assert m["kl_adv"] > 0
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_ard_with_the_student_as_teacher():
    student, teacher = twins()
    x, y = batch()
    # alpha 0: the clean CE of the student alone.
    method = build_method("ard", student, teacher, alpha=0.0, eps="2/255", steps=2, step_size="1/255")
    loss, _ = method.loss(x, y)
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.cross_entropy(teacher(x), y).item(), rel=1e-6)
    # alpha 1, T 30: the class-mean KL between the teacher on x and itself on PGD-CE inputs.
    method = build_method("ard", student, teacher, eps="2/255", steps=2, step_size="1/255")
    torch.manual_seed(7)
    loss, m = method.loss(x, y)
    torch.manual_seed(7)
    x_adv = pgd_linf(teacher, x, y, eps=2 / 255, steps=2, step_size=1 / 255, random_start=True)
    with torch.no_grad():
        expected = kd_kl(teacher(x_adv), teacher(x), T=30.0).item() / 10
    assert loss.item() == pytest.approx(expected, rel=1e-4) and m["kl"] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- IGAM


def test_input_gradient_of_a_linear_model_is_analytic():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    g = input_gradient(lin, x, y, create_graph=False)
    w = lin[1].weight
    with torch.no_grad():
        p = F.softmax(lin(x), dim=1)
        # d p_y / d x = p_y (w_y - sum_k p_k w_k)
        expected = p.gather(1, y[:, None]) * (w[y] - p @ w)
    assert torch.allclose(g.flatten(1), expected / 255.0, atol=1e-8)


def test_igam_loss_with_the_student_as_teacher():
    student, teacher = twins()
    method = build_method("igam", student, teacher, ce_only_fraction=0)
    x, y = batch()
    loss, m = method.loss(x, y)
    assert m["grad_l2"].item() == pytest.approx(0.0, abs=1e-12)  # identical input gradients
    with torch.no_grad():
        ce = F.cross_entropy(student(x), y).item()
    assert m["ce"].item() == pytest.approx(ce, rel=1e-6)
    # D sees the same gradients twice (one batch, BatchNorm over both halves), once labelled 0
    # and once 1: equal logits, so its CE is the mean of -log p0 and -log p1 of the same logits.
    j = input_gradient(teacher, x, y, create_graph=False)
    with torch.no_grad():
        d_s, d_t = method.disc.pair(j, j)
        expected_d = discriminator_ce(d_s, d_t).item()
        logp = F.log_softmax(d_s, dim=1)
    assert torch.allclose(d_s, d_t)
    assert expected_d == pytest.approx(-(logp[:, 0].mean() + logp[:, 1].mean()).item() / 2, rel=1e-6)
    assert m["disc_ce"].item() == pytest.approx(expected_d, rel=1e-5)
    assert loss.item() == pytest.approx(ce - 5.0 * expected_d, rel=1e-5)  # beta 5, gamma x 0
    assert gradient_matching(torch.ones(2, 3), torch.zeros(2, 3)).item() == 6.0


def test_igam_discriminator_input_is_centred_and_unit_length():
    g = torch.randn(4, 3, 32, 32) * 1e-6 + 3e-7  # raw input gradients are tiny and off-centre
    z = standardize_gradient(g)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6)
    assert torch.allclose(z.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    # Scale-free: D's logits do not change when the gradients are multiplied by 1e6.
    disc = GradientDiscriminator().train()
    torch.testing.assert_close(disc(g), disc(g * 1e6), rtol=1e-4, atol=1e-4)
    # The official shape: 4 convolutions (8, 16, 32, 64 channels) of stride 2 -> 64 x 2 x 2 -> 2 logits.
    convs = [m for m in disc.body if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.bias is not None) for c in convs] == [
        (c, (4, 4), (2, 2), True) for c in (8, 16, 32, 64)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.body) == 4 and disc.fc.in_features == 64 * 2 * 2


def test_igam_trains_its_discriminator_every_disc_every_steps_on_grad_ce_d():
    method = build_method(METHODS.get("igam").name, tiny(), tiny(1), disc_every=2, ce_only_fraction=0)
    disc = method.extra_modules()["disc"]
    assert disc is method.disc
    opt = torch.optim.SGD([*method.model.parameters(), *disc.parameters()], lr=0.1)
    x, y = batch()
    method.model.train()
    history = []
    for step in range(3):
        d_before = params(disc)
        opt.zero_grad(set_to_none=True)
        loss, m = method.loss(x, y)
        loss.backward()
        method.after_backward()
        if step == 0:
            # D's gradient is grad CE_D at the step's gradients (not the student's -beta * grad CE_D).
            method.teacher.train()  # official: the teacher's gradients with BatchNorm on batch statistics
            j_t = input_gradient(method.teacher, x, y, create_graph=False)
            method.teacher.eval()
            j_s = input_gradient(method.model, x, y, create_graph=False)
            want = torch.autograd.grad(discriminator_ce(*disc.pair(j_s, j_t)), list(disc.parameters()))
            for p, w in zip(disc.parameters(), want):
                torch.testing.assert_close(p.grad, w, rtol=1e-3, atol=1e-4)  # conv biases before BN: ~0
        opt.step()
        history.append(any(not torch.equal(a, b) for a, b in zip(d_before, params(disc))))
    assert history == [True, False, True]
    other = build_method("igam", tiny(), tiny(1), disc_every=2, ce_only_fraction=0)
    other.load_state_dict(method.state_dict())
    assert other.steps == 3


def test_igam_trains_with_ce_alone_before_its_phase_and_refuses_an_empty_phase():
    from mixacm.config import ConfigError, load_run_config, resolve_recipe

    method = build_method("igam", tiny(), tiny(1))  # official: the IGAM loss from 87.5 % of training
    method.begin_epoch(178, 205)
    x, y = batch()
    loss, m = method.loss(x, y)
    assert m["igam_on"].item() == 0 and "disc_acc" not in m
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.cross_entropy(method.model(x), y).item(), rel=1e-6)
    method.begin_epoch(179, 205)
    assert method.loss(x, y)[1]["igam_on"].item() == 1
    cfg = {"method": {"name": "igam"}, "teacher": "t.pt", "optim": {"epochs": 3}}
    with pytest.raises(ConfigError, match="ce_only_fraction"):
        resolve_recipe(load_run_config(cfg))
    with pytest.raises(ValueError, match="ce_only_fraction"):
        method.begin_epoch(0, 3)
    cfg["method"]["ce_only_fraction"] = 2 / 3  # the IGAM loss in the last of 3 epochs
    assert resolve_recipe(load_run_config(cfg))["epochs"] == 3


def test_bench_methods_covers_every_new_method(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
    spec = importlib.util.spec_from_file_location("bench_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    new = {"awp_at", "awp_trades", "fat", "fat_trades", "igam", "ard", "rslad"}
    assert new <= set(bench.DEFAULT_METHODS) and new <= set(bench.EXPECTED)
    # Timed in the last epoch of the recipe: AWP-TRADES' perturbation (after its warm-up) and
    # IGAM's phase (after its CE-only 87.5 %) are on, FAT for TRADES at its last tau.
    assert bench.MethodStep("awp_trades", tiny(), None, 1e-3, "none").method._active
    assert bench.MethodStep("igam", tiny(), tiny(1), 1e-3, "none").method._active
    assert bench.MethodStep("fat_trades", tiny(), None, 1e-3, "none").method.tau == 3
    bench.main(["--model", "resnet2b", "--teacher", "resnet4b", "--batch-size", "2", "--rounds", "1",
                "--iters", "1", "--warmup", "0", "--methods", "standard", "mixacm", *sorted(new)])
    out = capsys.readouterr().out
    assert all(f"| {name} " in out for name in ("teacher-fwd", "standard", "mixacm", *new))
    assert "mixacm / (standard + teacher forward) = " in out
