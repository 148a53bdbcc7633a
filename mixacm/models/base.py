"""The interface every model implements: [0, 1] inputs, normalisation inside, named features.

``model(x)`` returns logits; ``model(x, features=("layer1", "layer2"))`` returns
``(logits, {"layer1": A1, "layer2": A2})`` with each ``A`` a B x C x H x W tensor. MixACM reads
the activated channel maps from these features, so no string hooks reach into modules.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureClassifier(nn.Module):
    """Base class: owns the input normalisation and the feature-name contract.

    Subclasses set ``feature_names`` (in forward order) and implement
    ``_forward(z, want)`` on the normalised input ``z``, filling ``feats`` for every
    name in ``want`` and returning logits.
    """

    feature_names: tuple[str, ...] = ()
    # Pre-activation networks (WideResNet, PreAct ResNet, tiny): a named feature is a raw
    # residual sum that the network itself activates with the next unit's BN + ReLU. Their
    # ``_forward`` takes ``activated`` and then returns those activated maps instead. Other
    # models' features already end in a ReLU (``activated`` changes nothing for them).
    preactivation: bool = False

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _forward(self, z: Tensor, want: frozenset[str], feats: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _run_stages(self, out: Tensor, stages: Sequence[Callable[[Tensor], Tensor]],
                    want: frozenset[str], feats: dict[str, Tensor]) -> Tensor:
        """Apply ``stages`` in order, one per feature name, keeping the outputs in ``want``."""
        for name, stage in zip(self.feature_names, stages, strict=True):
            out = stage(out)
            if name in want:
                feats[name] = out
        return out

    def check_features(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no feature(s) {unknown}; valid: {list(self.feature_names)}"
            )

    def forward(self, x: Tensor, features: Sequence[str] = (), activated: bool = False
                ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Logits, or ``(logits, {name: feature})``. ``activated=True``: each feature as the network
        activates it before its next layer (pre-activation nets: the next BN + ReLU, computed once
        in the forward pass and shared with that layer; other nets: the feature itself)."""
        z = (x - self.mean) / self.std
        if not features:
            return self._forward(z, frozenset(), {})
        self.check_features(features)
        feats: dict[str, Tensor] = {}
        if self.preactivation:
            logits = self._forward(z, frozenset(features), feats, activated=activated)
        else:
            logits = self._forward(z, frozenset(features), feats)
        return logits, {name: feats[name] for name in features}

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a state dict saved outside this project onto this model's key names.

        One rule covers the wrapper layouts (``unwrap_state_dict``): RobustBench's normaliser
        buffers (``normalize.mean`` / ``normalize.std``, under any prefix) become this model's
        ``mean`` / ``std``, then leading key segments shared by every key (DataParallel's and
        DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, RobustBench's ``model.``, in any
        combination) are dropped while that does not lose matches with this model's own keys.
        Files without normalisation buffers get this model's own ``mean`` / ``std``. Models
        whose upstream key names differ extend this.
        """
        sd, _ = unwrap_state_dict(state_dict, self.state_dict().keys())
        for name in ("mean", "std"):
            sd.setdefault(name, getattr(self, name))
        return sd

    @torch.no_grad()
    def feature_channels(self, image_size: int = 32) -> dict[str, int]:
        """Channel count of every named feature (found by one forward pass on a dummy batch)."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        x = torch.zeros(1, self.mean.shape[1], image_size, image_size, device=p.device, dtype=p.dtype)
        _, feats = self(x, features=self.feature_names)
        self.train(was_training)
        return {name: int(t.shape[1]) for name, t in feats.items()}


def unwrap_state_dict(state_dict: Mapping[str, Tensor], own_keys: Iterable[str]
                      ) -> tuple[dict[str, Tensor], list[str]]:
    """``(state dict with wrapper prefixes removed, removed prefixes)`` against ``own_keys``.

    1. Keys ending in ``normalize.mean`` / ``normalize.std`` (RobustBench's ``ImageNormalizer``,
       under any wrapper) become ``mean`` / ``std`` unless the model has such keys itself.
    2. While every key shares its first dot-separated segment, that segment is dropped, as long
       as the number of keys matching ``own_keys`` does not fall (so a model whose own keys live
       under ``model.`` keeps that prefix).
    """
    own = set(own_keys)
    sd = dict(state_dict)
    for k in list(sd):
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] == "normalize" and parts[-1] in ("mean", "std") and k not in own:
            sd[parts[-1]] = sd.pop(k)
    norm = {k: sd.pop(k) for k in ("mean", "std") if k in sd}
    stripped: list[str] = []
    while sd and all("." in k for k in sd):
        heads = {k.split(".", 1)[0] for k in sd}
        if len(heads) != 1:
            break
        inner = {k.split(".", 1)[1]: v for k, v in sd.items()}
        if len(own & set(inner)) < len(own & set(sd)):
            break
        stripped.append(heads.pop() + ".")
        sd = inner
    sd.update(norm)
    return sd, stripped
