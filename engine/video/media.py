"""Frames in and out: video files through PyAV (FFmpeg), folders or globs of frames through Pillow.

PyAV is imported only here and only when a video is opened or written, so `import nst.engine`
never pays for it.
"""

from __future__ import annotations

import glob
import re
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, EngineError
from ..files import is_glob, new_folder_mode, temp_prefix, write_atomic
from ..images import load_image

# Containers we write, by extension, with FFmpeg's muxer name and the encoders to try in order:
# H.264 first (plays everywhere), then what the installed FFmpeg has that the container holds.
CONTAINERS: dict[str, tuple[str, tuple[str, ...]]] = {
    ".mp4": ("mp4", ("libx264", "libopenh264", "h264_videotoolbox", "mpeg4")),
    ".m4v": ("mp4", ("libx264", "libopenh264", "h264_videotoolbox", "mpeg4")),
    ".mov": ("mov", ("libx264", "libopenh264", "h264_videotoolbox", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "libopenh264", "libvpx-vp9", "mpeg4")),
    ".webm": ("webm", ("libvpx-vp9", "libvpx", "libaom-av1")),
    ".avi": ("avi", ("libx264", "mpeg4")),
}
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_FPS = Fraction(25)  # for a folder of frames, which carries no frame rate


class VideoError(EngineError):
    """A video or frame folder that cannot be read or written; the message names the file."""


def is_video_path(path: Path) -> bool:
    """Whether `path` names a video file by its extension (else it is a folder of frames)."""
    return Path(path).suffix.lower() in CONTAINERS


# `every`'s bound: the output's frame rate is the source's over it, and a 20-digit one overflowed
# FFmpeg's rational with a traceback. A million frames is over nine hours at 30 fps.
MAX_EVERY = 1_000_000


