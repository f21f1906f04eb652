"""L-BFGS for one large parameter, in the compact (matrix) form, with no host synchronisation.

`torch.optim.LBFGS` runs the two-loop recursion: 4m small kernels per iteration (a dot and an
axpy per history pair and loop) and a host read of every scalar. At m = 20 and 512 px that is
~160 launches and ~40 syncs per step for a few MB of arithmetic. Here the history is one stacked
(2m, n) tensor and the inverse-Hessian product uses the compact representation of Byrd, Nocedal
& Schnabel (1994, eq. 3.2):

    H = gamma*I + [S  gamma*Y] M [S^T; gamma*Y^T]
    M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]]

with R the upper triangle of S^T Y and D its diagonal. Per iteration that is one (2m, n) x (n, 3)
product (history against g, s, y), a (2m x 2m) solve, and one (2m, n)^T x (2m) product: two
passes over the history instead of four, and no Python loop over it. All scalars stay on the
device; the curvature test is a `where`, not an `if`. Which slot the next pair goes to and the
pairs' age order are device tensors too, so a rejected pair leaves the history as it was (the
oldest pair stays the oldest).

Where it departs from `torch.optim.LBFGS` (without line search), so that multiplying the loss by
any positive constant gives the same iterates, up to rounding:

- The curvature test is relative, L-BFGS-B's (Byrd, Lu, Nocedal & Zhu 1995, `mainlb`): keep a
  pair when `y.s > eps * (-g.s)`, g the gradient the step was taken from. torch's absolute
  `y.s > 1e-10` rejects every pair of a small loss (measured: 96 px, random weights, fp32, y.s
  about 2e-11), leaving plain gradient steps that barely move.
- The first step moves the entry with the largest gradient by `first_step` (parameter units);
  torch's `min(1, 1/|g|_1) * lr` shrinks with the loss and can fall below fp32's resolution.
- `max_step` caps the largest entry's move in every step (a device-side `clamp`, no sync). With
  no line search, a pair of tiny positive curvature from a non-convex region makes H huge along
  it: measured, one step moved pixels by 389 (of a [0, 1] range) and the loss rose 8e9-fold.
- Given the loss (`step(loss)`, a device tensor), a trial whose loss rose is taken back and
  retried shorter from the last accepted point, its pair unused; `point()` is that point, what
  a run keeps. Decided with `where`, so still no host read.

Where torch and this version both accept every pair (a convex problem, first step aside), the
iterates are the same (no cap, no loss given). The caller keeps torch's convergence tests, reading the loss only when it
chooses to. No line search: a strong-Wolfe search measured no gain here (benchmarks/README.md).
"""

from __future__ import annotations

import torch

FIRST_STEP = 1e-2  # parameter units: the largest entry's move on the first step
# Relative curvature threshold: about fp32's rounding (L-BFGS-B uses float64's epsilon; the
# gradients here are fp32, so a smaller change in the directional derivative is noise).
CURVATURE_EPS = 1e-7


