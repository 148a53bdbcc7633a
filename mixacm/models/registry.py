"""The model registry and the one way to build a model by name."""
from __future__ import annotations

from typing import Any, Callable

from mixacm.models.base import FeatureClassifier
from mixacm.registry import Registry

MODELS: Registry[Callable[..., FeatureClassifier]] = Registry("model")


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> FeatureClassifier:
    return MODELS.get(name)(num_classes=num_classes, **kwargs)
