"""The compact-form L-BFGS: against torch.optim.LBFGS where both accept every curvature pair (a
quadratic, a small style problem scaled so torch's absolute test passes, a saddle), and at any
loss scale, where torch's absolute test and first step fail."""

from __future__ import annotations

import pytest
import torch

from nst.engine.config import Optimizer, preset
from nst.engine.device import Runtime
from nst.engine.lbfgs import BatchedLBFGS, LBFGS
from nst.engine.targets import TorchTargets
from nst.engine.objective import make_objective
from nst.engine.transfer import build_model


def _torch_lbfgs(x: torch.Tensor, m: int, lr: float = 1.0) -> torch.optim.LBFGS:
    # One gradient per step and no stopping tests: the configuration ours reproduces.
    return torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=m, tolerance_grad=-1, tolerance_change=-1)


def _torch_first_step(f, x0: torch.Tensor) -> float:
    """`first_step` that makes our first step torch's: torch moves by min(1, 1/|g|_1) * g (times
    lr); ours moves the largest entry by first_step (times lr)."""
    x = x0.clone().requires_grad_(True)
    f(x).backward()
    g = x.grad
    return float(min(1.0, 1.0 / float(g.abs().sum())) * g.abs().max())


def _run_both(f, x0: torch.Tensor, *, m: int, steps: int, lr: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[float]]:
    """Ours (started with torch's first step) and torch's, side by side."""
    xa = x0.clone().requires_grad_(True)
    xb = x0.clone().requires_grad_(True)
    ours, ref = LBFGS(xa, lr=lr, history=m, first_step=_torch_first_step(f, x0)), _torch_lbfgs(xb, m, lr)
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
    # Style weight 1e12: a loss large enough that torch's absolute test (y.s > 1e-10) keeps its
    # pairs, as ours does at any scale. Unscaled, torch rejects them (see the scale tests below).
    cfg = preset("gatys", size=32, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"), optimizer=Optimizer.LBFGS, lbfgs_history=5,
                 content_weight=1e6, style_weight=1e12, tv_weight=1e3)
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


def _iterates(f, x0: torch.Tensor, *, steps: int, **kw) -> tuple[list[torch.Tensor], LBFGS]:
    x = x0.clone().requires_grad_(True)
    opt = LBFGS(x, history=5, **kw)
    out = []
    for _ in range(steps):
        x.grad = None
        f(x).backward()
        opt.step()
        out.append(x.detach().clone())
    return out, opt


@pytest.mark.parametrize("scale", [1e-12, 1e-8, 1e8])
def test_same_iterates_for_any_loss_scale(scale):
    # Multiplying the loss by a positive constant scales g, y and y.s alike: a quasi-Newton method
    # must take the same steps. Not a power of two, so rounding differs a little.
    f, x_star, x0 = _quadratic()
    ref, _ = _iterates(f, x0, steps=25)
    got, opt = _iterates(lambda x: scale * f(x), x0, steps=25)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1 + b.abs().max())), f"iterate {i} at scale {scale}"
    assert int(opt._accepted) == 24  # every pair kept
    assert (got[-1] - x_star).norm() < 0.1 * (x0 - x_star).norm()


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e4])
def test_same_iterates_at_any_loss_scale_while_every_pair_fails_the_curvature_test(scale):
    """A double well, sum((x^2 - 1)^2), started at x = 0.1 where its curvature is negative: the
    first pairs all fail the curvature test, so H is gamma * I. With gamma starting at 1 those
    steps were raw gradients, as large as the loss: about 4e-9 per iteration at scale 1e-8 and 4e-4
    at 1e-3 (stuck), and at 1 and 1e4 the cap's. Starting at the first step's scale they are the
    same steps at every scale, and the run crosses into the wells (x = +-1)."""
    f = lambda x: ((x * x - 1.0) ** 2).sum()  # noqa: E731
    x0 = torch.full((8,), 0.1) + 0.01 * torch.arange(8.0)
    def run(c: float) -> tuple[list[torch.Tensor], LBFGS]:
        x = x0.clone().requires_grad_(True)
        opt = LBFGS(x, history=5, first_step=0.05, max_step=0.5)
        out = []
        for _ in range(60):
            x.grad = None
            loss = c * f(x)
            loss.backward()
            opt.step(loss.detach())
            out.append(opt.point().clone())
        return out, opt
    ref, _ = run(1.0)
    got, opt = run(scale)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), f"iterate {i} at scale {scale}"
    assert int(opt._accepted) > 0 and float(f(got[-1])) < 1e-3 * float(f(x0))  # in the wells


