"""mixacm.losses against hand-computed values, invariants and float64 gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixacm.losses import acm_distance, activated_channel_map, kd_kl, mixup, mixup_ce, pooled_power, trades_kl


@pytest.fixture
def feat() -> torch.Tensor:
    # One image, two channels, 2 x 2 pixels.
    ch0 = [[2.0, -5.0], [2.0, 2.0]]
    ch1 = [[4.0, 0.0], [0.0, -1.0]]
    return torch.tensor([[ch0, ch1]])


def test_acm_default_hand_computed(feat):
    # relu, square, mean: ch0 (4 + 0 + 4 + 4) / 4 = 3, ch1 (16 + 0 + 0 + 0) / 4 = 4;
    # L2 normalised: (3, 4) / 5 = (0.6, 0.8).
    a = activated_channel_map(feat)
    assert a.shape == (1, 2)
    torch.testing.assert_close(a, torch.tensor([[0.6, 0.8]]))


def test_acm_options_hand_computed(feat):
    # p=1, sum pooling, no normalisation: ch0 2 + 0 + 2 + 2 = 6, ch1 4.
    a = activated_channel_map(feat, p=1, pooling="sum", normalize="none")
    torch.testing.assert_close(a, torch.tensor([[6.0, 4.0]]))
    # No activation, p=1, mean: ch0 (2 - 5 + 2 + 2) / 4 = 0.25, ch1 (4 - 1) / 4 = 0.75.
    a = activated_channel_map(feat, p=1, activation="none", normalize="none")
    torch.testing.assert_close(a, torch.tensor([[0.25, 0.75]]))
    # No activation, p=2, mean: ch0 (4 + 25 + 4 + 4) / 4 = 9.25, ch1 (16 + 1) / 4 = 4.25.
    a = activated_channel_map(feat, p=2, activation="none", normalize="none")
    torch.testing.assert_close(a, torch.tensor([[9.25, 4.25]]))


def test_acm_of_constant_positive_map_is_uniform():
    # Every channel pools to the same value, so the unit vector is 1/sqrt(C) everywhere.
    C = 7
    a = activated_channel_map(torch.full((3, C, 4, 5), 0.3))
    torch.testing.assert_close(a, torch.full((3, C), 1 / math.sqrt(C)))


def test_acm_rejects_bad_options(feat):
    for kwargs, word in [({"pooling": "max"}, "pooling"), ({"normalize": "l1"}, "normalize"),
                         ({"activation": "gelu"}, "activation"), ({"p": 0}, "p")]:
        with pytest.raises(ValueError, match=word):
            activated_channel_map(feat, **kwargs)
    with pytest.raises(ValueError, match="B x C x H x W"):
        activated_channel_map(feat[0])


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_pooled_power_equals_the_formula_and_its_gradient(p, pooling):
    # pool(A^p) and its float64 gradient (gradcheck) against the written-out formula.
    torch.manual_seed(0)
    feat = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = feat.pow(p).mean((2, 3)) if pooling == "mean" else feat.pow(p).sum((2, 3))
    torch.testing.assert_close(pooled_power(feat, p, pooling), ref)
    assert torch.autograd.gradcheck(lambda t: pooled_power(t, p, pooling), (feat,))


def test_pooled_power_of_bf16_maps_is_float32_and_keeps_their_layout():
    # Under autocast a bf16 channels_last map pools to float32 values equal to the float32
    # formula on the same bf16 numbers; its gradient is bf16 and channels_last (no float32 copy of
    # the map), within bf16 rounding of the float32 gradient.
    torch.manual_seed(0)
    feat = torch.randn(4, 8, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    feat.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = pooled_power(feat, 2, "mean")
    assert a.dtype == torch.float32
    f32 = feat.detach().float().requires_grad_(True)
    ref = f32.pow(2).mean((2, 3))
    torch.testing.assert_close(a, ref)
    w = torch.randn_like(ref)
    (g,) = torch.autograd.grad((a * w).sum(), feat)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), f32)
    assert g.dtype == torch.bfloat16 and g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g.float(), g_ref, rtol=2 ** -7, atol=1e-6)


def _map_sized_casts(fn, feat: torch.Tensor) -> list[str]:
    """The dtype casts (``aten::_to_copy``) of ``feat``'s full size that ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
            and e.input_shapes[0] == list(feat.shape)]


