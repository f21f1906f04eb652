"""Run configuration: closed choices as `str` enums, one frozen dataclass, and the presets.

Every default lives here; the CLI reads them from here (variants go through
`dataclasses.replace`, never through a second set of literals).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .layers import LAYER_NAMES


class Optimizer(str, enum.Enum):
    LBFGS = "lbfgs"
    ADAM = "adam"


class Pooling(str, enum.Enum):
    MAX = "max"
    AVG = "avg"


class PreserveColors(str, enum.Enum):
    NONE = "none"
    LUMINANCE = "luminance"
    HISTOGRAM = "histogram"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"
    FP16 = "fp16"


class LossForm(str, enum.Enum):
    """How the three loss terms are normalised.

    `normalized`: means over elements and a Gram matrix divided by C*H*W, so a weight means the
    same at every image size. `keras`: the sums of the notebook this project began from, term by
    term (see `losses.py`).
    """

    NORMALIZED = "normalized"
    KERAS = "keras"


class SizeEdge(str, enum.Enum):
    """Which edge of the output `size` measures; the other follows the content's aspect."""

    LONGEST = "longest"
    HEIGHT = "height"


class Provider(str, enum.Enum):
    """ONNX Runtime execution provider for the targets; `auto` tries them fastest first."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    CUDA = "cuda"
    CPU = "cpu"


class Preset(str, enum.Enum):
    GATYS = "gatys"
    SEED = "seed"


class TileGrams(str, enum.Enum):
    """What a tiled stage's style gradient is linearised around (`tiles.TiledObjective`)."""

    EXACT = "exact"  # this iteration's Grams, from a pass without gradients first: the exact gradient
    PREVIOUS = "previous"  # the last iteration's, gathered in its backward pass: one pass, approximate


class OptimizerState(str, enum.Enum):
    """Where L-BFGS's history lives (`plan.plan_run`); the rest of the optimiser's state stays with
    the image. Where, not what: the plan's choice, not the configuration's."""

    AUTO = "auto"  # on the device when it fits, else whichever fallback is soonest to a result
    DEVICE = "device"  # on the device; when it does not fit, a shorter history or Adam
    HOST = "host"  # in host memory (pinned), streamed through the device at every step


INIT_CHOICES = ("content", "noise", "style")  # or a path to an image file
AUTO = "auto"  # `scales`: coarse to fine, sizes from `auto_sizes`


_TEXT_TUPLES = ("content_layers", "style_layers", "masks", "style_regions")
_INT_TUPLES = ("scales", "scale_iterations")  # the other tuples hold numbers


