"""Every method proves it is active: a short real training (a few dozen SGD steps of a small
network on a generated, learnable batch) and the fact that makes it that method, for every
method of the registry; and, registry-wide, the ``term_*`` metrics of each method sum to its
loss (the loop turns them into each term's share of the loss, so a dead term shows in every
run)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.losses import trades_kl
from mixacm.methods import METHODS, build_method
from mixacm.methods.awp import _weights
from mixacm.methods.fat import early_stopped_pgd
from mixacm.methods.igam import gradient_matching, input_gradient
from mixacm.models import build_model

CHECKS: dict[str, Callable[[], None]] = {}


def proves(*names: str):
    def deco(fn):
        for name in names:
            CHECKS[name] = fn
        return fn
    return deco


@pytest.fixture(autouse=True)
def one_thread():
    # Small batches gain nothing from a second thread on the shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def learnable_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images = a class template + noise, in [0, 1]: a few dozen steps learn them."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 3, 32, 32, generator=g)
    y = torch.arange(n) % 10
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


def net(name: str = "resnet2b", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name)


def make(name: str, student: str = "resnet2b", **knobs):
    teacher = net("resnet4b", seed=1).eval() if METHODS.get(name).needs_teacher else None
    return build_method(name, net(student), teacher, **knobs)


def train(method, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05,
          after_step: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """``steps`` SGD steps of ``method`` on one batch, as the loop takes them (model and extra
    modules in one optimiser, ``after_backward`` between backward and step); the metrics read
    back after each step."""
    params = [*method.model.parameters(), *method.extra_modules().parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    method.model.train()
    history = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, metrics = method.loss(x, y)
        loss.backward()
        method.after_backward()
        opt.step()
        history.append({k: v.item() for k, v in metrics.items()})
        if after_step is not None:
            after_step(i)
    return history


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


# ----------------------------------------------------------------------------- the checks


@proves("standard")
def standard_learns_the_clean_batch():
    method, (x, y) = make("standard"), learnable_batch()
    h = train(method, x, y, 30)
    assert h[-1]["term_ce"] < 0.5 * h[0]["term_ce"]


@proves("at", "fast_at")
def adversarial_training_trains_on_inputs_worse_than_the_clean_ones():
    """AT (PGD) and Fast-AT (FGSM from a random start): the loss of every step is the CE of
    inputs within eps that the model finds harder than the clean ones, and it falls."""
    for name, knobs in (("at", {"eps": "8/255", "steps": 3, "step_size": "3/255"}), ("fast_at", {"eps": "8/255"})):
        method, (x, y) = make(name, **knobs), learnable_batch()
        h = train(method, x, y, 20)
        assert h[-1]["term_ce"] < h[0]["term_ce"], name
        # On the trained weights: the training inputs are harder than the clean batch.
        assert method.loss(x, y)[0].item() > ce(method.model, x, y) + 0.05, name


@proves("trades")
def trades_regularises_the_kl_its_attack_maximises():
    method, (x, y) = make("trades", eps="8/255", steps=3, step_size="3/255"), learnable_batch()
    h = train(method, x, y, 20)
    assert all(m["kl"] > 0 and m["term_kl"] == pytest.approx(6.0 * m["kl"], rel=1e-5) for m in h)
    # The inner maximisation raises the KL above that of its random start.
    torch.manual_seed(1)
    x_adv = method.attack(x, y)
    with torch.no_grad():
        nat = method.model(x)
        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        assert trades_kl(method.model(x_adv), nat) > 10 * trades_kl(method.model(start), nat)
    assert h[-1]["loss"] < h[0]["loss"]


@proves("free_at")
def free_at_carries_a_perturbation_its_own_backward_updates():
    method, (x, y) = make("free_at", eps="8/255", replays=4), learnable_batch()
    seen = []
    method.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    deltas = []
    train(method, x, y, 12, after_step=lambda i: deltas.append(method.delta.clone()))
    assert len(seen) == 12  # one forward per step: the attack costs no extra pass
    assert all(d.abs().max() <= 8 / 255 + 1e-6 for d in deltas)
    assert all(not torch.equal(a, b) for a, b in zip(deltas, deltas[1:]))  # updated every replay
    assert (seen[-1] - x).abs().mean() > 2 / 255  # the training inputs are perturbed


@proves("mixacm")
def mixacm_distance_to_the_teachers_channel_maps_falls():
    method, (x, y) = make("mixacm", gamma=5.0), learnable_batch()
    torch.manual_seed(0)
    h = train(method, x, y, 30, lr=0.02)
    assert mean(m["acm"] for m in h[-5:]) < 0.7 * mean(m["acm"] for m in h[:5])
    assert all(0 < m["lam"] < 1 for m in h) and all(m["term_acm"] > 0 and m["term_kd"] > 0 for m in h)


@proves("awp_at", "awp_trades")
def awp_perturbs_the_weights_after_its_warm_up_and_restores_them():
    for name, gamma in (("awp_at", 0.01), ("awp_trades", 0.005)):
        method = make(name, eps="8/255", steps=2, step_size="4/255", warmup_fraction=0.5)
        x, y = learnable_batch()
        method.begin_epoch(0, 2)  # warm-up: no perturbation
        h = train(method, x, y, 3)
        assert all(m["awp"] == 0 and m["awp_rel_norm"] == 0 for m in h), name
        method.begin_epoch(1, 2)
        weights = [p for _, p in _weights(method.model)]
        opt = torch.optim.SGD(method.model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(5):
            start = [p.detach().clone() for p in weights]
            opt.zero_grad(set_to_none=True)
            loss, m = method.loss(x, y)
            # The loss is taken at w + v, ||v|| = gamma ||w||: every perturbed layer moved.
            assert m["awp"].item() == 1 and m["awp_rel_norm"].item() == pytest.approx(gamma, rel=1e-4), name
            assert all(not torch.equal(p, s) for p, s in zip(weights, start)), name
            loss.backward()
            method.after_backward()
            # Before the optimiser step the weights are exactly those of the step's start.
            assert all(torch.equal(p, s) for p, s in zip(weights, start)), name
            opt.step()


@proves("fat", "fat_trades")
def fat_stops_misclassified_points_early():
    """With tau 0 an example stops once misclassified: the points the model gets wrong take
    fewer attack steps than the ones it gets right; training reports it in pgd_steps."""
    x, y = learnable_batch(64, seed=2)
    model = net()
    train(build_method("standard", model), x, y, 8)  # partly trained: some points right, some wrong
    model.eval()
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert 0 < int(wrong.sum()) < len(y)
    _, taken = early_stopped_pgd(model, x, y, eps=8 / 255, steps=6, step_size=2 / 255, tau=0)
    assert taken[wrong].mean() < taken[~wrong].mean()
    assert taken[wrong].max() == 0  # misclassified before the first step: stopped at once
    _, taken_at = early_stopped_pgd(model, x, y, eps=8 / 255, steps=6, step_size=2 / 255, tau=6)
    assert bool((taken_at == 6).all())  # tau >= steps: PGD
    for name in ("fat", "fat_trades"):
        method = make(name, eps="8/255", steps=6, step_size="2/255")
        h = train(method, x, y, 6)
        assert all(m["tau"] == 0 for m in h) and mean(m["pgd_steps"] for m in h) < 6, name


@proves("igam")
def igam_discriminator_learns_and_gradients_move_towards_the_teachers():
    x, y = learnable_batch(16)
    # The official knobs: D's accuracy leaves chance (either way: the student, which maximises
    # D's loss, can drive it below 0.5) within a few D steps.
    method = make("igam", ce_only_fraction=0)
    h = train(method, x, y, 25, lr=0.005)
    assert max(abs(m["disc_acc"] - 0.5) for m in h) >= 0.3
    assert all(m["igam_on"] == 1 for m in h) and all(m["term_adv"] < 0 for m in h)
    # The gradient-matching term pulls the student's input gradients towards the teacher's
    # faster than standard training. Its official weight (10, summed over the batch) is
    # ~1e-4 of the loss on a 16-image batch of this 0.1 M-parameter pair, so the mechanism is
    # shown with a weight that makes it the loss's main term and a D term that is negligible.
    teacher = net("resnet4b", seed=1).eval()

    def distance(model):
        return gradient_matching(input_gradient(model, x, y, False), input_gradient(teacher, x, y, False)).item()

    ends = {}
    for name, knobs in (("standard", {}), ("igam", {"ce_only_fraction": 0, "gamma": 1e6, "beta": 1e-3})):
        student = net()
        start = distance(student)
        method = build_method(name, student, teacher if name == "igam" else None, **knobs)
        train(method, x, y, 25, lr=0.02)
        ends[name] = distance(student) / start
    assert ends["igam"] < 0.8 * ends["standard"], ends


@proves("ard", "rslad")
def robust_distillation_kl_to_the_teacher_falls():
    x, y = learnable_batch()
    method = make("ard", eps="8/255", steps=3, step_size="3/255")
    h = train(method, x, y, 25, lr=0.05)
    assert mean(m["term_kl"] for m in h[-5:]) < 0.7 * mean(m["term_kl"] for m in h[:5])
    method = make("rslad", eps="8/255", steps=3, step_size="3/255")
    h = train(method, x, y, 25, lr=0.05)
    for key in ("kl_adv", "kl_nat"):
        assert mean(m[key] for m in h[-5:]) < 0.7 * mean(m[key] for m in h[:5]), key


# ----------------------------------------------------------------------------- the tests


def test_every_registered_method_has_a_check():
    assert set(CHECKS) == set(METHODS.names())


@pytest.mark.parametrize("check", sorted(set(CHECKS.values()), key=lambda f: f.__name__),
                         ids=lambda f: f.__name__)
def test_method_is_active(check):
    check()


TERM_CASES = [(name, {}) for name in METHODS.names()] + [
    ("igam", {"ce_only_fraction": 0}),
    ("ard", {"alpha": 0.5}),
    ("awp_trades", {"warmup_fraction": 0}),
    ("mixacm", {"ablation": "acm"}),
    ("mixacm", {"terms": [{"term": "sp", "weight": 10.0}, {"term": "kd", "weight": 2.0}]}),
]


@pytest.mark.parametrize(("name", "knobs"), TERM_CASES, ids=lambda v: str(v))
def test_term_metrics_sum_to_the_loss(name, knobs):
    if name in ("at", "awp_at", "ard", "rslad", "trades", "awp_trades", "fat", "fat_trades"):
        knobs = {"steps": 1, **knobs}
    method = make(name, student="tiny", **knobs)
    method.model.train()
    x, y = learnable_batch(8)
    torch.manual_seed(0)
    loss, metrics = method.loss(x, y)
    terms = {k: v for k, v in metrics.items() if k.startswith("term_")}
    assert terms, f"{name} reports no term_*"
    assert sum(v.item() for v in terms.values()) == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), terms
    assert all(not v.requires_grad for v in terms.values())


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("name", METHODS.names())
def test_step_reads_nothing_back_on_the_gpu(name, amp):
    """On CUDA, ``loss``, its backward and ``after_backward`` (attacks included) never
    synchronise with the host (``torch.cuda.set_sync_debug_mode("error")`` raises on any
    .item(), bool(tensor), copy to the host or boolean-mask indexing), in fp32 and under bf16
    autocast; the metrics stay on the device and their term_* sum to the loss."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    knobs = {"igam": {"ce_only_fraction": 0}, "awp_trades": {"warmup_fraction": 0}}.get(name, {})
    method = make(name, student="tiny", **knobs)
    method.model.to(dev, memory_format=torch.channels_last).train()
    if method.teacher is not None:
        method.teacher.to(dev, memory_format=torch.channels_last)
    extra = method.extra_modules().to(dev)  # in place: IGAM's discriminator, MixACM's maps
    opt = torch.optim.SGD([*method.model.parameters(), *extra.parameters()], lr=0.01, momentum=0.9)
    x, y = (t.to(dev) for t in learnable_batch(32))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16")

    def step(check: bool):
        opt.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            with autocast:
                loss, metrics = method.loss(x, y)
            loss.backward()
            method.after_backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
        return loss, metrics

    step(check=False)  # lazy initialisation (cuDNN, the CUDA generator) may synchronise once
    torch.cuda.synchronize()
    loss, metrics = step(check=True)
    assert all(v.device.type == "cuda" for v in metrics.values())
    terms = sum(v.item() for k, v in metrics.items() if k.startswith("term_"))
    assert terms == pytest.approx(loss.item(), rel=1e-4, abs=1e-5)
