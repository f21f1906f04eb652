"""The compact-form L-BFGS against torch.optim.LBFGS: a quadratic, a small style problem, and
rejected curvature pairs."""

from __future__ import annotations

import pytest
import torch

from nst.engine.config import Optimizer, preset
from nst.engine.device import Runtime
from nst.engine.lbfgs import LBFGS
from nst.engine.targets import TorchTargets
from nst.engine.objective import make_objective
from nst.engine.transfer import build_model


def _torch_lbfgs(x: torch.Tensor, m: int, lr: float = 1.0) -> torch.optim.LBFGS:
    # One gradient per step and no stopping tests: the configuration ours reproduces.
    return torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=m, tolerance_grad=-1, tolerance_change=-1)


def _run_both(f, x0: torch.Tensor, *, m: int, steps: int, lr: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[float]]:
    xa = x0.clone().requires_grad_(True)
    xb = x0.clone().requires_grad_(True)
    ours, ref = LBFGS(xa, lr=lr, history=m), _torch_lbfgs(xb, m, lr)
    its_a, its_b, fa, fb = [], [], [], []
    for _ in range(steps):
        xa.grad = None
        loss = f(xa)
        loss.backward()
        fa.append(float(loss.detach()))
        ours.step()
        its_a.append(xa.detach().clone())

        def closure() -> torch.Tensor:
            ref.zero_grad()
            loss_b = f(xb)
            loss_b.backward()
            return loss_b

        fb.append(float(ref.step(closure).detach()))
        its_b.append(xb.detach().clone())
    return its_a, its_b, fa, fb


def _quadratic(n: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    eig = torch.logspace(0, 2, n)  # condition number 100
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=gen)
    return (lambda x: 0.5 * x @ a @ x - b @ x), torch.linalg.solve(a, b), torch.randn(n, generator=gen)


@pytest.mark.parametrize("m", [3, 20])
def test_matches_torch_on_a_quadratic(m):
    f, x_star, x0 = _quadratic()
    its_a, its_b, fa, fb = _run_both(f, x0, m=m, steps=25)
    for i, (a, b) in enumerate(zip(its_a, its_b)):
        # Iterates agree to float32 rounding, amplified a little along the way.
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max())), f"iterate {i}"
    assert fa[-1] < fa[0] and (its_a[-1] - x_star).norm() < 0.5 * (x0 - x_star).norm()


def test_matches_torch_on_a_small_style_problem(weights):
    cfg = preset("gatys", size=32, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"), optimizer=Optimizer.LBFGS, lbfgs_history=5)
    runtime = Runtime(channels_last=False)
    model = build_model(cfg, weights, runtime)
    gen = torch.Generator().manual_seed(1)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    src = TorchTargets(model)
    ct = src.compute(content, content_layers=cfg.content_layers, style_layers=())
    st = src.compute(style, content_layers=(), style_layers=cfg.style_layers)
    loss_fn = make_objective(model, runtime, cfg, ct.content, st.grams, (32, 32))
    _, _, fa, fb = _run_both(lambda x: loss_fn(x)[0], content.clone(), m=5, steps=10)
    # Stated tolerance: loss trajectories within 1e-3 relative over 10 iterations (float32
    # through a network; the two implementations round differently).
    for i, (a, b) in enumerate(zip(fa, fb)):
        assert a == pytest.approx(b, rel=1e-3), f"iteration {i}: ours {a}, torch {b}"
    assert fa[-1] < 0.5 * fa[0]


@pytest.mark.parametrize("m", [2, 4])
def test_rejected_curvature_gives_no_nan_and_matches_torch(m):
    # A saddle: the negative-curvature coordinates give y.s < 0 pairs, which both versions skip.
    # With m = 2 the ring is full when pairs are rejected: the oldest pair must stay the oldest.
    d = torch.tensor([1.0, 2.0, -0.5, 3.0, -1.0])
    f = lambda x: 0.5 * (d * x * x).sum() + 0.1 * x.sum()  # noqa: E731
    its_a, its_b, fa, fb = _run_both(f, torch.tensor([0.3, -0.2, 0.1, 0.4, 0.2]), m=m, steps=8)
    for a, b in zip(its_a, its_b):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_zero_gradient_change_is_rejected_without_nan():
    # A linear function: y = 0 every step, so y.s = 0 and no pair is ever accepted.
    x = torch.zeros(6, requires_grad=True)
    opt = LBFGS(x, lr=0.5, history=3)
    c = torch.arange(1.0, 7.0)
    for _ in range(6):
        x.grad = None
        (c @ x).backward()
        opt.step()
    assert torch.isfinite(x).all()
    assert int(opt._valid.sum()) == 0


def test_bad_use():
    with pytest.raises(ValueError, match="history"):
        LBFGS(torch.zeros(3, requires_grad=True), history=0)
    with pytest.raises(RuntimeError, match="backward"):
        LBFGS(torch.zeros(3, requires_grad=True)).step()