@pytest.mark.parametrize("p", [1, 2])
def test_pooled_power_backward_writes_no_float32_copy_of_the_map(p):
    # The gradient of a bf16 map is formed in bf16 (p = 2: one product; p = 1: a broadcast view):
    # no cast of the map's size in the backward (the forward's reduction reads bf16 directly on
    # CUDA, tests/test_graphs.py checks it there; the CPU reduction casts).
    feat = torch.randn(4, 8, 6, 6).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = pooled_power(feat, p, "mean")
    assert _map_sized_casts(lambda: a.sum().backward(), feat) == []
    assert feat.grad.dtype == torch.bfloat16


def test_pooled_power_rejects_other_powers():
    with pytest.raises(ValueError, match="p=3"):
        pooled_power(torch.ones(1, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="pooling"):
        pooled_power(torch.ones(1, 1, 2, 2), 2, "max")


def test_acm_with_another_power_uses_the_formula(feat):
    # p = 3 (not a knob value, but the function takes it): relu, cube, mean, no normalisation.
    a = activated_channel_map(feat, p=3, normalize="none")
    torch.testing.assert_close(a, torch.tensor([[24.0 / 4, 64.0 / 4]]))


def test_acm_distance_hand_computed():
    # Sample 1: (0.6 - 0.8)^2 + (0.8 - 0.6)^2 = 0.08; sample 2: 0; batch mean 0.04.
    a_s = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    a_t = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    torch.testing.assert_close(acm_distance(a_s, a_t), torch.tensor(0.04))
    assert acm_distance(a_t, a_t).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        acm_distance(a_s, a_t[:, :1])


def test_kd_kl_hand_computed():
    # Teacher logits (ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2).
    # KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2).
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_kl(s, t).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: p = (sqrt 3, 1) / (sqrt 3 + 1); KL times T^2 = 4.
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    p1 = 1 / (math.sqrt(3) + 1)
    expected_t2 = 4 * (p0 * math.log(2 * p0) + p1 * math.log(2 * p1))
    assert kd_kl(s, t, T=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    # batchmean: a second, identical pair (KL 0) halves the value.
    s2 = torch.cat([s, t])
    t2 = torch.cat([t, t])
    assert kd_kl(s2, t2).item() == pytest.approx(expected / 2, rel=1e-6)


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(5, 10)
    assert kd_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(logits, logits, T=4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert trades_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_trades_kl_direction():
    # KL(f(x) || f(x')): the natural output is the target distribution.
    adv = torch.tensor([[0.0, 0.0]])
    nat = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((3/4, 1/4) || (1/2, 1/2))
    assert trades_kl(adv, nat).item() == pytest.approx(expected, rel=1e-6)
    # The reverse direction KL((1/2, 1/2) || (3/4, 1/4)) = 1/2 ln(2/3) + 1/2 ln 2 differs.
    reverse = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert trades_kl(nat, adv).item() == pytest.approx(reverse, rel=1e-6)


def test_mixup_ce_hand_computed():
    # softmax(ln 3, 0) = (3/4, 1/4): 0.25 * -ln(3/4) + 0.75 * -ln(1/4).
    logits = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.25 * -math.log(0.75) + 0.75 * -math.log(0.25)
    got = mixup_ce(logits, torch.tensor([0]), torch.tensor([1]), 0.25)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mixup_ce_with_lam_one_is_ce():
    logits, y_a, y_b = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.randint(0, 4, (6,))
    torch.testing.assert_close(mixup_ce(logits, y_a, y_b, 1.0), F.cross_entropy(logits, y_a))


def test_mixup_hand_computed():
    x = torch.tensor([[0.0], [1.0], [0.5]])
    y = torch.tensor([0, 1, 2])
    perm = torch.tensor([1, 2, 0])
    x_mix, y_a, y_b = mixup(x, y, 0.25, perm)
    # 0.25 * x_i + 0.75 * x_perm(i): 0.75, 0.25 + 0.375, 0.125 + 0
    torch.testing.assert_close(x_mix, torch.tensor([[0.75], [0.625], [0.125]]))
    assert y_a.tolist() == [0, 1, 2] and y_b.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="lam"):
        mixup(x, y, 1.5, perm)


def test_mixup_per_example_lam_hand_computed():
    x = torch.tensor([[0.0], [1.0], [0.5]])
    y = torch.tensor([0, 1, 2])
    perm = torch.tensor([1, 2, 0])
    lam = torch.tensor([0.25, 1.0, 0.5])
    x_mix, _, y_b = mixup(x, y, lam, perm)
    # 0.25 * 0 + 0.75 * 1; 1 * 1 + 0 * 0.5; 0.5 * 0.5 + 0.5 * 0
    torch.testing.assert_close(x_mix, torch.tensor([[0.75], [1.0], [0.25]]))
    assert y_b.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="one per example"):
        mixup(x, y, torch.tensor([0.5, 0.5]), perm)


def test_mixup_with_a_0d_tensor_lam_is_the_number_lam():
    # The batch lam stays a device tensor inside a training step (no host read): same mix, same CE.
    g = torch.Generator().manual_seed(0)
    x, y, perm = torch.rand(4, 3, 2, 2, generator=g), torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 3, 1])
    lam = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample()
    a, _, y_b = mixup(x, y, lam, perm)
    b, _, _ = mixup(x, y, lam.item(), perm)
    assert torch.equal(a, b)
    logits = torch.randn(4, 3, generator=g)
    assert torch.equal(mixup_ce(logits, y, y_b, lam), mixup_ce(logits, y, y_b, lam.item()))


