"""The optimisation: Gatys et al. 2015, coarse to fine, with progress through a callback.

One call, `stylize`, takes Pillow images and a `StyleConfig` and returns a `StyleResult`. It
never prints and never touches files; the caller saves what the callback hands it.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict

import torch
import torch.nn.functional as F
from PIL import Image

from . import color
from .config import AUTO, INIT_CHOICES, OTHER_OPTIMIZER_LR, Optimizer, OptimizerState, PreserveColors, StyleConfig, auto_iterations
from .device import Runtime, autocast_dtype, is_out_of_memory, out_of_memory_message, precision_context, release_memory, return_freed_memory, synchronize
from .errors import ConfigError
from .features import VGGFeatures
from .images import ImageError, as_rgb, check_fits_format, load_named, output_shape, resize, to_tensor
from .layers import deepest_layer, deepest_layer_within, min_input_size
from .lbfgs import BatchedLBFGS, LBFGS
from .losses import gram_matrix
from .masks import EVERYWHERE, Guidance, StyleGroup, as_mask, group_styles, guided_style_targets, layer_guides, load_mask, load_masks, make_guidance, stage_guide
from .objective import ExtraTerm, Objective, check_extra_terms, make_objective, style_grams
from .plan import Plan, TileMode, plan_run, style_shape
from .stopwatch import Stopwatch
from .targets import ImageTargets, TargetSource, TorchTargets, tiled_source
from .tiles import TiledObjective
from .weights import Weights, load_into

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass(kw_only=True)
class Iterate:
    """What the callback sees after each iteration. Tensors stay on the device: reading `loss`
    (`float(it.loss)`) synchronises, so a caller that prints should do it only as often as it
    redraws."""

    stage: int  # 0-based index into cfg.sizes
    stages: int
    size: tuple[int, int]  # (H, W) of this stage
    iteration: int  # 1-based within the stage
    iterations: int  # of this stage
    step: int  # 1-based over all stages
    total_steps: int
    loss: torch.Tensor  # 0-dim, total weighted loss at the image before this iteration's update
    terms: dict[str, torch.Tensor]  # weighted content / style / tv
    elapsed: float  # seconds since the optimisation began
    snapshot: Callable[[], torch.Tensor] = field(repr=False)  # current image, (1, 3, H, W) in [0, 1], CPU


class RunStatus(str, enum.Enum):
    """How a run ended; every status but DONE comes with a `message`."""

    DONE = "done"
    INTERRUPTED = "interrupted"  # Ctrl-C or StopRun: the latest image kept
    NONFINITE = "nonfinite"  # the loss became inf/nan: the last image with a finite loss kept
    OOM = "oom"  # a later scale did not fit: the previous scale's image kept


@dataclass(kw_only=True)
class StyleResult:
    """The output image and how it was reached."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1], CPU
    status: RunStatus
    steps: int  # iterations completed over all stages
    loss_history: list[float]  # total loss per iteration
    loss_terms: dict[str, float]  # the last iteration's weighted terms
    phases: dict[str, float]  # seconds: images, model, targets, optimisation
    iteration_seconds: list[float]  # per-iteration wall time, measured at sync points
    targets: dict[str, object]  # source, provider, cache, seconds
    message: str = ""
    # Stages that L-BFGS ended early, having found no lower loss in `lbfgs_patience` iterations:
    # {"stage", "size" (H, W), "iteration", "iterations", "best_iteration"} each.
    stopped_early: list[dict[str, object]] = field(default_factory=list)
    # The loss of the image kept, where the run knows it: L-BFGS keeps its last accepted point, the
    # lowest loss of the last stage; Adam's last update is not evaluated, so its last loss is the
    # step before. None without iterations.
    final_loss: float | None = None


class TargetCacheLike(Protocol):
    def lookup(self, key: str) -> ImageTargets | None: ...

    def store(self, key: str, targets: ImageTargets) -> None: ...


class StopRun(Exception):
    """Raised by a callback to end the run early, keeping the current image."""


def target_key(
    *, model: str, image: torch.Tensor, content_layers: Sequence[str], style_layers: Sequence[str], style_scale: float, dtype: str = "float32",
    region: torch.Tensor | None = None,
) -> str:
    """Content address of an image's targets: model, exact processed pixels, size, layers, scale,
    dtype, and the style region they were taken over (its exact weights at the image's size)."""
    h = hashlib.sha256()
    t = image.detach().to("cpu", torch.float32).contiguous()
    for part in (model, str(tuple(t.shape)), ",".join(content_layers), ",".join(style_layers), repr(float(style_scale)), dtype):
        h.update(part.encode() + b"\0")
    h.update(t.numpy().tobytes())
    if region is not None:  # absent for whole images, so their keys are what they always were
        r = region.detach().to("cpu", torch.float32).contiguous()
        h.update(b"region\0" + str(tuple(r.shape)).encode() + b"\0" + r.numpy().tobytes())
    return h.hexdigest()[:32]


def build_model(cfg: StyleConfig, weights: Weights, runtime: Runtime) -> VGGFeatures:
    """The frozen feature extractor cut after the deepest layer this configuration uses."""
    model = VGGFeatures(tuple(cfg.content_layers) + tuple(cfg.style_layers), pooling=cfg.pooling)
    load_into(model.features, weights)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def loop_network(model: VGGFeatures, runtime: Runtime) -> VGGFeatures:
    """The network the optimisation loop runs: `model` itself, or for bf16/fp16 with
    `runtime.lowp_weights` a copy whose conv weights are cast to that dtype once.

    Autocast would cast the same weights the same way (round to nearest) at every forward; a
    frozen weight is not a leaf that needs grad, so autocast's cast cache does not keep it.
    """
    dt = autocast_dtype(runtime.precision)
    if dt is None or not runtime.lowp_weights:
        return model
    net = copy.deepcopy(model)
    net.features.to(dtype=dt)
    return net


def model_id(weights: Weights, cfg: StyleConfig, *, source: TargetSource | None = None) -> str:
    """Identifies the network as the targets see it: weights, pooling, and the source's own
    identity (an ONNX file's sha256), so targets from one model file never stand in for another's."""
    identity = getattr(source, "identity", "")
    return f"{weights.fingerprint}-{cfg.pooling.value}" + (f"-{identity}" if identity else "")


