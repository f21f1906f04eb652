"""The optimisation: Gatys et al. 2015, coarse to fine, with progress through a callback.

One call, `stylize`, takes Pillow images and a `StyleConfig` and returns a `StyleResult`. It
never prints and never touches files; the caller saves what the callback hands it.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from . import color
from .config import INIT_CHOICES, Optimizer, PreserveColors, StyleConfig
from .device import Runtime, autocast_dtype, is_out_of_memory, out_of_memory_message, precision_context, release_memory, synchronize
from .errors import ConfigError
from .features import VGGFeatures
from .images import ImageError, load_image, output_shape, resize, to_tensor
from .layers import deepest_layer, min_input_size
from .lbfgs import LBFGS
from .losses import gram_matrix
from .objective import Objective, make_objective, style_grams
from .stopwatch import Stopwatch
from .targets import ImageTargets, TargetSource, TorchTargets
from .weights import Weights, load_into


@dataclass(kw_only=True)
class Iterate:
    """What the callback sees after each iteration. Tensors stay on the device: reading `loss`
    (`float(it.loss)`) synchronises, so a caller that prints should do it only as often as it
    redraws."""

    stage: int  # 0-based index into cfg.sizes
    stages: int
    size: tuple[int, int]  # (H, W) of this stage
    iteration: int  # 1-based within the stage
    iterations: int  # per stage
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


class TargetCacheLike(Protocol):
    def lookup(self, key: str) -> ImageTargets | None: ...

    def store(self, key: str, targets: ImageTargets) -> None: ...


class StopRun(Exception):
    """Raised by a callback to end the run early, keeping the current image."""


def target_key(*, model: str, image: torch.Tensor, content_layers: Sequence[str], style_layers: Sequence[str], style_scale: float, dtype: str = "float32") -> str:
    """Content address of an image's targets: model, exact processed pixels, size, layers, scale, dtype."""
    h = hashlib.sha256()
    t = image.detach().to("cpu", torch.float32).contiguous()
    for part in (model, str(tuple(t.shape)), ",".join(content_layers), ",".join(style_layers), repr(float(style_scale)), dtype):
        h.update(part.encode() + b"\0")
    h.update(t.numpy().tobytes())
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
    if cfg.style_match_output:
        return out_hw
    longest = max(1, round(cfg.style_scale * max(out_hw)))
    return output_shape(style.width, style.height, longest)


def _check_size(hw: tuple[int, int], what: str, cfg: StyleConfig) -> None:
    deepest = deepest_layer(cfg.content_layers + cfg.style_layers)
    need = min_input_size([deepest])
    if min(hw) < need:
        raise ImageError(
            f"the {what} would be {hw[1]}x{hw[0]} px, too small for layer {deepest} "
            f"(needs at least {need} px on each side); use a larger `size` or `style_scale`",
            params=("size", "style_scale"),
        )


def check_sizes(content: Image.Image, styles: Sequence[Image.Image], cfg: StyleConfig) -> None:
    """Raise ImageError before any work if a stage's output or style image is too small."""
    for size in cfg.sizes:
        hw = output_shape(content.width, content.height, size, cfg.size_edge)
        _check_size(hw, "output", cfg)
        for s in styles:
            _check_size(_style_hw(s, hw, cfg), "style image", cfg)


@dataclass(frozen=True)
class Stage:
    """One scale's inputs, each (1, 3, h, w) on the run's device."""

    index: int  # 0-based into cfg.sizes
    hw: tuple[int, int]  # (H, W) of the output at this scale
    content_rgb: torch.Tensor  # the content, resized
    network_content: torch.Tensor  # the content as the network sees it (luminance for `luminance`)
    styles: list[torch.Tensor]  # the style images, resized and recoloured
    luminance_only: bool  # the output's colours come from `content_rgb` at the end


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


