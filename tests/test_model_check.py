"""The one model check before any attack, and class counts against AutoAttack.

Each failure kind (output type, width against the dataset's classes, dtype, non-finite values,
batch dependence) stops ``evaluate`` in one line before any attack, with no state file, and the
command line exits 2 with no result file. Tuple/list/dict outputs follow the one documented rule,
recorded in the result. AutoAttack's targeted attacks are fitted to the class count or refused.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import encode_png, write_file

from mixacm.attacks import build_attack
from mixacm.cli import main
from mixacm.evaluate import OUTPUT_RULE, ModelCheckError, check_model, evaluate

EPS = 0.1
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def patterns(k: int) -> torch.Tensor:
    return torch.randint(0, 2, (k, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * 0.4 - 0.2


class Blobs(Dataset):
    """``n`` images of ``k`` classes, each class a fixed +-0.2 pattern around grey."""

    def __init__(self, k: int = 10, n: int = 40, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % k).tolist()
        y = torch.tensor(self.targets)
        self.images = (0.5 + patterns(k)[y] + 0.03 * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 1)
        self.num_classes = k

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def trained_net(k: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, k))
    data = Blobs(k, n=200, seed=5)
    x, y = data.images, torch.tensor(data.targets)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


class Wrap(nn.Module):
    """Returns the net's logits in another container (``kind``) or transformed."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        if self.kind == "tuple":
            return z, x.flatten(1)
        if self.kind == "list":
            return [z, x.flatten(1)]
        if self.kind == "dict":
            return {"features": x.flatten(1), "logits": z}
        if self.kind == "dict-no-logits":
            return {"out": z}
        if self.kind == "string":
            return "logits"
        if self.kind == "int":
            return z.round().long()
        if self.kind == "nan":
            return z.masked_fill(torch.arange(len(z)).view(-1, 1) == 1, float("nan"))
        if self.kind == "batch-norm":  # normalised by the batch: a sample depends on the others
            return z - z.mean(0, keepdim=True)
        if self.kind == "flat":
            return z.flatten()
        raise AssertionError(self.kind)


@pytest.fixture(scope="module")
def net10():
    return trained_net(10)


@pytest.mark.parametrize("kind,how", [("tuple", "tuple[0]"), ("list", "list[0]"), ("dict", "dict['logits']")])
def test_tuple_list_dict_outputs_follow_the_rule_and_it_is_recorded(net10, kind, how):
    data = Blobs()
    kw = dict(eps=EPS, n=20, batch_size=10, progress=False, device="cpu")
    reference = evaluate(net10, data, ["clean", "pgd5"], **kw)
    result = evaluate(Wrap(net10, kind), data, ["clean", "pgd5"], **kw)
    for name in ("clean", "pgd5"):  # the same logits, so the same counts
        assert result["metrics"][name]["correct"] == reference["metrics"][name]["correct"]
    assert reference["model_check"]["output"] == "tensor"
    assert result["model_check"] == {**reference["model_check"], "output": how}
    assert result["model_check"]["output_rule"] == OUTPUT_RULE
    assert result["model_check"]["num_outputs"] == result["model_check"]["num_classes"] == 10
    assert result["precision"] == "fp32"


@pytest.mark.parametrize("kind,match", [
    ("dict-no-logits", r"dict\['logits'\] without a logits tensor"),
    ("string", "str without a logits tensor"),
    ("int", "dtype torch.int64"),
    ("nan", "not finite .* for 1 of 10 images"),
    ("batch-norm", "depend on the rest of the batch"),
    ("flat", r"shape \(100,\); expected 10 x 10"),
])
def test_each_bad_output_kind_fails_before_any_attack(net10, tmp_path, kind, match):
    state = tmp_path / "state.json"
    with pytest.raises(ModelCheckError, match=match):
        evaluate(Wrap(net10, kind), Blobs(), ["clean", "pgd5"], EPS, n=20, batch_size=10,
                 progress=False, device="cpu", state_path=state)
    assert not state.exists()  # no (attack, batch) pair ran


@pytest.mark.parametrize("outputs", [100, 5])
def test_output_width_is_checked_against_the_dataset_classes(outputs, tmp_path):
    state = tmp_path / "state.json"
    with pytest.raises(ModelCheckError, match=f"model has {outputs} outputs but the dataset has 10 classes"):
        evaluate(trained_net(outputs), Blobs(), ["clean"], EPS, n=20, progress=False, device="cpu",
                 state_path=state)
    assert not state.exists()