class LBFGS:
    """Compact-form L-BFGS on a single tensor; call `step()` after `backward()` filled its grad.

    `lr` scales every step; `first_step` and `max_step` (None: no cap) are in the parameter's
    units, independent of the loss's scale; `curvature_eps` is the relative curvature test's eps.
    """

    def __init__(self, param: torch.Tensor, *, lr: float = 1.0, history: int = 20, first_step: float = FIRST_STEP, curvature_eps: float = CURVATURE_EPS, max_step: float | None = None) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        if not first_step > 0:
            raise ValueError(f"first_step must be positive, got {first_step}")
        if max_step is not None and not max_step > 0:
            raise ValueError(f"max_step must be positive or None, got {max_step}")
        self.param = param
        self.lr = float(lr)
        self.m = int(history)
        self.first_step = float(first_step)
        self.curvature_eps = float(curvature_eps)
        self.max_step = None if max_step is None else float(max_step)
        n = param.numel()
        dev = param.device
        self._hist = torch.zeros(2 * self.m, n, device=dev, dtype=torch.float32)  # rows: S then Y
        self._sy = torch.zeros(self.m, self.m, device=dev, dtype=torch.float64)  # s_i . y_j by slot
        self._yy = torch.zeros(self.m, self.m, device=dev, dtype=torch.float64)  # y_i . y_j by slot
        # Accepted pairs so far, and each slot's pair's number (-1: empty). Both on the device:
        # whether a pair is accepted is only known there.
        self._accepted = torch.zeros((), device=dev, dtype=torch.long)
        self._age = torch.full((self.m,), -1, device=dev, dtype=torch.long)
        self._gamma = torch.ones((), device=dev, dtype=torch.float64)
        self._slots = torch.arange(self.m, device=dev)
        self._prev_g: torch.Tensor | None = None
        self._prev_s: torch.Tensor | None = None  # the trial step from the base point, t * d
        self._base_x: torch.Tensor | None = None  # the last accepted point, flat fp32
        self._base_f: torch.Tensor | None = None  # its loss (float64, on the device), if given

    @property
    def _valid(self) -> torch.Tensor:  # (m,) bool: slot holds an accepted pair
        return self._age >= 0

    @property
    def S(self) -> torch.Tensor:  # (m, n)
        return self._hist[: self.m]

    @property
    def Y(self) -> torch.Tensor:  # (m, n)
        return self._hist[self.m :]

    @torch.no_grad()
    def step(self, loss: torch.Tensor | None = None) -> None:
        """Move the parameter along the quasi-Newton direction for its current gradient.

        Given the loss at the current point (a 0-dim tensor, never read on the host), a trial
        whose loss rose above the last accepted point's, or is not finite, is taken back and
        retried shorter from that point (a backtracking line search spread over iterations),
        its gradient unused.
        """
        if self.param.grad is None:
            raise RuntimeError("LBFGS.step() needs a gradient: call backward() first")
        g = self.param.grad.reshape(-1).float()
        x = self.param.detach().reshape(-1).float()
        f = None if loss is None else loss.detach().reshape(()).double()
        if self._prev_g is None:
            tiny = torch.finfo(torch.float32).tiny  # a zero gradient gives a zero step, not a NaN
            s = self._capped(-g * (self.first_step * self.lr / g.abs().amax().clamp_min(tiny)))
            self._prev_g, self._prev_s, self._base_x, self._base_f = g.clone(), s, x.clone(), f
            self.param.add_(s.view_as(self.param).to(self.param.dtype))
            return
        assert self._prev_s is not None and self._base_x is not None
        if f is None or self._base_f is None:  # no loss: every step is accepted
            accept = torch.ones((), dtype=torch.bool, device=g.device)
        else:
            # Not Armijo's sufficient decrease: a loss computed in bf16 can repeat exactly, and a
            # step that leaves it unchanged must not be shortened for ever.
            accept = torch.isfinite(f) & (f <= self._base_f)
        ab = self._remember(g - self._prev_g, self._prev_s, g, accept)
        s = self._capped(self._direction(g, ab) * self.lr)
        if f is not None and self._base_f is not None:
            # Rejected: the minimum of the quadratic through f0, f0' = g0.s and f along the trial,
            # kept within [0.1, 0.5] of it (Nocedal & Wright, sec. 3.5); 0.1 if f is not finite.
            gs = torch.dot(self._prev_g, self._prev_s).double()
            excess = f - self._base_f - gs
            shrink = torch.where(excess > 0, -gs / excess.clamp_min(1e-300) / 2, torch.zeros_like(gs)).clamp(0.1, 0.5)
            shrink = torch.where(torch.isfinite(shrink), shrink, torch.full_like(shrink, 0.1))
            s = torch.where(accept, s, self._prev_s * shrink.float())
            self._base_f = torch.where(accept, f, self._base_f)
        self._base_x = torch.where(accept, x, self._base_x)
        self._prev_g = torch.where(accept, g, self._prev_g)
        self._prev_s = s
        self.param.copy_((self._base_x + s).view_as(self.param).to(self.param.dtype))

    def _capped(self, s: torch.Tensor) -> torch.Tensor:
        if self.max_step is None:
            return s
        return s * torch.clamp(self.max_step / s.abs().amax().clamp_min(torch.finfo(torch.float32).tiny), max=1.0)

    def point(self) -> torch.Tensor:
        """The last accepted point (the best evaluated one) when step() was given losses, else the
        parameter itself: the image to show or keep, rather than a trial not yet evaluated."""
        if self._base_x is None or self._base_f is None:
            return self.param.detach()
        return self._base_x.view_as(self.param).to(self.param.dtype)

    @torch.no_grad()
    def settle(self) -> None:
        """Put the parameter on `point()`."""
        self.param.copy_(self.point())

    def _remember(self, y: torch.Tensor, s: torch.Tensor, g: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
        """Store (s, y) if the trial was accepted and passes the relative curvature test; return
        the history against g.

        One pass over the history gives the new pair's row and column of S^T Y and Y^T Y and the
        products S g, Y g that the direction needs.
        """
        m = self.m
        assert self._prev_g is not None
        ys, gs = (torch.stack([y, self._prev_g]) @ s).double().unbind()  # y.s, and g.s < 0 for a descent step
        ok = (ys > self.curvature_eps * -gs) & accept  # 0-dim bool on the device; scales with the loss on both sides
        p = (self._accepted % m).view(1)  # the slot of the oldest pair (or an empty one)
        s_new = torch.where(ok, s, self.S.index_select(0, p).squeeze(0))
        y_new = torch.where(ok, y, self.Y.index_select(0, p).squeeze(0))
        self._hist.index_copy_(0, torch.cat([p, p + m]), torch.stack([s_new, y_new]))
        # (3, n) rows against (2m, n) rows: both operands contiguous along n, one streaming pass
        # (an (n, 3) column block instead runs ~2x slower on the CPU's BLAS).
        prods = (self._hist @ torch.stack([s_new, y_new, g]).T).double()  # (2m, 3)
        # A rejected pair rewrites its slot's old values: the same numbers, no harm.
        self._sy.index_copy_(0, p, prods[m:, 0].unsqueeze(0))  # s_p . y_j
        self._sy.index_copy_(1, p, prods[:m, 1].unsqueeze(1))  # s_i . y_p
        self._yy.index_copy_(0, p, prods[m:, 1].unsqueeze(0))
        self._yy.index_copy_(1, p, prods[m:, 1].unsqueeze(1))
        y_dot_y = prods[m:, 1].index_select(0, p).squeeze(0)
        self._gamma = torch.where(ok, ys / y_dot_y, self._gamma)
        self._age.index_copy_(0, p, torch.where(ok, self._accepted, self._age.index_select(0, p).squeeze(0)).view(1))
        self._accepted += ok.long()
        return prods[:, 2]  # (2m,): S g then Y g

    def _direction(self, g: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """-H g from the compact representation, the pairs taken oldest first."""
        m = self.m
        # Slots oldest -> newest by their pair's number; empty slots (age -1) sort first and are
        # masked out: a unit diagonal in R and zeros elsewhere make their coefficients exactly 0.
        order = torch.argsort(self._age)  # (m,)
        v = self._valid[order].double()  # (m,)
        vv = v.unsqueeze(1) * v.unsqueeze(0)
        a, b = ab[:m][order] * v, ab[m:][order] * v
        sy = self._sy[order][:, order] * vv
        yy = self._yy[order][:, order] * vv
        r = torch.triu(sy) + torch.diag(1.0 - v)
        d = torch.diag(torch.diagonal(sy))
        gamma = self._gamma
        rinv_a = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True)  # R^-1 S^T g
        inner = (d + gamma * yy) @ rinv_a - gamma * b.unsqueeze(1)
        top = torch.linalg.solve_triangular(r.T, inner, upper=False).squeeze(1)  # R^-T (...)
        bottom = -rinv_a.squeeze(1)
        coef = torch.zeros(2 * m, device=g.device, dtype=torch.float64)
        coef[order] = top
        coef[m + order] = gamma * bottom
        hg = gamma.float() * g + self._hist.T @ coef.float()  # (n,)
        return -hg