def test_while_no_pair_passes_each_step_that_lowers_the_loss_doubles():
    """Concave along the steps (the double well near 0), a quadratic model has no minimum: the
    steps double, as a line search extrapolates, and the run reaches the wells in 7 iterations
    where steps of the first one's size took 11."""
    f = lambda x: ((x * x - 1.0) ** 2).sum()  # noqa: E731
    x0 = torch.full((8,), 0.1) + 0.01 * torch.arange(8.0)
    x = x0.clone().requires_grad_(True)
    opt = LBFGS(x, history=5, first_step=0.05, max_step=0.5)
    points, reached = [x0.clone()], None
    for i in range(20):
        x.grad = None
        loss = f(x)
        loss.backward()
        opt.step(loss.detach())
        points.append(opt.point().clone())
        if reached is None and float(f(points[-1])) < 1e-3 * float(f(x0)):
            reached = i + 1
    moves = [float((b - a).abs().max()) for a, b in zip(points[1:4], points[2:5])]  # accepted points 1..4: no pair has passed yet
    assert all(later >= 1.8 * earlier for earlier, later in zip(moves, moves[1:])), moves
    assert reached is not None and reached <= 8
    # Without losses nothing is taken back, so nothing bounds a growing step: it keeps its size.
    x = x0.clone().requires_grad_(True)
    opt = LBFGS(x, history=5, first_step=0.05)
    xs = [x0.clone()]
    for _ in range(4):
        x.grad = None
        f(x).backward()
        opt.step()
        xs.append(x.detach().clone())
    plain = [float((b - a).abs().max()) for a, b in zip(xs[1:], xs[2:])]
    assert int(opt._accepted) == 0 and all(later < 1.3 * earlier for earlier, later in zip(plain, plain[1:])), plain


def test_torch_stalls_on_a_small_loss_where_ours_does_not():
    # What the relative test fixes: at scale 1e-12 torch rejects every pair (y.s < 1e-10) and its
    # first step, min(1, 1/|g|_1) = 1, is a plain gradient step of a tiny gradient.
    f, x_star, x0 = _quadratic()
    small = lambda x: 1e-12 * f(x)  # noqa: E731
    xb = x0.clone().requires_grad_(True)
    ref = _torch_lbfgs(xb, 5)

    def closure() -> torch.Tensor:
        ref.zero_grad()
        loss = small(xb)
        loss.backward()
        return loss

    for _ in range(25):
        ref.step(closure)
    ours, _ = _iterates(small, x0, steps=25)
    start = (x0 - x_star).norm()
    assert (xb.detach() - x_star).norm() > 0.99 * start  # torch has not moved
    assert (ours[-1] - x_star).norm() < 0.1 * start


def test_first_step_and_cap_are_in_parameter_units():
    f, _, x0 = _quadratic()
    for scale in (1e-6, 1e6):
        its, _ = _iterates(lambda x: scale * f(x), x0, steps=1, first_step=0.05)
        assert float((its[0] - x0).abs().max()) == pytest.approx(0.05, rel=1e-5)
        its, _ = _iterates(lambda x: scale * f(x), x0, steps=6, max_step=0.01)
        moves = [float((b - a).abs().max()) for a, b in zip([x0, *its], its)]
        assert max(moves) <= 0.01 * (1 + 1e-5)


def test_a_step_that_raises_the_loss_is_taken_back():
    # x**4 from 1 with a first step of 3: to -2, where the loss is 16 times higher. Given the
    # losses, the next trial starts again from 1, between 0.1 and 0.5 of the way, and point()
    # stays on the accepted 1 until a trial is better.
    f = lambda x: (x**4).sum()  # noqa: E731
    x = torch.ones(4, requires_grad=True)
    opt = LBFGS(x, first_step=3.0)
    for expect_point in (1.0, 1.0):
        x.grad = None
        loss = f(x)
        loss.backward()
        opt.step(loss.detach())
        assert torch.allclose(opt.point(), torch.full((4,), expect_point))
    # The minimum of the quadratic through f(0) = 4, f'(0) = g.s = -48 and f(1) = 64 along the
    # trial: t = 48 / (2 * (64 - 4 + 48)) = 0.22, within [0.1, 0.5].
    assert float(x.detach()[0]) == pytest.approx(1 - 3 * 48 / 216, abs=1e-6)
    assert int(opt._accepted) == 0  # the rejected trial's pair is not learnt
    for _ in range(20):
        x.grad = None
        loss = f(x)
        loss.backward()
        opt.step(loss.detach())
    assert float(f(opt.point())) < 0.05 * 4
    opt.settle()
    assert torch.equal(x.detach(), opt.point())