def _is(value: object, kind: type) -> bool:
    """`value` fits a field of `kind`: an int where a float goes too; never a bool for a number."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass(frozen=True)
class StyleConfig:
    """Everything that decides what a stylisation run computes (not where or how fast)."""

    size: int = 512  # pixels along `size_edge` of the final output
    size_edge: SizeEdge = SizeEdge.LONGEST
    # Coarse-to-fine sizes (same edge as `size`); empty means a single pass at `size`, "auto" the
    # sizes of `auto_sizes(size)`. Each stage starts from the previous stage's result, upsampled.
    # "auto" by default: it reached the result sooner than one pass, with L-BFGS and with Adam
    # (`nst bench --to-result`, benchmarks/README.md).
    scales: tuple[int, ...] | Literal["auto"] = AUTO
    # Per scale for explicit `scales`; with "auto", the total that `auto_iterations` splits.
    iterations: int = 500
    # Explicit iterations per stage (one per entry of `sizes`), overriding `iterations`.
    scale_iterations: tuple[int, ...] = ()
    optimizer: Optimizer = Optimizer.LBFGS
    lr: float = 1.0  # L-BFGS step scale, or Adam's learning rate (in `pixel_scale` units)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # Adam ignores the loss's scale only while a pixel's gradient is well above eps. The normalised
    # losses' gradients are about 0.15 * weights / (3*H*W) per pixel (measured, random weights):
    # 2e-7 at 512 px, near torch's 1e-8 at 2048 px. 1e-12 keeps the floor far below.
    adam_eps: float = 1e-12
    lbfgs_history: int = 20  # short: the two-loop recursion is O(history) per step (benchmarks/README.md, "L-BFGS")
    # L-BFGS's first step moves the pixel with the largest gradient by this much (image units,
    # [0, 1] of the pixel range), whatever the loss's scale; torch's min(1, 1/|g|_1) depends on it.
    lbfgs_first_step: float = 1e-2
    # No step moves a pixel by more than this (image units). Without a line search, a curvature
    # pair of tiny positive curvature in a non-convex region sends one step hundreds of ranges away.
    lbfgs_max_step: float = 0.5
    # End an L-BFGS stage once this many iterations in a row found no lower loss (0: never). Its
    # losses only fall, so that is a stall, not noise: in bf16 the loss stops falling well above
    # fp32's and the steps cycle (measured on an H100 at 512 px: no lower loss after iteration
    # 215 of 800; on the CPU at 64 px after 119 of 400, at 1.21x fp32's loss), and every further
    # iteration only costs time. Improving runs went at most 2 iterations without a lower loss.
    lbfgs_patience: int = 50
    # Across a coarse-to-fine stage change, start Adam from the previous stage's moments, resampled
    # (L-BFGS always restarts). Off: measured at 128 px (64 -> 128), a fresh Adam was lower at every
    # point (loss/reference 2.36 against 2.97 after 10 iterations, 0.76 against 0.84 after 300).
    carry_adam_moments: bool = False
    # A tiled stage's Grams: exact (two passes per tile) or the previous iteration's (one pass).
    tile_grams: TileGrams = TileGrams.EXACT
    content_weight: float = 1.0
    style_weight: float = 1e6
    tv_weight: float = 1e-3
    content_layers: tuple[str, ...] = ("relu4_2",)
    style_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    # Per-layer factors, same length as the layer tuples; empty means 1/len for style layers
    # (so `style_weight` is the total) and 1 for content layers.
    content_layer_weights: tuple[float, ...] = ()
    style_layer_weights: tuple[float, ...] = ()
    style_blend: tuple[float, ...] = ()  # one weight per style image; empty means equal
    # Spatial control (masks.py), as image paths like `init`'s: one mask per style image ("-":
    # everywhere), where on the output it acts; one region per style image ("-": all of it),
    # which part of that style image its targets come from; a weight map on the content term.
    # Empty: none. Masks given to `stylize` as images take their place.
    masks: tuple[str, ...] = ()
    style_regions: tuple[str, ...] = ()
    content_mask: str = ""
    # Style image's longest side relative to the output's longest side at each scale.
    style_scale: float = 1.0
    # Resize the style image to exactly the output's H x W (the notebook's behaviour),
    # ignoring `style_scale` and the style's aspect ratio.
    style_match_output: bool = False
    init: str = "content"  # content | noise | style | path to an image
    preserve_colors: PreserveColors = PreserveColors.NONE
    pooling: Pooling = Pooling.MAX
    loss_form: LossForm = LossForm.NORMALIZED
    # The unit the optimised image lives in: 1.0 for [0, 1], 255.0 for 0-255 pixel values. It
    # changes what `lr` and the TV weight mean, which is why the seed preset needs 255.
    pixel_scale: float = 1.0
    save_every: int = 0  # 0: save only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        # A choice given as its string (`pooling="avg"`, as JSON and keyword callers give it)
        # becomes its enum, so that every reader can rely on `.value`.
        for f in dataclasses.fields(self):
            kind, value = type(f.default), getattr(self, f.name)
            if isinstance(f.default, enum.Enum) and not isinstance(value, kind):
                try:
                    object.__setattr__(self, f.name, kind(value))
                except ValueError:
                    choices = ", ".join(str(m.value) for m in kind)
                    raise ConfigError(f"{f.name} must be one of {choices}, got {value!r}", params=(f.name,)) from None
        self._check_types()
        validate(self)

    def _check_types(self) -> None:
        """A keyword caller's types: each field's kind, or one ConfigError naming it (a string
        size compared with an int in a TypeError; a layer name given as a plain string was split
        into letters). Lists become tuples, as JSON gives them."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "scales" and isinstance(value, str):
                continue  # "auto", or a word `validate` names
            if isinstance(f.default, tuple) or f.name == "scales":
                if isinstance(value, str):
                    raise ConfigError(f"`{f.name}` takes a tuple, e.g. ({value!r},), not the string {value!r}", params=(f.name,))
                if not isinstance(value, (tuple, list)):
                    raise ConfigError(f"`{f.name}` takes a tuple, got {value!r}", params=(f.name,))
                object.__setattr__(self, f.name, tuple(value))
                value = tuple(value)
                item = str if f.name in _TEXT_TUPLES else int if f.name in _INT_TUPLES else float
                if not all(_is(v, item) for v in value):
                    raise ConfigError(f"`{f.name}` takes {item.__name__} entries, got {value!r}", params=(f.name,))
            elif type(f.default) in (int, float, str) and not _is(value, type(f.default)):
                what = {float: "a number", int: "an integer", str: "a string"}[type(f.default)]
                raise ConfigError(f"`{f.name}` takes {what}, got {value!r}", params=(f.name,))

    @property
    def sizes(self) -> tuple[int, ...]:
        """The size of each stage, the last being the output's."""
        if self.scales == AUTO:
            return auto_sizes(self.size)
        return self.scales if self.scales else (self.size,)

    @property
    def stage_iterations(self) -> tuple[int, ...]:
        """Iterations of each stage of `sizes`."""
        if self.scale_iterations:
            return self.scale_iterations
        if self.scales == AUTO:
            return auto_iterations(self.iterations, len(self.sizes))
        return tuple(self.iterations for _ in self.sizes)

    def mask_files(self) -> tuple[Path, ...]:
        """The mask image files the configuration names (`masks`, `style_regions`,
        `content_mask`; not `-`, everywhere): inputs of the run, never overwritten."""
        paths = (*self.masks, *self.style_regions, *((self.content_mask,) if self.content_mask else ()))
        return tuple(Path(p.strip()) for p in paths if p.strip() != "-")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (enums as their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else (list(v) if isinstance(v, tuple) else v)
        out["sizes"] = list(self.sizes)
        out["stage_iterations"] = list(self.stage_iterations)
        return out


# Where `--scales auto` starts: the output size divided by this, but never below AUTO_MIN_START
# px. Chosen by `nst bench --to-result` (see benchmarks/README.md).
AUTO_START_DIVISOR = 4
AUTO_MIN_START = 64
# Share of an "auto" run's iteration budget that each coarser stage gets (at least one); the
# output size gets the rest. Measured (benchmarks/README.md): 30, 100 or 250 iterations at the
# coarser stage left the same ~270 to do at the output size, so the coarse stages stay short.
AUTO_COARSE_SHARE = 0.1


def auto_sizes(size: int) -> tuple[int, ...]:
    """Coarse-to-fine sizes ending at `size`: halving from it down to about size / AUTO_START_DIVISOR
    (not below AUTO_MIN_START, nor below MIN_SIZE). A size at or under the start is one stage."""
    start = max(size / AUTO_START_DIVISOR, AUTO_MIN_START, MIN_SIZE)
    sizes = [size]
    while sizes[-1] / 2 >= start * 0.99:
        sizes.append(round(sizes[-1] / 2))
    return tuple(reversed(sizes))


def auto_iterations(budget: int, stages: int) -> tuple[int, ...]:
    """Split `budget` iterations over `stages`: AUTO_COARSE_SHARE of it (at least 1) to each
    coarser stage, the rest to the last."""
    each = max(1, round(budget * AUTO_COARSE_SHARE)) if budget >= stages else 0
    coarse = (each,) * (stages - 1)
    return (*coarse, budget - sum(coarse))


MAX_SIZE = 16384  # pixels on an edge; larger is almost certainly a typo and would not fit anyway
MIN_SIZE = 32  # VGG19 to conv5 needs at least 16 px after four poolings; 32 keeps a margin


def validate(cfg: StyleConfig) -> None:
    """Raise ConfigError naming the bad field and the accepted values."""
    if isinstance(cfg.scales, str) and cfg.scales != AUTO:
        raise ConfigError(f"scales must be sizes such as 256,512 or {AUTO!r}, got {cfg.scales!r}")
    if not (MIN_SIZE <= cfg.size <= MAX_SIZE):
        raise ConfigError(f"`size` {cfg.size} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels", params=("size",))
    for s in cfg.sizes:
        if not (MIN_SIZE <= s <= MAX_SIZE):
            raise ConfigError(f"`scales` entry {s} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels", params=("scales",))
    if cfg.scales != AUTO and cfg.scales and list(cfg.scales) != sorted(cfg.scales):
        raise ConfigError(f"scales must increase (coarse to fine), got {','.join(map(str, cfg.scales))}")
    if not 0 <= cfg.iterations <= MAX_ITERATIONS:
        raise ConfigError(f"`iterations` must be 0 to {MAX_ITERATIONS:,}, got {cfg.iterations}", params=("iterations",))
    if cfg.scale_iterations and (len(cfg.scale_iterations) != len(cfg.sizes) or not all(0 <= n <= MAX_ITERATIONS for n in cfg.scale_iterations)):
        raise ConfigError(f"scale_iterations needs one count (0 to {MAX_ITERATIONS:,}) per stage ({len(cfg.sizes)}), got {list(cfg.scale_iterations)}")
    if not (0 < cfg.lr <= 1e6):
        raise ConfigError(f"`lr` must be positive and at most 1e6, got {cfg.lr}", params=("lr",))
    if cfg.lbfgs_history < 1:
        raise ConfigError(f"lbfgs_history must be at least 1, got {cfg.lbfgs_history}")
    if cfg.lbfgs_patience < 0:
        raise ConfigError(f"`lbfgs_patience` must be 0 (never stop early) or more, got {cfg.lbfgs_patience}", params=("lbfgs_patience",))
    for name in ("lbfgs_first_step", "lbfgs_max_step"):
        if not (0 < getattr(cfg, name) <= 1e3):
            raise ConfigError(f"{name} must be positive (image units, [0, 1] of the pixel range), got {getattr(cfg, name)}")
    for name in ("content_weight", "style_weight", "tv_weight"):
        v = getattr(cfg, name)
        if not v >= 0 or v == float("inf"):
            raise ConfigError(f"`{name}` must be a finite number >= 0, got {v}", params=(name,))
    if not cfg.content_layers and not cfg.style_layers:
        raise ConfigError("give at least one content or style layer")
    for layer in cfg.content_layers + cfg.style_layers:
        if layer not in LAYER_NAMES:
            raise ConfigError(f"unknown layer {layer!r}: use names like conv1_1, relu4_2, pool3 (see `nst info`)")
    for name in ("content_layers", "style_layers"):
        layers = getattr(cfg, name)
        twice = sorted({k for k in layers if layers.count(k) > 1})
        if twice:  # a layer's weight is given once; the export refused the repeated output name
            raise ConfigError(f"`{name}` names {', '.join(twice)} more than once", params=(name,))
    for layers, weights, what in (
        (cfg.content_layers, cfg.content_layer_weights, "content"),
        (cfg.style_layers, cfg.style_layer_weights, "style"),
    ):
        if weights and len(weights) != len(layers):
            raise ConfigError(f"{len(weights)} {what} layer weights given for {len(layers)} {what} layers")
        if any(not w >= 0 for w in weights):
            raise ConfigError(f"{what} layer weights must be >= 0")
    if any(not 0 <= w < float("inf") for w in cfg.style_blend) or (cfg.style_blend and sum(cfg.style_blend) <= 0):
        raise ConfigError("`style_blend` weights must be finite, >= 0 and not all zero", params=("style_blend",))
    if not (0.05 <= cfg.style_scale <= 8):
        raise ConfigError(f"`style_scale` must be between 0.05 and 8, got {cfg.style_scale}", params=("style_scale",))
    if cfg.pixel_scale not in (1.0, 255.0):
        raise ConfigError(f"pixel_scale must be 1 or 255, got {cfg.pixel_scale}")
    if cfg.save_every < 0:
        raise ConfigError(f"`save_every` must be 0 or more, got {cfg.save_every}", params=("save_every",))
    for name in ("masks", "style_regions"):
        if any(not str(p).strip() for p in getattr(cfg, name)):
            raise ConfigError(f"`{name}` has an empty entry: give a mask image path, or - for everywhere", params=(name,))
    if not cfg.init:
        raise ConfigError(f"init must be one of {', '.join(INIT_CHOICES)} or an image path")
    check_seed(cfg.seed)


# Per stage: about 14 hours at 20 it/s, beyond any run to a result; a count past it is a typo
# (one with 20 digits ran until interrupted).
MAX_ITERATIONS = 1_000_000
MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; numpy's none below 0


def check_seed(seed: int) -> None:
    """Refuse a seed no generator here takes (a huge one overflowed in torch with a traceback)."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"`seed` must be 0 to {MAX_SEED}, got {seed}", params=("seed",))


# CPU threads of a run (`threads`): torch.set_num_threads(99999999) never returned (a thread
# pool of that size).
MAX_THREADS = 1024


def check_threads(threads: int | None) -> None:
    """Refuse a thread count torch cannot sensibly take (None: torch's default)."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"`threads` must be 1 to {MAX_THREADS}, got {threads}", params=("threads",))


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, checked (None: leave torch's default)."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def content_layer_weights(cfg: StyleConfig) -> tuple[float, ...]:
    return cfg.content_layer_weights or tuple(1.0 for _ in cfg.content_layers)


def style_layer_weights(cfg: StyleConfig) -> tuple[float, ...]:
    n = len(cfg.style_layers)
    return cfg.style_layer_weights or tuple(1.0 / n for _ in cfg.style_layers)


# The notebook this project began from (Keras VGG19, Adam), term by term. Keras's
# `blockN_convM` outputs are post-ReLU, hence relu names here.
SEED = StyleConfig(
    size=400,
    size_edge=SizeEdge.HEIGHT,
    iterations=2000,
    optimizer=Optimizer.ADAM,
    lr=5.0,
    adam_betas=(0.9, 0.999),
    adam_eps=1e-7,  # Keras's default epsilon, not PyTorch's 1e-8
    content_weight=1.0,
    style_weight=1e6,  # split as 1e6 / 5 over the five layers by the default layer weights
    tv_weight=1e2,
    content_layers=("relu5_2",),
    style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
    style_match_output=True,
    init="content",
    scales=(),  # one pass, as the notebook
    loss_form=LossForm.KERAS,
    pixel_scale=255.0,
    save_every=500,
)

# Gatys et al. 2015 with L-BFGS, at the normalisation of `LossForm.NORMALIZED` (the PyTorch
# tutorial's scale: style 1e6 against content 1 with Grams divided by C*H*W).
GATYS = StyleConfig()

PRESETS: dict[Preset, StyleConfig] = {Preset.GATYS: GATYS, Preset.SEED: SEED}


# Each optimiser's lr where a preset runs the other one: L-BFGS's scales its quasi-Newton step (no
# unit); Adam's is a step in image units ([0, 1], times `pixel_scale`). Adam's 0.05 was measured
# with `nst bench --to-result` at 128 px: 0.05 and 0.1 within 5% of each other from 100
# iterations on, 0.02 and 0.01 behind (benchmarks/README.md).
OTHER_OPTIMIZER_LR = {Optimizer.LBFGS: 1.0, Optimizer.ADAM: 0.05}


def preset(name: Preset | str, **overrides: Any) -> StyleConfig:
    """The preset's configuration with `overrides` (fields given explicitly) applied. Switching
    the optimiser without giving `lr` takes that optimiser's lr (OTHER_OPTIMIZER_LR), not the
    preset's, which was meant for the other one."""
    try:
        base = PRESETS[Preset(name)]
    except ValueError:
        raise ConfigError(f"unknown preset {name!r}: use {', '.join(p.value for p in Preset)}") from None
    if "optimizer" in overrides and "lr" not in overrides and Optimizer(overrides["optimizer"]) != base.optimizer:
        opt = Optimizer(overrides["optimizer"])
        units = overrides.get("pixel_scale", base.pixel_scale) if opt == Optimizer.ADAM else 1.0
        overrides = {**overrides, "lr": OTHER_OPTIMIZER_LR[opt] * units}
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(StyleConfig)})
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(map(repr, unknown))}: StyleConfig's fields are {', '.join(f.name for f in dataclasses.fields(StyleConfig))}")
    return dataclasses.replace(base, **overrides)
