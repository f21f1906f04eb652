"""One clip end to end: open it, stylise its frames into the work folder, write the output.

`run_clip` is what `nst video` does for each input, in its own process or on a Ray worker; it
never prints (progress leaves through the callbacks) and writes only the clip's work folder and
output.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from PIL import Image

from ..config import PreserveColors, StyleConfig
from ..device import Runtime
from ..images import output_shape
from ..features import VGGFeatures
from ..jobs.journal import file_digest as sha256_of_file
from ..targets import TargetSource
from ..plan import Plan, PlanError, format_size, format_size_up, weight_bytes
from ..transfer import Iterate, MemoryRequest, TargetCacheLike, check_sizes, plan_for, planned_config
from ..weights import Weights
from .config import VideoConfig
from .flow import RaftFlow
from .journal import FRAMES, FrameJournal
from .media import DEFAULT_FPS, Clip, Encoded, FrameSelection, VideoError, choose_encoder, count_frames, is_video_path, open_clip, read_frames, write_frame_folder, write_video
from .run import FrameEvent, VideoResult, stylize_video

WORK_SUFFIX = ".nst-work"  # the work folder beside the output: OUTPUT.nst-work/


def work_folder(output: Path) -> Path:
    """Where the finished frames and the journal of a run writing `output` live."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def file_digest(path: Path) -> str:
    """16 hex digits of a file's sha256: how the journal tells an edited style or init apart."""
    return sha256_of_file(path)[:16]


@dataclass(frozen=True)
class ClipJob:
    """One input and where its result goes."""

    source: str  # a video file, a folder of frames, or a glob of frame files
    output: Path  # a video file (by its extension) or a folder for numbered PNG frames
    selection: FrameSelection = FrameSelection()
    fps: Fraction | None = None  # the frame rate of frames written as a video (None: 25); a video keeps its own

    @property
    def to_video(self) -> bool:
        return is_video_path(self.output)

    @property
    def encoder(self) -> str | None:
        """The encoder that will write the output (`media.choose_encoder`); None for a folder."""
        return choose_encoder(self.output)[1] if self.to_video else None


@dataclass
class ClipOutcome:
    """What became of one clip."""

    job: ClipJob
    status: str  # "done" | "interrupted" | "nonfinite" | "oom"
    clip: Clip
    result: VideoResult
    journal: FrameJournal
    total: int | None  # output frames expected
    fps: Fraction  # the output's frame rate
    phases: dict[str, float] = field(default_factory=dict)
    encoded: Encoded | None = None  # a video written
    worker: dict[str, object] = field(default_factory=dict)  # where it ran (Ray)
    plan: Plan | None = None  # the memory plan its frames ran by (with a `memory` request)
    cfg: StyleConfig | None = None  # the configuration as it ran (a plan may choose Adam)
    stopped: str = ""  # why a clip whose frames were all done stopped (Ctrl-C while writing)

    @property
    def message(self) -> str:
        return self.stopped or self.result.message


def open_job(job: ClipJob, styles: Sequence[Image.Image], cfg: StyleConfig) -> tuple[Clip, int | None]:
    """Open the job's input and check it before any work: (clip, frames to write). VideoError for
    a broken input or an empty selection, ImageError for frames too small for the layers."""
    clip = open_clip(job.source)
    total = job.selection.count(count_frames(clip))
    if total == 0:
        raise VideoError(f"{job.source} has {count_frames(clip)} frames, none of them in the range {job.selection.start}:{job.selection.stop or ''}")
    first = next(read_frames(clip, job.selection), None)
    if first is None:
        raise VideoError(f"{job.source}: no frame could be decoded in the range {job.selection.start}:{job.selection.stop or ''}")
    check_sizes(first, styles, cfg)
    return clip, total


def frame_bytes(frame_wh: tuple[int, int], cfg: StyleConfig, vcfg: VideoConfig, device: str = "cpu") -> int:
    """What a clip's loop keeps beside each frame's `stylize` (a frame after the first), on the
    run's device: a clip's memory plan counts it as the part `video`. On the host: the content frame
    (kept for the next frame's flow), the previous output warped onto it, the flow's reliability
    (an fp32 weight plane and two bool masks), and the frame and its start image in 8 bits. With
    the temporal term: its target and weights (on the CPU the host's own tensors, off it a copy on
    the device) and the term's autograd buffers at the output size (three images). Off the CPU
    only the device's share counts against the budget."""
    h, w = output_shape(frame_wh[0], frame_wh[1], cfg.sizes[-1], cfg.size_edge)
    plane = h * w * 4
    image = 3 * plane
    luminance = cfg.preserve_colors == PreserveColors.LUMINANCE
    temporal = vcfg.temporal_weight > 0
    terms = 3 * image if temporal else 0
    if str(device).split(":")[0] == "cpu":
        host = 2 * image + plane + 2 * h * w + 3 * h * w + 3 * frame_wh[0] * frame_wh[1]  # the decoded frame at its own size
        return host + terms + (plane if temporal and luminance else 0)  # a luminance target is a new plane
    return terms + ((plane if luminance else image) + plane if temporal else 0)


