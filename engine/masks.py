"""Spatial control: masks as guidance channels, and guided Gram matrices.

Gatys, Ecker, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in Neural Style
Transfer" (CVPR 2017): each region's features are multiplied by its guidance channel at the
layer's resolution before the Gram matrix is taken. A mask is a greyscale image, 1 (white) where
a style acts, 0 (black) where it does not, grey for a soft weight.

Three uses, each optional:
- `masks`: one per style image, where on the output that style acts (None: everywhere).
- `style_regions`: one per style image, which part of the style image its targets come from.
- `content_mask`: a weight map on the content term.

Everything here is a sum over positions (a guided Gram is sum_p t_p^2 f_p f_p^T over sum_p t_p^2),
so an evaluation that adds up positions tile by tile carries it unchanged: the guidance at each
layer's resolution is one more per-position input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError
from .images import ImageError, as_rgb, load_named
from .layers import LAYER_INDEX, LAYER_NAMES
from .losses import guided_gram

EVERYWHERE = "-"  # in a list of mask paths: this style acts everywhere / uses all of its image
ASPECT_TOLERANCE = 0.01  # a mask's width/height may differ from its image's by 1%, no more


def load_mask(path: str, *, param: str) -> Image.Image:
    """A mask file as a greyscale ("L") image; ImageError naming `param` if it cannot be read."""
    grey = load_named(path, param).convert("L")
    grey.info["nst.path"] = str(path)  # for messages: the conversion drops `filename`
    return grey


def as_mask(mask: Image.Image, what: str) -> Image.Image:
    """A mask handed to the Python API as a greyscale ("L") image, its mode read as a mask file's
    is (`as_rgb`: a float mask's weights of 1.0 were 1/255)."""
    if mask.mode == "L" and "transparency" not in mask.info:
        return mask
    grey = as_rgb(mask, what).convert("L")
    if "nst.path" in mask.info:
        grey.info["nst.path"] = mask.info["nst.path"]
    return grey


def load_masks(paths: Sequence[str], *, param: str) -> list[Image.Image | None]:
    """Mask files in order, `-` giving None (everywhere)."""
    return [None if p.strip() == EVERYWHERE else load_mask(p.strip(), param=param) for p in paths]


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """Greyscale image -> (1, 1, H, W) float32 weights in [0, 1]."""
    a = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy())[None, None]


def _name(mask: Image.Image, index: int) -> str:
    return str(mask.info.get("nst.path") or getattr(mask, "filename", "") or f"number {index + 1}")


def check_not_black(mask: Image.Image, *, param: str, index: int = 0) -> None:
    """ImageError if `mask` is black everywhere: it would give its style (or the content) no place."""
    if not np.asarray(mask.convert("L")).any():
        what = "the content term" if param == "content_mask" else "its style"
        raise ImageError(f"`{param}` {_name(mask, index)} is all black: it gives {what} no place; use - for everywhere, or leave it out", params=(param,))


def check_mask(mask: Image.Image, image: Image.Image, *, param: str, index: int, of: str) -> None:
    """ImageError if `mask` is all black, or its aspect ratio differs from `image`'s by over 1%.

    A mask of another shape is refused rather than stretched: stretching would move its regions
    away from the parts of the image they were drawn on.
    """
    check_not_black(mask, param=param, index=index)
    name = _name(mask, index)
    ratio = (mask.width / mask.height) / (image.width / image.height)
    if abs(ratio - 1) > ASPECT_TOLERANCE:
        raise ImageError(
            f"`{param}` {name} is {mask.width}x{mask.height} but the {of} is {image.width}x{image.height}: "
            f"aspect ratios differ by {abs(ratio - 1):.1%} (at most {ASPECT_TOLERANCE:.0%}); make the mask the {of}'s shape, it is not stretched",
            params=(param,),
        )


def check_count(items: Sequence[object], styles: int, *, param: str) -> None:
    """ConfigError unless there is one mask per style image."""
    if len(items) != styles:
        raise ConfigError(f"`{param}` has {len(items)} mask(s) for {styles} style image(s); give one per style, in their order ({EVERYWHERE} for everywhere)", params=(param,))


