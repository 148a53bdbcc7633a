"""Models: parameter counts, feature names and shapes, normalisation inside, and real checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixacm.checkpoint import load_foreign_state_dict
from mixacm.models import MODELS, FeatureClassifier, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kwargs) -> FeatureClassifier:
    # Big models are built on the meta device: shapes only, no memory and no initialisation cost.
    with torch.device("meta"):
        return build_model(name, **kwargs)


# Parameter counts checked by hand from the architecture descriptions (see the comments).
PARAMS = {
    # conv1 8*27+8; block(8->16): 16*72+16 + 16*144+16 + 16*8+16; block(16->16): 2*(16*144+16);
    # linear1 1024*100+100; linear2 100*10+10.
    "resnet2b": 224 + 1168 + 2320 + 144 + 2 * 2320 + 102_500 + 1010,
    # conv1 16*27+16; block(16->32) 32*144+32 + 32*288+32 + 32*16+32; three blocks 32->32 with two
    # 3x3 convs (2*9248), one of them with a 1x1 shortcut (32*32+32); linear1 512*100+100; linear2.
    "resnet4b": 448 + 4640 + 9248 + 544 + 3 * 2 * 9248 + 1056 + 51_300 + 1010,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name: str) -> None:
    assert n_params(on_meta(name)) == PARAMS[name]


def test_counts_equal_the_shared_checkpoints(shared_models: Path) -> None:
    # ../shared/models/README.md lists 105,238 for resnet4b, but its own architecture description
    # and the file's tensors both give 123,734; 112,006 for resnet2b agrees.
    assert PARAMS == {"resnet2b": 112_006, "resnet4b": 123_734}
    for name in PARAMS:
        raw = torch.load(shared_models / f"{name}.pth", map_location="cpu", weights_only=True)["state_dict"]
        assert sum(v.numel() for v in raw.values()) == PARAMS[name]


# name -> {feature: (channels, height)} for a 32x32 input
FEATURES = {
    "resnet2b": {"stem": (8, 16), "layer1": (16, 8)},
    "resnet4b": {"stem": (16, 16), "layer1": (32, 8), "layer2": (32, 4)},
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_feature_names_and_shapes(name: str) -> None:
    model = build_model(name).eval()
    assert model.feature_names == tuple(FEATURES[name])
    x = torch.rand(2, 3, 32, 32)
    logits, feats = model(x, features=model.feature_names)
    assert logits.shape == (2, 10)
    assert {k: (v.shape[1], v.shape[2]) for k, v in feats.items()} == FEATURES[name]
    assert all(v.shape[0] == 2 and v.shape[2] == v.shape[3] for v in feats.values())
    assert model.feature_channels() == {k: c for k, (c, _) in FEATURES[name].items()}
    # Asking for features changes nothing about the logits, and the order asked for is kept.
    assert torch.equal(model(x), logits)
    _, some = model(x, features=tuple(reversed(model.feature_names)))
    assert list(some) == list(reversed(model.feature_names))


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_cert_features_are_activated_maps(name: str) -> None:
    # Every feature of these networks is the output of a ReLU.
    _, feats = build_model(name)(torch.rand(2, 3, 32, 32), features=FEATURES[name])
    assert all(bool((v >= 0).all()) for v in feats.values())


def test_unknown_feature_is_a_value_error_listing_valid_names() -> None:
    model = build_model("resnet4b")
    with pytest.raises(ValueError, match=r"\['block9'\]; valid: \['stem', 'layer1', 'layer2'\]"):
        model(torch.rand(1, 3, 32, 32), features=("stem", "block9"))


def test_unknown_model_is_a_key_error_listing_names() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'resnet3b'; valid names: .*resnet2b, resnet4b"):
        build_model("resnet3b")


CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALISATION = {"resnet2b": CIFAR, "resnet4b": CIFAR}


@pytest.mark.parametrize("name", sorted(NORMALISATION))
def test_normalisation_is_inside(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION[name])
    x = torch.rand(2, 3, 32, 32)
    raw = model._forward((x - mean) / std, frozenset(), {})
    assert torch.allclose(model(x), raw, atol=1e-6)
    assert not torch.allclose(model(x), model._forward(x, frozenset(), {}), atol=1e-3)


def test_cert_forward_written_out() -> None:
    # resnet4b by hand from the README: conv1+ReLU, the residual groups, linear1+ReLU, linear2.
    torch.manual_seed(0)
    model = build_model("resnet4b").eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR)
    x = torch.rand(2, 3, 32, 32)
    out = F.relu(model.conv1((x - mean) / std))
    out = model.layer2(model.layer1(out))
    assert torch.allclose(model(x), model.linear2(F.relu(model.linear1(out.flatten(1)))), atol=1e-6)


def test_cert_block_computes_relu_of_residual_sum() -> None:
    from mixacm.models.cert_resnet import CertBlock

    torch.manual_seed(0)
    for c_in, stride in ((4, 1), (2, 2)):
        block = CertBlock(c_in, 4, stride)
        x = torch.randn(1, c_in, 6, 6)
        skip = x if len(block.shortcut) == 0 else block.shortcut[0](x)
        expected = F.relu(block.conv2(F.relu(block.conv1(x))) + skip)
        assert torch.equal(block(x), expected)
        assert (len(block.shortcut) == 0) == (c_in == 4 and stride == 1)


@pytest.mark.parametrize("name", ["resnet2b", "resnet4b"])
def test_shared_teachers_load_strictly(shared_models: Path, name: str) -> None:
    raw = torch.load(shared_models / f"{name}.pth", map_location="cpu", weights_only=True)["state_dict"]
    model = build_model(name)
    # The file's keys are exactly the model's, minus the normalisation buffers it does not carry.
    assert set(model.state_dict()) - set(raw) == {"mean", "std"}
    assert set(raw) <= set(model.state_dict())
    loaded = load_foreign_state_dict(shared_models / f"{name}.pth", name)
    assert torch.equal(loaded.linear2.weight, raw["linear2.weight"])


# Published clean accuracy (README in ../shared/models) and the fraction of the test split checked.
PUBLISHED_CLEAN = {"resnet2b": 69.25, "resnet4b": 77.20}


def _clean_accuracy(model: torch.nn.Module, root: Path, every: int) -> float:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(root / "test", transform=transforms.ToTensor())
    # Every k-th image of the class-sorted folder: a class-balanced, fixed subset.
    subset = Subset(ds, range(0, len(ds), every))
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(subset, batch_size=500):
            correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(subset)


@pytest.mark.parametrize("name", ["resnet2b", "resnet4b"])
def test_shared_teachers_reach_published_accuracy_on_1000_images(shared_models, cifar10_jpeg_root, name) -> None:
    # 1,000 images: the standard error is about 1.5 points, so allow 3.5 (the JPEG copy differs a
    # little from the original pixels too). A wrong layer order gives chance-level accuracy.
    model = load_foreign_state_dict(shared_models / f"{name}.pth", name)
    assert abs(_clean_accuracy(model, cifar10_jpeg_root, every=10) - PUBLISHED_CLEAN[name]) < 3.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet2b", "resnet4b"])
def test_shared_teachers_reach_published_accuracy_on_the_test_split(shared_models, cifar10_jpeg_root, name) -> None:
    model = load_foreign_state_dict(shared_models / f"{name}.pth", name)
    assert abs(_clean_accuracy(model, cifar10_jpeg_root, every=1) - PUBLISHED_CLEAN[name]) < 2.0


def test_every_registered_model_is_a_feature_classifier() -> None:
    for name in MODELS:
        model = on_meta(name)
        assert isinstance(model, FeatureClassifier), name
        assert model.feature_names[0] == "stem", name
