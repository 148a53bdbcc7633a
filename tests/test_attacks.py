"""PGD against facts: the analytic optimum of a linear model, the eps ball and image box,
restarts, reproducibility, and no side effects on the model; the attack-name registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.attacks import ATTACKS, PGDAttack, attack_names, build_attack, pgd_linf


def linear_model(n_in: int, n_out: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_reaches_linear_optimum(random_start):
    # Two-class linear model z = W x + b: the CE loss of label y is softplus(z_other - z_y), increasing
    # in (w_other - w_y) . x, so over the box [x - eps, x + eps] n [0, 1] it is maximised at
    # clip(x + eps * sign(w_other - w_y), 0, 1). With steps * step_size >= 2 eps PGD must land there.
    eps = 0.1
    model = linear_model(3 * 4 * 4)
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[:, 0, 0, :] = 0.02                      # near the bounds: clipping must be respected
    x[:, 1, 0, :] = 0.97
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    w = model[1].weight.detach()
    direction = (w[1 - y] - w[y]).view_as(x)
    assert (direction != 0).all()
    expected = (x + eps * direction.sign()).clamp(0, 1)

    x_adv = pgd_linf(model, x, y, eps=eps, steps=10, step_size=eps / 4, random_start=random_start,
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    # and the loss there is the maximum over the box (no other corner does better)
    with torch.no_grad():
        assert (F.cross_entropy(model(x_adv), y, reduction="none")
                >= F.cross_entropy(model(x), y, reduction="none")).all()


@pytest.mark.parametrize("eps,step_size,steps", [(2 / 255, 0.5, 3), (8 / 255, 2 / 255, 5), (0.3, 0.1, 4)])
def test_pgd_stays_in_eps_ball_and_image_box(eps, step_size, steps):
    model = small_net().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 4, 4, generator=g)
    x[:3] = 0.0
    x[3:6] = 1.0
    y = torch.randint(0, 10, (12,), generator=g)
    for restarts in (1, 3):
        x_adv = pgd_linf(model, x, y, eps=eps, steps=steps, step_size=step_size, restarts=restarts,
                         generator=torch.Generator().manual_seed(1))
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_restarts_never_worse_than_one_start():
    model = small_net(seed=3).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 3, 4, 4, generator=g)
    y = model(x).argmax(1).detach()  # every point starts correctly classified
    kw = dict(eps=0.05, steps=3, step_size=0.02)
    single = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(9), **kw)
    multi = pgd_linf(model, x, y, restarts=5, generator=torch.Generator().manual_seed(9), **kw)
    with torch.no_grad():
        wrong1, wrong5 = model(single).argmax(1) != y, model(multi).argmax(1) != y
        loss1 = F.cross_entropy(model(single), y, reduction="none")
        loss5 = F.cross_entropy(model(multi), y, reduction="none")
    # per example: broken by one start -> broken by restarts; otherwise the loss is no lower
    assert not (wrong1 & ~wrong5).any()
    both_correct = ~wrong1 & ~wrong5
    assert (loss5[both_correct] >= loss1[both_correct] - 1e-6).all()
    # the restarts actually helped somewhere (the first restart replays the single run)
    assert wrong5.sum() > wrong1.sum() or (loss5 > loss1 + 1e-4).any()


def test_pgd_leaves_model_mode_and_grads_alone():
    model = small_net()
    x = torch.rand(8, 3, 4, 4)
    y = torch.randint(0, 10, (8,))
    sentinel = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    bn = model[1]
    for training in (True, False):
        model.train(training)
        stats = bn.running_mean.clone()
        pgd_linf(model, x, y, eps=0.1, steps=2, step_size=0.05, restarts=2)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, sentinel[n], rtol=0, atol=0)
        if not training:  # eval mode: BN statistics untouched
            torch.testing.assert_close(bn.running_mean, stats, rtol=0, atol=0)


def test_pgd_under_no_grad_and_reproducible_from_generator():
    model = small_net().eval()
    x = torch.rand(8, 3, 4, 4)
    y = torch.randint(0, 10, (8,))
    kw = dict(eps=0.1, steps=2, step_size=0.03)
    with torch.no_grad():  # e.g. called from an evaluation loop
        a = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    b = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    c = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_pgd_custom_loss_with_non_label_target():
    # TRADES-style inner maximisation: KL to the clean prediction, y = clean logits.
    model = small_net().eval()
    x = torch.rand(8, 3, 4, 4)
    with torch.no_grad():
        clean = model(x)

    def kl(logits, target):
        return F.kl_div(F.log_softmax(logits, 1), F.softmax(target, 1), reduction="batchmean")

    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x_adv = pgd_linf(model, x, clean, eps=0.05, steps=3, step_size=0.02, loss_fn=kl, x_init=start,
                     restarts=2)
    with torch.no_grad():
        assert kl(model(x_adv), clean) > kl(model(start.clamp(0, 1)), clean)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6


@pytest.mark.parametrize("bad", [dict(eps=0.0), dict(eps=8.0), dict(restarts=0), dict(steps=-1)])
def test_pgd_rejects_bad_arguments(bad):
    kw = dict(eps=0.1, steps=2, step_size=0.05, restarts=1) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        pgd_linf(small_net(), torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), **kw)


def test_attack_names_parse_and_record_parameters():
    eps = 8 / 255
    pgd = build_attack("pgd20", eps)
    assert isinstance(pgd, PGDAttack)
    assert pgd.spec | {"version": None} == {
        "name": "pgd", "norm": "Linf", "eps": eps, "steps": 20, "step_size": eps / 4, "restarts": 1,
        "random_start": True, "loss": "ce", "package": "mixacm", "version": None}
    assert build_attack("pgd7", eps).spec["steps"] == 7
    assert build_attack("clean", eps).spec["name"] == "clean"
    assert set(ATTACKS.names()) == {"clean", "pgd", "autoattack", "autoattack-apgd", "autoattack-rand"}
    assert "pgd<K> (e.g. pgd20)" in attack_names()
    for bad in ("pgd", "pgd0", "pgd-20", "fgsm", "PGD20"):
        with pytest.raises(KeyError, match="valid names|at least 1 step"):
            build_attack(bad, eps)
    with pytest.raises(KeyError, match="autoattack-apgd"):
        build_attack("apgd", eps)


def test_pgd_attack_seed_controls_start():
    model = small_net().eval()
    x = torch.rand(4, 3, 4, 4)
    y = torch.randint(0, 10, (4,))
    attack = build_attack("pgd1", 0.1)
    assert torch.equal(attack(model, x, y, seed=3), attack(model, x, y, seed=3))
    assert not torch.equal(attack(model, x, y, seed=3), attack(model, x, y, seed=4))
