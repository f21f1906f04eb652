"""L-BFGS for one large parameter, or a batch of them, in the compact (matrix) form, with no host
synchronisation.

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
  Until a pair passes the curvature test, H is gamma * I with gamma that first step's scale,
  where torch's is 1: a plain gradient step, as small as the loss (a run whose first pairs
  failed, negative curvature along -g, barely moved). Each such step that lowers the loss
  doubles gamma, as a line search extrapolates, until a pair passes.
- `max_step` caps the largest entry's move in every step (a device-side `clamp`, no sync). With
  no line search, a pair of tiny positive curvature from a non-convex region makes H huge along
  it: measured, one step moved pixels by 389 (of a [0, 1] range) and the loss rose 8e9-fold.
- Given the loss (`step(loss)`, a device tensor), a trial whose loss rose is taken back and
  retried shorter from the last accepted point, its pair unused; `point()` is that point, what
  a run keeps. Decided with `where`, so still no host read.

`BatchedLBFGS` runs N such problems at once over an (N, ...) parameter (images optimised
together): every piece of state has a leading problem dimension ((N, 2m, n) history, (N, m, m)
S^T Y and Y^T Y, per-problem gamma, slots, ages, first step, cap and taken-back trial), the
products are batched (`bmm`, batched triangular solves) and every decision is a per-row `where`,
so one problem's rejected pair, taken-back trial or non-finite loss leaves the others' steps as
they are. Each problem's iterates are the ones `LBFGS` gives it alone, up to the batched
products' rounding. `LBFGS` is the same code with N = 1 and its products run unbatched, the
kernels (and so the rounding) of a single-problem optimiser.

The history can live in another device's memory (`history_device`: the host's, pinned when the
parameter is on CUDA) when the device cannot hold it: 2m image-sized fp32 vectors, 32 GB at
8192x8192 and m = 20. It is then kept as column chunks of at most `chunk_bytes`, each a
contiguous (B, 2m, k) tensor, and each of the two passes streams it through the device one chunk
at a time: the first copies a chunk in, writes the new pair's columns into it, adds the chunk's
products to the sum and copies the whole chunk back (the pair's slot is a device tensor: copying
only its rows would need its value on the host, a sync); the second copies each chunk in and
writes its columns of H g. Every copy is `non_blocking`, from or to pinned memory, so the host
only enqueues work, as in the in-device version: no host synchronisation. Per step the history
crosses the bus twice towards the device and once back. Copies and products share the current
stream, which orders them (a chunk is back in host memory before the next pass reads it) and
lets the allocator reuse a chunk's device memory; copies on a side stream, ordered by events,
could overlap the outward copy with the next inward one on a full-duplex bus (not done: there
was no GPU to measure it on). The device holds a chunk or two instead of the history.
The iterates are the in-device version's up to the order the first pass adds in (its partial
products are summed over chunks in float64); the second pass's columns are each one small
product, the same sum as before.

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
# A streamed history's chunk (`history_device`): large enough that each copy runs at the bus's
# full rate (transfers of a few MB already do), small enough that the device's share of the
# history is a rounding error. Pinned allocations are rounded up to a power of two by PyTorch's
# host allocator: chunks of just under a power of two lose almost nothing to it, where one
# history-sized pinned block could lose nearly half.
HISTORY_CHUNK_BYTES = 64 * 2**20


class LBFGS:
    """Compact-form L-BFGS on a single tensor; call `step()` after `backward()` filled its grad.

    `lr` scales every step; `first_step` and `max_step` (None: no cap) are in the parameter's
    units, independent of the loss's scale; `curvature_eps` is the relative curvature test's eps.
    `history_device` (None: the parameter's, held whole) keeps the history there instead, in
    chunks of at most `chunk_bytes` (None: HISTORY_CHUNK_BYTES) streamed through the parameter's device (see the module's
    docstring); "cpu" for a CUDA parameter is pinned host memory. Given the parameter's own device
    it streams too, in the same memory: the path the host history takes, testable without a GPU.
    """

    def __init__(
        self,
        param: torch.Tensor,
        *,
        lr: float = 1.0,
        history: int = 20,
        first_step: float = FIRST_STEP,
        curvature_eps: float = CURVATURE_EPS,
        max_step: float | None = None,
        history_device: torch.device | str | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        if not first_step > 0:
            raise ValueError(f"first_step must be positive, got {first_step}")
        if max_step is not None and not max_step > 0:
            raise ValueError(f"max_step must be positive or None, got {max_step}")
        chunk_bytes = HISTORY_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
        self.param = param
        self.lr = float(lr)
        self.m = int(history)
        self.first_step = float(first_step)
        self.curvature_eps = float(curvature_eps)
        self.max_step = None if max_step is None else float(max_step)
        b = self._problems(param)
        n = param.numel() // max(b, 1)
        dev = param.device
        # Every piece of state has a leading problem dimension B (1 here; see BatchedLBFGS).
        # The history's rows: S then Y. Held whole, (B, 2m, n) on the device; streamed, as
        # (start column, (B, 2m, k) chunk) pairs in `history_device`'s memory. Zeros, not empty:
        # an empty slot's coefficient is exactly 0, and 0 times a stale NaN would not be.
        self._hist = torch.empty(0)
        self._chunks: list[tuple[int, torch.Tensor]] = []
        if history_device is None:
            self._hist = torch.zeros(b, 2 * self.m, n, device=dev, dtype=torch.float32)
        else:
            where = torch.device(history_device)
            pin = where.type == "cpu" and dev.type == "cuda"  # page-locked: copies run asynchronously, at the bus's rate
            k = max(1, chunk_bytes // (b * 2 * self.m * 4))  # columns per chunk
            self._chunks = [(c, torch.zeros(b, 2 * self.m, min(k, n - c), dtype=torch.float32, device=where, pin_memory=pin)) for c in range(0, max(n, 1), k)]
        self._sy = torch.zeros(b, self.m, self.m, device=dev, dtype=torch.float64)  # s_i . y_j by slot
        self._yy = torch.zeros(b, self.m, self.m, device=dev, dtype=torch.float64)  # y_i . y_j by slot
        # Accepted pairs so far, and each slot's pair's number (-1: empty). Both on the device:
        # whether a pair is accepted is only known there.
        self._accepted = torch.zeros(b, device=dev, dtype=torch.long)
        self._age = torch.full((b, self.m), -1, device=dev, dtype=torch.long)
        self._gamma = torch.ones(b, device=dev, dtype=torch.float64)
        self._rows = torch.arange(b, device=dev)
        self._prev_g: torch.Tensor | None = None  # (B, n)
        self._prev_s: torch.Tensor | None = None  # the trial step from the base point, t * d
        self._base_x: torch.Tensor | None = None  # the last accepted point, (B, n) fp32
        self._base_f: torch.Tensor | None = None  # its loss, (B,) float64 on the device, if given

    @staticmethod
    def _problems(param: torch.Tensor) -> int:
        return 1

    # The products below are the only operations that add many numbers. One problem runs them
    # as plain 2-D products (dot, mv, mm, one triangular solve): the kernels, and so the rounding,
    # of a single-problem optimiser (its iterates are pinned by the reference-hash tests).
    # BatchedLBFGS runs them batched; everything else is elementwise or a copy, the same bits
    # whatever the leading dimension.
    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, n), (B, n) -> (B,)
        return torch.dot(a[0], b[0]).unsqueeze(0)

    def _mv(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, r, c), (B, c) -> (B, r)
        return (a[0] @ v[0]).unsqueeze(0)

    def _tmv(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, r, c), (B, r) -> (B, c): a^T v
        return (a[0].T @ v[0]).unsqueeze(0)

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, r, c), (B, c, k) -> (B, r, k)
        return (a[0] @ b[0]).unsqueeze(0)

    def _solve(self, r: torch.Tensor, b: torch.Tensor, *, upper: bool) -> torch.Tensor:  # triangular r (B, m, m)
        return torch.linalg.solve_triangular(r[0], b[0], upper=upper).unsqueeze(0)

    @property
    def _valid(self) -> torch.Tensor:  # (B, m) bool: slot holds an accepted pair
        return self._age >= 0

    @property
    def streamed(self) -> bool:
        """Whether the history lives in `history_device`'s memory and is streamed in chunks."""
        return bool(self._chunks)

    @property
    def history_device(self) -> torch.device:
        """Where the history is kept."""
        return self._chunks[0][1].device if self._chunks else self._hist.device

    def _whole(self) -> torch.Tensor:  # (B, 2m, n) on the parameter's device; a copy when streamed
        if not self._chunks:
            return self._hist
        return torch.cat([c.to(self.param.device) for _, c in self._chunks], dim=2)

    @property
    def S(self) -> torch.Tensor:  # (B, m, n)
        return self._whole()[:, : self.m]

    @property
    def Y(self) -> torch.Tensor:  # (B, m, n)
        return self._whole()[:, self.m :]

    @torch.no_grad()
    def step(self, loss: torch.Tensor | None = None) -> None:
        """Move the parameter along the quasi-Newton direction for its current gradient.

        Given the loss at the current point (a 0-dim tensor; `BatchedLBFGS`: one per problem,
        (N,); never read on the host), a trial
        whose loss rose above the last accepted point's, or is not finite, is taken back and
        retried shorter from that point (a backtracking line search spread over iterations),
        its gradient unused.
        """
        if self.param.grad is None:
            raise RuntimeError("LBFGS.step() needs a gradient: call backward() first")
        b = self._rows.numel()
        g = self.param.grad.reshape(b, -1).float()
        x = self.param.detach().reshape(b, -1).float()
        f = None if loss is None else loss.detach().reshape(b).double()
        if self._prev_g is None:
            tiny = torch.finfo(torch.float32).tiny  # a zero gradient gives a zero step, not a NaN
            scale = self.first_step / g.abs().amax(1, keepdim=True).clamp_min(tiny)  # (B, 1)
            s = self._capped(-g * (scale * self.lr))
            # Until a pair passes the curvature test, H is gamma * I: start gamma at the first
            # step's scale, not at 1. At 1 each such step is the raw gradient, as small as the
            # loss is: a run whose first pairs all fail (negative curvature along -g, measured
            # from the content image: chelsea and starry_night at 128 px, random weights, fp32)
            # then moved its largest pixel by 6e-5 per iteration and its loss fell 0.6% in 50.
            self._gamma = scale.squeeze(1).double()
            self._prev_g, self._prev_s, self._base_x, self._base_f = g.clone(), s, x.clone(), f
            self.param.add_(s.view_as(self.param).to(self.param.dtype))
            return
        assert self._prev_s is not None and self._base_x is not None
        if f is None or self._base_f is None:  # no loss: every step is accepted
            accept = torch.ones(b, dtype=torch.bool, device=g.device)
        else:
            # Not Armijo's sufficient decrease: a loss computed in bf16 can repeat exactly, and a
            # step that leaves it unchanged must not be shortened for ever.
            accept = torch.isfinite(f) & (f <= self._base_f)
        ab = self._remember(g - self._prev_g, self._prev_s, g, accept)
        # While no pair has passed, a step that lowered the loss but whose pair failed the
        # curvature test (the loss is concave along it, so no quadratic model has a minimum
        # there) doubles the next one: a line search's extrapolation, spread over iterations,
        # bounded by `max_step` and by the taking back of a step whose loss rose. Measured from
        # chelsea with starry_night at 128 px (fp32, random weights): the first pair passed at
        # iteration 6 instead of 41, and the loss after 50 iterations was 0.00127 against 0.0029.
        # Without losses (every trial accepted, nothing taken back) the steps keep their size.
        # (No pair kept now means none before: the count only grows.)
        if f is not None and self._base_f is not None:
            self._gamma = torch.where((self._accepted == 0) & accept, self._gamma * 2, self._gamma)
        s = self._capped(self._direction(g, ab) * self.lr)
        keep = accept.unsqueeze(1)  # (B, 1)
        if f is not None and self._base_f is not None:
            # Rejected: the minimum of the quadratic through f0, f0' = g0.s and f along the trial,
            # kept within [0.1, 0.5] of it (Nocedal & Wright, sec. 3.5); 0.1 if f is not finite.
            gs = self._dot(self._prev_g, self._prev_s).double()
            excess = f - self._base_f - gs
            shrink = torch.where(excess > 0, -gs / excess.clamp_min(1e-300) / 2, torch.zeros_like(gs)).clamp(0.1, 0.5)
            shrink = torch.where(torch.isfinite(shrink), shrink, torch.full_like(shrink, 0.1))
            s = torch.where(keep, s, self._prev_s * shrink.float().unsqueeze(1))
            self._base_f = torch.where(accept, f, self._base_f)
        self._base_x = torch.where(keep, x, self._base_x)
        self._prev_g = torch.where(keep, g, self._prev_g)
        self._prev_s = s
        self.param.copy_((self._base_x + s).view_as(self.param).to(self.param.dtype))

    def _capped(self, s: torch.Tensor) -> torch.Tensor:
        if self.max_step is None:
            return s
        return s * torch.clamp(self.max_step / s.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny), max=1.0)

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
        m, rows = self.m, self._rows
        assert self._prev_g is not None
        ys, gs = self._mv(torch.stack([y, self._prev_g], 1), s).double().unbind(1)  # y.s, and g.s < 0 for a descent step
        ok = (ys > self.curvature_eps * -gs) & accept  # (B,) bool on the device; scales with the loss on both sides
        keep = ok.unsqueeze(1)
        p = self._accepted % m  # (B,): each problem's slot of its oldest pair (or an empty one)
        if self._chunks:
            prods = self._store_streamed(s, y, g, keep, p)
        else:
            prods = self._store(self._hist, s, y, g, keep, p).double()
        # A rejected pair rewrites its slot's old values: the same numbers, no harm. The column
        # is written last, so S^T Y's diagonal entry is s_p . y_p from the S rows, as before.
        self._sy[rows, p] = prods[:, m:, 0]  # s_p . y_j
        self._sy[rows, :, p] = prods[:, :m, 1]  # s_i . y_p
        self._yy[rows, p] = prods[:, m:, 1]
        self._yy[rows, :, p] = prods[:, m:, 1]
        y_dot_y = prods[rows, p + m, 1]
        self._gamma = torch.where(ok, ys / y_dot_y, self._gamma)
        self._age[rows, p] = torch.where(ok, self._accepted, self._age[rows, p])
        self._accepted += ok.long()
        return prods[:, :, 2]  # (B, 2m): S g then Y g

    def _store(self, hist: torch.Tensor, s: torch.Tensor, y: torch.Tensor, g: torch.Tensor, keep: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Write the pair into slot p of `hist` (B, 2m, k) where `keep`, else its old values again;
        return `hist` against the pair and g, (B, 2m, 3) fp32. `s`, `y`, `g`: (B, k), the same columns."""
        rows, m = self._rows, self.m
        s_new = torch.where(keep, s, hist[rows, p])
        y_new = torch.where(keep, y, hist[rows, p + m])
        hist[rows, p] = s_new
        hist[rows, p + m] = y_new
        # (3, n) rows against (2m, n) rows: both operands contiguous along n, one streaming pass
        # (an (n, 3) column block instead runs ~2x slower on the CPU's BLAS).
        return self._mm(hist, torch.stack([s_new, y_new, g], 1).transpose(1, 2))

    def _store_streamed(self, s: torch.Tensor, y: torch.Tensor, g: torch.Tensor, keep: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """`_store` over the streamed history, chunk by chunk: (B, 2m, 3) float64, the chunks'
        products added in float64 (each chunk's own sum is fp32, as the whole history's is)."""
        dev = self.param.device
        total: torch.Tensor | None = None
        for c0, host in self._chunks:
            c1 = c0 + host.shape[2]
            # A copy even where `host` is on `dev` (the CPU): the path, and the write-back, that a
            # host history on a GPU takes, so the CPU's tests cover it.
            chunk = host.to(dev, non_blocking=True, copy=True)
            part = self._store(chunk, s[:, c0:c1], y[:, c0:c1], g[:, c0:c1], keep, p).double()
            host.copy_(chunk, non_blocking=True)  # the whole chunk: which rows changed is known only on the device
            total = part if total is None else total + part
        assert total is not None
        return total

    def _combination(self, coef: torch.Tensor) -> torch.Tensor:
        """The history's rows weighted by `coef` (B, 2m) fp32 and added: (B, n) on the parameter's device."""
        if not self._chunks:
            return self._tmv(self._hist, coef)
        dev = self.param.device
        out = torch.empty(coef.shape[0], self.param.numel() // coef.shape[0], device=dev, dtype=torch.float32)
        for c0, host in self._chunks:
            out[:, c0 : c0 + host.shape[2]] = self._tmv(host.to(dev, non_blocking=True), coef)  # each column its own sum over 2m rows
        return out

    def _direction(self, g: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """-H g from the compact representation, the pairs taken oldest first."""
        m, b = self.m, self._rows.numel()
        # Slots oldest -> newest by their pair's number; empty slots (age -1) sort first and are
        # masked out: a unit diagonal in R and zeros elsewhere make their coefficients exactly 0.
        order = torch.argsort(self._age, dim=1)  # (B, m)
        v = self._valid.gather(1, order).double()  # (B, m)
        vv = v.unsqueeze(2) * v.unsqueeze(1)
        a, bg = ab[:, :m].gather(1, order) * v, ab[:, m:].gather(1, order) * v
        rows_of, cols_of = order.unsqueeze(2).expand(b, m, m), order.unsqueeze(1).expand(b, m, m)
        sy = self._sy.gather(1, rows_of).gather(2, cols_of) * vv
        yy = self._yy.gather(1, rows_of).gather(2, cols_of) * vv
        r = torch.triu(sy) + torch.diag_embed(1.0 - v)
        d = torch.diag_embed(torch.diagonal(sy, dim1=1, dim2=2))
        gamma = self._gamma.view(b, 1, 1)
        rinv_a = self._solve(r, a.unsqueeze(2), upper=True)  # R^-1 S^T g, (B, m, 1)
        inner = self._mm(d + gamma * yy, rinv_a) - gamma * bg.unsqueeze(2)
        top = self._solve(r.transpose(1, 2), inner, upper=False).squeeze(2)  # R^-T (...)
        bottom = -rinv_a.squeeze(2)
        coef = torch.zeros(b, 2 * m, device=g.device, dtype=torch.float64)
        coef.scatter_(1, order, top)
        coef.scatter_(1, m + order, gamma.view(b, 1) * bottom)
        hg = self._gamma.float().unsqueeze(1) * g + self._combination(coef.float())  # (B, n)
        return -hg


class BatchedLBFGS(LBFGS):
    """One compact-form L-BFGS per entry of the first dimension of an (N, ...) parameter, all
    stepped together: N separate problems (images of a batch that share only the network's
    forward and backward pass) with their own histories, curvature tests, first steps, caps and
    taken-back trials. `step(loss)` takes the N losses, (N,)."""

    @staticmethod
    def _problems(param: torch.Tensor) -> int:
        if param.dim() < 1 or param.shape[0] < 1:
            raise ValueError(f"BatchedLBFGS needs a parameter with a leading batch dimension, got shape {tuple(param.shape)}")
        return param.shape[0]

    # On the CPU, bmm of a transposed (B, n, 2m) history against a vector took 12x as long as the
    # same product as a row vector against the history (measured at 256 px, N = 2), and a
    # (B, 1, n) x (B, n, 1) bmm 20x as long as vecdot: each product is written in its fast form.
    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(a, b)

    def _mv(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(a, v.unsqueeze(1))

    def _tmv(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.bmm(v.unsqueeze(1), a).squeeze(1)

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    def _solve(self, r: torch.Tensor, b: torch.Tensor, *, upper: bool) -> torch.Tensor:
        return torch.linalg.solve_triangular(r, b, upper=upper)
