"""Bottleneck ResNets for ImageNet: torchvision's definition (He et al. 2016), normalisation inside.

``resnet50`` is ``torchvision.models.resnet50(weights=None)``; ``resnet26`` is the same network
with two bottleneck blocks a stage instead of 3, 4, 6, 3 (timm's ``resnet26``: the same block type,
stage widths and feature shapes, 16.0 M parameters instead of 25.6 M, 2.4 instead of 4.1 GMACs at
224 px), the smaller member of the family. The network is held as ``self.model``, so the state
dict keys are ``model.<torchvision key>``: the layout of RobustBench's ImageNet models
(``Sequential(normalize, model)``), and plain torchvision state dicts load after the prefix is
added (``adapt_state_dict``). ImageNet mean/std are the normalisation buffers.

Features: ``stem`` = conv1-bn1-relu-maxpool (the paper's block 1), ``layer1``..``layer4`` = the
four stages' outputs (post-ReLU, as torchvision's bottlenecks end with a ReLU).
"""
from __future__ import annotations

from torch import Tensor, nn

from mixacm.models.base import IMAGENET_MEAN, IMAGENET_STD, FeatureClassifier
from mixacm.models.registry import MODELS


class TorchvisionResNet(FeatureClassifier):
    feature_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(mean=mean, std=std)
        self.model = net

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor]) -> Tensor:
        m = self.model
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        out = self._run_stages(z, (stem, m.layer1, m.layer2, m.layer3, m.layer4), want, feats)
        return m.fc(m.avgpool(out).flatten(1))

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        sd = dict(state_dict)
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        # A plain torchvision state dict: its keys live under ``model.`` here.
        if not any(k.startswith("model.") for k in sd):
            sd = {(k if k.startswith("normalize.") or k in ("mean", "std") else f"model.{k}"): v
                  for k, v in sd.items()}
        return super().adapt_state_dict(sd)


def _bottleneck_resnet(layers: list[int], num_classes: int, **kwargs) -> TorchvisionResNet:
    # Imported here: torchvision's import takes seconds (it loads torch._dynamo), and the
    # workflow's config check imports the model registry without building this network.
    from torchvision.models.resnet import Bottleneck, ResNet

    return TorchvisionResNet(ResNet(Bottleneck, layers, num_classes=num_classes), **kwargs)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, **kwargs) -> TorchvisionResNet:
    """ResNet-50: bottleneck blocks 3, 4, 6, 3 (``torchvision.models.resnet50``)."""
    return _bottleneck_resnet([3, 4, 6, 3], num_classes, **kwargs)


@MODELS.register("resnet26")
def resnet26(num_classes: int = 1000, **kwargs) -> TorchvisionResNet:
    """ResNet-26: bottleneck blocks 2, 2, 2, 2 (timm's ``resnet26``; torchvision's ResNet class)."""
    return _bottleneck_resnet([2, 2, 2, 2], num_classes, **kwargs)
