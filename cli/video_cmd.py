"""`nst video`: a clip stylised frame by frame with temporal consistency, resumable.

torch, PyAV and OpenCV are imported inside the command, so `nst --help` pays for none of them.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nst.engine import config as C
from nst.engine.video.config import DEFAULT_TEMPORAL_WEIGHT, FlowMethod, VideoConfig

from .common import UserError, console, fail, load_weights_for, torch_hub_dir, user_errors
from .stylize_cmd import config_from_options, same_file, stylize_parameters

WORK_SUFFIX = ".nst-work"  # the work folder beside OUTPUT: OUTPUT.nst-work/


def work_folder(output: Path) -> Path:
    """Where the finished frames and the journal of a run writing `output` live."""
    return output.with_name(output.name + WORK_SUFFIX)


def video_command(**a: Any) -> None:
    """Stylise a video or a sequence of frames with temporal consistency (Ruder et al. 2016).

    Each frame starts from the previous output warped by the optical flow and is held to it where
    the flow is reliable. Finished frames are kept in OUTPUT.nst-work beside the output: run the
    same command again after an interruption and it continues from the last finished frame.
    Every stylize option applies to each frame; any given here overrides the --preset.
    """
    with user_errors():
        _run(**a)


def _video_parameters() -> list[inspect.Parameter]:
    P = inspect.Parameter

    def opt(name: str, annotation: Any, default: Any = P.empty) -> inspect.Parameter:
        return P(name, P.KEYWORD_ONLY, annotation=annotation, default=default)

    return [
        opt("source", Annotated[str, typer.Argument(help="A video file (anything FFmpeg decodes), a folder of frames, or a quoted glob such as 'shots/*.png'.", show_default=False, metavar="INPUT")]),
        opt("styles", Annotated[list[Path], typer.Argument(help="One or more style images.", show_default=False, metavar="STYLE...")]),
        opt("output", Annotated[Path, typer.Option("--output", "-o", help="A video file (.mp4, .mkv, .mov, .webm, .avi; H.264 where the container takes it) or a folder for numbered PNG frames.", show_default=False)]),
        opt("frames", Annotated[Optional[str], typer.Option(help="Source frames A:B, counting from 0, B excluded (also A: or :B) [all].", show_default=False)], None),
        opt("every", Annotated[int, typer.Option(help="Take every Nth frame, a quick preview; the output's frame rate is divided by N.")], 1),
        opt("flow", Annotated[FlowMethod, typer.Option(help="Optical flow: dis or farneback (OpenCV, CPU), raft (torchvision's, needs its weights).")], FlowMethod.DIS),
        opt("flow_weights", Annotated[Optional[Path], typer.Option(help="A RAFT weights file for --flow raft [torchvision's file in the torch hub cache].", show_default=False)], None),
        opt("temporal_weight", Annotated[float, typer.Option(help="Weight of the temporal loss (the warped previous output); 0 stylises every frame independently.")], DEFAULT_TEMPORAL_WEIGHT),
        opt("iterations_first", Annotated[Optional[int], typer.Option(help="Iterations per scale for the first frame [2 x --iterations].", show_default=False)], None),
        opt("fps", Annotated[Optional[float], typer.Option(help="Frame rate of a folder of frames written as a video [25]; a video keeps its own.", show_default=False)], None),
    ]


# stylize's own options follow the video ones: what it takes per image, it takes per frame. Not
# taken: its CONTENT, STYLE and -o (replaced above), --save-every and --compare (per image).
video_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [*_video_parameters(), *stylize_parameters(without=("content", "styles", "output", "save_every", "compare"))], return_annotation=None
)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _check_paths(source: str, styles: list[Path], output: Path, report: Path | None, init: Path | None) -> bool:
    """Refuse outputs that would overwrite an input; returns whether OUTPUT is a video file."""
    from nst.engine.video.media import FRAME_EXTENSIONS, choose_encoder, is_video_path

    inputs = [Path(source), *styles, *([init] if init is not None else [])]
    for p in inputs:
        if same_file(output, p):
            raise UserError(f"output {output} is one of the inputs; inputs are never overwritten, choose another name")
    if report is not None and any(same_file(report, p) for p in [*inputs, output]):
        raise UserError(f"the report path {report} would overwrite an input or the output")
    if is_video_path(output):
        if output.is_dir():
            raise UserError(f"output {output} is a folder; give a file name or a folder without a video extension")
        choose_encoder(output)  # an FFmpeg without a fitting encoder fails here, before any work
        return True
    if output.suffix.lower() in FRAME_EXTENSIONS or (output.suffix and not output.is_dir()):
        raise UserError(f"output {output}: use a video file (.mp4, .mkv, .mov, .webm, .avi) or a folder for the frames")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"output folder {output} is not empty; choose a new or empty folder for the frames")
    return False


def _run(**a: object) -> None:  # noqa: C901 - a linear script of the run's phases
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nst.engine.device import Runtime, resolve_device, resolve_precision
    from nst.engine.files import remove, temporaries_beside
    from nst.engine.images import load_image
    from nst.engine.transfer import Iterate, check_sizes
    from nst.engine.video.flow import RaftFlow, find_raft_weights
    from nst.engine.video.journal import FrameJournal
    from nst.engine.video.media import DEFAULT_FPS, FrameSelection, count_frames, open_clip, read_frames, write_frame_folder, write_video
    from nst.engine.video.run import FrameEvent, stylize_video

    from .report import versions, write_json
    from .targets_opt import choose_targets

    source, styles, output = str(a["source"]), [Path(p) for p in a["styles"]], Path(a["output"])  # type: ignore[union-attr]
    report = Path(a["report"]) if a["report"] is not None else None  # type: ignore[arg-type]
    quiet = bool(a["quiet"])
    init = Path(a["init"]) if isinstance(a["init"], str) and a["init"] not in C.INIT_CHOICES else None
    to_video = _check_paths(source, styles, output, report, init)
    swept = remove(temporaries_beside(output))  # what killed runs writing this output left
    if swept and not quiet:
        console.print(f"removed {len(swept)} stale temporaries beside {output} that killed runs left")
    cfg = config_from_options({**a, "save_every": None})
    if cfg.style_blend and len(cfg.style_blend) != len(styles):
        raise UserError(f"--style-blend has {len(cfg.style_blend)} weights for {len(styles)} style images")
    vcfg = VideoConfig(temporal_weight=float(a["temporal_weight"]), iterations_first=a["iterations_first"], flow=a["flow"])  # type: ignore[arg-type]
    selection = FrameSelection.parse(a["frames"], int(a["every"]))  # type: ignore[arg-type]
    if a["fps"] is not None and not (0 < float(a["fps"]) <= 1000):  # type: ignore[arg-type]
        raise UserError(f"--fps must be above 0 and at most 1000, got {a['fps']}")
    dev = resolve_device(str(a["device"]))
    runtime = Runtime(device=dev, precision=resolve_precision(dev, str(a["precision"])))
    phases: dict[str, float] = {}

    t = time.perf_counter()
    clip = open_clip(source)
    style_ims = [load_image(p) for p in styles]
    init_im = load_image(init) if init is not None else None
    total = selection.count(count_frames(clip))
    if total == 0:
        raise UserError(f"{source} has {count_frames(clip)} frames: none in --frames {a['frames']}")
    phases["open"] = time.perf_counter() - t
    first = next(read_frames(clip, selection))
    check_sizes(first, style_ims, cfg)
    raft = None
    if vcfg.flow == FlowMethod.RAFT:
        raft = RaftFlow(find_raft_weights(hub_dir=torch_hub_dir(), path=a["flow_weights"]), device=runtime.device)  # type: ignore[arg-type]
    elif a["flow_weights"] is not None:
        raise UserError("--flow-weights is for --flow raft")

    t = time.perf_counter()
    w = load_weights_for(str(a["weights"]), cfg.seed)
    phases["weights"] = time.perf_counter() - t
    if w.is_random and not quiet:
        console.print(f"[yellow]weights: {w.description}, not pretrained: the result shows the method at work, not a painting[/]")
    t = time.perf_counter()
    target_source, cache, targets_info = choose_targets(
        a["targets"], cfg=cfg, weights=w, runtime=runtime, onnx_path=a["onnx"], provider=a["provider"], quiet=quiet  # type: ignore[arg-type]
    )
    phases["target setup"] = time.perf_counter() - t

    identity = {
        "input": clip.identity(), "styles": [_digest(p) for p in styles], "init": _digest(init) if init is not None else None,
        "config": cfg.to_dict(), "video": vcfg.to_dict(), "frames": selection.to_dict(), "weights": w.fingerprint,
    }  # fmt: skip
    journal = FrameJournal(work_folder(output), identity)

    progress: Progress | None = None
    tasks: dict[str, int] = {}
    if not quiet:
        progress = Progress(
            TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
    last_read = [0.0]

    def on_frame(ev: FrameEvent) -> None:
        if progress is None:
            return
        if not tasks:  # the clip's bar above the frame's
            tasks["video"] = progress.add_task("video", total=ev.total, completed=ev.index, info="")
            tasks["frame"] = progress.add_task("frame", total=ev.iterations, info="")
        if ev.kind == "start":
            progress.reset(tasks["frame"], total=ev.iterations, description=f"frame {ev.index + 1}", info="")
        else:
            err = "" if ev.warping_error is None else f", warping error {ev.warping_error:.2f}"
            progress.update(tasks["video"], completed=ev.index + 1, info=f"{ev.seconds:.1f} s/frame{err}")

    def on_iterate(it: Iterate) -> None:
        if progress is None or "frame" not in tasks:
            return
        now = time.perf_counter()
        fields = {}
        if now - last_read[0] > 0.25 or it.step == it.total_steps:
            last_read[0] = now
            fields["info"] = f"loss {float(it.loss):.4g}"
        progress.update(tasks["frame"], total=it.total_steps, completed=it.step, **fields)

    frames_iter = read_frames(clip, selection)
    try:
        if progress is not None:
            progress.start()
        result = stylize_video(
            frames_iter, style_ims, cfg, vcfg, weights=w, journal=journal, runtime=runtime, targets=target_source, cache=cache,
            total=total, raft=raft, init_image=init_im, frame_callback=on_frame, callback=on_iterate,
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.stop()
    for k in ("model", "flow", "targets", "optimisation", "save"):
        phases[k] = result.phases[k]
    if journal.restarted and not quiet:
        console.print(f"[yellow]note:[/] {journal.restarted}")
    if result.resumed and not quiet:
        console.print(f"resumed: {result.resumed} frame(s) finished by an earlier run were kept, not redone")

    if result.status != "done":
        kept = len(journal.entries)
        if result.status == "interrupted":
            console.print(f"[yellow]interrupted:[/] {result.message}; {kept} finished frame(s) are kept in {journal.folder}: run the same command again to continue")
            raise typer.Exit(130)
        raise fail(f"{result.message}; {kept} finished frame(s) are kept in {journal.folder}", code=1)

    t = time.perf_counter()
    fps = clip.fps if clip.kind == "video" and clip.fps else (Fraction(str(a["fps"])).limit_denominator(1001) if a["fps"] is not None else DEFAULT_FPS)
    paths = journal.frame_paths()
    encoded = None
    if to_video:
        audio_from = clip.path if clip.kind == "video" and clip.audio else None
        window = (selection.start / fps, selection.stop / fps if selection.stop is not None else None)
        encoded = write_video(paths, output, fps=selection.fps(fps), audio_from=audio_from, window=window)
        if encoded.note:
            console.print(f"[yellow]warning:[/] {encoded.note}; wrote the video without it")
    else:
        write_frame_folder(paths, output)
    phases["write"] = time.perf_counter() - t
    journal.remove()

    errors = result.warping_errors
    mean_err = result.warping_error_mean
    spf = result.seconds_per_frame
    out_desc: dict[str, object] = {"path": str(output), "kind": "video" if to_video else "frames", "frames": len(paths), "fps": str(selection.fps(fps))}
    if encoded is not None:
        out_desc.update(encoder=encoded.encoder, size=f"{encoded.size[0]}x{encoded.size[1]}", audio=encoded.audio)
    if report is not None:
        write_json(report, {
            "output": out_desc, "input": clip.describe(), "status": result.status,
            "frames": {"total": len(paths), "computed": len(paths) - result.resumed, "resumed": result.resumed},
            "phases": phases, "seconds_per_frame": spf,
            "temporal": {"weight": vcfg.temporal_weight, "flow": vcfg.flow.value, "warm_start": vcfg.starts_warm,
                         "warping_error_mean": mean_err, "warping_error_per_frame": errors,
                         "reliable_fraction_per_frame": [f.get("reliable") for f in result.frames]},
            "per_frame": result.frames,
            "device": str(runtime.device), "precision": runtime.precision.value, "weights": w.to_dict(),
            "targets": {**result.targets, **targets_info}, "config": cfg.to_dict(), "video": vcfg.to_dict(),
            "selection": selection.to_dict(), "versions": {**versions(), **_media_versions()},
        })  # fmt: skip
    if not quiet:
        console.print(_closing_table(result, phases, runtime, out_desc, mean_err, spf))
        audio = ", audio copied" if encoded is not None and encoded.audio else ""
        how = f"{encoded.encoder}, {encoded.size[0]}x{encoded.size[1]}, " if encoded is not None else "PNG frames, "
        console.print(f"wrote {output} ({len(paths)} frames, {how}{out_desc['fps']} fps{audio})")


def _media_versions() -> dict[str, str]:
    out = {}
    for mod, name in (("av", "av"), ("cv2", "opencv")):
        try:
            out[name] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _closing_table(result, phases: dict[str, float], runtime, out_desc: dict, mean_err: float | None, spf: float | None):  # -> rich Table
    from rich.table import Table

    table = Table(title="video", show_header=True, header_style="bold")
    table.add_column("frame", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("iterations", justify="right")
    table.add_column("reliable", justify="right")
    table.add_column("warping error", justify="right")
    rows = result.frames
    shown = rows if len(rows) <= 24 else rows[:10] + [None] + rows[-10:]
    for i, f in enumerate(shown):
        if f is None:
            table.add_row("...", "", "", "", "")
            continue
        n = f["index"] + 1
        err = "-" if f.get("warping_error") is None else f"{f['warping_error']:.2f}"
        rel = "-" if f.get("reliable") is None else f"{100 * f['reliable']:.0f}%"
        table.add_row(str(n), "resumed" if f.get("resumed") else f"{f['seconds']:.2f}", str(f["iterations"]), rel, err)
    table.add_section()
    table.add_row("mean", "-" if spf is None else f"{spf:.2f}", "", "", "-" if mean_err is None else f"{mean_err:.2f}", style="bold")
    total = sum(phases.values())
    table.caption = (
        f"warping error: mean |output t - warped output t-1| over reliable pixels, 8-bit levels. "
        f"{result.resumed} frame(s) resumed. Phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f"; total {total:.2f}. "
        f"{runtime.device}, {runtime.precision.value}; targets {result.targets.get('source')}: style computed {result.targets.get('style_computed')}x, "
        f"content {result.targets.get('content_computed')}x"
    )
    return table
