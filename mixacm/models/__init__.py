"""Model registry: every model takes [0, 1] images and returns named features on request."""
from mixacm.models.base import FeatureClassifier
from mixacm.models.registry import MODELS, build_model

# Importing a module registers its models (one import line per module).
from mixacm.models import cert_resnet  # noqa: E402,F401
from mixacm.models import imagenet_resnet  # noqa: E402,F401
from mixacm.models import preact_resnet  # noqa: E402,F401
from mixacm.models import tiny  # noqa: E402,F401
from mixacm.models import wide_resnet  # noqa: E402,F401

__all__ = ["FeatureClassifier", "MODELS", "build_model"]
