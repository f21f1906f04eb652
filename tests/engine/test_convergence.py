"""Convergence at any loss scale: the tests that would have caught an optimiser that did not move.

Seeded random weights on the CPU, the repository's example photos. A loss multiplied by a
constant must give the same loss curve relative to its start (L-BFGS at any scale; Adam while its
gradients stay well above its eps), fp32 must converge, and bf16 must end where fp32 ends.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from nst.engine import Precision, Runtime, load_image, preset, stylize
from nst.engine.config import Optimizer


@pytest.fixture(scope="module")
def photos():
    from pathlib import Path

    ex = Path(__file__).resolve().parents[2] / "examples"
    return load_image(ex / "chelsea.png"), load_image(ex / "the_scream.jpg")


def _relative_curve(photos, weights, *, size: int, iterations: int, scale: float = 1.0, precision: str = "fp32", **kw) -> list[float]:
    # Every iteration (no lbfgs_patience): these compare whole curves, and bf16 levels off early.
    base = preset("gatys", size=size, iterations=iterations, scales=(size,), **{"lbfgs_patience": 0, **kw})
    cfg = dataclasses.replace(base, content_weight=base.content_weight * scale, style_weight=base.style_weight * scale, tv_weight=base.tv_weight * scale)
    r = stylize(*photos[:1], [photos[1]], cfg, weights=weights, runtime=Runtime(precision=Precision(precision)))
    assert r.status == "done" and len(r.loss_history) == iterations
    return [x / r.loss_history[0] for x in r.loss_history]


@pytest.fixture(scope="module")
def curve96(photos, weights):
    """The 96 px fp32 gatys run at the loss's own scale, 100 iterations (shared by two tests)."""
    return _relative_curve(photos, weights, size=96, iterations=100)


def _best(curve: list[float]) -> list[float]:
    """Lowest loss so far: L-BFGS may try a step that it then takes back."""
    return list(itertools.accumulate(curve, min))


def test_fp32_gatys_at_96px_falls_90_percent_in_100_iterations(curve96):
    # With torch's absolute curvature test this fell 0.7% in 60 iterations.
    assert curve96[-1] <= 0.1, f"loss fell to {curve96[-1]:.3f} of its start"


def test_lbfgs_moves_where_its_first_curvature_pairs_all_fail(weights):
    """chelsea with starry_night at 64 px from the content image: the loss is concave along -g
    for its first iterations, so every pair fails the curvature test. Those steps used to be
    plain gradient steps of the normalised loss's tiny gradient: 30 iterations took the loss down
    0.75%. At the first step's scale, doubling while the loss falls, the first pair passes at
    iteration 6 and 30 iterations take the loss to 1.4% of its start (measured)."""
    from pathlib import Path

    ex = Path(__file__).resolve().parents[2] / "examples"
    cfg = preset("gatys", size=64, scales=(), iterations=30, lbfgs_patience=0)
    r = stylize(load_image(ex / "chelsea.png"), [load_image(ex / "starry_night.jpeg")], cfg, weights=weights, runtime=Runtime())
    assert min(r.loss_history) < 0.1 * r.loss_history[0], f"loss fell to {min(r.loss_history) / r.loss_history[0]:.4f} of its start"


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_lbfgs_same_relative_curve_at_any_loss_scale(photos, weights, curve96, scale):
    ref = _best(curve96[:50])
    got = _best(_relative_curve(photos, weights, size=96, iterations=50, scale=scale))
    # The same curve within 1% of the starting loss at every iteration...
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst <= 0.01, f"scale {scale}: curves differ by {worst:.4f} of the start"
    # ...and after 50 iterations within 3% of each other. Not closer: the problem is non-convex
    # and fp32 rounding differences grow (measured at 96 px: 0.9% and 1.4% at 1e-8 and 1e8, and
    # 0.6% from a change of the scale by 1e-7, which changes nothing but the rounding).
    assert ref[-1] < 0.05 and got[-1] == pytest.approx(ref[-1], rel=0.03)


def test_adam_same_relative_curve_at_1e_minus_2_and_1e2(photos, weights):
    # Adam's step is lr * m / (sqrt(v) + eps): the loss's scale cancels while the gradients stay
    # well above eps (the README says where that floor lies).
    kw = dict(size=64, iterations=50, optimizer=Optimizer.ADAM, lr=0.02)
    low = _relative_curve(photos, weights, scale=1e-2, **kw)
    high = _relative_curve(photos, weights, scale=1e2, **kw)
    assert high[-1] < 0.2
    assert max(abs(a - b) for a, b in zip(low, high)) <= 0.01
    assert low[-1] == pytest.approx(high[-1], rel=0.03)


@pytest.mark.bf16
def test_fp32_and_bf16_end_within_10_percent_after_200_iterations(photos, weights):
    fp32 = _relative_curve(photos, weights, size=48, iterations=200)
    bf16 = _relative_curve(photos, weights, size=48, iterations=200, precision="bf16")
    # Measured 8% apart: bf16 levels off near 0.83% of the start from about iteration 110, where
    # the steps become smaller than bf16's resolution of the network's input; fp32 goes on.
    assert min(fp32) < 0.1
    assert min(bf16) == pytest.approx(min(fp32), rel=0.10)
