"""The training loop: schedules at known steps, resume equals an uninterrupted run, divergence
keeps the last good checkpoint, one metrics line an epoch, model selection."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from mixacm.checkpoint import CheckpointError, load_model_file, model_spec, save_model_file
from mixacm.config import ConfigError
from mixacm.data import CIFAR_CLASSES, DataError
from mixacm.methods import METHODS
from mixacm.models import build_model
from mixacm.train import ResumeError, TrainingDiverged, make_lr_scheduler, train

N_CLASSES, PER_CLASS = 10, 8  # 80 training images: 5 batches of 16
CIFAR10_CLASSES = CIFAR_CLASSES["cifar10"]  # a CIFAR-10 folder's class folders carry these names


def make_image_folder(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """A CIFAR-shaped image folder of random PNGs (train/ and test/, 10 class folders)."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(N_CLASSES):
            folder = root / split / CIFAR10_CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # Class-dependent brightness, so a few steps can learn something.
                img = (torch.rand(3, 32, 32, generator=g) * 80 + 16 * c).clamp(0, 255).to(torch.uint8)
                write_png(img, str(folder / f"{i}.png"))
    return root


def make_teacher(path: Path, name: str = "tiny", seed: int = 1) -> Path:
    torch.manual_seed(seed)
    save_model_file(build_model(name), model_spec(name), path, {"role": "test teacher"})
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches of 16 tiny images gain nothing from a second thread, and on a shared machine two
    # threads that wait for each other at every operator make these runs several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def run_config(data_root: Path, method: dict, teacher: Path | None = None, **optim) -> dict:
    return {
        "seed": 3,
        "device": "cpu",
        "dataset": {"name": "cifar10", "root": str(data_root), "cache": False, "augment": True},
        "model": {"name": "tiny"},
        "teacher": str(teacher) if teacher else None,
        "method": method,
        "optim": {"epochs": 3, "batch_size": 16, "lr": 0.05, **optim},
        "train": {"progress": False},
    }


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- schedules


