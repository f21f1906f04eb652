"""Exact tiled evaluation of the objective: the whole image's loss and gradient, one tile at a time.

A Gram matrix is a sum over positions, and the style loss's gradient with respect to a layer's
features is linear in them once the whole image's Gram is known. So a first pass runs each tile
forward without autograd and adds up every style layer's Gram over the positions the tile owns;
a second pass runs each tile forward and backward with the style terms linearised around those
Grams (`<dL/dG, F F^T>`, whose gradient is the true one), and adds the tiles' input gradients.
Content and total-variation terms are sums over positions: each tile adds its own. Masks change
nothing in this: a guided Gram sums the features times the guidance over positions (its
normalising energy depends on the guidance alone), and a content mask weights each position.

Why it is exact: a tile is cut from the image with a halo of at least the deepest layer's reach
(`layers.receptive_reach`) on each side, and every cut lies on a multiple of the deepest layer's
stride, so the pooling windows fall where they fall in the whole image. Every feature a tile owns
then sees exactly the pixels it sees in the whole image (zero padding only at the image's own
edges), and the tiles own each position of each layer once: the sums are the whole image's, up to
the order of addition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import LossForm, TileGrams
from .device import autocast, autocast_dtype
from .layers import deepest_layer, layer_channels, layer_stride, receptive_reach
from .losses import gram_matrix, gram_style_loss

if TYPE_CHECKING:  # the objective imports the targets, which tile through this module
    from .objective import Objective, Terms


def tile_halo(layers: Sequence[str]) -> int:
    """Pixels of context around a tile: the deepest layer's reach, up to a multiple of its stride."""
    deepest = deepest_layer(layers)
    stride = layer_stride(deepest)
    return -(-receptive_reach(deepest) // stride) * stride


def tile_step(layers: Sequence[str]) -> int:
    """Tile edges and origins are multiples of this: the deepest layer's stride."""
    return layer_stride(deepest_layer(layers))


def snap_tile(tile: int, layers: Sequence[str]) -> int:
    """A tile edge in output pixels, rounded down to the deepest layer's stride (at least one stride)."""
    step = tile_step(layers)
    return max(step, tile // step * step)


@dataclass(frozen=True)
class Tile:
    """A tile's own rows and columns of the output (`y0:y1, x0:x1`) and the crop, with its halo,
    that the network runs on (`cy0:cy1, cx0:cx1`)."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def in_crop(self) -> tuple[int, int, int, int]:
        """The tile's own rows and columns, `(y0, y1, x0, x1)`, in its crop's pixels: what
        `VGGFeatures.forward(owned=)` keeps. Of a layer with `stride`, the tile owns positions
        `y0 // stride : y1 // stride` (and likewise for columns) of the crop's map: position i
        belongs to the tile whose rows hold pixel `stride * i`. The cuts are multiples of the
        deepest stride, and the last tile ends at the image's edge, where `H // stride` is the
        layer's height: either way `y1 // stride` is the end."""
        return self.y0 - self.cy0, self.y1 - self.cy0, self.x0 - self.cx0, self.x1 - self.cx0

    def owned(self, stride: int) -> tuple[slice, slice, slice, slice]:
        """The positions the tile owns of a whole image's (N, C, h, w) map of a layer with
        `stride`, as an index (see `in_crop`)."""
        return slice(None), slice(None), slice(self.y0 // stride, self.y1 // stride), slice(self.x0 // stride, self.x1 // stride)


def tile_grid(hw: tuple[int, int], tile: int, layers: Sequence[str]) -> list[Tile]:
    """Tiles of about `tile` px (snapped to the deepest stride) covering an (H, W) image, row by row;
    the last row and column end at the image's edge, so any size is covered."""
    h, w = hw
    edge, halo = snap_tile(tile, layers), tile_halo(layers)
    ys = [(y, min(y + edge, h)) for y in range(0, h, edge)]
    xs = [(x, min(x + edge, w)) for x in range(0, w, edge)]
    return [Tile(y0, y1, x0, x1, max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)) for y0, y1 in ys for x0, x1 in xs]


def grid_shape(hw: tuple[int, int], tile: int, layers: Sequence[str]) -> tuple[int, int]:
    """(rows, columns) of `tile_grid`."""
    edge = snap_tile(tile, layers)
    return -(-hw[0] // edge), -(-hw[1] // edge)


def _sum(t: torch.Tensor, per_image: bool) -> torch.Tensor:
    return t.flatten(1).sum(1) if per_image else t.sum()


@torch.no_grad()
def tiled_targets(
    features: Callable[[torch.Tensor, tuple[int, int, int, int]], Mapping[str, torch.Tensor]],
    image: torch.Tensor,
    *,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    tile: int,
    content_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An image's content features (1, C, h, w; kept in `content_dtype`) and normalised Grams
    (1, C, C), in fp32, one tile at a time: the same numbers as one pass over the whole image, up
    to rounding. `features(crop, owned)` gives a crop's feature maps of every content and style
    layer at the positions the tile owns (`Tile.in_crop`): the PyTorch network, which cuts the halo
    down as it goes, or an exported module through ONNX Runtime; the Grams are summed here, in
    fp32."""
    layers = tuple(content_layers) + tuple(style_layers)
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    n = image.shape[0]
    content = {k: image.new_zeros((n, layer_channels(k), *(d // layer_stride(k) for d in hw)), dtype=content_dtype) for k in content_layers}
    sums = {k: image.new_zeros((n, layer_channels(k), layer_channels(k)), dtype=torch.float32) for k in style_layers}
    for t in tile_grid(hw, snap_tile(tile, layers), layers):
        owned = features(image[:, :, t.cy0 : t.cy1, t.cx0 : t.cx1], t.in_crop)
        for k in content:
            content[k][t.owned(layer_stride(k))] = owned[k]
        for k in sums:
            sums[k] += gram_matrix(owned[k], normalize=False)
    grams = {k: g / (g.shape[-1] * (hw[0] // layer_stride(k)) * (hw[1] // layer_stride(k))) for k, g in sums.items()}
    return content, grams


@dataclass(frozen=True)
class _StyleEntry:
    """One Gram the style term compares: a layer's, or under masks a (group, layer)'s."""

    layer: str
    weight: float  # the layer's weight (times the group's under masks), before cfg.style_weight
    target: torch.Tensor  # (N or 1, C, C) in the loss form
    guide: torch.Tensor | None  # (1, 1, h, w) at the layer's resolution; None: everywhere
    energy: torch.Tensor | None = field(init=False, default=None)  # derived: the sum of the guide's squares

    def __post_init__(self) -> None:
        if self.guide is not None:
            tiny = torch.finfo(torch.float32).tiny  # a region pooling emptied: zero, not NaN (as `guided_gram`)
            object.__setattr__(self, "energy", self.guide.float().pow(2).sum().clamp_min(tiny))


class TiledObjective:
    """An `Objective` evaluated tile by tile: the same loss, the same gradient up to rounding, with
    the network's activations held for one tile (and its halo) at a time.

    With `grams` PREVIOUS (`StyleConfig.tile_grams`) the first pass is skipped: the style term is
    linearised around the Grams that the last call's second pass gathered (the exact ones on a
    call at the same image; the first call, with none, runs both passes). The loss and its terms
    stay exact, from this call's own Grams; the gradient is approximate by as much as the image
    moved since the last call. One pass per tile instead of two."""

    def __init__(
        self,
        objective: Objective,
        tile: int,
        *,
        grams: TileGrams | str = TileGrams.EXACT,
        content_images: torch.Tensor | None = None,
        content_net: Callable[..., Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self.objective = objective
        # Content targets made tile by tile at every call (the plan's `content_targets` "per tile")
        # instead of held image-sized: `content_images`, the contents as the network sees them,
        # (N, 3, H, W) in [0, 1], through `content_net` (the targets' fp32 network; default the
        # loop's, as the loop runs it) without gradients, kept at the precision held ones are
        # (`stylize_many`). The same targets up to rounding, for one more forward pass per tile;
        # the objective holds none.
        self.content_images = content_images
        self.content_net = content_net
        self.content_dtype = autocast_dtype(objective.runtime.precision) or torch.float32
        self.layers = tuple(objective.content_weights) + tuple(objective.style_weights)
        self.tile = snap_tile(tile, self.layers)
        self.grams = TileGrams(grams)
        self.previous: list[torch.Tensor] | None = None  # the last call's Gram sums (PREVIOUS)
        # One Gram sum per style layer, or under masks per (group, layer): a guided Gram is a sum
        # over positions of the features times the guidance, so it tiles as a plain one does.
        o = objective
        if o.style_groups:
            self.entries = [
                _StyleEntry(k, g.weight * w, g.grams[k], None if g.guides is None else g.guides[k])
                for g in o.style_groups for k, w in o.style_weights.items()
            ]  # fmt: skip
        else:
            self.entries = [_StyleEntry(k, w, o.grams[k], None) for k, w in o.style_weights.items()]

    def tiles(self, hw: tuple[int, int]) -> list[Tile]:
        return tile_grid(hw, self.tile, self.layers)

    def _features(self, crop: torch.Tensor, t: Tile, *, style_only: bool = False) -> dict[str, torch.Tensor]:
        """Every layer's features at the positions tile `t` owns (the network cuts the halo down
        as it goes deeper: `VGGFeatures.forward`'s `owned`). `style_only`: the style layers'
        alone (pass 1), so a content layer deeper than all of them is not run."""
        o = self.objective
        img = crop / o.cfg.pixel_scale
        if o.runtime.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        only = tuple(dict.fromkeys(e.layer for e in self.entries)) if style_only else None
        with autocast(o.runtime):
            return o.net(img, owned=t.in_crop, only=only)

    @staticmethod
    def _crop(x: torch.Tensor, t: Tile) -> torch.Tensor:
        return x[:, :, t.cy0 : t.cy1, t.cx0 : t.cx1]

    @staticmethod
    def _owned_features(feats: dict[str, torch.Tensor], e: "_StyleEntry", t: Tile) -> torch.Tensor:
        """The entry's layer's features (`_features`: at the positions tile `t` owns), times its
        guidance there."""
        f = feats[e.layer]
        if e.guide is None:
            return f
        return f.float() * e.guide[t.owned(layer_stride(e.layer))].float()

    @torch.no_grad()
    def gram_sums(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pass 1: each entry's unnormalised (guided) Gram over the whole image, (N, C, C) fp32."""
        return self._pass1(x, keep_last=False)[0]

    def _pass1(self, x: torch.Tensor, *, keep_last: bool) -> tuple[list[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]] | None]:
        """`gram_sums`, and with `keep_last` the last tile's crop and features run with autograd
        (its graph kept), which pass 2 then starts with instead of running that tile forward again:
        one tile's forward less an iteration, and no more memory than pass 2's own tiles hold."""
        sums = [x.new_zeros((x.shape[0], layer_channels(e.layer), layer_channels(e.layer)), dtype=torch.float32) for e in self.entries]
        if not sums:  # no style term: nothing to gather, pass 2 runs every tile
            return sums, None
        tiles = self.tiles(x.shape[-2:])
        kept = None
        for i, t in enumerate(tiles):
            last = keep_last and i == len(tiles) - 1
            crop = self._crop(x.detach(), t)
            with torch.enable_grad() if last else torch.no_grad():
                if last:
                    crop = crop.clone().requires_grad_(True)
                feats = self._features(crop, t, style_only=not last)
            with torch.no_grad():
                for e, acc in zip(self.entries, sums):
                    acc += gram_matrix(self._owned_features(feats, e, t), normalize=False)
            if last:
                kept = (crop, feats)
        return sums, kept

    def _style(self, sums: list[torch.Tensor], hw: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The weighted style term from the whole image's Gram sums, and its gradient with respect
        to each sum: the linear weights of pass 2."""
        o, form = self.objective, self.objective.cfg.loss_form
        leaves = [s.detach().requires_grad_(True) for s in sums]
        zero = torch.zeros((), device=sums[0].device) if sums else torch.zeros(())
        with torch.enable_grad():
            total = zero
            for e, g in zip(self.entries, leaves):
                h, wd = hw[0] // layer_stride(e.layer), hw[1] // layer_stride(e.layer)
                # As `style_loss` normalises: by C*h*w, or under guidance by C * its energy (the
                # keras form then scales a guided Gram back to a sum over C*h*w positions).
                positions = h * wd if e.energy is None else e.energy
                if form == LossForm.NORMALIZED:
                    g = g / (g.shape[-1] * positions)
                elif e.guide is not None:
                    g = g * (h * wd / positions)
                total = total + e.weight * gram_style_loss(g, e.target, form=form, image_pixels=o.pixels, per_image=o.per_image)
            total = o.cfg.style_weight * total
            if not leaves:
                return total, []
            grads = torch.autograd.grad(total.sum(), leaves)
        return total.detach(), list(grads)

    @torch.no_grad()
    def _made_content_targets(self, t: Tile) -> dict[str, torch.Tensor]:
        """The content targets at the positions tile `t` owns, made now from the tile's crop of the
        content images (`content_images`)."""
        o = self.objective
        assert self.content_images is not None
        crop, only = self._crop(self.content_images, t).float(), tuple(o.content_weights)
        if self.content_net is None:
            with autocast(o.runtime):
                feats = o.net(crop, owned=t.in_crop, only=only)
        else:
            feats = self.content_net(crop, owned=t.in_crop, only=only)
        return {k: feats[k].to(self.content_dtype) for k in o.content_weights}

    def _local_terms(self, x: torch.Tensor, crop: torch.Tensor, t: Tile, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This tile's share of the (unweighted) content and TV sums, already divided by what the
        whole image's means divide by."""
        o, form, each = self.objective, self.objective.cfg.loss_form, self.objective.per_image
        n = x.shape[0]
        h, w = x.shape[-2:]
        zero = crop.new_zeros((n,) if each else (), dtype=torch.float32)
        c = zero
        made = self._made_content_targets(t) if self.content_images is not None and o.content_weights else None
        for k, wt in o.content_weights.items():
            s = layer_stride(k)
            owned = t.owned(s)
            target = made[k] if made is not None else o.content_feats[k][owned]
            sq = (feats[k].float() - target.float()).pow(2)
            if k in o.content_guides:  # a content mask: each position's squared error weighted
                sq = sq * o.content_guides[k][owned].float()
            part = _sum(sq, each)
            if form == LossForm.NORMALIZED:
                part = part / (layer_channels(k) * (h // s) * (w // s) * (1 if each else n))
            c = c + wt * part
        # TV: a difference belongs to the tile that owns its first pixel; the crop has the halo's
        # next row and column.
        img = crop if form == LossForm.KERAS else crop / o.cfg.pixel_scale
        img = img.float()
        r0, c0 = t.y0 - t.cy0, t.x0 - t.cx0
        r1, c1 = min(t.y1, h - 1) - t.cy0, min(t.x1, w - 1) - t.cx0  # last first-pixel of a pair, exclusive
        if form == LossForm.NORMALIZED:
            rr, cc = t.y1 - t.cy0, t.x1 - t.cx0
            dy = img[:, :, r0 + 1 : r1 + 1, c0:cc] - img[:, :, r0:r1, c0:cc]
            dx = img[:, :, r0:rr, c0 + 1 : c1 + 1] - img[:, :, r0:rr, c0:c1]
            per = 1 if each else n
            # A 1 px thin image has no pairs that way: that term is 0, as in `tv_loss` (not 0/0).
            tv = _sum(dy.pow(2), each) / (3 * max(h - 1, 1) * w * per) + _sum(dx.pow(2), each) / (3 * h * max(w - 1, 1) * per)
        else:
            a = (img[:, :, r0:r1, c0:c1] - img[:, :, r0 + 1 : r1 + 1, c0:c1]).pow(2)
            b = (img[:, :, r0:r1, c0:c1] - img[:, :, r0:r1, c0 + 1 : c1 + 1]).pow(2)
            tv = _sum((a + b).pow(1.25), each)
        return c, tv

    def loss_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        """The loss and its terms at `x` (as `Objective.__call__` gives them), with the gradient
        added to `x.grad` (pass 2: each tile forward and backward)."""
        o, cfg = self.objective, self.objective.cfg
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        one_pass = self.grams == TileGrams.PREVIOUS
        reuse = one_pass and bool(self.previous) and self.previous[0].shape[0] == x.shape[0]  # type: ignore[index]
        tiles = self.tiles(hw)
        kept = None  # pass 1's last tile, run with autograd: pass 2 starts with it
        if reuse:
            sums = self.previous
        else:
            sums, kept = self._pass1(x, keep_last=not one_pass)
        style, lin = self._style(sums, hw)  # type: ignore[arg-type]
        # One pass: this call's Grams, gathered from the second pass's features, for the loss
        # (exact) and the next call's linearisation.
        gathered = [torch.zeros_like(g) for g in lin] if one_pass else []
        grad = torch.zeros_like(x) if x.grad is None else x.grad
        content = tv = None
        for t in tiles if kept is None else [tiles[-1], *tiles[:-1]]:
            if kept is not None:
                (crop, feats), kept = kept, None
            else:
                crop = self._crop(x.detach(), t).clone().requires_grad_(True)
                feats = self._features(crop, t)
            c, tv_part = self._local_terms(x, crop, t, feats)
            surrogate = cfg.content_weight * c + cfg.tv_weight * tv_part
            for i, (e, a) in enumerate(zip(self.entries, lin)):
                g = gram_matrix(self._owned_features(feats, e, t), normalize=False)
                surrogate = surrogate + (a * g).flatten(1).sum(1)
                if one_pass:
                    gathered[i] += g.detach()
            surrogate.sum().backward()
            assert crop.grad is not None
            grad[:, :, t.cy0 : t.cy1, t.cx0 : t.cx1] += crop.grad
            content = c.detach() if content is None else content + c.detach()
            tv = tv_part.detach() if tv is None else tv + tv_part.detach()
            del feats, crop, surrogate
        # Extra terms (video's temporal loss) act on the pixels, not the network: whole image.
        extra = {}
        for name, term in o.extra.items():
            whole = x.detach().requires_grad_(True)
            with torch.enable_grad():
                value = term(whole / cfg.pixel_scale).float()
                value.backward()
            assert whole.grad is not None
            grad += whole.grad
            extra[name] = value.detach()
        x.grad = grad
        if one_pass:
            self.previous = gathered
            if reuse:  # the loss at this image, not at the last one
                style = self._style(gathered, hw)[0]
        assert content is not None and tv is not None
        if not o.per_image:
            style = style.reshape(())
        terms = {"content": cfg.content_weight * content, "style": style, "tv": cfg.tv_weight * tv, **extra}
        total = terms["content"] + terms["style"] + terms["tv"]
        for name in extra:
            total = total + terms[name]
        return total, terms


__all__ = ["Tile", "TiledObjective", "grid_shape", "snap_tile", "tile_grid", "tile_halo", "tile_step", "tiled_targets"]