def test_a_non_finite_loss_is_taken_back():
    x = torch.ones(3, requires_grad=True)
    opt = LBFGS(x, first_step=0.5)
    for loss_value in (1.0, float("nan")):
        x.grad = torch.ones(3)
        opt.step(torch.tensor(loss_value))
    assert torch.isfinite(x).all() and torch.allclose(opt.point(), torch.ones(3))
    assert torch.allclose(x.detach(), torch.full((3,), 1 - 0.05))  # 0.1 of the rejected trial


def test_bad_use():
    with pytest.raises(ValueError, match="history"):
        LBFGS(torch.zeros(3, requires_grad=True), history=0)
    with pytest.raises(ValueError, match="first_step"):
        LBFGS(torch.zeros(3, requires_grad=True), first_step=0)
    with pytest.raises(ValueError, match="max_step"):
        LBFGS(torch.zeros(3, requires_grad=True), max_step=-1)
    with pytest.raises(RuntimeError, match="backward"):
        LBFGS(torch.zeros(3, requires_grad=True)).step()


# Batched: N problems over one (N, ...) parameter, against each problem run alone.

N_DIM = 6


def _problems():
    """Three different problems of one size, at different loss scales: a convex quadratic (every
    pair kept), a saddle (negative-curvature pairs rejected) and a quartic whose first trials
    overshoot (losses rise, trials taken back)."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(N_DIM, N_DIM, generator=gen))
    a = q @ torch.diag(torch.logspace(0, 1.5, N_DIM)) @ q.T
    c = torch.randn(N_DIM, generator=gen)
    d = torch.tensor([1.0, 2.0, -0.5, 3.0, -1.0, 0.7])
    fs = [
        lambda x: 1e-6 * (0.5 * x @ a @ x - c @ x),
        lambda x: 0.5 * (d * x * x).sum() + 0.1 * x.sum(),
        lambda x: 1e4 * (x**4).sum(),
    ]
    x0 = torch.stack([torch.randn(N_DIM, generator=gen), torch.tensor([0.3, -0.2, 0.1, 0.4, 0.2, -0.3]), torch.ones(N_DIM)])
    return fs, x0


def _alone(f, x0: torch.Tensor, *, steps: int, losses: bool, poison_at: int | None = None, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor], LBFGS]:
    x = x0.clone().requires_grad_(True)
    opt = LBFGS(x, **kw)
    its, points = [], []
    for k in range(steps):
        x.grad = None
        loss = f(x)
        loss.backward()
        if k == poison_at:
            loss, x.grad = torch.tensor(float("nan")), torch.full_like(x, float("nan"))
        opt.step(loss.detach() if losses else None)
        its.append(x.detach().clone())
        points.append(opt.point().clone())
    return its, points, opt


def _together(fs, x0: torch.Tensor, *, steps: int, losses: bool, poison: tuple[int, int] | None = None, **kw):
    x = x0.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, **kw)
    its, points = [], []
    for k in range(steps):
        x.grad = None
        loss = torch.stack([f(x[i]) for i, f in enumerate(fs)])  # (N,)
        loss.sum().backward()  # each row's gradient is its own problem's
        if poison is not None and k == poison[1]:
            i = poison[0]
            loss = loss.detach().clone()
            loss[i] = float("nan")
            x.grad[i] = float("nan")
        opt.step(loss.detach() if losses else None)
        its.append(x.detach().clone())
        points.append(opt.point().clone())
    return its, points, opt


@pytest.mark.parametrize("losses", [True, False])
@pytest.mark.parametrize("kw", [{"history": 3, "first_step": 3.0}, {"history": 5, "first_step": 3.0, "max_step": 0.5}])
def test_batched_equals_each_problem_alone(losses, kw):
    # fp32 throughout. The batched products (bmm) add in another order than the single problem's
    # dot/mv, so the iterates agree to rounding, not bit for bit; every decision (curvature test,
    # taken-back trial) must come out the same, so the counts of kept pairs are equal.
    fs, x0 = _problems()
    steps = 15
    its, points, opt = _together(fs, x0, steps=steps, losses=losses, **kw)
    for i, f in enumerate(fs):
        ref, ref_points, ref_opt = _alone(f, x0[i], steps=steps, losses=losses, **kw)
        for k in range(steps):
            torch.testing.assert_close(its[k][i], ref[k], rtol=1e-5, atol=1e-6, msg=f"problem {i}, iterate {k}")
            torch.testing.assert_close(points[k][i], ref_points[k], rtol=1e-5, atol=1e-6, msg=f"problem {i}, point {k}")
        assert int(opt._accepted[i]) == int(ref_opt._accepted)
        assert torch.equal(opt._age[i], ref_opt._age[0])
    kept = opt._accepted.tolist()
    assert kept[1] < steps - 1  # the saddle rejects pairs: the test covers rejected pairs
    if not losses:
        assert kept[0] == steps - 1  # every trial accepted: the quadratic keeps every pair
    else:  # trials whose loss rose were taken back: the point stayed while the iterate moved
        taken_back = [(k, i) for k in range(1, steps) for i in range(3) if torch.equal(points[k][i], points[k - 1][i])]
        assert taken_back and all(not torch.equal(its[k][i], its[k - 1][i]) for k, i in taken_back)
        assert float(fs[2](points[-1][2])) < 1e-6 * float(fs[2](x0[2]))


def test_batched_steps_double_per_problem_until_its_first_pair_passes():
    """A double well started where it is concave (no pair passes at first, so its steps double)
    beside a quadratic (its first pair passes, so its steps never do): each row takes the steps
    it takes alone, the doubling decided per row."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(N_DIM, N_DIM, generator=gen)
    a = a @ a.T + torch.eye(N_DIM)
    fs = [lambda x: 1e-3 * ((x * x - 1.0) ** 2).sum(), lambda x: 1e-6 * 0.5 * x @ a @ x]
    x0 = torch.stack([0.02 + 0.01 * torch.arange(float(N_DIM)), torch.randn(N_DIM, generator=gen)])
    kw = {"history": 5, "first_step": 0.05, "max_step": 0.5}
    its, points, opt = _together(fs, x0, steps=15, losses=True, **kw)
    for i, f in enumerate(fs):
        ref, ref_points, ref_opt = _alone(f, x0[i], steps=15, losses=True, **kw)
        for k in range(15):
            torch.testing.assert_close(points[k][i], ref_points[k], rtol=1e-5, atol=1e-6, msg=f"problem {i}, point {k}")
        assert int(opt._accepted[i]) == int(ref_opt._accepted)
    well = [float((b[0] - a[0]).abs().max()) for a, b in zip([x0, *points[:2]], points[:3])]
    assert well[1] >= 1.8 * well[0] and well[2] >= 1.8 * well[1], well  # 0.05, then doubled twice
    assert float(fs[0](points[-1][0])) < 1e-2 * float(fs[0](x0[0]))


