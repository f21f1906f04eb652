"""Would L-BFGS in TF32 stall as it does in bf16? An emulation on the CPU (benchmarks/README.md).

CUDA's TF32 rounds a convolution's or matrix product's fp32 operands to a 10-bit mantissa and
accumulates in fp32. This script does the same to every fp32 convolution of the network, forward
and backward (its input, weights and incoming gradient), and to the features whose Gram the
style loss takes (`--exact-targets`: not in the targets' passes), then runs the gatys preset's
L-BFGS at one scale on the example photos with seeded random weights. `fp32` and `bf16` (autocast, as `stylize` runs them) are the two ends.
It prints the lowest loss and writes the loss curve as JSON.

    OMP_NUM_THREADS=1 python benchmarks/tf32_emulation.py fp32 --size 128 --iterations 500
    OMP_NUM_THREADS=1 python benchmarks/tf32_emulation.py tf32 --size 128 --iterations 500
    OMP_NUM_THREADS=1 python benchmarks/tf32_emulation.py bf16 --size 128 --iterations 500

An emulation, not the hardware: cuDNN may round elsewhere too (its Winograd and FFT kernels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nst.engine.losses as losses
from nst.engine import Precision, Runtime, load_image, preset, random_weights, stylize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_conv2d = F.conv2d


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32's 10-bit mantissa (to nearest, ties away from zero), kept as fp32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _Round(torch.autograd.Function):
    """TF32 rounding forward, the gradient passed through."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return to_tf32(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


class _Conv(torch.autograd.Function):
    """A convolution whose operands are rounded to TF32, forward and for the input's gradient
    (the network is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):  # noqa: ANN001, ANN205
        ctx.save_for_backward(w)
        ctx.shape, ctx.args = x.shape, (stride, padding, dilation, groups)
        return _conv2d(to_tf32(x), to_tf32(w), b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (w,) = ctx.saved_tensors
        gi = torch.nn.grad.conv2d_input(ctx.shape, to_tf32(w), to_tf32(g.contiguous()), *ctx.args)
        return gi, None, None, None, None, None, None


def emulate_tf32(*, exact_targets: bool = False) -> None:
    """Patch the convolutions and the style loss's Gram, process-wide. `exact_targets`: leave
    the passes without gradients (the targets') in exact fp32."""

    def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: ANN001, ANN202
        if x.dtype != torch.float32 or (exact_targets and not (x.requires_grad or w.requires_grad)):
            return _conv2d(x, w, b, stride, padding, dilation, groups)
        return _Conv.apply(x, w, b, stride, padding, dilation, groups)

    F.conv2d = conv2d
    gram = losses.gram_matrix
    losses.gram_matrix = lambda features, *, normalize=True: gram(_Round.apply(features.float()), normalize=normalize)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--style", default="the_scream.jpg")
    p.add_argument("--exact-targets", action="store_true", help="tf32: the targets' passes in exact fp32")
    p.add_argument("--json", type=Path, default=None, help="write the loss curve here")
    a = p.parse_args()
    if a.mode == "tf32":
        emulate_tf32(exact_targets=a.exact_targets)
    cfg = preset("gatys", size=a.size, scales=(), iterations=a.iterations, lbfgs_patience=0)
    runtime = Runtime(precision=Precision.BF16 if a.mode == "bf16" else Precision.FP32)
    t = time.perf_counter()
    r = stylize(load_image(EXAMPLES / "chelsea.png"), [load_image(EXAMPLES / a.style)], cfg, weights=random_weights(seed=0), runtime=runtime)
    h = r.loss_history
    best = min(h)
    print(f"{a.mode}: {len(h)} iterations in {time.perf_counter() - t:.1f} s, lowest loss {best:.6g} at iteration {h.index(best) + 1}")
    if a.json is not None:
        a.json.write_text(json.dumps({"mode": a.mode, "size": a.size, "style": a.style, "losses": h}))


if __name__ == "__main__":
    main()