def test_check_model_tolerates_rounding_but_not_training_mode_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 10))
    x = torch.rand(8, 3, 4, 4)
    _, record = check_model(net.eval(), x, 10)
    assert record["batch_dependence_max_abs"] < 1e-4 and record["checked_images"] == 8
    with pytest.raises(ModelCheckError, match="training mode"):
        check_model(net.train(), x, 10)


# --------------------------------------------------------------------- AutoAttack and class counts


def test_autoattack_targets_fitted_to_four_classes_and_rule_recorded():
    net, data = trained_net(4), Blobs(4, n=12, seed=2)
    result = evaluate(net, data, ["clean", "autoattack-apgd"], EPS, progress=False, device="cpu")
    spec = result["metrics"]["autoattack-apgd"]["attack"]
    assert spec["num_classes"] == 4 and spec["n_target_classes"] == 3
    assert "min(9, classes - 1)" in spec["target_rule"]
    assert result["metrics"]["autoattack-apgd"]["accuracy_pct"] <= result["metrics"]["clean"]["accuracy_pct"]


@pytest.mark.parametrize("name,k", [("autoattack-apgd", 3), ("autoattack", 3), ("autoattack-rand", 2)])
def test_autoattack_needing_more_classes_is_refused_up_front(name, k, tmp_path):
    state = tmp_path / "state.json"
    with pytest.raises(ValueError, match=f"needs at least .* classes; the dataset has {k}"):
        evaluate(trained_net(k), Blobs(k, n=12), ["clean", name], EPS, progress=False, device="cpu",
                 state_path=state)
    assert not state.exists()


def test_ten_classes_keep_nine_targets():
    attack = build_attack("autoattack", EPS)
    attack.adapt_to_classes(10)
    assert attack.spec["n_target_classes"] == 9
    attack.adapt_to_classes(100)
    assert attack.spec["n_target_classes"] == 9


# --------------------------------------------------------------------- the command line


def write_folder(root, k: int, n: int):
    data = Blobs(k, n=n, seed=3)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(data.images, data.targets)):
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            write_file(str(d / f"{i:03d}.png"), encode_png((img * 255).round().to(torch.uint8)))
    return root


@pytest.fixture(scope="module")
def four_class_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder4"), 4, 16)


def _script(model: nn.Module, path) -> str:
    torch.jit.trace(model, torch.rand(2, 3, 4, 4), strict=False).save(str(path))
    return str(path)


def _evaluate(tmp_path, model_file, folder, attacks="clean,pgd3"):
    out = tmp_path / "result.json"
    rc = main(["evaluate", "--model-file", model_file, "--dataset", "imagefolder", "--data-root", str(folder),
               "--eps", "0.1", "--attacks", attacks, "--no-progress", "--out", str(out)])
    return rc, out


def test_cli_tuple_torchscript_evaluates_and_records_the_rule(tmp_path, four_class_folder, monkeypatch):
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "cache"))
    model_file = _script(Wrap(trained_net(4), "tuple"), tmp_path / "tuple.pt")
    rc, out = _evaluate(tmp_path, model_file, four_class_folder, "clean,pgd3,autoattack-apgd")
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model_check"]["output"] == "tuple[0]" and result["precision"] == "fp32"
    assert result["metrics"]["autoattack-apgd"]["attack"]["n_target_classes"] == 3


@pytest.mark.parametrize("outputs,match", [
    (10, "model has 10 outputs but the dataset has 4 classes"),
    (3, "model has 3 outputs but the dataset has 4 classes"),
])
def test_cli_wrong_width_exits_2_in_one_line_with_no_result(tmp_path, four_class_folder, monkeypatch, capsys,
                                                            outputs, match):
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "cache"))
    model_file = _script(trained_net(outputs), tmp_path / "m.pt")
    rc, out = _evaluate(tmp_path, model_file, four_class_folder)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and match in err and err.startswith("mixacm evaluate: error:")


def test_cli_autoattack_refused_for_three_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXACM_CACHE_DIR", str(tmp_path / "cache"))
    root = write_folder(tmp_path / "folder3", 3, 6)
    model_file = _script(trained_net(3), tmp_path / "m3.pt")
    rc, out = _evaluate(tmp_path, model_file, root, "clean,autoattack")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and "apgd-t, which needs at least 4 classes" in err