def stylize(
    content: Image.Image,
    styles: Sequence[Image.Image],
    cfg: StyleConfig,
    *,
    weights: Weights,
    runtime: Runtime | None = None,
    targets: TargetSource | None = None,
    cache: TargetCacheLike | None = None,
    init_image: Image.Image | None = None,
    callback: Callable[[Iterate], None] | None = None,
    model: VGGFeatures | None = None,
) -> StyleResult:
    """Optimise an image so its VGG19 features match `content`'s and its Grams match `styles`'.

    Each scale is a stage: its images, its objective (targets and weighted loss terms), then the
    optimiser's loop from the previous stage's result. Ctrl-C (KeyboardInterrupt) or `StopRun`
    from the callback ends the run with the latest image and status `interrupted`; a non-finite
    loss ends it with the last finite image and status `nonfinite`. Everything else a user can
    get wrong raises an `EngineError` before any work.
    """
    runtime = runtime or Runtime()
    if not styles:
        raise ConfigError("give at least one style image")
    blend = _blend(cfg, len(styles))
    check_sizes(content, styles, cfg)
    if cfg.init not in INIT_CHOICES and init_image is None:
        init_image = load_image(cfg.init)
    dev = runtime.device
    clock = Stopwatch(dev)

    with clock.phase("model"):
        if model is None:
            model = build_model(cfg, weights, runtime)
        net = loop_network(model, runtime)  # once for every scale; the targets keep the fp32 model
    source = targets or TorchTargets(model)
    lookup = _TargetLookup(source, cache, model_id(weights, cfg, source=source), cfg)
    loop = _Loop(cfg, runtime, clock, callback)
    stage: Stage | None = None
    hw = (0, 0)  # this scale's output size, known before anything of the scale can fail
    done: tuple[torch.Tensor, Stage] | None = None  # the last finished scale's image and stage
    x_prev: torch.Tensor | None = None  # previous stage's result, [0, 1] units

    with precision_context(runtime):
        try:
            for index, size in enumerate(cfg.sizes):
                hw = output_shape(content.width, content.height, size, cfg.size_edge)
                with clock.phase("images"):
                    stage = prepare_stage(content, styles, index, size, cfg, dev)
                with clock.phase("targets", sync=True):
                    content_feats, grams = lookup.stage_targets(stage, blend, dev)
                if x_prev is None:
                    init = _init_image(cfg, stage.network_content, stage.styles[0], init_image, stage.hw, dev)
                else:
                    init = F.interpolate(x_prev, size=stage.hw, mode="bicubic", align_corners=False).clamp(0, 1)
                objective = make_objective(net, runtime, cfg, content_feats, grams, stage.hw)
                x_prev = loop.run_stage(stage, objective, init)
                done = (x_prev, stage)
                if loop.status != RunStatus.DONE:
                    break
        except Exception as e:  # only running out of memory in a later scale is handled here
            if done is None or not is_out_of_memory(e):
                raise
            x_prev, kept = done
            loop.status = RunStatus.OOM
            loop.message = f"{out_of_memory_message(e, dev)} at {hw[1]}x{hw[0]}; kept the {kept.hw[1]}x{kept.hw[0]} result of the previous scale"
            stage = kept
    if loop.status == RunStatus.OOM:
        release_memory(dev)  # the failed scale's tensors, freed with the exception
    synchronize(dev)
    clock.stop("optimisation")
    assert x_prev is not None and stage is not None
    result_image = color.combine_luminance(x_prev, stage.content_rgb) if stage.luminance_only else x_prev
    phases = {"model": clock.seconds["model"], "images": clock.seconds.get("images", 0.0), "targets": clock.seconds.get("targets", 0.0), "optimisation": clock.seconds["optimisation"]}
    return StyleResult(
        image=result_image.detach().cpu(),
        status=loop.status,
        steps=loop.step,
        loss_history=torch.stack(loop.history).float().cpu().tolist() if loop.history else [],
        loss_terms={k: float(v.detach()) for k, v in loop.terms_last.items()},
        phases=phases,
        iteration_seconds=loop.iteration_seconds,
        targets={**lookup.source.describe(), "cache": lookup.cache_state(), "seconds": phases["targets"]},
        message=loop.message,
    )


