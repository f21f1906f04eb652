"""VGG19 as a feature extractor: layers addressed by name, cut after the deepest one in use."""

from __future__ import annotations

import torch
from torch import nn

from .config import Pooling
from .errors import ConfigError

# The geometry is torch-free data in `layers`; its names stay importable from here.
from .layers import CONV_INDICES, LAYER_INDEX, LAYER_NAMES, VGG19_CFG, layer_channels, layer_stride, tile_margins  # noqa: F401

# The PyTorch VGG-19 expects sRGB in [0, 1] normalised by ImageNet's mean and std, unlike
# Simonyan et al.'s Caffe model (BGR, 0-255, mean subtracted only). These are the values of
# torchvision's `VGG19_Weights.IMAGENET1K_V1.transforms()` (its resize and crop are for
# classification and are not used).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_features(*, depth: int = len(LAYER_NAMES), pooling: Pooling = Pooling.MAX, tapped: frozenset[int] = frozenset()) -> nn.Sequential:
    """torchvision's VGG19 `features` (same indices, so its state_dict loads), cut to `depth` layers.

    ReLUs run in place except after a tapped conv, whose pre-activation output would otherwise be
    overwritten.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for name in LAYER_NAMES[:depth]:
        i = len(layers)
        if name.startswith("conv"):
            out_ch = layer_channels(name)
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
            in_ch = out_ch
        elif name.startswith("relu"):
            layers.append(nn.ReLU(inplace=(i - 1) not in tapped))
        elif pooling == Pooling.AVG:
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGGFeatures(nn.Module):
    """Normalise an sRGB image in [0, 1] and return the named layers' outputs.

    (N, 3, H, W) in, {name: (N, C, H / stride, W / stride)} out. Frozen: the loop only needs the
    gradient with respect to the image, and weight gradients would cost 1.5x the work.
    """

    def __init__(self, layers: tuple[str, ...] | list[str], *, pooling: Pooling = Pooling.MAX) -> None:
        super().__init__()
        unknown = [n for n in layers if n not in LAYER_INDEX]
        if unknown:
            raise ConfigError(f"unknown layer(s) {', '.join(unknown)}: use names like conv1_1, relu4_2, pool3")
        if not layers:
            raise ConfigError("give at least one layer")
        self.layers = tuple(dict.fromkeys(layers))  # unique, order kept
        self.pooling = Pooling(pooling)
        self._taps = {LAYER_INDEX[n]: n for n in self.layers}
        depth = max(self._taps) + 1
        self.features = build_features(depth=depth, pooling=self.pooling, tapped=frozenset(self._taps))
        self._strides = [layer_stride(n) for n in LAYER_NAMES[:depth]]
        margins = tile_margins(self.layers)
        self._margins = [margins[n] for n in LAYER_NAMES[:depth]]
        self._subset_margins: dict[tuple[str, ...], list[int]] = {}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def depth(self) -> int:
        return len(self.features)

    def forward(self, image: torch.Tensor, owned: tuple[int, int, int, int] | None = None, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """With `owned`, the rows and columns `(y0, y1, x0, x1)` of `image` (a tile's crop with its
        halo) that the caller keeps: each tap is returned at those positions only (`y0 // stride :
        y1 // stride`, ...), and each layer's output is cut down as the network goes to what the
        deeper taps still need, so the halo costs less at each depth. The kept features are the
        same as the whole crop's. `y0` and `x0` must be multiples of the deepest tap's stride, as
        must `y1` and `x1` unless they are the image's edge.

        `only`: these taps alone; the network stops after the deepest of them (and, with `owned`,
        keeps only the margins they need)."""
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        out: dict[str, torch.Tensor] = {}
        if only is not None and not set(only) <= set(self.layers):
            raise ConfigError(f"`only` asks for layers this network does not tap: {', '.join(sorted(set(only) - set(self.layers)))}")
        taps = self._taps if only is None else {LAYER_INDEX[n]: n for n in only}
        last = max(taps)
        if owned is None:
            for i, layer in enumerate(self.features[: last + 1]):
                x = layer(x)
                if i in taps:
                    out[taps[i]] = x
            return out
        margins = self._margins if only is None else self._margins_for(tuple(taps.values()))
        y0, y1, x0, x1 = owned
        oy = ox = 0  # where the kept part of the current layer's output starts, in image pixels
        for i, layer in enumerate(self.features[: last + 1]):
            x = layer(x)
            s = self._strides[i]
            # Cut a conv's output (before its ReLU, which then runs in place on the cut copy and
            # the whole output is freed) and a pooling's, to the layer's margin around `owned`.
            if i < last and LAYER_NAMES[i].startswith(("conv", "pool")):
                m = margins[i]
                top, left = max(oy, y0 - m), max(ox, x0 - m)
                r0, c0 = top // s - oy // s, left // s - ox // s
                r1, c1 = min(x.shape[-2], (y1 + m) // s - oy // s), min(x.shape[-1], (x1 + m) // s - ox // s)
                if r0 > 0 or c0 > 0 or r1 < x.shape[-2] or c1 < x.shape[-1]:
                    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
                    x = x[:, :, r0:r1, c0:c1].contiguous(memory_format=fmt)
                    oy, ox = top, left
            if i in taps:
                out[taps[i]] = x[:, :, y0 // s - oy // s : y1 // s - oy // s, x0 // s - ox // s : x1 // s - ox // s]
        return out

    def _margins_for(self, names: tuple[str, ...]) -> list[int]:
        """`tile_margins` of a subset of the taps, by layer index (cached)."""
        key = tuple(sorted(names, key=LAYER_INDEX.__getitem__))
        if key not in self._subset_margins:
            margins = tile_margins(key)
            self._subset_margins[key] = [margins[n] for n in LAYER_NAMES[: LAYER_INDEX[key[-1]] + 1]]
        return self._subset_margins[key]
