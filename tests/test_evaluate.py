"""Evaluation against facts: counts equal a direct computation on the balanced subset, an
interrupted and resumed run equals an uninterrupted one, a state file from another evaluation is
an error, and the result file has the documented shape."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mixacm.data import data_digest
from mixacm.evaluate import EvaluationStateError, batch_seed, evaluate, model_sha256, write_result
from mixacm.utils import format_eps as eps_text

ATTACKS = ["clean", "pgd3"]
EPS = 8 / 255
CHECK = 4  # forwards of the model check on the first batch (batch twice, first image, batch reversed)


class ToyImages(Dataset):
    """60 images, 10 classes, labels in a shuffled order; ``targets`` like torchvision datasets."""

    def __init__(self, n: int = 60) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 4, generator=g)
        self.targets = torch.randperm(n, generator=g).remainder(10).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128, 10))


class Interrupt(RuntimeError):
    pass


def interrupt_after(model: nn.Module, forwards: int):
    """A forward hook that raises on the (forwards + 1)-th call, like a job killed mid-run."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] > forwards:
            raise Interrupt

    return model.register_forward_hook(hook)


def strip_times(result: dict) -> dict:
    out = json.loads(json.dumps(result))
    for key in ("wall_time_s", "timestamp"):
        out["provenance"].pop(key)
    return out


def test_counts_match_direct_computation_on_balanced_subset():
    data, model = ToyImages(), make_model()
    result = evaluate(model, data, ["clean"], EPS, n=20, batch_size=7, progress=False, device="cpu")
    # the first 2 images of each class, in dataset order
    labels = torch.tensor(data.targets)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(10)]).sort().values
    with torch.no_grad():
        expected = int((model.eval()(data.images[idx]).argmax(1) == labels[idx]).sum())
    m = result["metrics"]["clean"]
    assert (m["correct"], m["n"]) == (expected, 20)
    assert m["accuracy_pct"] == pytest.approx(100.0 * expected / 20)
    assert result["n"] == 20


def test_pgd_lowers_accuracy_and_result_shape(tmp_path):
    data, model = ToyImages(), make_model()
    model.train()
    result = evaluate(model, data, ATTACKS, "8/255", n=None, batch_size=16, progress=False, device="cpu")
    assert model.training  # the caller's mode is restored
    clean, pgd = result["metrics"]["clean"], result["metrics"]["pgd3"]
    assert clean["n"] == pgd["n"] == 60
    assert pgd["correct"] < clean["correct"]
    assert pgd["attack"]["steps"] == 3 and pgd["attack"]["step_size"] == pytest.approx(EPS / 4)
    assert pgd["attack"]["package"] == "mixacm" and clean["attack"]["name"] == "clean"
    assert result["eps"] == pytest.approx(EPS) and result["eps_text"] == "8/255"
    assert result["schema"] == 2 and result["model_sha256"] == model_sha256(model)
    assert result["data"] == data_digest(data, range(60)) and result["data"]["images"] == 60
    prov = result["provenance"]
    assert prov["device"] == "cpu" and prov["wall_time_s"] > 0 and "torch_version" in prov
    path = write_result(result, tmp_path / "sub" / "result.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left


@pytest.mark.parametrize("forwards", [1, 4, 7])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, forwards):
    data = ToyImages()
    kw = dict(eps=EPS, n=40, batch_size=8, seed=3, progress=False, device="cpu")
    reference = evaluate(make_model(), data, ATTACKS, **kw)

    model, state = make_model(), tmp_path / "eval.state.json"
    handle = interrupt_after(model, CHECK + forwards)
    with pytest.raises(Interrupt):
        evaluate(model, data, ATTACKS, state_path=state, **kw)
    handle.remove()
    saved = json.loads(state.read_text())
    finished = sum(len(v) for v in saved["done"].values())
    assert 0 < finished < 5 * len(ATTACKS)  # 5 batches, stopped part-way

    resumed = evaluate(model, data, ATTACKS, state_path=state, **kw)
    assert strip_times(resumed) == strip_times(reference)
    assert not state.exists()  # removed once complete


def test_resume_does_not_recompute_finished_batches(tmp_path):
    data, model, state = ToyImages(), make_model(), tmp_path / "s.json"
    kw = dict(eps=EPS, n=40, batch_size=8, progress=False, device="cpu", state_path=state)
    handle = interrupt_after(model, CHECK + 2)  # one forward a batch: batches 0 and 1 finish
    with pytest.raises(Interrupt):
        evaluate(model, data, ["clean"], **kw)
    handle.remove()
    done_before = json.loads(state.read_text())["done"]["clean"]
    assert sorted(done_before) == ["0", "1"]
    calls = {"n": 0}
    handle = model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    evaluate(model, data, ["clean"], **kw)
    handle.remove()
    assert calls["n"] == CHECK + 3  # the check, then only batches 2, 3, 4


