"""Training methods: one optimiser step each, frozen teacher, Free-AT's carried perturbation,
knob validation, mode handling around attacks, and MixACM's blocks and ablation presets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.losses import acm_distance, kd_kl
from mixacm.methods import METHODS, build_method
from mixacm.methods.base import RecipeError
from mixacm.models import build_model
from mixacm.models.base import FeatureClassifier


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def student() -> FeatureClassifier:
    torch.manual_seed(0)
    return build_model("tiny")


def tiny_teacher() -> FeatureClassifier:
    # Other widths than the student, so MixACM needs its channel transformations.
    torch.manual_seed(1)
    return build_model("tiny", widths=(8, 16, 32))


class TwoGroupNet(FeatureClassifier):
    """A teacher with a stem and two residual groups (like the shared resnet4b)."""

    feature_names = ("stem", "layer1", "layer2")

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.layer1 = nn.Conv2d(4, 6, 3, 2, 1)
        self.layer2 = nn.Conv2d(6, 12, 3, 2, 1)
        self.fc = nn.Linear(12, 10)

    def _forward(self, z, want, feats):
        out = z
        for name in self.feature_names:
            out = torch.relu(getattr(self, name)(out))
            if name in want:
                feats[name] = out
        return self.fc(out.mean(dim=(2, 3)))


def make(name: str, **knobs):
    cls = METHODS.get(name)
    return build_method(name, student(), tiny_teacher() if cls.needs_teacher else None, **knobs)


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's metrics (device tensors) read back as numbers, as the loop does per interval."""
    return {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_takes_one_step(name):
    method = make(name)
    model, teacher = method.model, method.teacher
    model.train()
    before = params(model)
    teacher_before = params(teacher) if teacher is not None else []
    trainable = list(model.parameters()) + list(method.extra_modules().parameters())
    opt = torch.optim.SGD(trainable, lr=0.1)

    x, y = batch()
    opt.zero_grad()
    loss, metrics = method.loss(x, y)
    assert model.training, "the method must leave the model in training mode"
    loss.backward()
    method.after_backward()
    opt.step()

    assert metrics["loss"].item() == pytest.approx(loss.item())
    # Metrics are detached 0-d float32 tensors on the step's device (the loop reads them back
    # once per logging interval), never Python floats read inside the step.
    for key, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, key
        assert v.dtype == torch.float32 and v.device == loss.device and math.isfinite(v.item()), key
    changed = [not torch.equal(a, b) for a, b in zip(before, params(model))]
    assert any(changed), f"{name}: no parameter changed"
    if teacher is not None:
        assert not teacher.training
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, params(teacher)))


def bn_updates(model: FeatureClassifier) -> int:
    return int(model.layer1.bn1.num_batches_tracked)


@pytest.mark.parametrize(
    ("name", "knobs", "forwards_in_train_mode"),
    [
        ("at", {}, 11),  # default train, as Rice et al.'s code: 10 PGD forwards + the loss's
        ("at", {"attack_mode": "eval"}, 1),  # the attack's 10 forwards in eval mode: only the loss's
        ("fast_at", {}, 2),  # official: the FGSM forward is an ordinary training forward
        ("fast_at", {"attack_mode": "eval"}, 1),
        ("trades", {}, 2),  # eval-mode attack; clean and adversarial forwards of the loss
        ("trades", {"attack_mode": "train"}, 2 + 1 + 10),  # + target logits + 10 steps
        ("standard", {}, 1),
        ("free_at", {}, 1),
    ],
)
def test_attack_mode_decides_which_forwards_update_batchnorm(name, knobs, forwards_in_train_mode):
    method = make(name, **knobs)
    method.model.train()
    method.loss(*batch())
    assert bn_updates(method.model) == forwards_in_train_mode
    assert method.model.training


def test_trades_with_beta_zero_is_ce():
    method = make("trades", beta=0)
    method.model.train()
    x, y = batch()
    loss, metrics = method.loss(x, y)
    expected = F.cross_entropy(method.model(x), y)
    torch.testing.assert_close(loss, expected)
    assert metrics["kl"] > 0  # the regulariser was computed, only weighted by 0