class _TargetLookup:
    """Each stage's targets, from the cache when it has them, counting hits for the report."""

    def __init__(self, source: TargetSource, cache: TargetCacheLike | None, mid: str, cfg: StyleConfig) -> None:
        self.source, self.cache, self.mid, self.cfg = source, cache, mid, cfg
        self.hits = self.lookups = 0

    def stage_targets(self, stage: Stage, blend: Sequence[float], device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(content features, blended style Grams) for one stage, on `device`."""
        cfg = self.cfg
        c_targets = self.image_targets(stage.network_content, cfg.content_layers, ())
        s_targets = [self.image_targets(st, (), cfg.style_layers) for st in stage.styles]
        return c_targets.to(device).content, style_grams(cfg, s_targets, stage.styles, blend, device=device)

    def image_targets(self, image: torch.Tensor, content_layers: Sequence[str], style_layers: Sequence[str]) -> ImageTargets:
        key = None
        if self.cache is not None:
            self.lookups += 1
            key = target_key(model=self.mid, image=image, content_layers=content_layers, style_layers=style_layers, style_scale=self.cfg.style_scale)
            hit = self.cache.lookup(key)
            if hit is not None:
                self.hits += 1
                return hit
        t = self.source.compute(image, content_layers=tuple(content_layers), style_layers=tuple(style_layers))
        if self.cache is not None and key is not None:
            self.cache.store(key, t)
        return t

    def cache_state(self) -> str:
        return "off" if self.cache is None else ("hit" if self.hits == self.lookups else "miss")


class _Loop:
    """The optimiser's iterations over the stages, and what the result reports about them."""

    def __init__(self, cfg: StyleConfig, runtime: Runtime, clock: Stopwatch, callback: Callable[[Iterate], None] | None) -> None:
        self.cfg, self.runtime, self.clock, self.callback = cfg, runtime, clock, callback
        self.total_steps = cfg.iterations * len(cfg.sizes)
        self.step = 0
        self.history: list[torch.Tensor] = []
        self.terms_last: dict[str, torch.Tensor] = {}
        self.iteration_seconds: list[float] = []
        self.status, self.message = RunStatus.DONE, ""

    def run_stage(self, stage: Stage, objective: Objective, init: torch.Tensor) -> torch.Tensor:
        """Optimise from `init` ([0, 1]); returns the stage's image in [0, 1] (the last finite one)."""
        cfg, dev = self.cfg, self.runtime.device
        x = (init * cfg.pixel_scale).contiguous().requires_grad_(True)  # NCHW: L-BFGS flattens it
        good = x.detach().clone()
        opt = make_optimizer(cfg, x)

        def snapshot(x: torch.Tensor = x) -> torch.Tensor:
            img = (x.detach() / cfg.pixel_scale).clamp(0, 1)
            if stage.luminance_only:
                img = color.combine_luminance(img, stage.content_rgb)
            return img.cpu()

        self.clock.start("optimisation")
        last_sync, last_sync_step = time.perf_counter(), self.step
        try:
            for it in range(1, cfg.iterations + 1):
                if x.grad is not None:
                    x.grad = None
                loss, terms = objective(x)
                loss.backward()
                self.history.append(loss.detach())
                self.terms_last = terms
                if it % self.runtime.health_interval == 0 or it == cfg.iterations:
                    # A sync point: time the iterations since the last one, and check the loss.
                    synchronize(dev)
                    now = time.perf_counter()
                    if self.step + 1 > last_sync_step:
                        n = self.step + 1 - last_sync_step
                        self.iteration_seconds.extend([(now - last_sync) / n] * n)
                    last_sync, last_sync_step = now, self.step + 1
                    if not torch.isfinite(loss).item():
                        self.status = RunStatus.NONFINITE
                        self.message = f"the loss became {float(loss.detach())} at iteration {self.step + 1}; kept the last image with a finite loss"
                        x.data.copy_(good)
                        self.history.pop()
                        break
                    good = x.detach().clone()
                opt.step()
                self.step += 1
                if self.callback is not None:
                    self.callback(
                        Iterate(
                            stage=stage.index, stages=len(cfg.sizes), size=stage.hw, iteration=it, iterations=cfg.iterations,
                            step=self.step, total_steps=self.total_steps, loss=loss.detach(),
                            terms={k: v.detach() for k, v in terms.items()}, elapsed=self.clock.since("optimisation"), snapshot=snapshot,
                        )
                    )  # fmt: skip
        except (KeyboardInterrupt, StopRun):
            self.status = RunStatus.INTERRUPTED
            self.message = f"stopped at iteration {self.step} of {self.total_steps}; kept the latest image"
        with torch.no_grad():
            out = (x.detach() / cfg.pixel_scale).clamp(0, 1)
            if not torch.isfinite(out).all():
                out = (good / cfg.pixel_scale).clamp(0, 1)
        return out


def make_optimizer(cfg: StyleConfig, x: torch.Tensor, *, capturable: bool = False) -> "LBFGS | torch.optim.Adam":
    """The configuration's optimiser over the image `x` (`capturable`: Adam for a CUDA graph)."""
    if cfg.optimizer == Optimizer.ADAM:
        return torch.optim.Adam([x], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, capturable=capturable)
    return LBFGS(x, lr=cfg.lr, history=cfg.lbfgs_history)


__all__ = [
    "Iterate", "Objective", "RunStatus", "Stage", "StopRun", "StyleResult", "build_model", "gram_matrix", "loop_network",
    "make_objective", "make_optimizer", "prepare_stage", "style_grams", "stylize", "target_key",
]  # fmt: skip