@pytest.mark.parametrize("change", [
    {"eps": 4 / 255}, {"n": 30}, {"seed": 1}, {"attacks": ["clean", "pgd5"]}, {"batch_size": 4}, "weights"])
def test_state_from_a_different_evaluation_is_an_error(tmp_path, change):
    data, state = ToyImages(), tmp_path / "eval.state.json"
    kw = dict(attacks=ATTACKS, eps=EPS, n=40, batch_size=8, seed=0, progress=False, device="cpu",
              state_path=state)
    model = make_model()
    handle = interrupt_after(model, CHECK + 3)
    with pytest.raises(Interrupt):
        evaluate(model, data, **kw)
    handle.remove()
    before = state.read_text()
    if change == "weights":
        model = make_model(seed=1)
    else:
        kw.update(change)
    with pytest.raises(EvaluationStateError, match="different evaluation"):
        evaluate(model, data, **kw)
    assert state.read_text() == before  # untouched, so the right run can still resume


def test_bad_inputs_fail_before_any_work(tmp_path):
    data, state = ToyImages(), tmp_path / "s.json"
    with pytest.raises(KeyError, match="valid names"):
        evaluate(make_model(), data, ["clean", "pgd"], EPS, state_path=state, progress=False)
    with pytest.raises(ValueError, match="outside"):
        evaluate(make_model(), data, ["clean"], 8, state_path=state, progress=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate(make_model(), data, ["clean", "clean"], EPS, state_path=state, progress=False)
    with pytest.raises(ValueError, match="61"):
        evaluate(make_model(), data, ["clean"], EPS, n=61, state_path=state, progress=False)
    assert not state.exists()
    state.write_text("{not json")
    with pytest.raises(EvaluationStateError, match="unreadable"):
        evaluate(make_model(), data, ["clean"], EPS, state_path=state, progress=False)


def test_batch_seed_and_eps_text():
    seeds = {batch_seed(s, a, b) for s in (0, 1) for a in ("pgd20", "autoattack") for b in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    assert batch_seed(0, "pgd20", 3) == batch_seed(0, "pgd20", 3)
    assert eps_text(2 / 255) == "2/255" and eps_text(0.031) == "0.031" and eps_text(" 8/255") == "8/255"


@pytest.fixture(scope="module")
def teacher_and_test_set(cifar10_jpeg_root, shared_models, tmp_path_factory):
    from mixacm.checkpoint import load_foreign_state_dict
    from mixacm.data import load_dataset

    data = load_dataset("cifar10", "test", root=cifar10_jpeg_root, cache_dir=tmp_path_factory.mktemp("cache"))
    return load_foreign_state_dict(shared_models / "resnet2b.pth", "resnet2b"), data


def test_real_teacher_matches_independent_measurement(teacher_and_test_set):
    # shared/models/README.md, measured on the JPEG copy: resnet2b 68.70 % clean (10k images),
    # 55.5 % under PGD-20 at 2/255 on 1,000 images (100 a class, step eps/4, one random start).
    model, data = teacher_and_test_set
    result = evaluate(model, data, ["clean", "pgd20"], "2/255", n=1000, batch_size=250, progress=False,
                      device="cpu")
    clean, pgd = result["metrics"]["clean"], result["metrics"]["pgd20"]
    assert clean["n"] == pgd["n"] == 1000
    assert abs(clean["accuracy_pct"] - 68.70) <= 3.0
    assert abs(pgd["accuracy_pct"] - 55.5) <= 2.5


@pytest.mark.slow
def test_real_teacher_autoattack_no_weaker_than_pgd(teacher_and_test_set):
    model, data = teacher_and_test_set
    result = evaluate(model, data, ["clean", "pgd20", "autoattack-apgd"], "2/255", n=200, batch_size=100,
                      progress=False, device="cpu")
    m = {k: v["accuracy_pct"] for k, v in result["metrics"].items()}
    assert m["autoattack-apgd"] <= m["pgd20"] + 1.0 < m["clean"]


def test_progress_bar_counts_attack_x_batch_steps_and_names_the_running_one(capsys):
    evaluate(make_model(), ToyImages(), ["clean", "pgd2"], EPS, n=20, batch_size=10, progress=True,
             device="cpu")
    err = capsys.readouterr().err
    assert "evaluate (attack x batch)" in err
    assert "/4 " in err  # 2 attacks x 2 batches
    assert "running pgd2 on batch 2/2" in err
    assert "pgd2 batch 2:" in err