def test_free_at_delta_stays_within_eps_and_changes_across_replays():
    eps = 8 / 255
    method = make("free_at", eps="8/255", replays=3)
    assert method.replays == 3 and method.recipe["replays"] == 3
    assert method.recipe["epochs"] == math.ceil(200 / 3)
    model = method.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    deltas = []
    for _ in range(3):
        opt.zero_grad()
        loss, _ = method.loss(x, y)
        loss.backward()
        method.after_backward()
        opt.step()
        deltas.append(method.delta.clone())
    for d in deltas:
        assert d.shape == x.shape
        assert d.abs().max().item() <= eps + 1e-7
    # First replay starts from 0, so one FGSM step of size eps reaches the corners of the ball.
    assert torch.allclose(deltas[0].abs()[deltas[0] != 0], torch.tensor(eps))
    assert not torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[1], deltas[2])

    # A smaller last batch continues from the leading part of the carried perturbation ...
    loss, _ = method.loss(x[:5], y[:5])
    torch.testing.assert_close(method._leaf.detach(), deltas[-1][:5])
    loss.backward()
    method.after_backward()
    # ... and the perturbation keeps its full size: rows 5.. are untouched, rows :5 moved
    # (the official code updates global_noise_data[0:n] only).
    assert method.delta.shape == x.shape
    torch.testing.assert_close(method.delta[5:], deltas[-1][5:])
    assert not torch.equal(method.delta[:5], deltas[-1][:5])
    after_small = method.delta.clone()
    # The next full batch continues from all of it (no reset to zero).
    method.loss(x, y)
    torch.testing.assert_close(method._leaf.detach(), after_small)
    # A larger batch keeps what it has and starts its extra rows from zero.
    x_big, y_big = batch(12, seed=1)
    method.loss(x_big, y_big)
    torch.testing.assert_close(method._leaf.detach()[:8], after_small)
    assert torch.count_nonzero(method._leaf[8:]) == 0

    # The carried perturbation survives a state round trip (resume).
    fresh = make("free_at", replays=3)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.delta, method.delta)


def test_free_at_after_backward_without_backward_is_an_error():
    method = make("free_at")
    method.loss(*batch())
    with pytest.raises(RuntimeError, match="after_backward"):
        method.after_backward()


@pytest.mark.parametrize(
    ("name", "knobs", "word"),
    [
        ("at", {"epss": 0.1}, "epss"),
        ("at", {"eps": 8}, "eps"),
        ("at", {"steps": 0}, "steps"),
        ("at", {"steps": 2.5}, "steps"),
        ("at", {"random_start": "yes"}, "random_start"),
        ("at", {"attack_mode": "test"}, "attack_mode"),
        ("trades", {"beta": -1}, "beta"),
        ("trades", {"step_size": "x"}, "step_size"),
        ("free_at", {"replays": 0}, "replays"),
        ("fast_at", {"step_scale": 0}, "step_scale"),
        ("standard", {"eps": "8/255"}, "eps"),
        ("mixacm", {"pooling": "max"}, "pooling"),
        ("mixacm", {"p": 3}, "p"),
        ("mixacm", {"T": 0}, "T"),
        ("mixacm", {"mixup_alpha": -1}, "mixup_alpha"),
        ("mixacm", {"transform": "conv"}, "transform"),
        ("mixacm", {"blocks": "all"}, "blocks"),
        ("mixacm", {"blocks": [["layer3", "layer9"]]}, "blocks"),
        ("mixacm", {"blocks": [["layer3"]]}, "blocks"),
        ("mixacm", {"ablation": "acm", "kd": True}, "kd"),
        ("mixacm", {"mixup": "yes"}, "mixup"),
        ("mixacm", {"ablation": "everything"}, "ablation"),
    ],
)
def test_bad_knobs_raise_naming_the_knob(name, knobs, word):
    with pytest.raises(ValueError, match=f"'{word}'"):
        make(name, **knobs)


def test_teacher_presence_is_checked():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("mixacm", student(), None)
    with pytest.raises(ValueError, match="does not use a teacher"):
        build_method("at", student(), tiny_teacher())
    with pytest.raises(KeyError, match="unknown method 'madry'"):
        build_method("madry", student())


def test_knob_listing_and_resolved_values():
    listed = {k["name"]: k for k in METHODS.get("at").knobs()}
    assert listed["eps"]["default"] == "8/255" and listed["eps"]["unit"] == "fraction of [0, 1]"
    method = make("at", eps="4/255", steps="5")
    assert method.resolved_knobs() == {
        "eps": 4 / 255, "steps": 5, "step_size": 2 / 255, "random_start": True, "attack_mode": "train",
        "clean_bn_forward": True,
    }


