"""An independent cross-check of the project's PGD: torchattacks' PGD (3.5.1) with the same
settings on the same points of a briefly trained model.

Without a random start both attacks are deterministic and must give the same adversarial
images (same step, same sign of the same gradient, same projection); with random starts the
draws differ (torchattacks uses the global RNG), so the accuracies must agree within
TOLERANCE_PCT points. torchattacks pins old `requests`; CI installs it with `--no-deps`
(.ci/run), and the test skips where it is absent.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.attacks import build_attack, pgd_linf

torchattacks = pytest.importorskip(
    "torchattacks", reason="torchattacks not installed (pip install --no-deps torchattacks==3.5.1 scipy)")

EPS, STEPS = 0.07, 20
TOLERANCE_PCT = 3.0  # on 400 points: a few points of random-start noise, far below any real bug


@pytest.fixture(scope="module")
def trained():
    """A small net trained for a few seconds on noisy class patterns: PGD at EPS breaks some points."""
    torch.manual_seed(0)
    patterns = torch.randint(0, 2, (10, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1

    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 10
        return (0.5 + patterns[y] + 0.08 * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 1), y

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = sample(1000, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return (model, *sample(400, 2))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_same_images_without_random_start(trained):
    model, x, y = trained
    ours = pgd_linf(model, x, y, eps=EPS, steps=STEPS, step_size=EPS / 4, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=False)(x, y)
    same = (ours - theirs).flatten(1).abs().amax(1) < 1e-6
    assert float(same.float().mean()) >= 0.99  # a rare float tie in the sign may differ
    assert accuracy(model, ours, y) == pytest.approx(accuracy(model, theirs, y), abs=0.5)


def test_pgd20_accuracy_agrees_with_random_starts(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    ours = accuracy(model, build_attack("pgd20", EPS)(model, x, y, seed=0), y)
    torch.manual_seed(0)
    theirs = accuracy(model, torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)(x, y), y)
    assert 10 < theirs < clean - 10, (clean, theirs)  # the check means something: PGD bites, not all the way
    assert abs(ours - theirs) <= TOLERANCE_PCT, (ours, theirs)
