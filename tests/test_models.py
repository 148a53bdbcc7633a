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




def _bn(c: int) -> int:
    return 2 * c


def _preact_block(c_in: int, c_out: int, stride: int) -> int:
    # bn1, 3x3 conv1, bn2, 3x3 conv2 (no biases), 1x1 projection when the shape changes
    proj = c_in * c_out if stride != 1 or c_in != c_out else 0
    return _bn(c_in) + 9 * c_in * c_out + _bn(c_out) + 9 * c_out * c_out + proj


def wrn_params(depth: int, k: int, classes: int = 10) -> int:
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 27 * 16 + _bn(64 * k) + 64 * k * classes + classes
    for g in range(3):
        total += _preact_block(widths[g], widths[g + 1], 1 if g == 0 else 2)
        total += (n - 1) * _preact_block(widths[g + 1], widths[g + 1], 1)
    return total


def preact18_params(classes: int = 10) -> int:
    total, c_in = 27 * 64 + _bn(512) + 512 * classes + classes, 64
    for i, width in enumerate((64, 128, 256, 512)):
        total += _preact_block(c_in, width, 1 if i == 0 else 2) + _preact_block(width, width, 1)
        c_in = width
    return total


def bottleneck_resnet_params(layers: list[int], classes: int = 1000) -> int:
    """torchvision's bottleneck ResNet: 7x7 stem conv + BN; per block 1x1 (c_in -> w), 3x3 (w -> w),
    1x1 (w -> 4w), each with BN, and a 1x1 projection + BN in the first block of a stage; fc."""
    total, c_in = 3 * 64 * 49 + _bn(64), 64
    for width, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            total += c_in * width + 9 * width * width + width * 4 * width + _bn(width) * 2 + _bn(4 * width)
            if i == 0:
                total += c_in * 4 * width + _bn(4 * width)
            c_in = 4 * width
    return total + 2048 * classes + classes


PARAMS.update({
    "wrn-10-1": wrn_params(10, 1),
    "wrn-28-10": wrn_params(28, 10),
    "wrn-34-10": wrn_params(34, 10),
    "wrn-34-20": wrn_params(34, 20),
    "wrn-70-16": wrn_params(70, 16),
    "preact_resnet18": preact18_params(),
})


def test_hand_counts_agree_with_published_figures() -> None:
    # RobustBench / torchvision / Rice et al. figures.
    assert wrn_params(34, 10) == 46_160_474
    assert wrn_params(28, 10) == 36_479_194
    # Rice et al.'s PreAct ResNet-18 ends with BN + ReLU before pooling: 1,024 parameters more than
    # the often-quoted 11,171,146 of the variant without that final BN.
    assert preact18_params() == 11_171_146 + _bn(512)
    assert bottleneck_resnet_params([3, 4, 6, 3]) == 25_557_032  # torchvision's ResNet-50
    assert wrn_params(10, 1) == 77_850


def test_resnet26_is_resnet50s_block_type_with_two_blocks_a_stage() -> None:
    from torchvision.models.resnet import Bottleneck

    small, big = on_meta("resnet26", num_classes=1000), on_meta("resnet50", num_classes=1000)
    assert n_params(small) == bottleneck_resnet_params([2, 2, 2, 2])  # timm's resnet26: 16.0 M
    assert type(small) is type(big)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(small.model, stage)
        assert len(blocks) == 2 and all(isinstance(b, Bottleneck) for b in blocks)
    x = torch.empty(2, 3, 224, 224, device="meta")
    shapes = [{k: tuple(v.shape) for k, v in m(x, features=m.feature_names)[1].items()} for m in (small, big)]
    assert shapes[0] == shapes[1]  # the same features for the ACM path, block for block


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name: str) -> None:
    assert n_params(on_meta(name)) == PARAMS[name]


def test_resnet50_parameter_count() -> None:
    from torchvision.models import resnet50

    with torch.device("meta"):
        reference = resnet50(weights=None)
    assert n_params(on_meta("resnet50", num_classes=1000)) == n_params(reference) == 25_557_032
    # build_model's default is 10 classes (the dataset decides): fc 2048 -> 10.
    assert n_params(on_meta("resnet50")) == 25_557_032 - 2048 * 990 - 990


def test_counts_equal_the_shared_checkpoints(shared_models: Path) -> None:
    # ../shared/models/README.md lists 105,238 for resnet4b, but its own architecture description
    # and the file's tensors both give 123,734; 112,006 for resnet2b agrees.
    assert (PARAMS["resnet2b"], PARAMS["resnet4b"]) == (112_006, 123_734)
    for name in ("resnet2b", "resnet4b"):
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


