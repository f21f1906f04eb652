"""Exact FLOP counts for one iteration of the loop: the cut VGG19 forward and its input gradient.

What is counted (one multiply-add = 2 FLOPs, as `torch.utils.flop_counter` counts):

- conv, forward: `2 * Cin * Cout * 9 * H_l * W_l` per image (padding 1 keeps the size). Bias
  additions are not counted (FlopCounterMode does not count them either).
- conv, input gradient: the same per conv (the gradient with respect to a conv's input is the
  transposed convolution, the same MACs), conv1_1's included since the loop needs d loss / d
  image. No weight gradients: the network is frozen.
- relu: 1 per element forward (a max), 1 per element backward (a masked copy).
- pool (2x2, stride 2, floors odd sizes): max 3 comparisons per output, avg 3 adds and a
  multiply per output; backward 1 per input element (routing or scaling).
- gram (`F F^T` over positions, per style layer): `2 * C * C * HW` forward; backward the same,
  one product `F (dG + dG^T)` (`losses._Gram`; the C x C symmetrising add is not counted).

Not counted: the ImageNet normalisation, the loss sums and the optimiser's update, all O(pixels)
and a fraction of a percent of the convolutions at any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import Pooling
from .errors import ConfigError
from .layers import LAYER_INDEX, LAYER_NAMES, deepest_layer, layer_channels


@dataclass(frozen=True)
class LayerFlops:
    """One layer's work for `batch` images of the given size."""

    name: str  # conv1_1, relu1_1, pool1, gram:relu1_1, ...
    kind: str  # conv | relu | pool | gram
    shape: tuple[int, int, int]  # (C, H, W) of the layer's output (for a gram, its input)
    forward: int
    input_grad: int  # 0 for layers the gradient does not pass through


@dataclass(frozen=True)
class FlopCount:
    """Per-layer counts and totals for one iteration (forward + input gradient)."""

    height: int
    width: int
    batch: int
    layers: tuple[LayerFlops, ...]

    def _sum(self, kinds: tuple[str, ...], attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers if layer.kind in kinds)

    @property
    def conv_forward(self) -> int:
        return self._sum(("conv",), "forward")

    @property
    def conv_input_grad(self) -> int:
        return self._sum(("conv",), "input_grad")

    @property
    def other(self) -> int:
        """relu, pool and gram, both directions."""
        kinds = ("relu", "pool", "gram")
        return self._sum(kinds, "forward") + self._sum(kinds, "input_grad")

    @property
    def total(self) -> int:
        return sum(layer.forward + layer.input_grad for layer in self.layers)


def count_flops(
    hw: tuple[int, int],
    *,
    layers: Sequence[str],
    style_layers: Sequence[str] = (),
    batch: int = 1,
    forward_to: str | None = None,
    backward_batch: int | None = None,
    pooling: Pooling | str = Pooling.MAX,
) -> FlopCount:
    """Count one iteration at (H, W) for a network cut after the deepest of `layers`.

    `style_layers` add a Gram matrix each (forward and backward, for one image). `forward_to`
    runs the forward pass deeper than the deepest tap (the reference loop runs all of VGG19);
    the gradient still stops at the deepest tap. `backward_batch` (default `batch`) is how many
    images the input gradient runs for.
    """
    if not layers:
        raise ConfigError("give at least one layer")
    unknown = [n for n in [*layers, *style_layers, *([forward_to] if forward_to else [])] if n not in LAYER_INDEX]
    if unknown:
        raise ConfigError(f"unknown layer(s) {', '.join(unknown)}: use names like conv1_1, relu4_2, pool3")
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive, got {h}x{w}")
    pooling = Pooling(pooling)
    back_n = batch if backward_batch is None else backward_batch
    deepest = LAYER_INDEX[deepest_layer(layers)]
    last = max(deepest, LAYER_INDEX[forward_to]) if forward_to else deepest
    out: list[LayerFlops] = []
    c_in = 3
    sizes: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(LAYER_NAMES[: last + 1]):
        grad = i <= deepest
        if name.startswith("conv"):
            c_out = layer_channels(name)
            f = 2 * c_in * c_out * 9 * h * w
            out.append(LayerFlops(name, "conv", (c_out, h, w), batch * f, back_n * f if grad else 0))
            c_in = c_out
        elif name.startswith("relu"):
            e = c_in * h * w
            out.append(LayerFlops(name, "relu", (c_in, h, w), batch * e, back_n * e if grad else 0))
        else:
            n_in = c_in * h * w
            h, w = h // 2, w // 2
            n_out = c_in * h * w
            per = 3 if pooling == Pooling.MAX else 4
            out.append(LayerFlops(name, "pool", (c_in, h, w), batch * per * n_out, back_n * n_in if grad else 0))
        sizes[name] = (c_in, h, w)
    for name in style_layers:
        c, lh, lw = sizes[name]
        f = 2 * c * c * lh * lw
        out.append(LayerFlops(f"gram:{name}", "gram", (c, lh, lw), f, f))
    return FlopCount(int(hw[0]), int(hw[1]), batch, tuple(out))


__all__ = ["FlopCount", "LayerFlops", "count_flops"]