@dataclass(frozen=True)
class FrameSelection:
    """`--frames A:B` and `--every N`: source frames A (from 0) up to B (excluded), every Nth."""

    start: int = 0
    stop: int | None = None  # None: to the end
    every: int = 1

    def __post_init__(self) -> None:
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ConfigError(f"`frames` range {self.start}:{'' if self.stop is None else self.stop} is empty: use A:B with 0 <= A < B", params=("frames",))
        if not 1 <= self.every <= MAX_EVERY:
            raise ConfigError(f"`every` must be 1 to {MAX_EVERY}, got {self.every}", params=("every",))

    @classmethod
    def parse(cls, text: str | None, every: int = 1) -> "FrameSelection":
        """`A:B`, `A:` or `:B` (a Python slice of frame numbers from 0)."""
        if text is None or text.strip() in ("", ":"):
            return cls(every=every)
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
        if not m:
            raise ConfigError(f"bad `frames` range {text!r}: use A:B (frames A to B-1, counting from 0), A: or :B", params=("frames",))
        return cls(int(m.group(1) or 0), int(m.group(2)) if m.group(2) else None, every)

    def picks(self, index: int) -> bool:
        return index >= self.start and (self.stop is None or index < self.stop) and (index - self.start) % self.every == 0

    def count(self, total: int | None) -> int | None:
        """How many frames a source of `total` frames gives (None if unknown)."""
        if total is None:
            return None
        end = total if self.stop is None else min(total, self.stop)
        return max(0, -(-(end - self.start) // self.every))

    def fps(self, fps: Fraction) -> Fraction:
        """The output's frame rate: every Nth frame at 1/N the rate keeps the clip's duration."""
        return fps / self.every

    def to_dict(self) -> dict[str, object]:
        return {"start": self.start, "stop": self.stop, "every": self.every}


@dataclass
class Clip:
    """An opened input: a video file, or an ordered list of frame files."""

    path: Path
    kind: str  # "video" | "frames"
    fps: Fraction | None  # None for frames (they carry none)
    frames: int | None  # frames in the source; None when the container does not say
    width: int
    height: int
    audio: bool = False
    codec: str = ""
    files: list[Path] = field(default_factory=list)
    turn: str | None = None  # how a player shows the stored frames (`_TURNS`): a phone's portrait clip is "rotate 90 clockwise"

    def describe(self) -> dict[str, object]:
        return {"path": str(self.path), "kind": self.kind, "fps": str(self.fps) if self.fps else None, "frames": self.frames,
                "size": f"{self.width}x{self.height}", "codec": self.codec or None, "audio": self.audio, "turned": self.turn}  # fmt: skip

    def identity(self) -> dict[str, object]:
        """What tells this input apart from an edited one (for resuming): names, sizes, times."""
        files = [self.path] if self.kind == "video" else self.files
        return {"kind": self.kind, "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _av_message(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return str(text).splitlines()[0] if text else type(e).__name__


def _natural_key(path: Path) -> list[object]:
    """frame2 before frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def frame_files(source: str) -> list[Path]:
    """A folder's frames or a glob's files, in natural order; VideoError where there are none."""
    p = Path(source)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FRAME_EXTENSIONS and not f.name.startswith(".")]
        if not files:
            raise VideoError(f"{p}: a folder without frames ({', '.join(FRAME_EXTENSIONS)})")
    elif is_glob(source):
        files = [Path(f) for f in glob.glob(source) if Path(f).is_file()]
        if not files:
            raise VideoError(f"{source}: no files match this pattern")
    else:
        raise VideoError(f"input not found: {source}")
    return sorted(files, key=_natural_key)


def open_clip(source: str | Path) -> Clip:
    """Open a video file (anything FFmpeg decodes), a folder of frames or a glob of frame files."""
    text = str(source)
    p = Path(text)
    if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS:
        raise VideoError(f"{p} is a still image; give a video, a folder of frames or a glob of them (nst stylize takes one image)")
    if not p.is_file():
        files = frame_files(text)
        first = load_image(files[0])
        return Clip(p, "frames", None, len(files), first.width, first.height, files=files)
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoError(f"{p}: no video stream in this file (or it is damaged or cut short)")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if not ctx.width or not ctx.height:
                raise VideoError(f"{p}: the video stream has no frame size")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            turn = _display_turn(container, stream)
            w, h = (ctx.height, ctx.width) if turn in _SIDEWAYS else (ctx.width, ctx.height)  # as a player shows it
            return Clip(p, "video", Fraction(rate) if rate else None, stream.frames or None, w, h,
                        audio=bool(container.streams.audio), codec=ctx.name, turn=turn)  # fmt: skip
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{p}: not a video FFmpeg can read ({_av_message(e)})") from None


# How a player shows the stored frames, as Pillow's lossless turn that does the same.
_TURNS = {
    "rotate 90 counterclockwise": Image.Transpose.ROTATE_90, "rotate 180": Image.Transpose.ROTATE_180,
    "rotate 90 clockwise": Image.Transpose.ROTATE_270, "mirror left-right": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip top-bottom": Image.Transpose.FLIP_TOP_BOTTOM, "transpose": Image.Transpose.TRANSPOSE, "transverse": Image.Transpose.TRANSVERSE,
}  # fmt: skip
_SIDEWAYS = ("rotate 90 counterclockwise", "rotate 90 clockwise", "transpose", "transverse")


def display_turn(matrix: Sequence[int]) -> str | None:
    """The turn (a key of `_TURNS`) that a display matrix (9 int32, 16.16 fixed point, as
    QuickTime and FFmpeg store it: a stored pixel (x, y) is shown at (a x + c y, b x + d y)) makes
    of the stored frames; None for none, or for a matrix that is no turn or flip by a multiple of
    90 degrees (shown as stored). Found by moving a small pattern as the matrix says and asking
    which of Pillow's turns gives the same picture."""
    a, b, c, d = (round(matrix[i] / 65536) for i in (0, 1, 3, 4))
    if any(abs(matrix[i] - v * 65536) > 64 for i, v in zip((0, 1, 3, 4), (a, b, c, d))) or abs(a * d - b * c) != 1:
        return None
    pattern = np.arange(6, dtype=np.uint8).reshape(2, 3)
    ys, xs = np.mgrid[0:2, 0:3]
    sx, sy = a * xs + c * ys, b * xs + d * ys
    shown = np.zeros((sy.max() - sy.min() + 1, sx.max() - sx.min() + 1), np.uint8)
    shown[sy - sy.min(), sx - sx.min()] = pattern
    stored = Image.fromarray(pattern)
    return next((name for name, op in _TURNS.items() if np.array_equal(np.asarray(stored.transpose(op)), shown)), None)


def _display_turn(container: Any, stream: Any) -> str | None:
    """The stream's display turn (a phone records a portrait clip as landscape frames and a
    display matrix), read from its first frame's side data (or, on an older PyAV, its rotation)."""
    for frame in container.decode(stream):
        for data in getattr(frame, "side_data", ()) or ():
            if "DISPLAYMATRIX" in str(getattr(data, "type", "")) and len(bytes(data)) == 36:
                return display_turn(struct.unpack("=9i", bytes(data)))
        rotation = int(round((getattr(frame, "rotation", 0) or 0) / 90)) * 90 % 360  # counterclockwise degrees
        return {90: "rotate 90 counterclockwise", 180: "rotate 180", 270: "rotate 90 clockwise"}.get(rotation)
    return None


def read_frames(clip: Clip, selection: FrameSelection = FrameSelection()) -> Iterator[Image.Image]:
    """The selected frames in order, as RGB Pillow images of the first frame's size."""
    if clip.kind == "frames":
        for i, f in enumerate(clip.files):
            if selection.stop is not None and i >= selection.stop:
                return
            if selection.picks(i):
                im = load_image(f)
                if im.size != (clip.width, clip.height):
                    raise VideoError(f"{f} is {im.width}x{im.height} but the first frame is {clip.width}x{clip.height}; frames must share one size")
                yield im
        return
    import av

    try:
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if selection.stop is not None and i >= selection.stop:
                    return
                if selection.picks(i):
                    im = frame.to_image()  # RGB, in the stream's own size
                    if clip.turn is not None:  # as players show it (the output carries no display matrix)
                        im = im.transpose(_TURNS[clip.turn])
                    if im.size != (clip.width, clip.height):
                        im = im.resize((clip.width, clip.height), Image.Resampling.LANCZOS)  # a mid-stream size change
                    yield im
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{clip.path}: decoding failed ({_av_message(e)})") from None


def count_frames(clip: Clip) -> int:
    """The source's frame count, by demuxing (no decoding) when the container does not store it."""
    if clip.frames is not None:
        return clip.frames
    import av

    try:
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{clip.path}: cannot count frames ({_av_message(e)})") from None


def choose_encoder(path: Path) -> tuple[str, str]:
    """(muxer, encoder) for an output file: the first encoder of the container's list that the
    installed FFmpeg has."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        raise VideoError(f"cannot write {Path(path).name!r}: unknown video extension {suffix or '(none)'!r}; use {', '.join(CONTAINERS)} or a folder")
    muxer, encoders = CONTAINERS[suffix]
    for name in encoders:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # not built into this FFmpeg
            continue
        return muxer, name
    raise VideoError(f"this FFmpeg build has none of the encoders {', '.join(encoders)} for {suffix}; write a folder of frames instead")


@dataclass
class Encoded:
    """What `write_video` wrote."""

    path: Path
    encoder: str
    frames: int
    fps: Fraction
    size: tuple[int, int]  # (W, H) in the file
    audio: bool  # audio packets were copied
    note: str = ""  # why audio was not copied, if it was asked for


def _encode(tmp: Path, muxer: str, encoder: str, frames: Sequence[Path], fps: Fraction, audio_from: Path | None, window: tuple[Fraction, Fraction | None]) -> tuple[int, tuple[int, int], int]:
    """Write the video; (frames, (W, H), audio packets copied)."""
    import av

    first = Image.open(frames[0])
    # 4:2:0 chroma needs even sides: drop a last odd row or column rather than stretch the frame.
    w, h = first.width - first.width % 2, first.height - first.height % 2
    if w < 2 or h < 2:
        raise VideoError(f"frames of {first.width}x{first.height} are too small to encode")
    # Frames are numbered in this time base. Not the stream's: the muxer replaces that when it
    # writes the header, on the first packet, which H.264's lookahead delays by some 40 frames;
    # frames numbered in the new one all fell on time 0 and the mux failed ("pts < dts").
    tick = Fraction(1) / fps
    with av.open(str(tmp), "w", format=muxer) as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = tick
        if encoder == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        elif encoder.startswith("libvpx"):
            stream.options = {"crf": "24", "b": "0"}
        else:
            stream.bit_rate = max(1_000_000, w * h * 8)
        audio_in = audio_out = None
        src = None
        if audio_from is not None:
            src = av.open(str(audio_from))
            if src.streams.audio:
                audio_in = src.streams.audio[0]
                audio_out = out.add_stream_from_template(audio_in)
        for i, f in enumerate(frames):
            with Image.open(f) as im:
                frame = av.VideoFrame.from_image(im.convert("RGB").crop((0, 0, w, h)))
            frame.pts = i
            frame.time_base = tick
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        copied = 0
        if audio_in is not None and src is not None:
            # `window` counts from the first video frame; packets carry the source's own clock,
            # which need not start at 0 (MPEG-TS, a camera's or a cut clip's): it was put 10 s out
            # of sync, and a --frames window then copied nothing.
            origin = _video_origin(src)
            lo, hi = origin + window[0], (origin + window[1]) if window[1] is not None else None
            shift = int(lo / audio_in.time_base)
            for packet in src.demux(audio_in):
                if packet.pts is None or packet.size == 0:
                    continue
                t = packet.pts * audio_in.time_base
                if t < lo or (hi is not None and t >= hi):
                    continue
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = audio_out
                out.mux(packet)
                copied += 1
            src.close()
    return len(frames), (w, h), copied


def _video_origin(container: Any) -> Fraction:
    """When the source's first video frame is due, in seconds of its own clock (0 for most files)."""
    if container.streams.video:
        v = container.streams.video[0]
        if v.start_time is not None and v.time_base is not None:
            return Fraction(v.start_time) * v.time_base
    return Fraction(container.start_time or 0, 1_000_000)  # AV_TIME_BASE


def write_video(frames: Sequence[Path], out: Path, *, fps: Fraction, audio_from: Path | None = None, window: tuple[Fraction, Fraction | None] = (Fraction(0), None)) -> Encoded:
    """Encode frame files into `out` atomically, copying `audio_from`'s first audio stream (its
    packets within `window`, in seconds) when there is one. An audio stream the container cannot
    hold is left out with a note rather than failing the video."""
    import av

    if not frames:
        raise VideoError("no frames to encode")
    muxer, encoder = choose_encoder(out)
    note = ""
    try:
        n, size, copied = 0, (0, 0), 0

        def write(tmp: Path) -> None:
            nonlocal n, size, copied
            n, size, copied = _encode(tmp, muxer, encoder, frames, fps, audio_from, window)

        try:
            write_atomic(out, write)
        except (av.FFmpegError, ValueError) as e:
            if audio_from is None or isinstance(e, VideoError):
                raise
            note = f"the audio stream could not be copied into {out.suffix} ({_av_message(e)})"
            audio_from = None
            write_atomic(out, write)
    except VideoError:
        raise
    except av.FFmpegError as e:
        raise VideoError(f"cannot write {out}: {_av_message(e)}") from None
    return Encoded(out, encoder, n, fps, size, audio=copied > 0, note=note)  # what was copied, not what the source has


def write_frame_folder(frames: Sequence[Path], out: Path) -> Path:
    """Put the frame files into the folder `out` (made, or empty) as 000001.png, 000002.png...

    They are copied into a hidden folder beside `out` first and moved into place together, so
    `out` never holds half a clip."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VideoError(f"output folder {out} is not empty; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out.name)))  # named for sweeps to find
    try:
        for i, f in enumerate(frames, 1):
            shutil.copyfile(f, tmp / f"{i:06d}{f.suffix}")
        # A folder gets what mkdir would give it (or the empty one it replaces keeps its own),
        # not mkdtemp's private 0700.
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode) if out.exists() else new_folder_mode())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["CONTAINERS", "Clip", "Encoded", "FrameSelection", "VideoError", "choose_encoder", "count_frames", "is_video_path",
           "open_clip", "read_frames", "write_frame_folder", "write_video"]  # fmt: skip