# Big models on the meta device: feature shapes propagate without any computation.
# name -> (kwargs, image size, {feature: (channels, height)})
META_FEATURES = {
    "wrn-34-10": ({}, 32, {"stem": (16, 32), "layer1": (160, 32), "layer2": (320, 16), "layer3": (640, 8)}),
    "wrn-70-16": ({}, 32, {"stem": (16, 32), "layer1": (256, 32), "layer2": (512, 16), "layer3": (1024, 8)}),
    "preact_resnet18": ({}, 32, {"stem": (64, 32), "layer1": (64, 32), "layer2": (128, 16),
                                 "layer3": (256, 8), "layer4": (512, 4)}),
    "resnet50": ({"num_classes": 1000}, 224, {"stem": (64, 56), "layer1": (256, 56), "layer2": (512, 28),
                           "layer3": (1024, 14), "layer4": (2048, 7)}),
}


@pytest.mark.parametrize("name", sorted(META_FEATURES))
def test_big_model_feature_shapes(name: str) -> None:
    kwargs, size, expected = META_FEATURES[name]
    model = on_meta(name, **kwargs)
    assert model.feature_names == tuple(expected)
    x = torch.empty(2, 3, size, size, device="meta")
    logits, feats = model(x, features=model.feature_names)
    assert logits.shape == (2, kwargs.get("num_classes", 10))
    assert {k: (v.shape[1], v.shape[2]) for k, v in feats.items()} == expected
    assert model.feature_channels(image_size=size) == {k: c for k, (c, _) in expected.items()}