def test_batched_problem_going_non_finite_leaves_the_others_alone():
    # One problem's loss and gradient turn NaN at one step: its trial is taken back (it stays
    # finite), and the other rows take exactly the steps they take when nothing went wrong.
    fs, x0 = _problems()
    kw = {"history": 4, "first_step": 0.5, "max_step": 0.5}
    clean, _, _ = _together(fs, x0, steps=10, losses=True, **kw)
    its, points, opt = _together(fs, x0, steps=10, losses=True, poison=(1, 4), **kw)
    for k in range(10):
        assert torch.equal(its[k][[0, 2]], clean[k][[0, 2]])
        assert torch.isfinite(its[k]).all() and torch.isfinite(points[k]).all()
    ref, ref_points, _ = _alone(fs[1], x0[1], steps=10, losses=True, poison_at=4, **kw)
    torch.testing.assert_close(its[-1][1], ref[-1], rtol=1e-5, atol=1e-6)
    assert torch.equal(points[4][1], points[3][1])  # the poisoned trial was not accepted


def test_batched_bad_use():
    with pytest.raises(ValueError, match="batch dimension"):
        BatchedLBFGS(torch.tensor(1.0, requires_grad=True))
    with pytest.raises(RuntimeError, match="backward"):
        BatchedLBFGS(torch.zeros(2, 3, requires_grad=True)).step()


# A history kept in another device's memory and streamed in column chunks (`history_device`). On
# the CPU "cpu" is the parameter's own memory, but the chunked passes run as they would from
# pinned host memory: the products are summed over chunks, the combination written chunk by chunk.


def _streamed_kw(kw: dict, chunk_bytes: int) -> dict:
    return {**kw, "history_device": "cpu", "chunk_bytes": chunk_bytes}


