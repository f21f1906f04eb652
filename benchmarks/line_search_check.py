"""Does a strong-Wolfe line search make our L-BFGS reach results sooner? (benchmarks/README.md)

Runs the gatys preset on the example photos with seeded random weights, fp32, on the CPU, twice
for the same number of gradient evaluations:

- `ours`: `nst.engine.lbfgs.LBFGS` as `stylize` runs it (one evaluation per iteration, the loss
  passed to `step` so it can take back a step that rose);
- `wolfe`: the same L-BFGS directions, each step's length chosen by PyTorch's strong-Wolfe line
  search (`torch.optim.lbfgs._strong_wolfe`, a private function: this is a measurement script,
  not product code), starting from the unit step, with no step cap.

It prints how many evaluations and seconds each took to reach fractions of the starting loss.

    python benchmarks/line_search_check.py --size 96 --evaluations 150
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.optim.lbfgs import _strong_wolfe

from nst.engine import Runtime, load_image, preset, random_weights
from nst.engine.images import output_shape, resize, to_tensor
from nst.engine.lbfgs import LBFGS
from nst.engine.targets import TorchTargets
from nst.engine.transfer import _make_loss, build_model, style_grams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def problem(size: int):
    cfg = preset("gatys", size=size)
    runtime = Runtime()
    content, style = load_image(EXAMPLES / "chelsea.png"), load_image(EXAMPLES / "the_scream.jpg")
    hw = output_shape(content.width, content.height, size)
    c = to_tensor(resize(content, hw))
    st = to_tensor(resize(style, output_shape(style.width, style.height, size)))
    model = build_model(cfg, random_weights(seed=0), runtime)
    src = TorchTargets(model)
    ct = src.compute(c, content_layers=cfg.content_layers, style_layers=())
    sg = style_grams(cfg, [src.compute(st, content_layers=(), style_layers=cfg.style_layers)], [st], [1.0], device=c.device)
    return cfg, _make_loss(model, runtime, cfg, ct.content, sg, hw), c


def run(mode: str, size: int, evaluations: int) -> list[tuple[int, float, float]]:
    cfg, loss_fn, x0 = problem(size)
    x = x0.clone().requires_grad_(True)
    log: list[tuple[int, float, float]] = []  # (evaluations so far, seconds, loss)
    t0 = time.perf_counter()
    if mode == "ours":
        opt = LBFGS(x, first_step=cfg.lbfgs_first_step, max_step=cfg.lbfgs_max_step)
        for i in range(evaluations):
            x.grad = None
            loss, _ = loss_fn(x)
            loss.backward()
            log.append((i + 1, time.perf_counter() - t0, float(loss.detach())))
            opt.step(loss.detach())
        return log

    def value_and_grad(flat: torch.Tensor) -> tuple[float, torch.Tensor]:
        xx = flat.view_as(x).detach().clone().requires_grad_(True)
        loss, _ = loss_fn(xx)
        loss.backward()
        return float(loss.detach()), xx.grad.reshape(-1).clone()

    opt = LBFGS(x, first_step=cfg.lbfgs_first_step)  # directions only: the search sets the length
    f, g = value_and_grad(x.detach().reshape(-1))
    n = 1
    log.append((n, time.perf_counter() - t0, f))
    while n < evaluations:
        base = x.detach().clone()
        x.grad = g.view_as(x).clone()
        opt.step()  # the quasi-Newton step with lr 1, then measured and undone
        d = (x.detach() - base).reshape(-1)
        x.data.copy_(base)
        gtd = float(g @ d)
        if gtd >= 0:
            break
        f, g, t, evals = _strong_wolfe(lambda xf, t, dd: value_and_grad(xf + t * dd), base.reshape(-1), 1.0, d, f, g, gtd, max_ls=10)
        n += evals
        s = t * d
        x.data.add_(s.view_as(x))
        opt._prev_s = s.view(1, -1)  # the curvature pair of the step actually taken (one problem: (1, n))
        log.append((n, time.perf_counter() - t0, f))
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--evaluations", type=int, default=150)
    a = ap.parse_args()
    torch.manual_seed(0)
    for mode in ("ours", "wolfe"):
        log = run(mode, a.size, a.evaluations)
        start = log[0][2]
        parts = []
        for frac in (0.1, 0.03, 0.015, 0.0125, 0.011):
            hit = next((e for e in log if e[2] <= frac * start), None)
            parts.append(f"{frac:g}: " + (f"{hit[0]} evals {hit[1]:.0f} s" if hit else "not reached"))
        best = min(e[2] for e in log) / start
        print(f"{mode:5s} {a.size} px  " + "; ".join(parts) + f"; lowest after {log[-1][0]} evals: {best:.5f} of the start", flush=True)


if __name__ == "__main__":
    main()