def _style_hw(style: Image.Image, out_hw: tuple[int, int], cfg: StyleConfig) -> tuple[int, int]:
    return style_shape((style.width, style.height), out_hw, cfg)


def _check_size(hw: tuple[int, int], what: str, cfg: StyleConfig, *, size: int) -> None:
    deepest = deepest_layer(cfg.content_layers + cfg.style_layers)
    need = min_input_size([deepest])
    if min(hw) < need:
        # What can help: a larger image at this stage (the output's `size` or this `scales`
        # entry; for a style image that is not resized to the output also `style_scale`), or
        # layers that need fewer pixels. Not `style_scale` for the output: it does not change it.
        first = len(cfg.sizes) > 1 and size != cfg.sizes[-1]
        bigger = f"`scales` entry than {size}" if first else "`size`"
        if what != "output" and not cfg.style_match_output:
            bigger = f"`style_scale` or {bigger}"
        shallow = deepest_layer_within(min(hw))
        layers = f"layers no deeper than {shallow} (`style_layers`, `content_layers`)" if shallow else "a wider image"
        raise ImageError(
            f"the {what} would be {hw[1]}x{hw[0]} px, too small for layer {deepest} "
            f"(needs at least {need} px on each side); use a larger {bigger}, or {layers}",
            params=("size", "scales", "style_scale", "style_layers", "content_layers"),
        )


def _stage_fits(content_wh: tuple[int, int], style_whs: Sequence[tuple[int, int]], cfg: StyleConfig, size: int) -> bool:
    need = min_input_size([deepest_layer(cfg.content_layers + cfg.style_layers)])
    hw = output_shape(content_wh[0], content_wh[1], size, cfg.size_edge)
    return min(hw) >= need and all(min(style_shape(wh, hw, cfg)) >= need for wh in style_whs)


def fit_scales(contents: Sequence[Image.Image], styles: Sequence[Sequence[Image.Image]], cfg: StyleConfig) -> StyleConfig:
    """`cfg` with `scales="auto"` made explicit for these images: the coarse stages at which an
    output or a style image would be too small for the layers are left out (a wide, thin image
    starts at a larger size), and the budget is split over the stages kept as `auto` splits it
    (counts given per stage, `scale_iterations`, stay those of the stages kept). Explicit scales
    are the caller's choice and stay as they are (too small is then an error)."""
    return fit_scales_to([c.size for c in contents], [[s.size for s in st] for st in styles], cfg)


def fit_scales_to(content_whs: Sequence[tuple[int, int]], style_whs: Sequence[Sequence[tuple[int, int]]], cfg: StyleConfig) -> StyleConfig:
    """`fit_scales` for images known by their (width, height) alone."""
    if cfg.scales != AUTO:
        return cfg
    sizes = cfg.sizes
    first = 0
    while first < len(sizes) - 1 and not all(_stage_fits(c, st, cfg, sizes[first]) for c, st in zip(content_whs, style_whs)):
        first += 1
    kept = sizes[first:]
    # Counts given per stage keep theirs (the stages left out take theirs with them); otherwise
    # the budget is split over the kept stages. Overwriting given counts ran `nst bench
    # --to-result`'s auto rows to 400 iterations at the output size, whatever its limit.
    counts = cfg.scale_iterations[first:] if cfg.scale_iterations else auto_iterations(cfg.iterations, len(kept))
    return replace(cfg, scales=kept, scale_iterations=counts)


def check_sizes(content: Image.Image, styles: Sequence[Image.Image], cfg: StyleConfig) -> None:
    """Raise ImageError before any work if a stage's output or style image is too small (with
    `scales="auto"`, a stage of `fit_scales`)."""
    cfg = fit_scales([content], [styles], cfg)
    for size in cfg.sizes:
        hw = output_shape(content.width, content.height, size, cfg.size_edge)
        _check_size(hw, "output", cfg, size=size)
        for s in styles:
            _check_size(_style_hw(s, hw, cfg), "style image", cfg, size=size)


def check_job(content: Image.Image, styles: Sequence[Image.Image], cfg: StyleConfig, output: str | Path) -> None:
    """ImageError before any work for a job that cannot end in its output: a stage too small for
    the layers (`check_sizes`), or an output format that cannot hold the result (`check_fits_format`)."""
    check_sizes(content, styles, cfg)
    check_fits_format(output, output_shape(content.width, content.height, cfg.sizes[-1], cfg.size_edge))


@dataclass(frozen=True)
class Stage:
    """One scale's inputs, each (1, 3, h, w) on the run's device."""

    index: int  # 0-based into cfg.sizes
    hw: tuple[int, int]  # (H, W) of the output at this scale
    content_rgb: torch.Tensor | None  # the content, resized (after `for_loop`: only when `luminance_only`)
    network_content: torch.Tensor | None  # the content as the network sees it (luminance for `luminance`)
    styles: list[torch.Tensor]  # the style images, resized and recoloured
    luminance_only: bool  # the output's colours come from `content_rgb` at the end

    def for_loop(self) -> "Stage":
        """This stage without what only its targets and its start image needed: the styles, and
        the content unless the output's colours come from it. At print size each is hundreds of
        MB that the optimiser's loop would otherwise hold."""
        return replace(self, content_rgb=self.content_rgb if self.luminance_only else None, network_content=None, styles=[])


def prepare_stage(content: Image.Image, styles: Sequence[Image.Image], index: int, size: int, cfg: StyleConfig, device: torch.device) -> Stage:
    """Resize the images for one scale and apply colour preservation.

    Colour preservation happens here, before any target is computed: `histogram` recolours the
    styles to the content's colour statistics; `luminance` turns everything into luminance.
    """
    hw = output_shape(content.width, content.height, size, cfg.size_edge)
    content_rgb = to_tensor(resize(content, hw)).to(device)
    luminance_only = cfg.preserve_colors == PreserveColors.LUMINANCE
    style_ts = []
    for s in styles:
        st = to_tensor(resize(s, _style_hw(s, hw, cfg))).to(device)
        if cfg.preserve_colors == PreserveColors.HISTOGRAM:
            st = color.match_histogram(st, content_rgb)
        elif luminance_only:
            st = color.match_luminance(st, content_rgb)
        style_ts.append(st)
    content_t = color.luminance(content_rgb) if luminance_only else content_rgb
    return Stage(index, hw, content_rgb, content_t, style_ts, luminance_only)