def test_recipes_follow_method_md():
    at, trades, mix = make("at"), make("trades"), make("mixacm")
    assert (at.recipe["epochs"], at.recipe["weight_decay"], at.recipe["milestones"]) == (200, 5e-4, [0.5, 0.75])
    assert (trades.recipe["epochs"], trades.recipe["weight_decay"]) == (76, 2e-4)
    # Official: lr / 10 from 1-based epoch 75, i.e. after 74 of the 76 epochs.
    assert trades.recipe["epochs"] * trades.recipe["milestones"][0] == pytest.approx(74)
    with pytest.raises(RecipeError, match="method 'mixacm' has no recipe for dataset 'cifar100'"):
        mix.recipe_for("cifar100")
    imagenet = mix.recipe_for("imagenet")
    assert (imagenet["epochs"], imagenet["weight_decay"], imagenet["lr"], imagenet["batch_size"]) == (90, 1e-4, 0.1, 256)
    assert make("fast_at").recipe["schedule"] == "cyclic"
    # A copy: editing it does not change the method's recipe.
    mix.recipe_for("cifar10")["milestones"].append(0.9)
    assert mix.recipe_for("cifar10")["milestones"] == [0.5, 0.75]


# -- MixACM ---------------------------------------------------------------------------------


def test_mixacm_default_blocks_pair_groups_from_the_last_one():
    method = build_method("mixacm", student(), TwoGroupNet())
    assert method.pairs == [("layer2", "layer1"), ("layer3", "layer2")]
    assert method.resolved_knobs()["blocks"] == [["layer2", "layer1"], ["layer3", "layer2"]]
    # tiny: layer2 has 32 channels, layer3 64; teacher layer1 6, layer2 12.
    shapes = {k: tuple(m.weight.shape) for k, m in method.extra_modules().items()}
    assert shapes == {"layer2_to_layer1": (6, 32), "layer3_to_layer2": (12, 64)}

    with_stem = build_method("mixacm", student(), TwoGroupNet(), blocks="groups+stem")
    assert with_stem.pairs[0] == ("stem", "stem")

    explicit = build_method("mixacm", student(), TwoGroupNet(), blocks=[["layer1", "stem"]], transform="interpolate")
    assert explicit.pairs == [("layer1", "stem")]
    assert sum(p.numel() for p in explicit.extra_modules().parameters()) == 0


def test_mixacm_equal_channels_use_identity_and_linear_starts_at_interpolation():
    same = build_method("mixacm", student(), build_model("tiny"))
    assert all(isinstance(m, nn.Identity) for m in same.extra_modules().values())

    lin = build_method("mixacm", student(), tiny_teacher(), transform="linear")
    interp = build_method("mixacm", student(), tiny_teacher(), transform="interpolate")
    a = torch.rand(4, 64)
    torch.testing.assert_close(lin.transforms["layer3_to_layer3"](a), interp.transforms["layer3_to_layer3"](a))
    # Interpolating 64 -> 32 points with aligned ends keeps the first and last values.
    out = interp.transforms["layer3_to_layer3"](a)
    torch.testing.assert_close(out[:, [0, -1]], a[:, [0, -1]])


def test_mixacm_teacher_sees_the_student_batch_and_transforms_get_gradients():
    method = make("mixacm")
    seen: dict[str, torch.Tensor] = {}
    method.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    method.teacher.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0]))
    method.teacher.train()  # a careless caller: the method still runs the teacher in eval mode
    x, y = batch()
    torch.manual_seed(3)
    loss, metrics = method.loss(x, y)
    assert not method.teacher.training
    assert torch.equal(seen["student"], seen["teacher"])
    assert 0 < metrics["lam"] < 1 and not torch.equal(seen["student"], x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.extra_modules().parameters())