def test_mixup_ce_per_example_lam_hand_computed():
    # Two examples, both with logits (ln 3, 0): p = (3/4, 1/4). Example 0: lam 0.25 between
    # classes 0 and 1; example 1: lam 1 on class 1. Mean of the two weighted CEs.
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    lam = torch.tensor([0.25, 1.0])
    got = mixup_ce(logits, torch.tensor([0, 1]), torch.tensor([1, 0]), lam)
    first = 0.25 * -math.log(0.75) + 0.75 * -math.log(0.25)
    second = -math.log(0.25)
    assert got.item() == pytest.approx((first + second) / 2, rel=1e-6)
    # A constant per-example lam equals the scalar form.
    logits, y_a, y_b = torch.randn(5, 4), torch.randint(0, 4, (5,)), torch.randint(0, 4, (5,))
    torch.testing.assert_close(mixup_ce(logits, y_a, y_b, torch.full((5,), 0.3)), mixup_ce(logits, y_a, y_b, 0.3))


def test_gradcheck_acm_distance_float64():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a, b):
        return acm_distance(activated_channel_map(a), activated_channel_map(b))

    assert torch.autograd.gradcheck(f, (fs, ft))

    def f_sum(a, b):
        return acm_distance(
            activated_channel_map(a, p=1, pooling="sum", normalize="none", activation="none"),
            activated_channel_map(b, p=1, pooling="sum", normalize="none", activation="none"),
        )

    assert torch.autograd.gradcheck(f_sum, (fs, ft))


def test_gradcheck_kd_kl_float64():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_kl(a, b, T=2.0), (s, t))
    assert torch.autograd.gradcheck(trades_kl, (s, t))


def test_kd_kl_is_computed_in_float32_from_low_precision_logits():
    # Under the CPU's bf16 autocast logits arrive in bf16; T^2 = 900 times a bf16 KL of
    # near-equal distributions went negative. The KL is taken in fp32 of the same values.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g).to(torch.bfloat16)
    t = (s.float() + 0.01 * torch.randn(16, 10, generator=g)).to(torch.bfloat16)
    got = kd_kl(s, t, T=30.0)
    assert got.dtype == torch.float32 and got.item() >= 0
    assert torch.equal(got, kd_kl(s.float(), t.float(), T=30.0))