# What an encoder holds while it writes a clip, per pixel of a frame: the frames in its lookahead
# and their analysis planes. Measured on this project's CPU (write_video of 60-80 frames, the peak
# resident memory it added): libx264 at preset medium 204-224 B/px at 1024x768 and 2048x1536,
# libvpx-vp9 196, mpeg4 55. Rounded up.
ENCODER_BYTES_PER_PIXEL = {"libx264": 240, "libopenh264": 240, "libvpx-vp9": 240, "libvpx": 240, "libaom-av1": 240}
OTHER_ENCODER_BYTES_PER_PIXEL = 64


def encoder_bytes(frame_wh: tuple[int, int], encoder: str) -> int:
    """Host memory `write_video` takes to encode frames of (W, H) with `encoder`."""
    return frame_wh[0] * frame_wh[1] * ENCODER_BYTES_PER_PIXEL.get(encoder, OTHER_ENCODER_BYTES_PER_PIXEL)


def plan_clip(
    frame_wh: tuple[int, int], style_whs: Sequence[tuple[int, int]], cfg: StyleConfig, vcfg: VideoConfig, runtime: Runtime, memory: MemoryRequest,
    *, encoder: str | None = None,
) -> Plan:
    """A clip's memory plan (`transfer.plan_for` for its frame size), counting what the clip's loop
    keeps beside each frame (`frame_bytes`). With `encoder` (the output is a video file), also what
    writing it takes once the frames are done (`Plan.write_bytes`: the encoder's frames in flight,
    with the network still loaded beside it, on the host): a PlanError when that is over the
    budget (off the CPU, over the host memory available)."""
    memory = dataclasses.replace(memory, video_bytes=frame_bytes(frame_wh, cfg, vcfg, str(runtime.device)))
    plan = plan_for(frame_wh, list(style_whs), cfg, runtime, memory)
    if encoder is None:
        return plan
    h, w = output_shape(frame_wh[0], frame_wh[1], cfg.sizes[-1], cfg.size_edge)
    need = encoder_bytes((w - w % 2, h - h % 2), encoder)
    beside = weight_bytes(tuple(cfg.content_layers) + tuple(cfg.style_layers), runtime.precision) + (memory.source_bytes or 0)
    on_cpu = runtime.device.type == "cpu"
    if on_cpu:
        budget = plan.budget_bytes  # as `plan_for` resolved it
    else:
        import torch

        from .. import device  # looked up at the call, as `plan_for` does

        budget = device.default_memory_budget(torch.device("cpu"))
    if need + beside > budget:
        where = f"the {format_size(budget)} budget" if on_cpu else f"the {format_size(budget)} of host memory available"
        raise PlanError(
            f"writing the {w}x{h} video needs about {format_size(need + beside)} ({encoder}'s frames in flight {format_size(need)}, "
            f"the network {format_size(beside)}), more than {where}: "
            + (f"give --max-memory {format_size_up(need + beside)} or more, " if on_cpu else "")
            + "or write the frames to a folder (-o DIR)"
        )
    return dataclasses.replace(plan, write_bytes=need)


# A stylised frame as PNG, as a share of its raw RGB bytes: measured 0.65-0.82 on this project's
# outputs (random weights, 43-512 px); a smoother painting compresses further. The disk check
# refuses a clip only when even half the raw size per frame would not fit.
PNG_SHARE_AT_LEAST = 0.5


def check_disk(job: ClipJob, frame_wh: tuple[int, int], total: int | None, cfg: StyleConfig) -> None:
    """VideoError before any work when the clip's finished frames cannot fit on the disk that holds
    its work folder (`work_folder`), counting the frames already there as done and each new one as
    at least PNG_SHARE_AT_LEAST of its raw size. Frames stay there until the output is written, so
    a long clip at full HD needs tens of GB. An unknown frame count is not checked."""
    if total is None:
        return
    folder = work_folder(job.output)
    h, w = output_shape(frame_wh[0], frame_wh[1], cfg.sizes[-1], cfg.size_edge)
    done = folder / FRAMES
    have = sum(1 for _ in done.glob("*.png")) if done.is_dir() else 0
    need = int(max(0, total - have) * 3 * h * w * PNG_SHARE_AT_LEAST)
    where = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise VideoError(
            f"{job.source}: {total - have} frames of {w}x{h} need at least {format_size(need)} as PNG in {folder} until the output is "
            f"written, and that disk has {format_size(free)} free: free some space, or stylise fewer frames (--frames A:B, --every N)"
        )