@pytest.mark.parametrize(
    ("preset", "on"),
    [
        ("full", {"acm", "kd", "mixup"}),
        ("acm", {"acm"}),
        ("acm+kd", {"acm", "kd"}),
        ("acm+mixup", {"acm", "mixup"}),
        ("kd", {"kd"}),
    ],
)
def test_mixacm_ablation_presets_switch_terms(preset, on):
    beta, gamma = 0.5, 3.0
    method = make("mixacm", ablation=preset, beta=beta, gamma=gamma)
    knobs = method.resolved_knobs()
    assert {s for s in ("acm", "kd", "mixup") if knobs[s]} == on and knobs["ablation"] == preset
    model, teacher = method.model.train(), method.teacher
    x, y = batch()
    loss, m = method.loss(x, y)
    m = floats(m)

    assert loss.item() == pytest.approx(m["ce"] + beta * m["kd"] + gamma * m["acm"], rel=1e-6)
    for term in ("acm", "kd"):
        assert (m[term] > 0) == (term in on)
        if term not in on:
            assert m[term] == 0.0
    if "mixup" in on:
        assert 0 < m["lam"] < 1
        return
    # Clean inputs and plain CE: every term can be recomputed from the networks directly.
    assert m["lam"] == 1.0
    with torch.no_grad():
        # The default activation is the network's own: the features as the next layer receives them.
        logits, s_feats = model(x, features=("layer1", "layer2", "layer3"), activated=True)
        t_logits, t_feats = teacher(x, features=("layer1", "layer2", "layer3"), activated=True)
    assert m["ce"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    if "kd" in on:
        assert m["kd"] == pytest.approx(kd_kl(logits, t_logits).item(), rel=1e-5)
    if "acm" in on:
        with torch.no_grad():
            expected = sum(
                acm_distance(method.student_channel_map(n, n, s_feats[n]), method.channel_map(t_feats[n])).item()
                for n in ("layer1", "layer2", "layer3")
            )
        assert m["acm"] == pytest.approx(expected, rel=1e-5)


def test_mixacm_switches_without_preset_name_the_matching_preset():
    assert make("mixacm", kd=False).resolved_knobs()["ablation"] == "acm+mixup"
    custom = make("mixacm", acm=False, kd=False, mixup=True).resolved_knobs()
    assert custom["ablation"] == "custom" and custom["mixup"] and not custom["acm"]
    assert make("mixacm", ablation="acm", kd=False).resolved_knobs()["ablation"] == "acm"


def test_mixacm_knobs_are_checked_without_networks():
    # The config is validated before any job starts, when no network exists yet.
    cls = METHODS.get("mixacm")
    with pytest.raises(ValueError, match="'kd'"):
        cls.resolve({"ablation": "acm", "kd": True})
    with pytest.raises(ValueError, match="'blocks'"):
        cls.resolve({"blocks": ["layer1", "layer2"]})
    assert cls.resolve({"ablation": "kd"}).acm is False


@pytest.mark.parametrize("name", METHODS.names())
def test_resolved_knobs_round_trip(name):
    # A run's recorded knobs rebuild the same method (what a rerun from results relies on).
    used = make(name, **({"ablation": "acm+kd"} if name == "mixacm" else {})).resolved_knobs()
    assert make(name, **used).resolved_knobs() == used


# -- recipes per dataset ----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_every_recipe_names_its_source_and_resolves(name):
    from mixacm.config import load_run_config, resolve_recipe

    cls = METHODS.get(name)
    assert cls.recipe_datasets(), f"method {name!r} declares no recipe"
    for dataset in cls.recipe_datasets():
        assert len(cls.recipes[dataset]["source"]) > 10, (name, dataset)
        cfg = {"dataset": {"name": dataset}, "method": {"name": name}}
        if cls.needs_teacher:
            cfg["teacher"] = "teacher.pt"
        recipe = resolve_recipe(load_run_config(cfg))
        assert recipe["epochs"] >= 1 and recipe["batch_size"] >= 1


def test_imagenet_recipes_of_the_papers():
    from mixacm.config import load_run_config, resolve_recipe

    def resolved(name, **knobs):
        cfg = {"dataset": {"name": "imagenet"}, "method": {"name": name, **knobs}}
        if name == "mixacm":
            cfg["teacher"] = "t.pt"
        cfg = load_run_config(cfg)
        return resolve_recipe(cfg), METHODS.get(name).resolve(knobs, dataset="imagenet")

    # Free-AT (FreeAdversarialTraining configs.yml + main_free.py): m 4, eps 4/255, budget 90 ->
    # 23 epochs, lr 0.1 / 10 every ceil(30 / 4) = 8 epochs, batch 256, wd 1e-4.
    free, k = resolved("free_at")
    assert (k.replays, k.eps, k.budget_epochs) == (4, 4 / 255, 90)
    assert (free["epochs"], free["batch_size"], free["lr"], free["weight_decay"]) == (23, 256, 0.1, 1e-4)
    assert [m * 23 for m in free["milestones"]] == pytest.approx([8, 16])
    # Fast-AT (fast_adversarial ImageNet): 15 epochs, FGSM 1.25 eps from a random start at 4/255.
    fast, k = resolved("fast_at")
    assert (k.eps, k.step_scale, fast["epochs"], fast["schedule"]) == (4 / 255, 1.25, 15, "piecewise")
    assert fast["lr"] == 0.4 and fast["lr_points"][1] == pytest.approx([1 / 15, 1.0])
    # MixACM (method.md): SGD, lr 0.1 at batch 256, wd 1e-4, 90 epochs.
    mix, _ = resolved("mixacm")
    assert (mix["epochs"], mix["batch_size"], mix["lr"], mix["weight_decay"]) == (90, 256, 0.1, 1e-4)
    # None of them is the CIFAR recipe.
    for r in (free, fast, mix):
        assert r["batch_size"] != 128


def test_no_recipe_for_the_dataset_is_a_config_error_naming_both():
    from mixacm.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="method 'at' has no recipe for dataset 'imagenet'"):
        load_run_config({"dataset": {"name": "imagenet"}, "method": {"name": "at"}})
    with pytest.raises(ConfigError, match="method 'trades' has no recipe for dataset 'cifar100'"):
        load_run_config({"dataset": {"name": "cifar100"}, "method": {"name": "trades"}})
    with pytest.raises(RecipeError, match="method 'fast_at' has no recipe for dataset 'imagefolder'"):
        make("fast_at").recipe_for("imagefolder")


