"""The optimisation: Gatys et al. 2015, coarse to fine, with progress through a callback.

One call, `stylize`, takes Pillow images and a `StyleConfig` and returns a `StyleResult`. It
never prints and never touches files; the caller saves what the callback hands it.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from . import color
from .config import INIT_CHOICES, LossForm, Optimizer, PreserveColors, StyleConfig, content_layer_weights, style_layer_weights
from .errors import ConfigError
from .device import Runtime, autocast, autocast_dtype, is_out_of_memory, out_of_memory_message, precision_context, release_memory, synchronize
from .features import VGGFeatures
from .images import ImageError, load_image, output_shape, resize, to_tensor
from .layers import deepest_layer, feature_hw, min_input_size
from .lbfgs import LBFGS
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .targets import ImageTargets, TargetSource, TorchTargets
from .weights import Weights, load_into


@dataclass
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


@dataclass
class StyleResult:
    """The output image and how it was reached."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1], CPU
    status: str  # "done" | "interrupted" | "nonfinite" | "oom" (a later scale did not fit; the previous one's image kept)
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


def _stage_images(
    content: Image.Image, styles: Sequence[Image.Image], hw: tuple[int, int], cfg: StyleConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(content RGB, content as the network sees it, style images) for one stage, (1, 3, h, w) each.

    Colour preservation happens here, before any target is computed: `histogram` recolours the
    styles to the content's colour statistics; `luminance` turns everything into luminance.
    """
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
    return content_rgb, content_t, style_ts


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

    Ctrl-C (KeyboardInterrupt) or `StopRun` from the callback ends the run with the latest image
    and status "interrupted"; a non-finite loss ends it with the last finite image and status
    "nonfinite". Everything else a user can get wrong raises an `EngineError` before any work.
    """
    runtime = runtime or Runtime()
    if not styles:
        raise ConfigError("give at least one style image")
    blend = _blend(cfg, len(styles))
    check_sizes(content, styles, cfg)
    if cfg.init not in INIT_CHOICES and init_image is None:
        init_image = load_image(cfg.init)
    phases: dict[str, float] = {}
    dev = runtime.device
    luminance_only = cfg.preserve_colors == PreserveColors.LUMINANCE

    t0 = time.perf_counter()
    if model is None:
        model = build_model(cfg, weights, runtime)
    net = loop_network(model, runtime)  # once for every scale; the targets keep the fp32 model
    phases["model"] = time.perf_counter() - t0
    source = targets or TorchTargets(model)
    mid = model_id(weights, cfg, source=source)

    total_steps = cfg.iterations * len(cfg.sizes)
    history: list[torch.Tensor] = []
    iter_seconds: list[float] = []
    terms_last: dict[str, torch.Tensor] = {}
    target_seconds = 0.0
    cache_hits, cache_lookups = 0, 0
    status, message = "done", ""
    step = 0
    image_seconds = 0.0
    optim_start = None
    x_prev: torch.Tensor | None = None  # previous stage's result, [0, 1] units
    done: tuple | None = None  # (x_prev, content_rgb, hw) of the last finished scale
    content_rgb = None

    with precision_context(runtime):
        try:
            for stage, size in enumerate(cfg.sizes):
                # --- images for this stage -------------------------------------------------------
                ti = time.perf_counter()
                hw = output_shape(content.width, content.height, size, cfg.size_edge)
                content_rgb, content_t, style_ts = _stage_images(content, styles, hw, cfg, dev)
                image_seconds += time.perf_counter() - ti

                # --- targets -------------------------------------------------------------------
                tt = time.perf_counter()
                c_targets = _targets(source, cache, mid, content_t, cfg.content_layers, (), cfg)
                s_targets = [_targets(source, cache, mid, st, (), cfg.style_layers, cfg) for st in style_ts]
                cache_lookups += (1 + len(style_ts)) if cache is not None else 0
                cache_hits += sum(int(t[1]) for t in [c_targets, *s_targets])
                content_feats = c_targets[0].to(dev).content
                grams = style_grams(cfg, [t for t, _ in s_targets], style_ts, blend, device=dev)
                synchronize(dev)
                target_seconds += time.perf_counter() - tt

                # --- the image being optimised ---------------------------------------------------
                if x_prev is None:
                    init = _init_image(cfg, content_t, style_ts[0], init_image, hw, dev)
                else:
                    init = F.interpolate(x_prev, size=hw, mode="bicubic", align_corners=False).clamp(0, 1)
                x = (init * cfg.pixel_scale).contiguous().requires_grad_(True)  # NCHW: L-BFGS flattens it
                good = x.detach().clone()
                loss_fn = make_loss(net, runtime, cfg, content_feats, grams, hw)
                opt = make_optimizer(cfg, x)

                def snapshot(x: torch.Tensor = x) -> torch.Tensor:
                    img = (x.detach() / cfg.pixel_scale).clamp(0, 1)
                    if luminance_only:
                        img = color.combine_luminance(img, content_rgb)
                    return img.cpu()

                if optim_start is None:
                    synchronize(dev)
                    optim_start = time.perf_counter()
                last_sync = time.perf_counter()
                last_sync_step = step
                try:
                    for it in range(1, cfg.iterations + 1):
                        if x.grad is not None:
                            x.grad = None
                        loss, terms = loss_fn(x)
                        loss.backward()
                        history.append(loss.detach())
                        terms_last = terms
                        if it % runtime.health_interval == 0 or it == cfg.iterations:
                            synchronize(dev)
                            now = time.perf_counter()
                            if step + 1 > last_sync_step:
                                per = (now - last_sync) / (step + 1 - last_sync_step)
                                iter_seconds.extend([per] * (step + 1 - last_sync_step))
                            last_sync, last_sync_step = now, step + 1
                            if not torch.isfinite(loss).item():
                                status = "nonfinite"
                                message = f"the loss became {float(loss.detach())} at iteration {step + 1}; kept the last image with a finite loss"
                                x.data.copy_(good)
                                history.pop()
                                break
                            good = x.detach().clone()
                        opt.step()
                        step += 1
                        if callback is not None:
                            callback(
                                Iterate(stage, len(cfg.sizes), hw, it, cfg.iterations, step, total_steps,
                                        loss.detach(), {k: v.detach() for k, v in terms.items()},
                                        time.perf_counter() - optim_start, snapshot)
                            )
                except (KeyboardInterrupt, StopRun):
                    status = "interrupted"
                    message = f"stopped at iteration {step} of {total_steps}; kept the latest image"
                with torch.no_grad():
                    x_prev = (x.detach() / cfg.pixel_scale).clamp(0, 1)
                    if not torch.isfinite(x_prev).all():
                        x_prev = (good / cfg.pixel_scale).clamp(0, 1)
                done = (x_prev, content_rgb, hw)
                if status != "done":
                    break
        except Exception as e:  # only running out of memory in a later scale is handled here
            if done is None or not is_out_of_memory(e):
                raise
            x_prev, content_rgb, kept_hw = done
            status = "oom"
            message = f"{out_of_memory_message(e, dev)} at {hw[1]}x{hw[0]}; kept the {kept_hw[1]}x{kept_hw[0]} result of the previous scale"
    if status == "oom":
        release_memory(dev)  # the failed scale's tensors, freed with the exception
    synchronize(dev)
    phases["images"] = image_seconds
    phases["targets"] = target_seconds
    phases["optimisation"] = (time.perf_counter() - optim_start) if optim_start else 0.0
    assert x_prev is not None and content_rgb is not None
    result_image = color.combine_luminance(x_prev, content_rgb) if luminance_only else x_prev
    losses = torch.stack(history).float().cpu().tolist() if history else []
    return StyleResult(
        image=result_image.detach().cpu(),
        status=status,
        steps=step,
        loss_history=losses,
        loss_terms={k: float(v.detach()) for k, v in terms_last.items()},
        phases=phases,
        iteration_seconds=iter_seconds,
        targets={
            **source.describe(),
            "cache": "off" if cache is None else ("hit" if cache_hits == cache_lookups else "miss"),
            "seconds": target_seconds,
        },
        message=message,
    )


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


def _targets(source: TargetSource, cache: TargetCacheLike | None, mid: str, image: torch.Tensor, content_layers: Sequence[str], style_layers: Sequence[str], cfg: StyleConfig) -> tuple[ImageTargets, bool]:
    """One image's targets, from the cache when it has them; returns (targets, was_hit)."""
    key = None
    if cache is not None:
        key = target_key(model=mid, image=image, content_layers=content_layers, style_layers=style_layers, style_scale=cfg.style_scale)
        hit = cache.lookup(key)
        if hit is not None:
            return hit, True
    t = source.compute(image, content_layers=tuple(content_layers), style_layers=tuple(style_layers))
    if cache is not None and key is not None:
        cache.store(key, t)
    return t, False


def make_optimizer(cfg: StyleConfig, x: torch.Tensor, *, capturable: bool = False) -> "LBFGS | torch.optim.Adam":
    """The configuration's optimiser over the image `x` (`capturable`: Adam for a CUDA graph)."""
    if cfg.optimizer == Optimizer.ADAM:
        return torch.optim.Adam([x], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, capturable=capturable)
    return LBFGS(x, lr=cfg.lr, history=cfg.lbfgs_history)


def make_loss(
    net: VGGFeatures,
    runtime: Runtime,
    cfg: StyleConfig,
    content_feats: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    hw: tuple[int, int],
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The weighted loss as a function of the optimised image (in `pixel_scale` units), through
    `net` (the loop's network: `loop_network(model, runtime)`)."""
    cw = dict(zip(cfg.content_layers, content_layer_weights(cfg)))
    sw = dict(zip(cfg.style_layers, style_layer_weights(cfg)))
    form = cfg.loss_form
    pixels = hw[0] * hw[1]
    scale = cfg.pixel_scale

    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = x / scale
        if runtime.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with autocast(runtime):
            feats = net(img)
        zero = x.new_zeros(())
        c = sum((w * content_loss(feats[k], content_feats[k], form=form) for k, w in cw.items()), zero)
        s = sum((w * style_loss(feats[k], grams[k], form=form, image_pixels=pixels) for k, w in sw.items()), zero)
        # The notebook's TV acts on its 0-255 image; the normalised TV on the [0, 1] image.
        tv = tv_loss(x if form == LossForm.KERAS else img, form=form)
        terms = {"content": cfg.content_weight * c, "style": cfg.style_weight * s, "tv": cfg.tv_weight * tv}
        return terms["content"] + terms["style"] + terms["tv"], terms

    return loss_fn


__all__ = ["Iterate", "StopRun", "StyleResult", "build_model", "gram_matrix", "loop_network", "make_loss", "make_optimizer", "stylize", "target_key"]
