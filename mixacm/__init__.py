"""mixacm: a reproducible benchmark of MixACM (Muhammad et al., NeurIPS 2021) and its baselines."""
__version__ = "0.1.0"