def _init_image(cfg: StyleConfig, content: torch.Tensor, style: torch.Tensor, init_image: Image.Image | None, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    if cfg.init == "content":
        return content.clone()
    if cfg.init == "noise":
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.rand(content.shape, generator=gen).to(device)
    if cfg.init == "style":
        return F.interpolate(style, size=hw, mode="bicubic", align_corners=False).clamp(0, 1)
    assert init_image is not None
    return to_tensor(resize(init_image, hw)).to(device)


def _blend(cfg: StyleConfig, n: int) -> list[float]:
    w = list(cfg.style_blend) if cfg.style_blend else [1.0] * n
    if len(w) != n:
        raise ConfigError(f"`style_blend` has {len(w)} weights for {n} style images", params=("style_blend",))
    total = sum(w)
    return [x / total for x in w]


class RunOptions(TypedDict, total=False):
    """The keyword options that `stylize` passes on to `stylize_many` as they are (see there)."""

    runtime: Runtime | None
    targets: TargetSource | None
    cache: TargetCacheLike | None
    model: VGGFeatures | None
    loop_model: VGGFeatures | None
    extra_terms: Mapping[str, ExtraTerm] | None
    masks: Sequence[Image.Image | None] | None
    style_regions: Sequence[Image.Image | None] | None
    content_mask: Image.Image | None
    plan: Plan | None


def stylize(
    content: Image.Image,
    styles: Sequence[Image.Image],
    cfg: StyleConfig,
    *,
    weights: Weights,
    init_image: Image.Image | None = None,
    callback: Callable[[Iterate], None] | None = None,
    **options: Unpack[RunOptions],
) -> StyleResult:
    """Optimise an image so its VGG19 features match `content`'s and its Grams match `styles`'.

    `model` (from `build_model`) and `loop_model` (`loop_network(model, runtime)`) let a caller
    that stylises many images build the network once. `extra_terms` adds named loss terms of the
    image to every stage's objective (video's temporal term is one); without them the objective
    is content + style + TV, unchanged.

    Spatial control (greyscale images, white = 1; each takes the place of the configuration's
    path of the same name): `masks`, one per style (None: everywhere), where on the output each
    style acts, by guided Gram matrices; `style_regions`, one per style (None: all of it), which
    part of each style image its targets come from; `content_mask`, a weight map on the content
    term. Pixels no mask covers get only the content and TV terms.

    Each scale is a stage: its images, its objective (targets and weighted loss terms), then the
    optimiser's loop from the previous stage's result. Ctrl-C (KeyboardInterrupt) or `StopRun`
    from the callback ends the run with the latest image and status `interrupted`; a non-finite
    loss ends it with the last finite image and status `nonfinite`. Everything else a user can
    get wrong raises an `EngineError` before any work. `plan` (`plan.plan_run`) says which stages
    run tile by tile (the same result, up to rounding, in less memory); without it all run whole.
    """
    if callback is not None and not callable(callback):
        raise ConfigError(f"`callback` must be callable, got {type(callback).__name__}", params=("callback",))
    each = None if callback is None else (lambda _i, it: callback(it))
    return stylize_many([content], [styles], cfg, weights=weights, init_images=[init_image], callback=each, **options)[0]


@dataclass(frozen=True)
class MemoryRequest:
    """What a run asks of its memory plan (`plan_for`): `budget` in bytes (None: the device's free
    memory less a margin, `device.default_memory_budget`), `tile` (auto: whole where a stage
    fits, else the largest tile that does; off; or a tile edge in pixels) and where L-BFGS's
    history lives (`optimizer_state`). `source_bytes`: what the run's target source holds beside
    the loop's network (`targets.resident_bytes`: ONNX Runtime's session is a copy of the weights;
    PyTorch's source is the loop's network). `video_bytes`: what a clip's loop keeps beside each
    frame's run on the run's device (`video.pipeline.frame_bytes`)."""

    budget: int | None = None
    tile: TileMode | int = TileMode.AUTO
    optimizer_state: OptimizerState = OptimizerState.AUTO
    source_bytes: int = 0
    video_bytes: int = 0


def plan_for(content_wh: tuple[int, int], style_whs: Sequence[tuple[int, int]], cfg: StyleConfig, runtime: Runtime, request: MemoryRequest = MemoryRequest()) -> Plan:
    """The memory plan of a run on `runtime` for a content and style images of these (width,
    height): `plan.plan_run` over the stages `fit_scales` keeps. On the CPU the machine's memory
    bounds what tiling can do (image buffers beyond it are refused); off it, a history in host
    memory may take the available RAM less a margin."""
    from . import device  # looked up at the call: what the machine has is read when planning

    budget = request.budget if request.budget is not None else device.default_memory_budget(runtime.device)
    on_cpu = runtime.device.type == "cpu"
    return plan_run(
        fit_scales_to([content_wh], [list(style_whs)], cfg), content_wh, list(style_whs), precision=runtime.precision, device=str(runtime.device),
        budget=budget, tile=request.tile, host_bytes=device.host_memory_bytes() if on_cpu else None, optimizer_state=request.optimizer_state,
        host_budget=None if on_cpu else device.default_memory_budget(torch.device("cpu")), held={"source": request.source_bytes, "video": request.video_bytes},
    )  # fmt: skip


def planned_config(cfg: StyleConfig, plan: Plan) -> StyleConfig:
    """`cfg` as `plan` runs it (`Plan.changes`): a switch to Adam takes Adam's own lr, as the
    presets give it to a run that names the other optimiser, not the one meant for L-BFGS."""
    changes = plan.changes(cfg)
    if "optimizer" in changes:
        opt = Optimizer(changes["optimizer"])
        return replace(cfg, optimizer=opt, lr=OTHER_OPTIMIZER_LR[opt] * (cfg.pixel_scale if opt == Optimizer.ADAM else 1.0))
    return replace(cfg, **changes)


def stage_shapes(width: int, height: int, cfg: StyleConfig) -> tuple[tuple[int, int], ...]:
    """(H, W) of every stage for a content of this size: contents with equal shapes can be
    optimised together."""
    return tuple(output_shape(width, height, size, cfg.size_edge) for size in cfg.sizes)


def _check_arguments(
    contents: object, styles: object, cfg: object, weights: object, runtime: object, init_images: object, callback: object,
    masks: object, style_regions: object, content_mask: object,
) -> None:
    """The Python caller's types, before any work: one ConfigError naming the argument (a numpy
    array or a path where an image goes, one image where a list goes, a preset's name where its
    configuration goes), rather than an AttributeError from deep inside."""

    def image(x: object, what: str, *, optional: bool = False) -> None:
        if x is None and optional:
            return
        if not isinstance(x, Image.Image):
            hint = " (read files with `load_image`)" if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__") else ""
            raise ConfigError(f"`{what}` must be a PIL image, got {type(x).__name__}{hint}", params=(what,))
        if x.width < 1 or x.height < 1:
            raise ConfigError(f"`{what}` is an empty image ({x.width}x{x.height})", params=(what,))

    def sequence(xs: object, what: str) -> Sequence[object]:
        if isinstance(xs, (Image.Image, str, bytes)) or not isinstance(xs, Sequence):
            raise ConfigError(f"`{what}` must be a list of PIL images, got {type(xs).__name__}", params=(what,))
        return xs

    def images(xs: object, what: str, *, optional_items: bool = False) -> None:
        for x in sequence(xs, what):
            image(x, what, optional=optional_items)

    if not isinstance(cfg, StyleConfig):
        raise ConfigError(f"`cfg` must be a StyleConfig (e.g. `preset('gatys')`), got {type(cfg).__name__}", params=("cfg",))
    if not isinstance(weights, Weights):
        raise ConfigError(f"`weights` must be Weights (`load_weights('imagenet')` or `random_weights()`), got {type(weights).__name__}", params=("weights",))
    if runtime is not None and not isinstance(runtime, Runtime):
        raise ConfigError(f"`runtime` must be a Runtime (e.g. `Runtime(precision='fp32')`), got {type(runtime).__name__}", params=("runtime",))
    if callback is not None and not callable(callback):
        raise ConfigError(f"`callback` must be callable, got {type(callback).__name__}", params=("callback",))
    images(contents, "content")
    for st in sequence(styles, "styles"):
        images(st, "styles")
    if init_images is not None:
        images(init_images, "init_image", optional_items=True)
    for what, ms in (("masks", masks), ("style_regions", style_regions)):
        if ms is not None:
            images(ms, what, optional_items=True)
    image(content_mask, "content_mask", optional=True)


def stylize_many(
    contents: Sequence[Image.Image],
    styles: Sequence[Sequence[Image.Image]],
    cfg: StyleConfig,
    *,
    weights: Weights,
    runtime: Runtime | None = None,
    targets: TargetSource | None = None,
    cache: TargetCacheLike | None = None,
    init_images: Sequence[Image.Image | None] | None = None,
    callback: Callable[[int, Iterate], None] | None = None,
    model: VGGFeatures | None = None,
    loop_model: VGGFeatures | None = None,
    extra_terms: Mapping[str, ExtraTerm] | None = None,
    masks: Sequence[Image.Image | None] | None = None,
    style_regions: Sequence[Image.Image | None] | None = None,
    content_mask: Image.Image | None = None,
    plan: Plan | None = None,
) -> list[StyleResult]:
    """`stylize` for several contents at once (each with its own styles), stacked into one
    (N, 3, H, W) tensor: one forward and backward per iteration for all of them.

    Each image has its own loss terms, and the sum's gradient with respect to an image is its own
    loss's; Adam is elementwise and L-BFGS keeps one history per image, so each result is what
    `stylize` gives that image alone, within rounding. Every content must have the same
    `stage_shapes`. `callback(i, iterate)` is called for each image still running. An image whose
    loss stops being finite keeps its last finite image (status `nonfinite`) and the others go
    on; Ctrl-C or `StopRun` ends them all with their latest images. `masks` and `content_mask`
    apply to every content, `style_regions` to every list of styles (see `stylize`).
    """
    _check_arguments(contents, styles, cfg, weights, runtime, init_images, callback, masks, style_regions, content_mask)
    # Pillow images made RGB (masks greyscale) as image files' modes are; their pixels as they stand.
    contents = [as_rgb(c, "content") for c in contents]
    styles = [[as_rgb(s, "styles") for s in st] for st in styles]
    if init_images is not None:
        init_images = [None if im is None else as_rgb(im, "init_image") for im in init_images]
    masks, style_regions = ([None if m is None else as_mask(m, what) for m in ms] if ms is not None else None
                            for ms, what in ((masks, "masks"), (style_regions, "style_regions")))  # fmt: skip
    content_mask = as_mask(content_mask, "content_mask") if content_mask is not None else None
    runtime = runtime or Runtime()
    n = len(contents)
    if n == 0 or len(styles) != n:
        raise ConfigError(f"give one list of style images per content ({n} contents, {len(styles)} lists)")
    if not all(styles):
        raise ConfigError("give at least one style image")
    blends = [_blend(cfg, len(s)) for s in styles]
    if check_extra_terms(extra_terms) and n > 1:
        raise ConfigError("extra loss terms are for one image at a time, not a batch", params=("extra_terms",))
    cfg = fit_scales(contents, styles, cfg)
    for content, st in zip(contents, styles):
        check_sizes(content, st, cfg)
    guidance = resolve_guidance(cfg, contents, styles, masks=masks, style_regions=style_regions, content_mask=content_mask)
    shapes = stage_shapes(contents[0].width, contents[0].height, cfg)
    if any(stage_shapes(c.width, c.height, cfg) != shapes for c in contents[1:]):
        raise ConfigError("images optimised together must have the same size at every stage")
    inits: list[Image.Image | None] = list(init_images) if init_images is not None else [None] * n
    if cfg.init not in INIT_CHOICES and any(im is None for im in inits):
        shared_init = load_named(cfg.init, "init")
        inits = [shared_init if im is None else im for im in inits]
    dev = runtime.device
    clock = Stopwatch(dev)

    with clock.phase("model"):
        if model is None:
            model = build_model(cfg, weights, runtime)
        # Once for every scale; the targets keep the fp32 model.
        net = loop_model if loop_model is not None else loop_network(model, runtime)
    tiles = [plan.tile_at(hw) for hw in shapes] if plan is not None else [None] * len(shapes)
    # Stages whose content targets are made at every tile's pass, not held (`StagePlan.content_targets`).
    per_tile = [t is not None and plan.stage_at(hw).content_targets == "per tile" for t, hw in zip(tiles, shapes)] if plan is not None else [False] * len(shapes)
    if any(t is not None for t in tiles) and dev.type == "cpu":
        return_freed_memory()  # else freed tile maps stay in the heap (see there)
    # Targets of a tiled run come tile by tile too: a whole-image pass could need more than the loop.
    # A source given by the caller is made to tile at the plan's edge (`with_tile`); one that cannot
    # gives way to PyTorch's.
    tile = plan.target_tile() if plan is not None else None
    source = (tiled_source(targets, tile) if tile is not None and targets is not None else targets) or TorchTargets(model, tile=tile)
    mid = model_id(weights, cfg, source=source)
    # Targets over a style region come from the PyTorch model: the exported target module has no
    # guidance input. They are cached under the PyTorch model's identity and the region.
    regions = _RegionTargets(model, model_id(weights, cfg)) if any(r is not None for r in guidance.style_regions) else None
    lookups = [_TargetLookup(source, cache, mid, cfg, regions=regions) for _ in range(n)]  # per image: its cache hits
    source_notes = {} if regions is None else {"style_regions": "torch (fp32): the exported target module has no guidance input"}
    if any(per_tile):  # made in the loop, whatever the source
        source_notes["content_targets"] = "torch (fp32), made again at each tile's pass (the plan's `content_targets`)"
    # L-BFGS's history where the plan keeps it: host memory (pinned beside a CUDA image), streamed.
    history_device = "cpu" if plan is not None and plan.optimizer_state == "host" else None
    loop = _Loop(cfg, runtime, clock, callback, n, history_device=history_device)
    stages: list[Stage] = []
    hw = shapes[0]  # this scale's output size, known before anything of the scale can fail
    done: tuple[torch.Tensor, list[Stage]] | None = None  # the last finished scale's images and stages
    x_prev: torch.Tensor | None = None  # previous stage's results, (N, 3, h, w) in [0, 1] units

    with precision_context(runtime):
        try:
            for index, (size, hw) in enumerate(zip(cfg.sizes, shapes)):
                with clock.phase("images"):
                    stages = [prepare_stage(c, st, index, size, cfg, dev) for c, st in zip(contents, styles)]
                tile = tiles[index]
                with clock.phase("targets", sync=True):
                    # A tiled stage's content features are image-sized: the cache would hold a
                    # second copy while it writes them, so only its styles' Grams are cached.
                    # Its content features are kept at the network's precision (the loop's
                    # features are at that precision), at half the memory.
                    lowp = autocast_dtype(runtime.precision) if tile is not None else None
                    per_image = [lk.stage_targets(sg, dev, guidance, cache_content=tile is None, content_dtype=lowp, content=not per_tile[index])
                                 for lk, sg in zip(lookups, stages)]  # fmt: skip
                    if guidance.masked:  # a guided style term per group of styles sharing a mask
                        groups, grams = _style_groups(cfg, guidance, per_image, stages, blends, hw, dev), {}
                    else:  # the styles' Grams blended into one target
                        groups = []
                        blended = [style_grams(cfg, t[1], sg.styles, b, device=dev) for t, sg, b in zip(per_image, stages, blends)]
                        grams = {k: torch.cat([g[k] for g in blended]) for k in cfg.style_layers}  # (N, C, C)
                # (N, C, h, w); one image's are its own tensors, not a copy
                content_feats = {k: per_image[0][0][k] if n == 1 else torch.cat([t[0][k] for t in per_image]) for k in per_image[0][0]}
                content_guides = {} if guidance.content_mask is None else layer_guides(stage_guide(guidance.content_mask, hw).to(dev), cfg.content_layers)
                if x_prev is None:
                    init = torch.cat([_init_image(cfg, sg.network_content, sg.styles[0], im, sg.hw, dev) for sg, im in zip(stages, inits)])
                else:
                    init = F.interpolate(x_prev, size=hw, mode="bicubic", align_corners=False).clamp_(0, 1)
                # The loop needs none of the stage's images but the colours' source (and, when its
                # content targets are made per tile, the content), and only the targets themselves
                # (see `plan.stage_parts`, which counts the same buffers).
                contents_t = None
                if per_tile[index]:
                    contents_t = stages[0].network_content if n == 1 else torch.cat([sg.network_content for sg in stages])  # type: ignore[misc]
                stages, per_image = [sg.for_loop() for sg in stages], []
                objective = make_objective(net, runtime, cfg, content_feats, grams, hw, per_image=n > 1, extra_terms=extra_terms,
                                           style_groups=groups, content_guides=content_guides)
                del content_feats
                if tile is not None:
                    objective = TiledObjective(objective, tile, grams=cfg.tile_grams, content_images=contents_t, content_net=model)
                x_prev = loop.run_stage(stages, objective, init)  # takes `init` over
                del init, objective, contents_t
                done = (x_prev, stages)
                if not loop.running:
                    break
        except Exception as e:  # only running out of memory in a later scale is handled here
            if done is None or not is_out_of_memory(e):
                raise
            x_prev, stages = done
            kept = stages[0].hw
            for i in loop.running:
                loop.status[i] = RunStatus.OOM
                loop.message[i] = f"{out_of_memory_message(e, dev)} at {hw[1]}x{hw[0]}; kept the {kept[1]}x{kept[0]} result of the previous scale"
    if RunStatus.OOM in loop.status:
        release_memory(dev)  # the failed scale's tensors, freed with the exception
    synchronize(dev)
    clock.stop("optimisation")
    assert x_prev is not None and stages
    phases = {"model": clock.seconds["model"], "images": clock.seconds.get("images", 0.0), "targets": clock.seconds.get("targets", 0.0), "optimisation": clock.seconds["optimisation"]}
    history = torch.stack(loop.history).float().cpu() if loop.history else torch.empty(0, n)  # (T, N)
    results = []
    for i in range(n):
        img, stage = loop.stopped.get(i, (x_prev[i : i + 1], stages[i]))
        image = color.combine_luminance(img, stage.content_rgb) if stage.luminance_only else img
        results.append(
            StyleResult(
                image=image.detach().cpu(),
                status=loop.status[i],
                steps=loop.steps[i],
                loss_history=history[: loop.kept[i], i].tolist(),
                loss_terms={k: float(v.detach()[i]) for k, v in loop.terms_last.items()},
                phases=dict(phases),
                iteration_seconds=loop.iteration_seconds[: loop.steps[i] + (loop.status[i] == RunStatus.NONFINITE)],
                targets={**source.describe(), "cache": lookups[i].cache_state(), "seconds": phases["targets"], **source_notes},
                message=loop.message[i],
                stopped_early=loop.stopped_early[i],
                final_loss=loop.final_loss(history, i),
            )
        )
    return results


def resolve_guidance(
    cfg: StyleConfig,
    contents: Sequence[Image.Image],
    styles: Sequence[Sequence[Image.Image]],
    *,
    masks: Sequence[Image.Image | None] | None = None,
    style_regions: Sequence[Image.Image | None] | None = None,
    content_mask: Image.Image | None = None,
) -> Guidance:
    """The run's masks, checked: the images given, else those the configuration's paths name."""
    if masks is None and cfg.masks:
        masks = load_masks(cfg.masks, param="masks")
    if style_regions is None and cfg.style_regions:
        style_regions = load_masks(cfg.style_regions, param="style_regions")
    if content_mask is None and cfg.content_mask and cfg.content_mask.strip() != EVERYWHERE:
        content_mask = load_mask(cfg.content_mask, param="content_mask")
    return make_guidance(contents, styles, masks=masks, style_regions=style_regions, content_mask=content_mask)


def _style_groups(
    cfg: StyleConfig, guidance: Guidance, per_image: Sequence[tuple[object, list[ImageTargets]]], stages: Sequence[Stage],
    blends: Sequence[Sequence[float]], hw: tuple[int, int], device: torch.device,
) -> list[StyleGroup]:
    """One guided style term per group of styles sharing a mask: the group's targets blended (by
    its styles' blend weights, renormalised), the mask at this stage's size and each layer's."""
    groups = []
    for idx, mask in group_styles(guidance.masks):
        weight = sum(blends[0][i] for i in idx)
        if weight == 0:
            continue  # its styles' blend weights are all 0: the group's term weighs nothing
        guides = None if mask is None else layer_guides(stage_guide(mask, hw).to(device), cfg.style_layers)
        blended = []
        for (_, targets), sg, b in zip(per_image, stages, blends):
            total = sum(b[i] for i in idx)
            blended.append(style_grams(cfg, [targets[i] for i in idx], [sg.styles[i] for i in idx], [b[i] / total for i in idx], device=device))
        grams = {k: torch.cat([g[k] for g in blended]) for k in cfg.style_layers}  # (N, C, C)
        groups.append(StyleGroup(weight, grams, guides))
    return groups


class _RegionTargets:
    """Style targets over a region of the style image, from the PyTorch model."""

    def __init__(self, model: VGGFeatures, mid: str) -> None:
        self.model, self.mid = model, mid

    def compute(self, image: torch.Tensor, region: torch.Tensor, style_layers: Sequence[str]) -> ImageTargets:
        return ImageTargets({}, guided_style_targets(self.model, image, region, style_layers))


class _TargetLookup:
    """Each stage's targets, from the cache when it has them, counting hits for the report."""

    def __init__(self, source: TargetSource, cache: TargetCacheLike | None, mid: str, cfg: StyleConfig, *, regions: _RegionTargets | None = None) -> None:
        self.source, self.cache, self.mid, self.cfg, self.regions = source, cache, mid, cfg, regions
        self.hits = self.lookups = 0

    def stage_targets(
        self,
        stage: Stage,
        device: torch.device,
        guidance: Guidance,
        *,
        cache_content: bool = True,
        content_dtype: torch.dtype | None = None,
        content: bool = True,
    ) -> tuple[dict[str, torch.Tensor], list[ImageTargets]]:
        """(content features on `device`, each style image's targets) for one stage; without
        `cache_content` the content's features are neither looked up in the cache nor stored;
        `content_dtype`: the content features' dtype (None: fp32, as every source gives them);
        without `content`, none (the loop makes them per tile)."""
        cfg = self.cfg
        assert stage.network_content is not None, "a stage's targets come before `Stage.for_loop`"
        c_feats = {}
        if content:
            c_targets = self.image_targets(stage.network_content, cfg.content_layers, (), use_cache=cache_content, content_dtype=content_dtype)
            c_feats = c_targets.to(device).content
        s_targets = []
        for i, st in enumerate(stage.styles):
            region = guidance.region(i)
            s_targets.append(self.image_targets(st, (), cfg.style_layers, region=None if region is None else stage_guide(region, tuple(st.shape[-2:]))))
        return c_feats, s_targets

    def image_targets(
        self,
        image: torch.Tensor,
        content_layers: Sequence[str],
        style_layers: Sequence[str],
        *,
        region: torch.Tensor | None = None,
        use_cache: bool = True,
        content_dtype: torch.dtype | None = None,
    ) -> ImageTargets:
        key = None
        mid = self.mid if region is None else self.regions.mid  # type: ignore[union-attr]
        cache = self.cache if use_cache else None
        if cache is not None:
            self.lookups += 1
            key = target_key(model=mid, image=image, content_layers=content_layers, style_layers=style_layers, style_scale=self.cfg.style_scale, region=region)
            hit = cache.lookup(key)
            if hit is not None:
                self.hits += 1
                return hit
        if region is None:
            # Rounded as the source makes them (a tiled source never holds a full fp32 copy). Only
            # asked for when it matters, so a source written before `content_dtype` still serves
            # whole stages. (Not cached: see the caller.)
            dtype = {} if content_dtype is None else {"content_dtype": content_dtype}
            t = self.source.compute(image, content_layers=tuple(content_layers), style_layers=tuple(style_layers), **dtype)
        else:
            assert self.regions is not None
            t = self.regions.compute(image, region, style_layers)
        if cache is not None and key is not None:
            cache.store(key, t)
        return t

    def cache_state(self) -> str:
        return "off" if self.cache is None else ("hit" if self.hits == self.lookups else "miss")


class _Loop:
    """The optimiser's iterations over the stages for N images at once, and what each image's
    result reports about them."""

    def __init__(
        self, cfg: StyleConfig, runtime: Runtime, clock: Stopwatch, callback: Callable[[int, Iterate], None] | None, n: int, *, history_device: str | None = None
    ) -> None:
        self.cfg, self.runtime, self.clock, self.callback, self.n = cfg, runtime, clock, callback, n
        self.history_device = history_device  # where L-BFGS keeps its history (None: with the image)
        self.stage_iterations = cfg.stage_iterations
        self.total_steps = sum(self.stage_iterations)
        self.step = 0  # iterations of the batch
        self.steps = [0] * n  # iterations each image took part in
        self.history: list[torch.Tensor] = []  # (N,) per iteration
        self.kept = [0] * n  # how many entries of `history` count for each image
        self.terms_last: dict[str, torch.Tensor] = {}  # (N,) each
        self.iteration_seconds: list[float] = []
        self.status, self.message = [RunStatus.DONE] * n, [""] * n
        self.running = list(range(n))  # images still being optimised
        self.stopped: dict[int, tuple[torch.Tensor, Stage]] = {}  # image -> (its result, its stage) when it stopped early
        self.stage_start = [0] * n  # where each image's current stage begins in its `history` entries
        self.prev_opt: object | None = None  # the last stage's optimiser (for `carry_adam_moments`)
        self.stopped_early: list[list[dict[str, object]]] = [[] for _ in range(n)]  # per image (`StyleResult.stopped_early`)

    def final_loss(self, history: torch.Tensor, i: int) -> float | None:
        """The loss of image i's kept image (see `StyleResult.final_loss`)."""
        losses = history[: self.kept[i], i]
        if len(losses) == 0:
            return None
        if self.cfg.optimizer == Optimizer.LBFGS and self.status[i] != RunStatus.NONFINITE and self.stage_start[i] < len(losses):
            return float(losses[self.stage_start[i] :].min())
        return float(losses[-1])

    def run_stage(self, stages: list[Stage], objective: Objective | TiledObjective, init: torch.Tensor) -> torch.Tensor:
        """Optimise from `init` ((N, 3, H, W) in [0, 1]); returns the stage's images in [0, 1]
        (for each, the last finite one)."""
        cfg, dev, n = self.cfg, self.runtime.device, self.n
        # The image is `init` itself, scaled in place (NCHW: L-BFGS flattens it): the caller hands
        # it over, and a print-size stage has no memory for a second copy.
        x = init.contiguous()
        if cfg.pixel_scale != 1:
            x.mul_(cfg.pixel_scale)
        x.requires_grad_(True)
        # The last image with a finite loss; a tiled stage (one that is short of memory) keeps it
        # at half precision, well within one 8-bit level of the image.
        tiled = isinstance(objective, TiledObjective)
        good_dtype = torch.float16 if tiled and x.dtype == torch.float32 else x.dtype
        good = x.detach().to(good_dtype, copy=True)
        opt = make_optimizer(cfg, x, per_image=n > 1, fused=tiled, history_device=self.history_device)
        stage = stages[0]
        stage_its = self.stage_iterations[stage.index]
        self.stage_start = list(self.kept)

        def snapshot(i: int, x: torch.Tensor = x) -> torch.Tensor:
            # L-BFGS: its last accepted point, what the run keeps, not an untried step.
            img = (kept_point(opt, x)[i : i + 1] / cfg.pixel_scale).clamp(0, 1)
            if stages[i].luminance_only:
                img = color.combine_luminance(img, stages[i].content_rgb)
            return img.cpu()

        # L-BFGS's stall: the stage ends once every running image has gone `patience` iterations
        # without a lower loss, read at the sync points only (every iteration on the CPU).
        patience = cfg.lbfgs_patience if not isinstance(opt, torch.optim.Optimizer) else 0
        best, best_it, checked, stalled = [math.inf] * n, [0] * n, 0, False

        self.clock.start("optimisation")
        last_sync, last_sync_step = time.perf_counter(), self.step
        try:
            for it in range(1, stage_its + 1):
                if not self.running:
                    break
                if x.grad is not None:
                    x.grad = None
                loss, terms = objective.loss_and_grad(x)  # each image's gradient is its own loss's
                loss, terms = loss.reshape(n), {k: v.reshape(n) for k, v in terms.items()}  # (N,) each
                self.history.append(loss.detach())
                for i in self.running:
                    self.kept[i] += 1
                self.terms_last = terms
                if it % self.runtime.health_interval == 0 or it == stage_its:
                    # A sync point: time the iterations since the last one, and check the losses.
                    synchronize(dev)
                    now = time.perf_counter()
                    if self.step + 1 > last_sync_step:
                        k = self.step + 1 - last_sync_step
                        self.iteration_seconds.extend([(now - last_sync) / k] * k)
                    last_sync, last_sync_step = now, self.step + 1
                    finite = torch.isfinite(loss).tolist()
                    for i in [i for i in self.running if not finite[i]]:
                        self.status[i] = RunStatus.NONFINITE
                        value = float(loss[i].detach())
                        self.message[i] = (
                            f"the loss became {value} at iteration {self.steps[i] + 1}; kept the last image with a finite loss" if self.steps[i]
                            else f"the loss was {value} at the start, before any step; kept the starting image"
                        )
                        self.kept[i] -= 1
                        self.running.remove(i)
                        self.stopped[i] = ((good[i : i + 1].to(x.dtype) / cfg.pixel_scale).clamp(0, 1), stages[i])
                    if not self.running:
                        x.data.copy_(good)
                        break
                    good.copy_(x.detach())
                    if patience:
                        for j, row in enumerate(torch.stack(self.history[-(it - checked) :]).float().tolist(), start=checked + 1):
                            for i in self.running:
                                if row[i] < best[i]:
                                    best[i], best_it[i] = row[i], j
                        checked = it
                        stalled = it < stage_its and all(it - best_it[i] >= patience for i in self.running)
                if it == 1 and cfg.carry_adam_moments:
                    carry_adam_moments(self.prev_opt, opt)
                if isinstance(opt, torch.optim.Optimizer):  # Adam
                    opt.step()
                else:  # L-BFGS: the losses let it take back a step that went uphill
                    opt.step(loss.detach())
                if len(self.running) < n:  # images that stopped stay where they stopped
                    with torch.no_grad():
                        idle = [i for i in range(n) if i not in self.running]
                        x[idle] = good[idle].to(x.dtype)
                self.step += 1
                for i in self.running:
                    self.steps[i] += 1
                if self.callback is not None:
                    elapsed = self.clock.since("optimisation")
                    for i in self.running:
                        self.callback(
                            i,
                            Iterate(
                                stage=stage.index, stages=len(cfg.sizes), size=stage.hw, iteration=it, iterations=stage_its,
                                step=self.step, total_steps=self.total_steps, loss=loss[i].detach(),
                                terms={k: v[i].detach() for k, v in terms.items()}, elapsed=elapsed, snapshot=functools.partial(snapshot, i),
                            ),
                        )  # fmt: skip
                if stalled:  # the iteration counted, as every evaluated one does; the image is L-BFGS's best point
                    for i in self.running:
                        self.stopped_early[i].append({"stage": stage.index, "size": list(stage.hw), "iteration": it, "iterations": stage_its, "best_iteration": best_it[i]})
                    break
        except (KeyboardInterrupt, StopRun):
            for i in self.running:
                self.status[i] = RunStatus.INTERRUPTED
                self.message[i] = f"stopped at iteration {self.steps[i]} of {self.total_steps}; kept the latest image"
            self.running = []
        # The next stage starts Adam from these moments (`carry_adam_moments`); nothing else of
        # this optimiser outlives the stage.
        self.prev_opt = opt if cfg.carry_adam_moments and isinstance(opt, torch.optim.Adam) else None
        x.grad = None
        with torch.no_grad():
            # In place: the stage's image (L-BFGS: its last accepted point) is not used again.
            out = kept_point(opt, x).div_(cfg.pixel_scale).clamp_(0, 1)
            bad = ~torch.isfinite(out).flatten(1).all(1)  # (N,): such an image falls back whole
            if bad.any():
                out[bad] = (good[bad].to(out.dtype) / cfg.pixel_scale).clamp(0, 1)
        return out


def make_optimizer(
    cfg: StyleConfig, x: torch.Tensor, *, capturable: bool = False, per_image: bool = False, fused: bool = False, history_device: str | torch.device | None = None
) -> "LBFGS | torch.optim.Adam":
    """The configuration's optimiser over the image `x` (`capturable`: Adam for a CUDA graph).
    Adam is elementwise, so one for a batch is one per image; L-BFGS with `per_image` is a
    `BatchedLBFGS`: one history, curvature test and step length per image of the batch.
    `fused`: Adam's fused kernel, which makes no image-sized temporaries in its step (the
    default implementation makes two); for stages short of memory. `history_device`: where
    L-BFGS keeps its history, streamed through `x`'s device (None: with `x`; the plan's
    optimiser state "host" is "cpu"); Adam ignores it."""
    if cfg.optimizer == Optimizer.ADAM:
        fuse = fused and not capturable and x.dtype == torch.float32 and x.device.type in ("cpu", "cuda")
        return torch.optim.Adam([x], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, capturable=capturable, fused=fuse or None)
    # The first step and the step cap are in image units ([0, 1] of the pixel range).
    return (BatchedLBFGS if per_image else LBFGS)(
        x, lr=cfg.lr, history=cfg.lbfgs_history, first_step=cfg.lbfgs_first_step * cfg.pixel_scale, max_step=cfg.lbfgs_max_step * cfg.pixel_scale,
        history_device=history_device,
    )  # fmt: skip


def kept_point(opt: object, x: torch.Tensor) -> torch.Tensor:
    """What a run keeps of `x`: L-BFGS's last accepted points (not a trial still to be
    evaluated), else `x` itself. Detached, (N, 3, H, W)."""
    if isinstance(opt, torch.optim.Optimizer):
        return x.detach()
    return opt.point()  # type: ignore[attr-defined]


@torch.no_grad()
def carry_adam_moments(old: object, new: object) -> None:
    """Start `new` Adam (this stage's images, their gradient already computed) from `old`'s
    moments (the previous, smaller stage), resampled to the new size.

    Bilinear resampling keeps the second moment non-negative. A pixel's gradient does not keep
    its size across a stage change (a normalised loss spreads over four times the pixels), so
    each image's moments are rescaled by the ratio of its new gradient's RMS to the old moments'
    RMS gradient estimate, sqrt(mean(v)): the steps keep the shape the old stage learnt and take
    the new gradient's scale. Anything other than two Adams is left alone (L-BFGS restarts: its
    pairs belong to the old size's coordinates).
    """
    if not (isinstance(old, torch.optim.Adam) and isinstance(new, torch.optim.Adam)):
        return
    (p_old,) = old.param_groups[0]["params"]
    (p_new,) = new.param_groups[0]["params"]
    state = old.state.get(p_old)
    if not state or p_new.grad is None:
        return
    size = p_new.shape[-2:]
    m = F.interpolate(state["exp_avg"], size=size, mode="bilinear", align_corners=False)
    v = F.interpolate(state["exp_avg_sq"], size=size, mode="bilinear", align_corners=False)
    bias2 = 1 - old.param_groups[0]["betas"][1] ** state["step"]  # v's bias correction (step: a tensor)
    per_image = (1, 2, 3)
    rms_new = p_new.grad.float().pow(2).mean(per_image, keepdim=True).sqrt()
    rms_old = (v.mean(per_image, keepdim=True) / bias2).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    k = rms_new / rms_old  # (N, 1, 1, 1)
    new.state[p_new] = {"step": state["step"].clone(), "exp_avg": (m * k).to(p_new.dtype), "exp_avg_sq": (v * k * k).to(p_new.dtype)}


__all__ = [
    "Iterate", "Objective", "RunStatus", "Stage", "StopRun", "StyleResult", "build_model", "gram_matrix", "loop_network",
    "carry_adam_moments", "kept_point", "make_objective", "make_optimizer", "prepare_stage", "resolve_guidance", "stage_shapes", "style_grams", "stylize",
    "stylize_many", "target_key", "MemoryRequest", "fit_scales_to", "plan_for", "planned_config",
]  # fmt: skip