def run_clip(
    job: ClipJob,
    styles: Sequence[Image.Image],
    cfg: StyleConfig,
    vcfg: VideoConfig,
    *,
    weights: Weights,
    identity: dict[str, object],
    runtime: Runtime | None = None,
    targets: TargetSource | None = None,
    cache: TargetCacheLike | None = None,
    raft: RaftFlow | None = None,
    init_image: Image.Image | None = None,
    model: VGGFeatures | None = None,
    on_start: Callable[[Clip, int | None], None] | None = None,
    frame_callback: Callable[[FrameEvent], None] | None = None,
    callback: Callable[[Iterate], None] | None = None,
    opened: tuple[Clip, int | None] | None = None,
    memory: MemoryRequest | Plan | None = None,
) -> ClipOutcome:
    """Stylise one clip, resuming from its work folder, and write its output (then drop the work
    folder). `identity` names what else decides the frames (style and init digests): the
    journal resumes only a run with the same input, settings and identity. `opened` is what
    `open_job` returned for this job, where the caller checked it already (it is not opened,
    counted and decoded twice). `memory` asks for a memory plan (`transfer.plan_for`, made on
    this runtime for the clip's frame size), or is one the caller made so: every frame runs by
    it, tiled where it says, and with the optimiser it chose."""
    phases: dict[str, float] = {}
    t = time.perf_counter()
    clip, total = opened if opened is not None else open_job(job, styles, cfg)
    phases["open"] = time.perf_counter() - t
    plan = plan_clip((clip.width, clip.height), [s.size for s in styles], cfg, vcfg, runtime or Runtime(), memory, encoder=job.encoder) if isinstance(memory, MemoryRequest) else memory
    if plan is not None:
        cfg = planned_config(cfg, plan)
    check_disk(job, (clip.width, clip.height), total, cfg)
    rt = runtime or Runtime()
    full_identity = {
        "input": clip.identity(), **identity, "config": cfg.to_dict(), "video": vcfg.to_dict(), "frames": job.selection.to_dict(),
        "weights": weights.fingerprint,
        # What else decides a frame's pixels: the precision and device type it ran at, where its
        # targets came from, and the masks' contents (a mask edited in place keeps its path).
        "precision": rt.precision.value, "device": rt.device.type,
        "targets": [getattr(targets, "name", "torch"), getattr(targets, "identity", "")],
        "masks": [file_digest(Path(p)) for p in cfg.mask_files()],
        # Tiled and whole frames differ by rounding: a run resumes only frames made the same way.
        **({"tiles": [s.tile if s.mode == "tiled" else None for s in plan.stages]} if plan is not None else {}),
    }  # fmt: skip
    journal = FrameJournal(work_folder(job.output), full_identity)
    if on_start is not None:
        on_start(clip, total)
    result = stylize_video(
        read_frames(clip, job.selection), styles, cfg, vcfg, weights=weights, journal=journal, runtime=runtime, targets=targets,
        cache=cache, total=total, raft=raft, init_image=init_image, model=model, frame_callback=frame_callback, callback=callback, plan=plan,
    )  # fmt: skip
    phases.update(result.phases)
    rate = clip.fps if clip.kind == "video" and clip.fps else (job.fps or DEFAULT_FPS)
    out = ClipOutcome(job, result.status, clip, result, journal, total, job.selection.fps(rate), phases, plan=plan, cfg=cfg)
    if result.status != "done":
        return out
    t = time.perf_counter()
    frames = journal.frame_paths()
    try:
        if job.to_video:
            audio_from = clip.path if clip.kind == "video" and clip.audio else None
            window = (job.selection.start / rate, job.selection.stop / rate if job.selection.stop is not None else None)
            out.encoded = write_video(frames, job.output, fps=out.fps, audio_from=audio_from, window=window)
        else:
            write_frame_folder(frames, job.output)
    except KeyboardInterrupt:  # nothing half-written (both write atomically); the frames stay for a rerun
        out.status, out.stopped = "interrupted", f"stopped while writing {job.output}"
        return out
    phases["write"] = time.perf_counter() - t
    journal.remove()
    return out


__all__ = ["PNG_SHARE_AT_LEAST", "WORK_SUFFIX", "ClipJob", "ClipOutcome", "check_disk", "file_digest", "open_job", "run_clip", "work_folder"]