def _close_to_rounding(got: torch.Tensor, ref: torch.Tensor, k: int, msg: str) -> None:
    """The streamed first pass adds its products in another order (each chunk in fp32, then the
    chunks in float64), so the iterates differ by rounding, which these small, badly conditioned
    problems amplify step by step: measured, moving the in-device run's start by one fp32 ulp
    moves its iterates by up to 2.6e-4 of their largest entry within 15 steps (the streamed
    history's differ by up to 1.2e-4). So: 1e-6 of the largest entry for the first four
    iterates, where nothing has had time to grow, and 1e-3 after."""
    tol = (1e-6 if k < 4 else 1e-3) * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=0, atol=tol, msg=msg)


@pytest.mark.parametrize("losses", [True, False])
@pytest.mark.parametrize("kw", [{"history": 3, "first_step": 3.0}, {"history": 2, "first_step": 0.5, "max_step": 0.5}])
def test_streamed_history_equals_the_device_history(losses, kw):
    # Each problem of `_problems` (pairs kept; pairs rejected with the ring full at history 2;
    # trials taken back) with chunks of 4 then 2 columns (2m rows of fp32 per column).
    fs, x0 = _problems()
    steps = 15
    for i, f in enumerate(fs):
        ref, ref_points, ref_opt = _alone(f, x0[i], steps=steps, losses=losses, **kw)
        its, points, opt = _alone(f, x0[i], steps=steps, losses=losses, **_streamed_kw(kw, 4 * 2 * kw["history"] * 4))
        assert opt.streamed and [c.shape[2] for _, c in opt._chunks] == [4, 2]
        for k in range(steps):
            _close_to_rounding(its[k], ref[k], k, f"problem {i}, iterate {k}")
            _close_to_rounding(points[k], ref_points[k], k, f"problem {i}, point {k}")
        # Every decision the same: which pairs were kept, in which slots, in which order.
        assert int(opt._accepted) == int(ref_opt._accepted)
        assert torch.equal(opt._age, ref_opt._age)
        _close_to_rounding(opt.S, ref_opt.S, steps, "S")
        _close_to_rounding(opt.Y, ref_opt.Y, steps, "Y")
    _, _, saddle = _alone(fs[1], x0[1], steps=steps, losses=losses, **_streamed_kw(kw, 1))  # one column a chunk
    assert int(saddle._accepted) < steps - 1  # the scenarios include rejected pairs


def test_streamed_history_on_a_quadratic_in_uneven_chunks():
    # 50 unknowns in chunks of 7 columns (the last of 1), history 5, 25 steps: the iterates are the
    # in-device history's within rounding, and both converge.
    f, x_star, x0 = _quadratic()
    ref, ref_opt = _iterates(f, x0, steps=25)
    got, opt = _iterates(f, x0, steps=25, history_device="cpu", chunk_bytes=7 * 10 * 4)
    assert [c.shape[2] for _, c in opt._chunks] == [7] * 7 + [1]
    for k, (a, b) in enumerate(zip(got, ref)):
        _close_to_rounding(a, b, k, f"iterate {k}")
    assert int(opt._accepted) == int(ref_opt._accepted) == 24
    assert (got[-1] - x_star).norm() < 0.1 * (x0 - x_star).norm()


@pytest.mark.parametrize("losses", [True, False])
def test_batched_streamed_history_equals_the_device_history(losses):
    # Three problems at once, 2m = 8 rows each: 96 bytes a column, chunks of 2 columns. One
    # problem's NaN at step 4 is taken back in both.
    fs, x0 = _problems()
    kw = {"history": 4, "first_step": 0.5, "max_step": 0.5}
    ref, ref_points, ref_opt = _together(fs, x0, steps=12, losses=losses, poison=(1, 4) if losses else None, **kw)
    its, points, opt = _together(fs, x0, steps=12, losses=losses, poison=(1, 4) if losses else None, **_streamed_kw(kw, 2 * 96 + 50))
    assert [c.shape for _, c in opt._chunks] == [torch.Size([3, 8, 2])] * 3
    for k in range(12):
        for i in range(3):
            _close_to_rounding(its[k][i], ref[k][i], k, f"problem {i}, iterate {k}")
            _close_to_rounding(points[k][i], ref_points[k][i], k, f"problem {i}, point {k}")
        assert torch.isfinite(its[k]).all()
    assert torch.equal(opt._accepted, ref_opt._accepted) and torch.equal(opt._age, ref_opt._age)


def test_streamed_history_bad_use():
    with pytest.raises(ValueError, match="chunk_bytes"):
        LBFGS(torch.zeros(3, requires_grad=True), history_device="cpu", chunk_bytes=0)
    opt = LBFGS(torch.zeros(3, requires_grad=True))
    assert not opt.streamed and opt.history_device == torch.device("cpu")