def stage_guide(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A (1, 1, H0, W0) mask at a stage's size (H, W): averaged over each output pixel's area when
    shrinking (what fraction of the pixel the region covers), bilinear when enlarging."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    shrink = mask.shape[-2] >= hw[0] and mask.shape[-1] >= hw[1]
    out = F.interpolate(mask, size=hw, mode="area") if shrink else F.interpolate(mask, size=hw, mode="bilinear", align_corners=False)
    return out.clamp(0, 1)


def layer_guides(guide: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """The guidance at each layer's resolution: 2x2 average pooling (floored, as the network's
    pooling floors) once per pooling layer before it.

    Averaging rather than sampling: a position after k poolings stands for a 2^k x 2^k block of
    pixels, and its weight is the share of that block the region covers, so the total weight is
    kept, a thin region does not vanish between samples, and weights stay in [0, 1] (no
    overshoot as with bicubic). The paper downsamples the guidance channels too; it also
    describes keeping only positions whose receptive field lies wholly inside a region, which
    would empty small regions at deep layers.
    """
    wanted = set(layers)
    out: dict[str, torch.Tensor] = {}
    g = guide
    for name in LAYER_NAMES[: max((LAYER_INDEX[n] for n in wanted), default=-1) + 1]:
        if name.startswith("pool"):
            g = F.avg_pool2d(g, 2)
        if name in wanted:
            out[name] = g
    return out


@torch.no_grad()
def guided_style_targets(model: torch.nn.Module, image: torch.Tensor, region: torch.Tensor, style_layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """A style image's normalised guided Grams (1, C, C) over `region` ((1, 1, H, W) at the
    image's size), from the PyTorch feature extractor in fp32."""
    dev = next(model.parameters()).device
    feats = model(image.to(dev, torch.float32))
    guides = layer_guides(region.to(dev), style_layers)
    return {name: guided_gram(feats[name], guides[name]) for name in style_layers}


@dataclass(frozen=True)
class StyleGroup:
    """Styles that act under one guidance channel, as one style term: their targets are blended
    as unmasked styles' are, then matched by the guided Gram of the output under that channel."""

    weight: float  # the group's share of the style term: its styles' blend weights, summed
    grams: dict[str, torch.Tensor]  # style layer -> blended target (N, C, C) in the loss form
    guides: dict[str, torch.Tensor] | None  # style layer -> (1, 1, h, w) guidance; None: everywhere


def group_styles(masks: Sequence[torch.Tensor | None]) -> list[tuple[list[int], torch.Tensor | None]]:
    """Style indices grouped by identical masks (None with None), in order of first appearance.

    Styles under one mask blend their Grams, as styles do without masks, so a set of identical
    masks (all white, say) gives the unmasked objective; styles under different masks each get
    their own guided term, and where masks overlap both terms act, each by its weight.
    """
    groups: list[tuple[list[int], torch.Tensor | None]] = []
    for i, m in enumerate(masks):
        for idx, gm in groups:
            if (m is None and gm is None) or (m is not None and gm is not None and m.shape == gm.shape and torch.equal(m, gm)):
                idx.append(i)
                break
        else:
            groups.append(([i], m))
    return groups


@dataclass(frozen=True)
class Guidance:
    """A run's masks as tensors at their own resolution, (1, 1, H, W) on the CPU (None: not given,
    or `-`). Resized per stage by `stage_guide`, per layer by `layer_guides`."""

    masks: tuple[torch.Tensor | None, ...] = ()  # one per style image, or none at all
    style_regions: tuple[torch.Tensor | None, ...] = ()  # one per style image, or none at all
    content_mask: torch.Tensor | None = None

    @property
    def masked(self) -> bool:
        """Whether the style term is guided (some style has a mask)."""
        return any(m is not None for m in self.masks)

    def region(self, index: int) -> torch.Tensor | None:
        return self.style_regions[index] if self.style_regions else None


def make_guidance(
    contents: Sequence[Image.Image],
    styles: Sequence[Sequence[Image.Image]],
    *,
    masks: Sequence[Image.Image | None] | None,
    style_regions: Sequence[Image.Image | None] | None,
    content_mask: Image.Image | None,
) -> Guidance:
    """Check the masks against the images (count, all black, aspect ratio) and turn them into
    tensors. `masks` and `content_mask` are shared by every content, `style_regions` by every
    style list (one per style image, in order)."""
    for param, items in (("masks", masks), ("style_regions", style_regions)):
        if items is None:
            continue
        for st in styles:
            check_count(items, len(st), param=param)
        for i, m in enumerate(items):
            if m is None:
                continue
            for image in contents if param == "masks" else [st[i] for st in styles]:
                check_mask(m, image, param=param, index=i, of="content" if param == "masks" else f"style image {i + 1}")
    if content_mask is not None:
        for image in contents:
            check_mask(content_mask, image, param="content_mask", index=0, of="content")

    def tensors(items: Sequence[Image.Image | None] | None) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if m is None else mask_tensor(m) for m in items or ())

    return Guidance(tensors(masks), tensors(style_regions), None if content_mask is None else mask_tensor(content_mask))


__all__ = [
    "EVERYWHERE", "Guidance", "StyleGroup", "check_count", "check_mask", "check_not_black", "group_styles", "guided_gram", "guided_style_targets",
    "layer_guides", "load_mask", "load_masks", "make_guidance", "mask_tensor", "stage_guide",
]  # fmt: skip
