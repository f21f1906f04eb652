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
device; the curvature test (`y.s > 1e-10`, as in torch) is a `where`, not an `if`.

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
        self._valid = torch.zeros(self.m, device=dev, dtype=torch.bool)  # slot holds an accepted pair
        self._gamma = torch.ones((), device=dev, dtype=torch.float64)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}  # cached index tensors, no H2D per step
        self._pairs = 0  # pairs offered so far (accepted or not): a host counter, no sync
        self._prev_g: torch.Tensor | None = None
        self._prev_s: torch.Tensor | None = None  # the last step taken, t * d

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
            self._remember(g - self._prev_g, self._prev_s)
            s = self._direction(g) * self.lr
        self._prev_g = g.clone()
        self._prev_s = s
        self.param.add_(s.view_as(self.param).to(self.param.dtype))

    def _remember(self, y: torch.Tensor, s: torch.Tensor) -> None:
        """Put (s, y) into the ring buffer if it has positive curvature (y.s > 1e-10)."""
        p = self._pairs % self.m
        ys = torch.dot(y, s).double()
        ok = ys > 1e-10  # 0-dim bool on the device
        s_old, y_old = self.S[p].clone(), self.Y[p].clone()
        self.S[p] = torch.where(ok, s, s_old)
        self.Y[p] = torch.where(ok, y, y_old)
        # New row and column of S^T Y and Y^T Y from one pass over the history.
        prods = (self._hist @ torch.stack([self.S[p], self.Y[p]], dim=1)).double()  # (2m, 2)
        s_dot_y_all = prods[self.m :, 0]  # y_j . s_p
        y_dot_s_all = prods[: self.m, 1]  # s_i . y_p
        y_dot_y_all = prods[self.m :, 1]  # y_j . y_p
        self._sy[p, :] = s_dot_y_all
        self._sy[:, p] = y_dot_s_all
        self._yy[p, :] = y_dot_y_all
        self._yy[:, p] = y_dot_y_all
        self._gamma = torch.where(ok, ys / y_dot_y_all[p], self._gamma)
        self._valid[p] = self._valid[p] | ok
        self._pairs += 1

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g from the compact representation, the pairs taken oldest first."""
        k = min(self._pairs, self.m)
        # Slots oldest -> newest. A rejected pair leaves an older pair in its slot, which then
        # sits at a newer position: still a valid BFGS update sequence, just in another order.
        key = (k, self._pairs % self.m)
        order = self._orders.get(key)
        if order is None:
            order = torch.tensor([(self._pairs - k + i) % self.m for i in range(k)], device=g.device)
            self._orders[key] = order
        # Slots that never accepted a pair (rejected before the buffer filled) are masked out:
        # a unit diagonal in R and zeros elsewhere make their coefficients exactly zero.
        v = self._valid[order].double()  # (k,)
        vv = v.unsqueeze(1) * v.unsqueeze(0)
        ab = (self._hist @ g).double()  # (2m,): S g then Y g, one pass
        a, b = ab[: self.m][order] * v, ab[self.m :][order] * v
        sy = self._sy[order][:, order] * vv
        yy = self._yy[order][:, order] * vv
        r = torch.triu(sy) + torch.diag(1.0 - v)
        d = torch.diag(torch.diagonal(sy))
        gamma = self._gamma
        rinv_a = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True)  # R^-1 S^T g
        inner = (d + gamma * yy) @ rinv_a - gamma * b.unsqueeze(1)
        top = torch.linalg.solve_triangular(r.T, inner, upper=False).squeeze(1)  # R^-T (...)
        bottom = -rinv_a.squeeze(1)
        coef = torch.zeros(2 * self.m, device=g.device, dtype=torch.float64)
        coef[order] = top
        coef[self.m + order] = gamma * bottom
        hg = gamma.float() * g + self._hist.T @ coef.float()  # (n,)
        return -hg

    def state_dict(self) -> dict[str, object]:
        return {"pairs": self._pairs, "gamma": float(self._gamma)}