def test_at_attacks_the_model_in_training_mode_by_default():
    method = make("at", steps=2)
    seen = []
    method.model.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    method.model.eval()  # the loop sets train(); the attack must not depend on it either way
    method.model.train()
    method.loss(*batch())
    assert seen == [True, True, True]  # 2 PGD forwards + the loss's, all in training mode
    seen.clear()
    make_eval = make("at", steps=2, attack_mode="eval")
    make_eval.model.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    make_eval.model.train()
    make_eval.loss(*batch())
    assert seen == [False, False, True]


def test_docs_recipe_table_matches_the_registry():
    """docs/recipes.md has one row per (method, dataset) recipe, with the code's epochs, batch,
    lr, weight decay and weight-decay exemptions."""
    from pathlib import Path

    from mixacm.config import load_run_config, resolve_recipe

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] in METHODS:
            rows[(cells[0], cells[1])] = cells
    expected = set()
    for name in METHODS.names():
        cls = METHODS.get(name)
        for dataset in cls.recipe_datasets():
            expected.add((name, dataset))
            cfg = {"dataset": {"name": dataset}, "method": {"name": name}, "teacher": "t.pt" if cls.needs_teacher else None}
            r = resolve_recipe(load_run_config(cfg))
            cells = rows.get((name, dataset))
            assert cells is not None, f"docs/recipes.md has no row for {name} on {dataset}"
            assert (int(cells[2]), int(cells[3]), float(cells[4]), float(cells[5])) == (
                r["epochs"], r["batch_size"], r["lr"], r["weight_decay"]), (name, dataset)
            assert cells[6] == (", ".join(r["weight_decay_exempt"]) or "none"), (name, dataset)
    assert set(rows) == expected


# -- the activated channel map of pre-activation networks ---------------------------------------