# Small real configurations of each family, for forward tests on real numbers.
SMALL = {
    "wide_resnet": ({"depth": 10, "widen_factor": 1}, 32),
    "preact_resnet18": ({}, 32),
    "resnet50": ({"num_classes": 10}, 64),
    "resnet26": ({"num_classes": 10}, 64),
    "tiny": ({}, 32),
    "resnet2b": ({}, 32),
    "resnet4b": ({}, 32),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_do_not_change_logits(name: str) -> None:
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    x = torch.rand(2, 3, size, size)
    logits, feats = model(x, features=model.feature_names)
    assert torch.equal(model(x), logits)
    assert list(feats) == list(model.feature_names)
    # The stem is the first layer's output, at most halving the resolution of a CIFAR-sized input
    # (ImageNet's stride-2 conv plus max-pool quarter it).
    assert feats["stem"].shape[-1] in (size, size // 2, size // 4)


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
NORMALISATION = {"resnet2b": CIFAR, "resnet4b": CIFAR, "tiny": CIFAR, "wide_resnet": CIFAR,
                 "preact_resnet18": CIFAR, "resnet50": IMAGENET, "resnet26": IMAGENET}


@pytest.mark.parametrize("name", sorted(NORMALISATION))
def test_normalisation_is_inside(name: str) -> None:
    torch.manual_seed(0)
    kwargs, size = SMALL[name]
    model = build_model(name, **kwargs).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION[name])
    x = torch.rand(2, 3, size, size)
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


# --- upstream key layouts --------------------------------------------------------------------

def _bn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def robustbench_wrn_keys(depth: int, k: int, sub_block1: bool = False) -> set[str]:
    """RobustBench's WideResNet state-dict keys, from its definition: groups ``blockG.layer.i``
    with bn1, conv1, bn2, conv2 and ``convShortcut`` where the channel count changes."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | _bn_keys("bn1")
    groups = [("block1", 0), ("block2", 1), ("block3", 2)] + ([("sub_block1", 0)] if sub_block1 else [])
    for name, g in groups:
        for i in range(n):
            p = f"{name}.layer.{i}"
            keys |= _bn_keys(f"{p}.bn1") | _bn_keys(f"{p}.bn2") | {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            if i == 0 and widths[g] != widths[g + 1]:
                keys.add(f"{p}.convShortcut.weight")
    return keys


@pytest.mark.parametrize("name,depth,k", [("wrn-34-10", 34, 10), ("wrn-28-10", 28, 10), ("wrn-70-16", 70, 16)])
def test_wide_resnet_keys_are_robustbench_keys(name: str, depth: int, k: int) -> None:
    assert set(on_meta(name).state_dict()) == robustbench_wrn_keys(depth, k) | {"mean", "std"}


def test_wide_resnet_options() -> None:
    model = on_meta("wide_resnet", depth=16, widen_factor=4, sub_block1=True, bias_last=False)
    assert set(model.state_dict()) == (robustbench_wrn_keys(16, 4, sub_block1=True) - {"fc.bias"}) | {"mean", "std"}
    for depth in (27, 4, 0):
        with pytest.raises(ValueError, match=rf"depth must be 6n \+ 4 .*got {depth}"):
            build_model("wide_resnet", depth=depth)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model("wide_resnet", depth=10, dropout=1.5)
    with pytest.raises(TypeError, match="depth"):
        build_model("wrn-34-10", depth=28)


def test_wide_resnet_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("wide_resnet", depth=10, widen_factor=1, dropout=0.5)
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


def test_preact_resnet18_keys() -> None:
    keys = set(on_meta("preact_resnet18").state_dict())
    # Rice et al.'s names: projections inside a Sequential, final ``bn`` and ``linear``.
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight", "bn.running_var",
            "linear.weight", "linear.bias"} <= keys
    assert not any(k.startswith("layer1.0.shortcut") or k.startswith("layer2.1.shortcut") for k in keys)
    assert not any("bias" in k and "conv" in k for k in keys)


def test_preact_block_by_hand() -> None:
    from mixacm.models.blocks import PreActBlock

    torch.manual_seed(0)
    for c_in, stride, key, wrap in ((4, 1, "shortcut", False), (2, 2, "convShortcut", False), (2, 1, "shortcut", True)):
        block = PreActBlock(c_in, 4, stride, shortcut_key=key, wrap_shortcut=wrap).eval()
        x = torch.randn(1, c_in, 6, 6)
        a = F.relu(block.bn1(x))
        proj = getattr(block, key)
        skip = x if proj is None else proj(a)
        assert torch.equal(block(x), block.conv2(F.relu(block.bn2(block.conv1(a)))) + skip)
        assert (proj is None) == (c_in == 4 and stride == 1)
        if proj is not None:
            assert isinstance(proj, torch.nn.Sequential) == wrap


def test_resnet50_loads_torchvision_and_robustbench_layouts() -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50(weights=None, num_classes=10).eval()
    model = build_model("resnet50", num_classes=10).eval()
    assert set(model.state_dict()) == {f"model.{k}" for k in reference.state_dict()} | {"mean", "std"}
    # A plain torchvision state dict: model(x) is torchvision's net on the normalised image.
    model.load_state_dict(model.adapt_state_dict(reference.state_dict()), strict=True)
    x = torch.rand(1, 3, 64, 64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-5)
    # RobustBench's Sequential(normalize, model) layout: the file's normalisation is kept.
    rb = {f"model.{k}": v for k, v in reference.state_dict().items()}
    rb["normalize.mean"], rb["normalize.std"] = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    model.load_state_dict(model.adapt_state_dict(rb), strict=True)
    assert torch.equal(model.mean, rb["normalize.mean"]) and torch.equal(model.std, rb["normalize.std"])


def test_robustbench_wrapped_cifar_model_is_unwrapped() -> None:
    src = build_model("wide_resnet", depth=10, widen_factor=1)
    raw = {f"model.{k}": v for k, v in src.state_dict().items() if k not in ("mean", "std")}
    raw["normalize.mean"], raw["normalize.std"] = src.mean * 0 + 0.5, src.std * 0 + 0.2
    target = build_model("wide_resnet", depth=10, widen_factor=1)
    target.load_state_dict(target.adapt_state_dict(raw), strict=True)
    assert torch.equal(target.fc.weight, src.fc.weight) and float(target.std.flatten()[0]) == pytest.approx(0.2)


def test_tiny_keys_are_unchanged_by_the_shared_block() -> None:
    # Model files written before the block moved to mixacm.models.blocks must still load.
    keys = set(build_model("tiny").state_dict())
    assert {"stem.weight", "layer1.bn1.weight", "layer2.shortcut.weight", "layer3.shortcut.weight",
            "bn.running_mean", "fc.weight"} <= keys
    assert "layer1.shortcut.weight" not in keys and not any(".shortcut.0." in k for k in keys)
    assert n_params(build_model("tiny")) == (
        27 * 16 + _preact_block(16, 16, 1) + _preact_block(16, 32, 2) + _preact_block(32, 64, 2)
        + _bn(64) + 64 * 10 + 10)
