"""Attacks on [0, 1] images: L-inf PGD (mixacm's own) and an AutoAttack adapter."""
from mixacm.attacks.pgd import pgd_linf

__all__ = ["pgd_linf"]