def test_wrn_student_acm_is_the_map_its_next_layer_receives():
    """WRN student and teacher (pre-activation): with the default activation ('network') the ACM
    of layer k is computed from exactly the tensor the network's next unit convolves (the next
    group's first BN + ReLU; after the last group, the final BN + ReLU before pooling), in the
    training-mode forward of the loss itself; it differs from relu(raw residual sum)."""
    from mixacm.losses import activated_channel_map
    from mixacm.models import build_model

    torch.manual_seed(0)
    student = build_model("wide_resnet", depth=10, widen_factor=1)
    teacher = build_model("wide_resnet", depth=10, widen_factor=2).eval()
    method = build_method("mixacm", student, teacher, ablation="acm")
    assert method.knobs.activation == "network"
    assert method.run_details()["acm_activation"]["student"].startswith("network: next unit's BN + ReLU")

    received: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda mod, args, out=None: received.__setitem__(name, (args[0] if out is None else torch.relu(out)).detach())

    # What the next layer receives: the first conv of the next group (its input is relu(bn1(x)))
    # and the final BN's output through the ReLU.
    student.block2.layer[0].conv1.register_forward_pre_hook(keep("layer1"))
    student.block3.layer[0].conv1.register_forward_pre_hook(keep("layer2"))
    student.bn1.register_forward_hook(lambda mod, args, out: received.__setitem__("layer3", torch.relu(out).detach()))
    # What the loss itself computes the ACM from: the features of the student's forward.
    used: dict[str, torch.Tensor] = {}
    forward = student.forward

    def spy(x, features=(), activated=False):
        out = forward(x, features=features, activated=activated)
        if features:
            used.update({k: v.detach() for k, v in out[1].items()})
        return out

    student.forward = spy
    student.train()
    x, y = batch()
    method.loss(x, y)
    assert sorted(used) == ["layer1", "layer2", "layer3"]
    for name in used:
        torch.testing.assert_close(used[name], received[name], rtol=0, atol=0)
        acm = method.channel_map(used[name])
        torch.testing.assert_close(acm, activated_channel_map(received[name], activation="none"))
    # The old map, relu of the raw residual sum, is a different vector.
    with torch.no_grad():
        _, raw = student(x, features=("layer3",))
    assert not torch.allclose(method.channel_map(used["layer3"]),
                              activated_channel_map(raw["layer3"], activation="relu"), atol=1e-3)


def test_activated_features_leave_the_logits_unchanged():
    from mixacm.models import build_model

    for name in ("tiny", "preact_resnet18"):
        torch.manual_seed(0)
        model = build_model(name).eval()
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
            a_logits, act = model(x, features=model.feature_names, activated=True)
            _, raw = model(x, features=model.feature_names)
        torch.testing.assert_close(a_logits, logits)
        for f in model.feature_names:
            assert act[f].min() >= 0 and act[f].shape == raw[f].shape


def test_mixacm_ce_weight_scales_only_the_hard_label_term():
    x, y = batch()
    losses = {}
    for w in (1.0, 0.25):
        method = make("mixacm", ce_weight=w, beta=0.5, gamma=3.0)
        torch.manual_seed(5)
        loss, m = method.loss(x, y)
        m = floats(m)
        assert loss.item() == pytest.approx(w * m["ce"] + 0.5 * m["kd"] + 3.0 * m["acm"], rel=1e-6)
        losses[w] = m
    # Same seed, same mixup: the unweighted terms agree; only the total changed.
    assert losses[1.0]["ce"] == pytest.approx(losses[0.25]["ce"], rel=1e-6)


def test_mixacm_one_lam_per_example():
    method = make("mixacm", mixup_lambda="sample")
    seen: dict[str, torch.Tensor] = {}
    method.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    x, y = batch(n=64)
    torch.manual_seed(2)
    _, m = method.loss(x, y)
    # Recreate the draws: per-example lam from Beta(1, 1), then the permutation.
    torch.manual_seed(2)
    lam = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((64,))
    perm = torch.randperm(64)
    expected = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
    torch.testing.assert_close(seen["student"], expected)
    assert m["lam"] == pytest.approx(float(lam.mean()), rel=1e-6)
    assert lam.std() > 0.1  # distinct values, not one shared lam


def test_mixacm_input_noise_is_bounded_uniform_noise_and_zero_is_the_paper():
    eps = 2 / 255
    x, y = batch()
    seen = {}
    for noise in ("0", "2/255"):
        method = make("mixacm", input_noise=noise, mixup=False, ablation="custom")
        method.model.register_forward_pre_hook(lambda m, args, k=noise: seen.__setitem__(k, args[0].detach()))
        torch.manual_seed(0)
        method.loss(x, y)
    assert torch.equal(seen["0"], x)  # no mixup, no noise: the clean batch
    delta = seen["2/255"] - x
    assert delta.abs().max() <= eps + 1e-7 and delta.abs().max() > eps / 2
    assert seen["2/255"].min() >= 0 and seen["2/255"].max() <= 1
    assert make("mixacm").resolved_knobs()["input_noise"] == 0.0
    with pytest.raises(ValueError, match="input_noise"):
        make("mixacm", input_noise=-0.1)
