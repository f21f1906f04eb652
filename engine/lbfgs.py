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
device; the curvature test (`y.s > 1e-10`, as in torch) is a `where`, not an `if`. Which slot
the next pair goes to and the pairs' age order are device tensors too, so a rejected pair leaves
the history exactly as torch leaves it (the oldest pair stays the oldest).

Same iterates as `torch.optim.LBFGS(lr, history_size, line_search_fn=None)` stepped once per
gradient (`max_iter=1`), up to rounding; the convergence tests of torch's version are left to the
caller, which reads the loss only when it chooses to.
"""

from __future__ import annotations

import torch


class LBFGS:
    """Compact-form L-BFGS on a single tensor; call `step()` after `backward()` filled its grad."""

    def __init__(self, param: torch.Tensor, *, lr: float = 1.0, history: int = 20) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.param = param
        self.lr = float(lr)
        self.m = int(history)
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
        self._prev_s: torch.Tensor | None = None  # the last step taken, t * d

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
    def step(self) -> None:
        """Move the parameter along the quasi-Newton direction for its current gradient."""
        if self.param.grad is None:
            raise RuntimeError("LBFGS.step() needs a gradient: call backward() first")
        g = self.param.grad.reshape(-1).float()
        if self._prev_g is None:
            # First step: steepest descent scaled as torch does, min(1, 1/|g|_1) * lr.
            t = torch.clamp(g.abs().sum().reciprocal(), max=1.0) * self.lr
            s = -g * t
        else:
            assert self._prev_s is not None
            ab = self._remember(g - self._prev_g, self._prev_s, g)
            s = self._direction(g, ab) * self.lr
        self._prev_g = g.clone()
        self._prev_s = s
        self.param.add_(s.view_as(self.param).to(self.param.dtype))

    def _remember(self, y: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Store (s, y) if it has positive curvature (y.s > 1e-10); return the history against g.

        One pass over the history gives the new pair's row and column of S^T Y and Y^T Y and the
        products S g, Y g that the direction needs.
        """
        m = self.m
        ys = torch.dot(y, s).double()
        ok = ys > 1e-10  # 0-dim bool on the device
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
