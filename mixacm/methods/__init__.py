"""Training methods in one registry; each says how to compute one step's loss.

Adding a method is one module here and one import line below; the tests loop over METHODS.
"""
from mixacm.methods.base import METHODS, Method, build_method

# Importing a module registers its method (one import line per method).
from mixacm.methods import standard  # noqa: E402,F401
from mixacm.methods import at  # noqa: E402,F401
from mixacm.methods import trades  # noqa: E402,F401
from mixacm.methods import free_at  # noqa: E402,F401
from mixacm.methods import fast_at  # noqa: E402,F401
from mixacm.methods import mixacm  # noqa: E402,F401
from mixacm.methods import awp  # noqa: E402,F401
from mixacm.methods import fat  # noqa: E402,F401
from mixacm.methods import fat_trades  # noqa: E402,F401
from mixacm.methods import igam  # noqa: E402,F401
from mixacm.methods import ard  # noqa: E402,F401
from mixacm.methods import rslad  # noqa: E402,F401

__all__ = ["METHODS", "Method", "build_method"]