def lrs(schedule: str, epochs: int, steps_per_epoch: int = 1, lr: float = 1.0, **recipe) -> list[float]:
    """The lr of every optimiser step of a recipe, as torch's scheduler sets it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_lr_scheduler(opt, {"schedule": schedule, "epochs": epochs, "lr": lr, **recipe}, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_drops_at_fraction_milestones():
    # 200 epochs x 10 steps, lr / 10 at 50 % and 75 %: the drops land on epochs 100 and 150.
    s = lrs("step", 200, 10, milestones=[0.5, 0.75], gamma=0.1)
    assert [s[t] for t in (0, 999, 1000, 1499, 1500, 1999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # TRADES: 76 epochs, lr / 10 from 1-based epoch 75 on = after 74/76 of training.
    trades = lrs("step", 76, 391, milestones=[74 / 76], gamma=0.1)
    assert trades[74 * 391 - 1] == 1.0 and trades[74 * 391] == pytest.approx(0.1)


def test_step_schedule_equals_the_closed_form_bit_for_bit():
    # lr * gamma ** (milestones reached): what the hand-written schedule computed before torch's
    # MultiStepLR replaced it (config/ci.yaml's 4-step runs cross two milestones).
    s = lrs("step", 1, 4, lr=0.1, milestones=[0.5, 0.75], gamma=0.1)
    assert s == [0.1, 0.1, 0.1 * 0.1 ** 1, 0.1 * 0.1 ** 2]


def test_cosine_schedule_values():
    s = lrs("cosine", 100)
    assert s[0] == 1.0
    assert s[50] == pytest.approx(0.5)
    assert s[25] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert s[99] == pytest.approx((1 + math.cos(math.pi * 99 / 100)) / 2)


def test_cyclic_schedule_is_one_triangle_peaking_halfway_as_cycliclr():
    s = lrs("cyclic", 100)
    # Fast-AT's CyclicLR(base 0, step_size_up = step_size_down = total / 2), stepped after each
    # batch: step t trains at lr_max * interp(t / total); the peak is step 50, step 0 has lr 0.
    assert s[50] == pytest.approx(1.0)
    assert s[25] == pytest.approx(0.5) and s[75] == pytest.approx(0.5)
    assert s[0] == 0.0 and s[99] == pytest.approx(0.02)
    # Another peak position is a recipe value (optim.lr_peak).
    forty = lrs("cyclic", 10, 10, lr_peak=0.4)
    assert max(forty) == pytest.approx(1.0) and forty.index(max(forty)) == 40


def test_piecewise_schedule_interpolates_points_at_t_plus_one():
    # Fast-AT ImageNet phase 1 over 15 epochs of 10 steps: 0 -> 1 in the first epoch, 0.1 at epoch 6.
    s = lrs("piecewise", 15, 10, lr_points=[[0, 0], [1 / 15, 1], [6 / 15, 0.1], [1, 0.001]])
    assert s[4] == pytest.approx(0.5) and s[9] == pytest.approx(1.0)
    assert s[59] == pytest.approx(0.1) and s[149] == pytest.approx(0.001)


def test_warmup_and_constant():
    s = lrs("constant", 10, 10, warmup_epochs=1)
    assert [s[t] for t in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    # Warmup multiplies into the step schedule.
    w = lrs("step", 10, 10, warmup_epochs=1, milestones=[0.5], gamma=0.1)
    assert [w[t] for t in (0, 9, 49, 50, 99)] == pytest.approx([0.1, 1.0, 1.0, 0.1, 0.1])
    with pytest.raises(ConfigError, match="warmup"):
        lrs("cyclic", 10, 10, warmup_epochs=1)


def test_scheduler_state_round_trip_continues_the_same_lrs():
    # Resume: a scheduler rebuilt and loaded from a state_dict continues where the first stopped.
    recipe = {"schedule": "cyclic", "epochs": 4, "lr": 0.2, "lr_peak": 0.5}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = make_lr_scheduler(opt, recipe, 5)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched2 = make_lr_scheduler(opt2, recipe, 5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        opt.step(), sched.step(), opt2.step(), sched2.step()


# ----------------------------------------------------------------------------- official recipes, as run


def test_trades_recipe_schedule_drops_from_epoch_75_of_76():
    """TRADES's resolved recipe through the schedule builder: with 391 steps an epoch, every step
    of (1-based) epoch 74 trains at lr 0.1, every step of epochs 75 and 76 at 0.01."""
    from mixacm.config import load_run_config, resolve_recipe

    recipe = resolve_recipe(load_run_config({"method": {"name": "trades"}}))
    s = lrs(recipe["schedule"], recipe["epochs"], 391, lr=recipe["lr"], milestones=recipe["milestones"],
            gamma=recipe["gamma"])
    lr = {e: {round(x, 12) for x in s[(e - 1) * 391: e * 391]} for e in (74, 75, 76)}
    assert lr[74] == {0.1} and lr[75] == lr[76] == {0.01}


@pytest.mark.slow
def test_trades_lr_drops_from_epoch_75_of_76(tmp_path, data_root):
    """The lr each epoch trains at, read from metrics.jsonl of a run on TRADES's own recipe (one
    step an epoch): 0.1 up to epoch 74, 0.01 at epochs 75 and 76 (train_trades_cifar10.py)."""
    cfg = run_config(data_root, {"name": "trades", "steps": 1})
    cfg["optim"] = {"batch_size": 16}
    cfg["dataset"]["cache"] = True
    cfg["train"]["max_steps_per_epoch"] = 1
    summary = train(cfg, tmp_path / "trades")
    lrs = {line["epoch"]: line["lr"] for line in metric_lines(tmp_path / "trades")}
    assert summary["epochs"] == 76 and summary["recipe"]["source"].startswith("Zhang et al. 2019")
    assert (lrs[1], lrs[74], lrs[75], lrs[76]) == pytest.approx((0.1, 0.1, 0.01, 0.01))


def test_fast_at_cyclic_lr_peaks_halfway(tmp_path, data_root):
    """Fast-AT's recipe (15 epochs, cyclic to 0.2) at two steps an epoch: the halfway step (15 of
    30) is the last of epoch 8 and trains at the peak 0.2; the lr rises before it and falls after."""
    cfg = run_config(data_root, {"name": "fast_at"})
    cfg["optim"] = {"batch_size": 16}
    cfg["train"]["max_steps_per_epoch"] = 2
    summary = train(cfg, tmp_path / "fast")
    lrs = [line["lr"] for line in metric_lines(tmp_path / "fast")]
    assert summary["recipe"]["schedule"] == "cyclic" and summary["recipe"]["lr_peak"] == 0.5
    assert len(lrs) == 15 and summary["recipe"]["milestones"] == []  # no unread milestones
    assert "milestones" not in METHODS.get("fast_at").recipes["cifar10"]
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 7  # epoch 8
    assert lrs[6] == pytest.approx(0.2 * 13 / 15) and lrs[8] == pytest.approx(0.2 * 13 / 15)
    assert lrs == sorted(lrs[:8]) + sorted(lrs[8:], reverse=True)


def test_run_records_say_what_ran(tmp_path, data_root):
    """Free-AT with its epochs overridden records the budget it trained (epochs x m), the recipe's
    source and which keys the config overrode."""
    cfg = run_config(data_root, {"name": "free_at", "replays": 2}, epochs=1)
    cfg["train"]["max_steps_per_epoch"] = 1
    summary = train(cfg, tmp_path / "free")
    assert summary["knobs"]["budget_epochs"] == 2 and summary["knobs"]["replays"] == 2
    rec = summary["recipe"]
    assert rec["epochs"] == 1 and rec["replays"] == 2 and rec["dataset"] == "cifar10"
    assert rec["overrides"] == ["batch_size", "epochs", "lr"] and "free_adv_train" in rec["source"]
    meta = load_model_file(tmp_path / "free" / "model.pt")[1]["meta"]
    assert meta["recipe"] == rec and meta["knobs"]["budget_epochs"] == 2


# ----------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("method", [
    {"name": "free_at", "replays": 2}, {"name": "mixacm"},
    # Measured 71 s and 81 s on the 2-core machine at load average 11 (the first two: 44 s, 32 s).
    pytest.param({"name": "igam", "ce_only_fraction": 0.4}, marks=pytest.mark.slow),  # IGAM from epoch 2
    pytest.param({"name": "awp_trades", "steps": 1, "warmup_fraction": 0.4}, marks=pytest.mark.slow),
])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, data_root, teacher_file, method):
    """Free-AT carries a perturbation and replays; MixACM has extra modules, a teacher and mixup
    draws; IGAM a discriminator (an extra module), its step count and a phase that begin_epoch
    switches (from epoch 2 of 3 here); AWP a warm-up that begin_epoch sets
    (from epoch 2 of 3 here): a resumed run must restore all of it (and the RNG) to end on
    identical weights."""
    teacher = teacher_file if METHODS.get(method["name"]).needs_teacher else None
    cfg = run_config(data_root, method, teacher)
    full = train(cfg, tmp_path / "full")
    replays = method.get("replays", 1)
    assert full["steps"] == 3 * 5 * replays  # 3 epochs x 5 batches x replays

    out = tmp_path / "killed"
    # Killed in the middle of epoch 2: nothing of epoch 2 written, epoch 1 checkpointed.
    partial = train(cfg, out, stop_after_steps=7 * replays)
    assert partial["completed"] is False
    assert not (out / "model.pt").exists()
    assert [line["epoch"] for line in metric_lines(out)] == [1]
    resumed = train(cfg, out)
    assert resumed["resumed_from_epoch"] == 1 and resumed["steps"] == full["steps"]

    a, b = weights(tmp_path / "full" / "model.pt"), weights(out / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The logs agree too (apart from timings): one line an epoch, same losses.
    la, lb = metric_lines(tmp_path / "full"), metric_lines(out)
    assert [line["epoch"] for line in lb] == [1, 2, 3]
    assert [line["loss"] for line in la] == [line["loss"] for line in lb]
    if method["name"] == "awp_trades":  # the loop told the method each epoch
        assert [line["awp"] for line in la] == [0.0, 1.0, 1.0]


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    cls = METHODS.get("standard")
    real_loss = cls.loss
    out = tmp_path / "run"
    seen: dict[str, object] = {"calls": 0}

    def loss_going_nan(self, x, y):
        seen["calls"] += 1
        loss, metrics = real_loss(self, x, y)
        if seen["calls"] == 8:  # the 3rd step of epoch 2
            return loss * float("nan"), {**metrics, "ce": float("nan")}
        return loss, metrics

    monkeypatch.setattr(cls, "loss", loss_going_nan)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3 .*optimiser step 8.*ce=nan"):
        train(run_config(data_root, {"name": "standard"}), out)
    # Epoch 1's files (written in the background during epoch 2) are complete; nothing of epoch 2.
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 5 and len(state["history"]) == 1
    assert [line["epoch"] for line in metric_lines(out)] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "state.pt"]
    assert not (out / "model.pt").exists() and not (out / "train_summary.json").exists()


def test_resume_refuses_a_state_from_another_config(tmp_path, data_root):
    out = tmp_path / "run"
    cfg = run_config(data_root, {"name": "standard"}, epochs=1)
    train(cfg, out)
    with pytest.raises(ResumeError, match="config hash"):
        train(run_config(data_root, {"name": "standard"}, epochs=1, lr=0.01), out)
    # Renaming the run or hiding progress bars is not another experiment.
    train({**cfg, "name": "renamed", "train": {"progress": False}}, out)


def test_metrics_summary_and_model_file(tmp_path, data_root):
    out = tmp_path / "run"
    cfg = run_config(data_root, {"name": "standard"}, epochs=2, schedule="constant")
    cfg["train"]["max_steps_per_epoch"] = 3
    summary = train(cfg, out)
    lines = metric_lines(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert [line["step"] for line in lines] == [3, 6]  # capped at 3 steps an epoch
    assert all(line["lr"] == 0.05 and line["images_per_s"] > 0 and "ce" in line for line in lines)
    assert summary["images"] == 2 * 3 * 16
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk["config_hash"] == summary["config_hash"] and on_disk["selection"] == {"mode": "last", "epoch": 2}
    _, info = load_model_file(out / "model.pt")
    meta = info["meta"]
    assert meta["method"] == "standard" and meta["seed"] == 3 and meta["dataset"]["fraction"] == 1.0
    assert meta["recipe"]["lr"] == 0.05 and meta["provenance"]["torch_version"] == torch.__version__


def test_best_pgd_selection_keeps_the_best_holdout_epoch(tmp_path, data_root):
    cfg = run_config(data_root, {"name": "standard"}, epochs=3, lr=0.2, schedule="constant")
    cfg["dataset"].update(holdout=20)
    cfg["train"].update(selection="best_pgd", selection_n=20, selection_eps="2/255")
    summary = train(cfg, tmp_path / "run")
    lines = metric_lines(tmp_path / "run")
    scores = [line["holdout_pgd_pct"] for line in lines]
    best = scores.index(max(scores)) + 1  # the first epoch reaching the maximum
    assert summary["selection"]["epoch"] == best
    assert summary["selection"]["holdout_pgd_pct"] == max(scores)
    assert summary["images"] == 3 * 3 * 16  # 60 training images left: 3 batches an epoch
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    chosen = weights(tmp_path / "run" / "model.pt")
    assert all(torch.equal(chosen[k], v) for k, v in state["best"]["model"].items())


def test_last_selection_scores_the_holdout_on_the_last_epoch_only(tmp_path, data_root):
    cfg = run_config(data_root, {"name": "standard"}, epochs=2, lr=0.2, schedule="constant")
    cfg["dataset"].update(holdout=20)
    cfg["train"].update(selection_n=20, selection_eps="2/255")
    summary = train(cfg, tmp_path / "run")
    lines = metric_lines(tmp_path / "run")
    assert "holdout_pgd_pct" not in lines[0] and lines[1]["holdout_n"] == 20
    sel = summary["selection"]
    assert sel["mode"] == "last" and sel["epoch"] == 2
    assert sel["holdout_pgd_pct"] == lines[1]["holdout_pgd_pct"] and sel["n"] == 20
    # The kept model is the last epoch's, the one the holdout scored.
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    chosen = weights(tmp_path / "run" / "model.pt")
    assert all(torch.equal(chosen[k], v) for k, v in state["model"].items())


def test_a_budget_in_steps_trains_as_many_steps_on_less_data(tmp_path, data_root):
    # 80 images, batch 16 (last partial batch dropped): 5 batches an epoch on all, 2 on half (40
    # images). 10 steps = 2 full
    # epochs = 5 epochs of half.
    runs = {}
    for fraction in (1.0, 0.5):
        cfg = run_config(data_root, {"name": "standard"}, steps=10, schedule="constant")
        del cfg["optim"]["epochs"]  # the budget in steps decides them (both set is refused)
        cfg["dataset"]["fraction"] = fraction
        runs[fraction] = train(cfg, tmp_path / f"frac{fraction}")
    assert runs[1.0]["epochs"] == 2 and runs[0.5]["epochs"] == 5
    assert runs[1.0]["steps"] == runs[0.5]["steps"] == 10
    _, info = load_model_file(tmp_path / "frac0.5" / "model.pt")
    assert info["meta"]["recipe"]["epochs"] == 5 and info["meta"]["recipe"]["steps"] == 10


def test_bad_input_is_refused_before_anything_is_written(tmp_path, data_root):
    with pytest.raises(ConfigError, match="dataset.fraction"):
        train({**run_config(data_root, {"name": "standard"}), "dataset": {"fraction": 0}}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="missing.pt"):
        train(run_config(data_root, {"name": "mixacm"}, tmp_path / "missing.pt"), tmp_path / "x")
    with pytest.raises(DataError, match="dataset.root"):
        train(run_config(tmp_path / "no-data", {"name": "standard"}), tmp_path / "x")
    with pytest.raises(ConfigError, match="model.kwargs: tiny: .*depth"):
        train({**run_config(data_root, {"name": "standard"}), "model": {"name": "tiny", "kwargs": {"depth": 3}}},
              tmp_path / "x")
    with pytest.raises(ConfigError, match="batch_size"):  # 80 images cannot fill a batch of 128
        train(run_config(data_root, {"name": "standard"}, batch_size=128), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_each_weighted_term_gets_its_share_of_the_loss(tmp_path, data_root, monkeypatch):
    cls = METHODS.get("standard")
    real_loss = cls.loss

    def loss_with_terms(self, x, y):  # two weighted terms of sizes 3/4 and 1/4 of the loss
        loss, metrics = real_loss(self, x, y)
        raw = {k: v for k, v in metrics.items() if not k.startswith("term_")}
        return loss, {**raw, "term_a": 0.75 * loss.detach(), "term_b": -0.25 * loss.detach()}

    monkeypatch.setattr(cls, "loss", loss_with_terms)
    cfg = run_config(data_root, {"name": "standard"}, epochs=1)
    cfg["train"]["log_every"] = 2  # three reads in an epoch of five steps
    train(cfg, tmp_path / "run")
    (line,) = metric_lines(tmp_path / "run")
    # Shares of |term| (a negative term, like IGAM's adversarial one, still has its part).
    assert line["share_a"] == pytest.approx(0.75) and line["share_b"] == pytest.approx(0.25)
    assert line["term_a"] == pytest.approx(0.75 * line["loss"]) and line["term_b"] == pytest.approx(-0.25 * line["loss"])


def test_a_nan_between_two_reads_is_named_at_its_own_step(tmp_path, data_root, monkeypatch):
    cls = METHODS.get("standard")
    real_loss = cls.loss
    calls = {"n": 0}

    def loss_going_nan(self, x, y):
        calls["n"] += 1
        loss, metrics = real_loss(self, x, y)
        return (loss * float("nan"), metrics) if calls["n"] == 3 else (loss, metrics)

    monkeypatch.setattr(cls, "loss", loss_going_nan)
    cfg = run_config(data_root, {"name": "standard"}, epochs=1)
    cfg["train"]["log_every"] = 4  # read after step 4: the NaN of step 3 is found there
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 3 .*optimiser step 3\)"):
        train(cfg, tmp_path / "run")
    assert calls["n"] == 4 and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the loader in the loop


def test_the_loader_is_built_once_per_run(tmp_path, data_root, monkeypatch):
    import mixacm.train as train_mod

    built = []
    real = train_mod.make_train_loader
    monkeypatch.setattr(train_mod, "make_train_loader", lambda *a, **k: built.append(1) or real(*a, **k))
    summary = train(run_config(data_root, {"name": "standard"}, epochs=3), tmp_path / "run")
    assert summary["epochs"] == 3 and len(built) == 1


def test_a_folder_run_resumed_with_other_workers_ends_on_the_same_weights(tmp_path):
    """Images decoded on the fly (larger than the cache limit): a run killed with the loader in
    the training process (num_workers 0) and resumed with two worker processes ends on the weights
    of an uninterrupted run; the worker count is not part of the config hash."""
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        folder = tmp_path / "data" / "train" / f"n{c}"
        folder.mkdir(parents=True)
        for i in range(8):
            write_png((torch.rand(3, 72, 80, generator=g) * 100 + 100 * c).to(torch.uint8), str(folder / f"{i}.png"))
    cfg = run_config(tmp_path / "data", {"name": "standard"}, epochs=2, batch_size=4)
    cfg["dataset"]["name"] = "imagenet"
    cfg["train"].update(max_steps_per_epoch=2, num_workers=0)
    full = train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "killed", stop_after_steps=3)["completed"] is False
    resumed = train({**cfg, "train": {**cfg["train"], "num_workers": 2}}, tmp_path / "killed")
    assert resumed["resumed_from_epoch"] == 1 and resumed["config_hash"] == full["config_hash"]
    a, b = weights(tmp_path / "full" / "model.pt"), weights(tmp_path / "killed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_augmentation_the_device_loader_cannot_batch_is_refused_by_name():
    # Cached images that are not square: cifar_transform crops a square the batched crop cannot
    # make. (A CIFAR folder of such images is refused when it is loaded; this is the loader's own
    # guard, which setup turns into a ConfigError on dataset.augment.)
    from mixacm.data import CachedImageDataset, cifar_transform
    from mixacm.loader import make_train_loader

    images = torch.zeros(8, 3, 24, 32, dtype=torch.uint8)
    ds = CachedImageDataset(images, torch.arange(8) % 2, ["a", "b"], source="test", source_detail="test",
                            transform=cifar_transform(True, size=32))
    with pytest.raises(TypeError, match=r"RandomCrop.*no batched version.*\(24, 32\)"):
        make_train_loader(ds, 4, 0)
    plain = CachedImageDataset(images, torch.arange(8) % 2, ["a", "b"], source="test", source_detail="test",
                               transform=cifar_transform(False, size=32))
    assert [tuple(x.shape) for x, _ in make_train_loader(plain, 4, 0)] == [(4, 3, 24, 32)] * 2
