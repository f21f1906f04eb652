"""A whole clip, frame by frame, with temporal consistency (Ruder, Dosovitskiy & Brox 2016).

Frame t > 0 starts from the previous output warped onto it by the optical flow between the two
content frames (disoccluded pixels taken from the content frame) and is held to that warped
output by the temporal term wherever the flow is reliable. The network is built once, the style
targets are computed once (an in-memory layer over the target cache), and each frame's content
targets go through the same target source as a still image's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .. import color
from ..config import PreserveColors, StyleConfig
from ..device import Runtime
from ..features import VGGFeatures
from ..errors import ConfigError
from ..images import load_image, output_shape, resize, to_pil, to_tensor
from ..plan import Plan
from ..targets import ImageTargets, TargetSource, TorchTargets, tiled_source
from ..transfer import Iterate, RunStatus, TargetCacheLike, build_model, check_sizes, fit_scales, loop_network, stylize
from ..weights import Weights
from .config import FlowMethod, VideoConfig
from .flow import RaftFlow, flow_pair
from .journal import FrameJournal
from .media import VideoError
from .temporal import TemporalTerm, warping_error
from .warping import reliability, warp

# How the previous output is resampled onto the frame: bilinear, as in the paper (bicubic, tried
# on the synthetic pan, neither kept more of the style nor flickered less).
IMAGE_WARP = "bilinear"
WARPED_INIT = "warped previous output"  # cfg.init of frames that start from the previous output


@dataclass
class FrameEvent:
    """What the frame callback sees when a frame starts ("start") and when it is saved ("done")."""

    kind: str  # "start" | "done"
    index: int  # output frame, from 0
    total: int | None  # output frames, None when the input does not say
    iterations: int  # this frame's iterations over all scales
    seconds: float = 0.0  # "done": the frame's wall time
    warping_error: float | None = None  # "done": 8-bit levels against the warped previous output


@dataclass
class VideoResult:
    """The finished frames (in the work folder) and how they were reached."""

    status: str  # "done" | "interrupted" | "nonfinite" | "oom"
    frames: list[dict[str, object]]  # per output frame: seconds, iterations, warping_error, reliable, resumed
    resumed: int  # frames found finished in the work folder and not redone
    phases: dict[str, float]  # seconds: model, flow, targets, optimisation, save
    targets: dict[str, object]  # source, provider, and how often style and content targets were computed
    message: str = ""

    @property
    def warping_errors(self) -> list[float | None]:
        return [f.get("warping_error") for f in self.frames]  # type: ignore[misc]

    @property
    def warping_error_mean(self) -> float | None:
        vals = [v for v in self.warping_errors if v is not None]
        return statistics.fmean(vals) if vals else None

    @property
    def seconds_per_frame(self) -> float | None:
        """Mean wall time of the frames computed in this run (resumed ones excluded)."""
        vals = [float(f["seconds"]) for f in self.frames if not f.get("resumed")]  # type: ignore[arg-type]
        return statistics.fmean(vals) if vals else None


class _CountingSource:
    """A target source that counts what it computes: style targets should be computed once."""

    def __init__(self, inner: TargetSource) -> None:
        self.inner, self.name = inner, inner.name
        # What `stylize_many` checks before making a source tile (`targets.tiled_source`): the
        # inner source's edge, so a tiled plan keeps this wrapper (and the source it wraps).
        self.tile = getattr(inner, "tile", None)
        self.style_computed = self.content_computed = 0

    def compute(self, image: torch.Tensor, *, content_layers: tuple[str, ...], style_layers: tuple[str, ...], **kw: torch.dtype) -> ImageTargets:
        self.style_computed += bool(style_layers)
        self.content_computed += bool(content_layers)
        return self.inner.compute(image, content_layers=content_layers, style_layers=style_layers, **kw)

    def describe(self) -> dict[str, object]:
        return self.inner.describe()


class _StyleMemo:
    """Keeps style targets in memory for the whole clip, over the caller's cache (if any).

    Content targets are the frames' own and are neither kept nor written to the shared cache.
    """

    def __init__(self, backing: TargetCacheLike | None) -> None:
        self.backing = backing
        self.memory: dict[str, ImageTargets] = {}

    def lookup(self, key: str) -> ImageTargets | None:
        if key in self.memory:
            return self.memory[key]
        hit = self.backing.lookup(key) if self.backing is not None else None
        if hit is not None and not hit.content:
            self.memory[key] = hit
        return hit

    def store(self, key: str, targets: ImageTargets) -> None:
        if targets.content:
            return
        self.memory[key] = targets
        if self.backing is not None:
            self.backing.store(key, targets)


def stylize_video(
    frames: Iterable[Image.Image],
    styles: Sequence[Image.Image],
    cfg: StyleConfig,
    vcfg: VideoConfig,
    *,
    weights: Weights,
    journal: FrameJournal,
    runtime: Runtime | None = None,
    targets: TargetSource | None = None,
    cache: TargetCacheLike | None = None,
    total: int | None = None,
    raft: RaftFlow | None = None,
    init_image: Image.Image | None = None,
    model: VGGFeatures | None = None,
    frame_callback: Callable[[FrameEvent], None] | None = None,
    callback: Callable[[Iterate], None] | None = None,
    plan: Plan | None = None,
) -> VideoResult:
    """Stylise `frames` (Pillow images, in order) into `journal`'s work folder, resuming after the
    frames it already holds. Ctrl-C ends the run with status "interrupted", finished frames kept.

    `init_image` is the start of frames that do not start from the previous output (with
    `cfg.init` naming an image file); `total` (the number of frames, if known) is for progress;
    `model` (from `build_model`) lets a caller with several clips build the network once.
    `plan` (`transfer.plan_for`, made for the frames' size) says which stages run tile by tile;
    apply its changes to `cfg` first (`transfer.planned_config`).
    """
    runtime = runtime or Runtime()
    if vcfg.flow == FlowMethod.RAFT and raft is None:
        raise ConfigError("`flow` raft needs a loaded RaftFlow (see find_raft_weights)", params=("flow",))
    phases = {"model": 0.0, "flow": 0.0, "targets": 0.0, "optimisation": 0.0, "save": 0.0}
    resumed = journal.open()
    records: list[dict[str, object]] = [{**e, "resumed": True} for e in journal.entries]

    t = time.perf_counter()
    model = model if model is not None else build_model(cfg, weights, runtime)
    net = loop_network(model, runtime)
    tile = plan.target_tile() if plan is not None else None
    fallback: dict[str, str] = {}
    if targets is not None and tile is not None:  # a tiled plan's targets come tile by tile, as a tiled `stylize`'s
        targets = tiled_source(targets, tile)
        fallback = {} if targets is not None else {"fallback": "torch: the source cannot tile"}
    source = _CountingSource(targets or TorchTargets(model, tile=tile))
    # With `preserve_colors` the style is recoloured to each frame, so its targets are the frame's
    # own: none is kept or cached (one each per frame filled the target cache and the memory).
    memo = _StyleMemo(cache) if cfg.preserve_colors == PreserveColors.NONE else None
    phases["model"] = time.perf_counter() - t
    luminance_only = cfg.preserve_colors == PreserveColors.LUMINANCE

    status, message = "done", ""
    prev_content: torch.Tensor | None = None  # (1, 3, H, W) content frame t-1 at the output size
    hw: tuple[int, int] | None = None
    index = -1
    try:
        for index, frame in enumerate(frames):
            if hw is None:
                check_sizes(frame, styles, cfg)
                hw = output_shape(frame.width, frame.height, cfg.sizes[-1], cfg.size_edge)
            content = to_tensor(resize(frame, hw))
            if index < resumed:  # finished earlier: only its content frame is needed, for the flow
                prev_content = content
                continue
            start = time.perf_counter()
            frame_cfg = dataclasses.replace(cfg, iterations=vcfg.first_iterations(cfg)) if index == 0 else cfg
            iterations = sum(fit_scales([frame], [styles], frame_cfg).stage_iterations)
            if frame_callback is not None:
                frame_callback(FrameEvent("start", index, total, iterations))

            frame_init, extra, warped, rel = init_image, None, None, None
            if prev_content is not None:
                tf = time.perf_counter()
                forward, backward = flow_pair(prev_content, content, method=vcfg.flow, raft=raft)
                rel = reliability(forward.cpu(), backward.cpu())
                previous = to_tensor(load_image(journal.frame_path(index - 1)))  # as saved: a resumed run sees the same
                warped, _ = warp(previous, backward.cpu(), mode=IMAGE_WARP)
                warped = warped.clamp(0, 1)
                phases["flow"] += time.perf_counter() - tf
                del forward, backward, previous  # a print-size frame's buffers: only what the run uses stays
                if vcfg.starts_warm:
                    start_at = torch.where(rel.disoccluded, content, warped)
                    frame_init = to_pil(color.luminance(start_at) if luminance_only else start_at)
                    frame_cfg = dataclasses.replace(frame_cfg, init=WARPED_INIT)
                    del start_at
                if vcfg.temporal_weight > 0:
                    target = color.luminance(warped) if luminance_only else warped
                    extra = {"temporal": TemporalTerm(target.to(runtime.device), rel.weights.to(runtime.device), vcfg.temporal_weight)}
            prev_content = content  # the next frame's flow starts here; the one before is not needed

            result = stylize(frame, styles, frame_cfg, weights=weights, runtime=runtime, targets=source, cache=memo,
                             init_image=frame_init, callback=callback, model=model, loop_model=net, extra_terms=extra, plan=plan)  # fmt: skip
            phases["targets"] += result.phases.get("targets", 0.0)
            phases["optimisation"] += result.phases.get("optimisation", 0.0)
            if result.status != "done":
                # stylize's "kept the latest image" is not so here: an unfinished frame is dropped.
                reason = result.message.split("; kept ")[0]
                status, message = RunStatus(result.status).value, f"frame {index + 1}: {reason} (the frame is not kept)"
                break
            ts = time.perf_counter()
            err = warping_error(result.image, warped, rel.weights) if warped is not None and rel is not None else None
            info = {
                "seconds": round(time.perf_counter() - start, 4),
                "iterations": result.steps,
                "warping_error": err,
                "reliable": None if rel is None else round(rel.fraction, 4),
                "loss": result.loss_history[-1] if result.loss_history else None,
                "terms": result.loss_terms,
            }
            journal.record(index, result.image, info)
            phases["save"] += time.perf_counter() - ts
            records.append({**journal.entries[-1], "resumed": False})
            if frame_callback is not None:
                frame_callback(FrameEvent("done", index, total, iterations, float(info["seconds"]), err))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        status, message = "interrupted", f"stopped in frame {index + 1}"
    if status == "done" and index + 1 < resumed:
        raise VideoError(f"the input has {index + 1} frames but the work folder holds {resumed} finished ones")
    if status == "done" and index < 0:
        raise VideoError("the input has no frames in the selected range")
    return VideoResult(
        status=status,
        frames=records,
        resumed=resumed,
        phases=phases,
        targets={**source.describe(), **fallback, "style_computed": source.style_computed, "content_computed": source.content_computed},
        message=message,
    )


__all__ = ["FrameEvent", "VideoResult", "stylize_video"]
