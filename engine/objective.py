"""The objective: the weighted loss terms of one stage as one object.

It owns what the loss compares against (the content layers' features and the style layers'
blended Grams) and how the terms are weighted; `stylize` and the profiler call it on the image
being optimised. Under masks (`masks.py`) the style term is a sum of guided terms, one per
group of styles sharing a mask, and the content term is weighted by a map. It evaluates the whole
image at once; `tiles.TiledObjective` evaluates it tile by tile, with the same loss and gradient
(masks included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .config import LossForm, StyleConfig, content_layer_weights, style_layer_weights
from .device import Runtime, autocast
from .errors import ConfigError
from .features import VGGFeatures
from .layers import feature_hw
from .losses import content_loss, style_loss, tv_loss
from .masks import StyleGroup
from .targets import ImageTargets

Terms = dict[str, torch.Tensor]  # weighted "content", "style", "tv" (and any extra terms), each 0-dim

# An extra loss term: the image being optimised, (1, 3, h, w) in [0, 1] units (not clamped) at the
# stage's size (the luminance image under `PreserveColors.LUMINANCE`), to a 0-dim weighted loss.
# Video's temporal term is one; it is added to content + style + TV and reported under its name.
ExtraTerm = Callable[[torch.Tensor], torch.Tensor]
BASE_TERMS = ("content", "style", "tv")


def style_grams(
    cfg: StyleConfig, targets: Sequence[ImageTargets], styles: Sequence[torch.Tensor], blend: Sequence[float], *, device: torch.device
) -> dict[str, torch.Tensor]:
    """The style layers' target Grams in the run's loss form, blended over the style images."""
    grams = {}
    for layer in cfg.style_layers:
        parts = []
        for w, t, st in zip(blend, targets, styles):
            g = t.grams[layer].to(device)
            if cfg.loss_form == LossForm.KERAS:
                # Targets arrive normalised (divided by C*h*w of the style's layer); the
                # notebook's loss wants the plain sum F F^T.
                fh, fw = feature_hw(st.shape[-2:], layer)
                g = g * (g.shape[-1] * fh * fw)
            parts.append(w * g)
        grams[layer] = torch.stack(parts).sum(0)
    return grams


@dataclass(frozen=True)
class Objective:
    """The weighted loss of an image (in `pixel_scale` units) at one stage's size, through `net`
    (the loop's network: `loop_network(model, runtime)`). Call it: `loss, terms = objective(x)`."""

    net: VGGFeatures
    runtime: Runtime
    cfg: StyleConfig
    content_feats: dict[str, torch.Tensor]  # content layer -> target features (1, C, h, w)
    grams: dict[str, torch.Tensor]  # style layer -> blended target Gram (1, C, C) in the loss form
    content_weights: dict[str, float]  # per layer, before cfg.content_weight
    style_weights: dict[str, float]  # per layer, before cfg.style_weight
    pixels: int  # H*W of the image: the keras form's style normalisation
    # Several images in x, each against its own targets ((N, ...) each): (N,) terms, one per image.
    per_image: bool = False
    extra: Mapping[str, ExtraTerm] = field(default_factory=dict)  # name -> term, after the three (one image only)
    # Spatial control: with groups, the style term is theirs (each guided by its mask) and
    # `grams` is unused; a content layer in `content_guides` weights its positions by that map.
    style_groups: tuple[StyleGroup, ...] = ()
    content_guides: Mapping[str, torch.Tensor] = field(default_factory=dict)  # layer -> (1, 1, h, w)

    def terms(self, x: torch.Tensor) -> Terms:
        """Each term, weighted, for the image `x` (1, 3, H, W), or with `per_image` for each image
        of `x` (N, 3, H, W)."""
        cfg, form = self.cfg, self.cfg.loss_form
        img = x / cfg.pixel_scale
        extra = {name: term(img).float() for name, term in self.extra.items()}
        if self.runtime.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with autocast(self.runtime):
            feats = self.net(img)
        zero = x.new_zeros(())
        each = self.per_image
        cg = self.content_guides
        c = sum((w * content_loss(feats[k], self.content_feats[k], form=form, per_image=each, weight=cg.get(k)) for k, w in self.content_weights.items()), zero)
        if self.style_groups:
            s = sum(
                (g.weight * w * style_loss(feats[k], g.grams[k], form=form, image_pixels=self.pixels, per_image=each, guide=None if g.guides is None else g.guides[k])
                 for g in self.style_groups for k, w in self.style_weights.items()),
                zero,
            )  # fmt: skip
        else:
            s = sum((w * style_loss(feats[k], self.grams[k], form=form, image_pixels=self.pixels, per_image=each) for k, w in self.style_weights.items()), zero)
        # The notebook's TV acts on its 0-255 image; the normalised TV on the [0, 1] image.
        tv = tv_loss(x if form == LossForm.KERAS else img, form=form, per_image=each)
        return {"content": cfg.content_weight * c, "style": cfg.style_weight * s, "tv": cfg.tv_weight * tv, **extra}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        terms = self.terms(x)
        total = terms["content"] + terms["style"] + terms["tv"]
        for name in self.extra:
            total = total + terms[name]
        return total, terms

    def loss_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        """The loss and its terms at `x`, with their gradient added to `x.grad` (each image's
        gradient its own loss's). `tiles.TiledObjective` offers the same, tile by tile."""
        loss, terms = self(x)
        loss.sum().backward()
        return loss, terms


def make_objective(
    net: VGGFeatures,
    runtime: Runtime,
    cfg: StyleConfig,
    content_feats: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    hw: tuple[int, int],
    *,
    per_image: bool = False,
    extra_terms: Mapping[str, ExtraTerm] | None = None,
    style_groups: Sequence[StyleGroup] = (),
    content_guides: Mapping[str, torch.Tensor] | None = None,
) -> Objective:
    """The stage's objective at output size `hw`, with the configuration's per-layer weights
    (`per_image`: for a batch of images, each against its own targets), any `extra_terms`
    added to the three (for one image), and the masks' terms (`style_groups`,
    `content_guides`, see `Objective`)."""
    content_weights = dict(zip(cfg.content_layers, content_layer_weights(cfg)))
    style_weights = dict(zip(cfg.style_layers, style_layer_weights(cfg)))
    extra = check_extra_terms(extra_terms)
    if extra and per_image:
        raise ConfigError("extra loss terms are for one image at a time, not a batch", params=("extra_terms",))
    return Objective(
        net, runtime, cfg, content_feats, grams, content_weights, style_weights, hw[0] * hw[1], per_image, extra,
        style_groups=tuple(style_groups), content_guides=dict(content_guides or {}),
    )  # fmt: skip


def check_extra_terms(extra_terms: Mapping[str, ExtraTerm] | None) -> dict[str, ExtraTerm]:
    """The extra terms as a dict, or ConfigError for a name that would hide one of the three."""
    extra = dict(extra_terms or {})
    if clash := sorted(set(extra) & set(BASE_TERMS)):
        raise ConfigError(f"extra loss terms need names other than content, style and tv: {', '.join(clash)}", params=("extra_terms",))
    return extra


__all__ = ["ExtraTerm", "Objective", "Terms", "check_extra_terms", "make_objective", "style_grams"]
