"""`nst video`: clips stylised frame by frame with temporal consistency, resumable.

torch, PyAV, OpenCV and Ray are imported inside the command, so `nst --help` pays for none of
them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nst.engine import config as C
from nst.engine.files import is_glob, same_file
from nst.engine.video.config import DEFAULT_TEMPORAL_WEIGHT, FlowMethod, VideoConfig

from .common import UserError, check_writable, console, fail, interrupted_code, load_weights_for, ray_device_and_precision, torch_hub_dir, user_errors, warn_if_weights_missing
from .stylize_cmd import config_from_options, keyword_option, memory_request, plan_lines, stylize_parameters
from .targets_opt import check_targets_options, planned_source_bytes

STYLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what marks the first STYLE


def video_command(**a: Any) -> None:
    """Stylise videos with temporal consistency, resumably.

    The method is Ruder, Dosovitskiy and Brox 2016, "Artistic style transfer for videos".

    Each frame starts from the previous output warped by the optical flow and is held to it where
    the flow is reliable. Finished frames are kept in OUTPUT.nst-work beside the output: run the
    same command again after an interruption and it continues from the last finished frame.
    INPUTs come first (video files, folders of frames, quoted globs), then the STYLE images.
    Every stylize option applies to each frame; any given here overrides the --preset.
    """
    with user_errors():
        _run(a)


def _video_parameters() -> list[inspect.Parameter]:
    opt = keyword_option
    return [
        opt("paths", Annotated[list[str], typer.Argument(help="INPUT... then STYLE...: video files (anything FFmpeg decodes), folders of frames or quoted globs ('shots/*.png'), then one or more style images.", show_default=False, metavar="INPUT... STYLE...")]),
        opt("output", Annotated[Path, typer.Option("--output", "-o", help="A video file (.mp4, .mkv, .mov, .webm, .avi; H.264 where the container takes it) or a folder for numbered PNG frames; with several INPUTs, a folder for their videos.", show_default=False)]),
        opt("frames", Annotated[Optional[str], typer.Option(help="Source frames A:B, counting from 0, B excluded (also A: or :B) [all].", show_default=False)], None),
        opt("every", Annotated[int, typer.Option(help="Take every Nth frame, a quick preview; the output's frame rate is divided by N.")], 1),
        opt("flow", Annotated[FlowMethod, typer.Option(help="Optical flow: dis or farneback (OpenCV, CPU), raft (torchvision's, needs its weights).")], FlowMethod.DIS),
        opt("flow_weights", Annotated[Optional[Path], typer.Option(help="A RAFT weights file for --flow raft [torchvision's file in the torch hub cache].", show_default=False)], None),
        opt("temporal_weight", Annotated[float, typer.Option(help="Weight of the temporal loss (the warped previous output); 0 stylises every frame independently.")], DEFAULT_TEMPORAL_WEIGHT),
        opt("iterations_first", Annotated[Optional[int], typer.Option(help="Iterations per scale for the first frame [2 x --iterations].", show_default=False)], None),
        opt("fps", Annotated[Optional[float], typer.Option(help="Frame rate of a folder of frames written as a video [25]; a video keeps its own.", show_default=False)], None),
        opt("ray", Annotated[bool, typer.Option("--ray", help="Several INPUTs on a Ray cluster, one video per worker: the one RAY_ADDRESS names, else a local one.")], False),
        opt("ray_address", Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (host:port, or auto).", show_default=False)], None),
        opt("threads", Annotated[Optional[int], typer.Option("--threads", help="CPU threads per Ray worker (one per that many CPUs), or of the run here [torch's default].", show_default=False)], None),
    ]


# stylize's own options follow the video ones: what it takes per image, it takes per frame. Not
# taken: its CONTENT, STYLE and -o (replaced above), --save-every and --compare (per image). Its
# memory plan (--max-memory, --tile, --dry-run) is made per clip, for the clip's frame size.
video_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [*_video_parameters(), *stylize_parameters(without=("content", "styles", "output", "save_every", "compare"))], return_annotation=None
)


def split_paths(paths: Sequence[str]) -> tuple[list[str], list[Path]]:
    """INPUT... STYLE...: the styles begin at the first image file name (a glob is an input)."""
    first_style = next((i for i, p in enumerate(paths) if Path(p).suffix.lower() in STYLE_SUFFIXES and not is_glob(p)), None)
    if first_style is None:
        last = Path(paths[-1]) if paths else None
        hint = f"; a {last.suffix} is read as a video: save the style as .png" if last is not None and last.suffix.lower() in (".gif", ".apng") else ""
        raise UserError(f"give one or more STYLE images after the INPUT (image files such as style.jpg: {', '.join(STYLE_SUFFIXES)}){hint}")
    if first_style == 0:
        raise UserError(f"{paths[0]} is a still image; give a video, a folder of frames or a quoted glob of them first, then the STYLE images (nst stylize takes one image)")
    inputs, styles = list(paths[:first_style]), [Path(p) for p in paths[first_style:]]
    if bad := [p for p in styles if Path(p).suffix.lower() not in STYLE_SUFFIXES]:
        raise UserError(f"{bad[0]} comes after the STYLE images; give every INPUT before them")
    return inputs, styles


def _outputs(inputs: list[str], output: Path) -> list[Path]:
    """One output per input: OUTPUT itself, or with several inputs OUTPUT/<input's name>.mp4."""
    from nst.engine.video.media import is_video_path

    if len(inputs) == 1:
        return [output]
    if output.suffix or (output.exists() and not output.is_dir()):
        raise UserError(f"with {len(inputs)} INPUTs, -o is a folder for their videos, not {output}")
    names: dict[Path, str] = {}
    for src in inputs:
        p = Path(src)
        # A glob is named for its folder, a folder for itself, as they resolve (`*.png` or `.` in
        # the current folder gave an empty stem: a hidden `.mp4` frames folder).
        folder = p.parent if is_glob(src) else None if p.suffix else p
        stem = (folder.resolve().name or "frames") if folder is not None else p.stem
        out = output / (stem + (p.suffix.lower() if is_video_path(p) else ".mp4"))
        if out in names:
            raise UserError(f"{names[out]} and {src} would both write {out}; give them different names or run them apart")
        names[out] = src
    return list(names)


def _input_files(source: str) -> list[Path]:
    """The files an INPUT names: itself, or a folder's or a glob's frames (none where there are
    none: opening the input says so)."""
    from nst.engine.video.media import VideoError, frame_files

    if Path(source).is_file():
        return [Path(source)]
    try:
        return frame_files(source)
    except VideoError:
        return [Path(source)]


def _check_output(output: Path, inputs: list[Path], report: Path | None) -> None:
    """Refuse an output that would overwrite an input or is neither a video name nor a folder."""
    from nst.engine.video.media import choose_encoder, is_video_path

    for p in inputs:
        if same_file(output, p):
            raise UserError(f"output {output} is one of the inputs; inputs are never overwritten, choose another name")
    if report is not None and any(same_file(report, p) for p in [*inputs, output]):
        raise UserError(f"the report path {report} would overwrite an input (a frame, a mask, a model) or the output")
    check_writable(report, "--report", example="report.json")
    if is_video_path(output):
        if output.is_dir():
            raise UserError(f"output {output} is a folder; give a file name or a folder without a video extension")
        check_writable(output, "output")  # a file where one of its folders would be
        choose_encoder(output)  # an FFmpeg without a fitting encoder fails here, before any work
    elif output.is_dir():  # an existing folder, a dot in its name or not
        if any(output.iterdir()):
            raise UserError(f"output folder {output} is not empty; choose a new or empty folder for the frames")
        check_writable(output, "output", folder=True)
    elif output.suffix or output.exists():  # a new folder's name has no extension: out.mp5 is a typo
        raise UserError(f"output {output}: use a video file (.mp4, .mkv, .mov, .webm, .avi) or a folder for the frames")
    else:
        check_writable(output, "output", folder=True)


def _run(a: Mapping[str, Any]) -> None:  # noqa: C901 - a linear script of the run's phases
    from nst.engine.files import remove, temporaries_beside
    from nst.engine.images import load_image, load_named
    from nst.engine.video.flow import find_raft_weights
    from nst.engine.video.media import FrameSelection
    from nst.engine.video.pipeline import ClipJob, file_digest, open_job

    inputs, styles = split_paths(a["paths"])
    output = Path(a["output"])
    report = Path(a["report"]) if a["report"] is not None else None
    quiet, on_ray = bool(a["quiet"]), bool(a["ray"]) or a["ray_address"] is not None
    check_targets_options(a["targets"], a["onnx"], a["provider"])
    init = Path(a["init"]) if isinstance(a["init"], str) and a["init"] not in C.INIT_CHOICES else None
    outputs = _outputs(inputs, output)
    cfg = config_from_options({**a, "save_every": None})
    # Every file the run reads: a frames folder's or a glob's frames, not the folder or the pattern
    # alone (a --report named as a frame replaced it), and the masks, the model, RAFT's weights.
    read = [f for src in inputs for f in _input_files(src)] + styles + ([init] if init else [])
    read += [Path(p) for p in cfg.mask_files()] + [Path(p) for p in (a["onnx"], a["flow_weights"]) if p is not None]
    for out in outputs:
        _check_output(out, read, report)
        swept = remove(temporaries_beside(out))  # what killed runs writing this output left
        if swept and not quiet:
            console.print(f"removed {len(swept)} stale temporaries beside {out} that killed runs left")
    if cfg.style_blend and len(cfg.style_blend) != len(styles):
        raise UserError(f"--style-blend has {len(cfg.style_blend)} weights for {len(styles)} style images")
    vcfg = VideoConfig(temporal_weight=float(a["temporal_weight"]), iterations_first=a["iterations_first"], flow=a["flow"])
    selection = FrameSelection.parse(a["frames"], int(a["every"]))
    if a["fps"] is not None and not (0 < float(a["fps"]) <= 1000):
        raise UserError(f"--fps must be above 0 and at most 1000, got {a['fps']}")
    C.check_threads(a["threads"])
    fps = Fraction(str(a["fps"])).limit_denominator(1001) if a["fps"] is not None else None
    jobs = [ClipJob(src, out, selection, fps) for src, out in zip(inputs, outputs)]

    style_ims = [load_image(p) for p in styles]
    init_im = load_named(init, "init") if init is not None else None
    raft_file = None
    if vcfg.flow == FlowMethod.RAFT:
        raft_file = find_raft_weights(hub_dir=torch_hub_dir(), path=a["flow_weights"])
    elif a["flow_weights"] is not None:
        raise UserError("--flow-weights is for --flow raft")
    # The plans count ONNX Runtime's session where the targets come from one.
    memory = dataclasses.replace(memory_request(a["max_memory"], a["tile"], a["optimizer_state"]), source_bytes=planned_source_bytes(a["targets"], cfg=cfg, onnx_path=a["onnx"]))
    if a["dry_run"]:
        _dry_run(a, jobs, style_ims, cfg, vcfg, memory, report=report, on_ray=on_ray)
    identity = {"styles": [file_digest(p) for p in styles], "init": file_digest(init) if init is not None else None}
    a = {**a, "memory": memory}
    if len(jobs) == 1 and not on_ray:
        from nst.engine.video.pipeline import plan_clip

        opened = open_job(jobs[0], style_ims, cfg)  # a broken input fails here, before the weights load
        if cfg.mask_files():  # so do masks that cannot be read or have another shape than the frames
            from PIL import Image

            from nst.engine.transfer import resolve_guidance

            resolve_guidance(cfg, [Image.new("L", (opened[0].width, opened[0].height))], [style_ims])
        runtime = _runtime(a)
        plan = plan_clip((opened[0].width, opened[0].height), [s.size for s in style_ims], cfg, vcfg, runtime, memory, encoder=jobs[0].encoder)  # so does a budget too small
        _run_one({**a, "memory": plan}, jobs[0], style_ims, init_im, cfg, vcfg, identity, raft_file, report=report, quiet=quiet, opened=opened, runtime=runtime)
    else:
        _run_many(a, jobs, style_ims, init_im, cfg, vcfg, identity, raft_file, report=report, quiet=quiet, on_ray=on_ray)


def _dry_run(a: Mapping[str, Any], jobs: list, styles: list, cfg: C.StyleConfig, vcfg: VideoConfig, memory: Any, *, report: Path | None, on_ray: bool) -> None:
    """Print each clip's memory plan (and write them under `plans` in --report); exit 0."""
    from nst.engine.transfer import planned_config
    from nst.engine.video.pipeline import open_job, plan_clip

    if on_ray:
        raise UserError("--dry-run plans on this machine's device; with --ray each clip's plan is made on its worker: leave out --ray to see it")
    runtime = _runtime(a)
    plans = []
    for job in jobs:
        clip, _total = open_job(job, styles, cfg)
        plan = plan_clip((clip.width, clip.height), [s.size for s in styles], cfg, vcfg, runtime, memory, encoder=job.encoder)
        plans.append({"input": job.source, "plan": plan.to_dict(), "config": planned_config(cfg, plan).to_dict()})
        if len(jobs) > 1:
            console.print(f"{job.source}:", highlight=False)
        if plan.changes(cfg):
            console.print(f"[yellow]warning:[/] memory plan: {plan.optimizer_note}", highlight=False)
        for line in plan_lines(plan):
            console.print(line, highlight=False)
    warn_if_weights_missing(str(a["weights"]))
    if report is not None:
        from .report import write_json

        write_json(report, {"status": "dry-run", "plans": plans, "device": str(runtime.device), "precision": runtime.precision.value})
        if not a["quiet"]:
            console.print(f"wrote {report} (report)")
    raise typer.Exit(0)


def _runtime(a: Mapping[str, Any]) -> Any:
    """Where a run in this process runs: --device and --precision resolved."""
    from nst.engine.device import Runtime, resolve_device, resolve_precision

    dev = resolve_device(str(a["device"]))
    return Runtime(device=dev, precision=resolve_precision(dev, str(a["precision"])))


def _setup(a: Mapping[str, Any], cfg: C.StyleConfig, runtime: Any, *, quiet: bool) -> tuple[Any, Any, Any, dict[str, object], dict[str, float]]:
    """(weights, target source, cache, target info, phases) for a run in this process."""
    from .targets_opt import choose_targets

    phases: dict[str, float] = {}
    t = time.perf_counter()
    w = load_weights_for(str(a["weights"]), cfg.seed)
    phases["weights"] = time.perf_counter() - t
    if w.is_random and not quiet:
        console.print(f"[yellow]weights: {w.description}, not pretrained: the result shows the method at work, not a painting[/]")
    t = time.perf_counter()
    source, cache, info = choose_targets(a["targets"], cfg=cfg, weights=w, runtime=runtime, onnx_path=a["onnx"], provider=a["provider"], quiet=quiet)
    phases["target setup"] = time.perf_counter() - t
    return w, source, cache, info, phases


class _Bars:
    """The clip's bar (frames, s/frame, ETA) above the frame's (iterations, loss)."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.table import Column

        # At 80 columns a long clip's count stays whole (it was "1100/12…"); the notes give way.
        self.progress = None if quiet else Progress(
            TextColumn("[bold]{task.description}[/]", table_column=Column(no_wrap=True)), BarColumn(bar_width=16),
            MofNCompleteColumn(table_column=Column(no_wrap=True)), TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self.tasks: dict[str, Any] = {}
        self.last_read = 0.0

    def start(self, name: str, total: int | None) -> None:
        if self.progress is None:
            return
        for t in self.tasks.values():
            self.progress.remove_task(t)
        self.tasks = {"video": self.progress.add_task(name, total=total, info=""), "frame": self.progress.add_task("frame", total=None, info="")}

    def on_frame(self, ev: Any) -> None:  # FrameEvent
        if self.progress is None or not self.tasks:
            return
        if ev.kind == "start":
            self.progress.update(self.tasks["video"], completed=ev.index)
            self.progress.reset(self.tasks["frame"], total=ev.iterations, description=f"frame {ev.index + 1}", info="")
        else:
            err = "" if ev.warping_error is None else f", warping error {ev.warping_error:.2f}"
            self.progress.update(self.tasks["video"], completed=ev.index + 1, info=f"{ev.seconds:.1f} s/frame{err}")

    def on_iterate(self, it: Any) -> None:  # Iterate
        if self.progress is None or not self.tasks:
            return
        now = time.perf_counter()
        fields = {}
        if now - self.last_read > 0.25 or it.step == it.total_steps:
            self.last_read = now
            fields["info"] = f"loss {float(it.loss):.4g}"  # a device sync: at most 4 times a second
        self.progress.update(self.tasks["frame"], total=it.total_steps, completed=it.step, **fields)


def _run_one(
    a: Mapping[str, Any], job: Any, styles: list, init_im: Any, cfg: C.StyleConfig, vcfg: VideoConfig, identity: dict, raft_file: Path | None,
    *, report: Path | None, quiet: bool, opened: tuple[Any, int | None], runtime: Any,
) -> None:
    from nst.engine.video.flow import RaftFlow
    from nst.engine.video.pipeline import run_clip

    C.set_threads(a["threads"])  # as with several inputs here (it was ignored for one)
    if not quiet:
        _plan_notes(a["memory"], job.source)
    w, source, cache, tinfo, phases = _setup(a, cfg, runtime, quiet=quiet)
    raft = RaftFlow(raft_file, device=runtime.device) if raft_file is not None else None
    bars = _Bars(quiet)
    try:
        if bars.progress is not None:
            bars.progress.start()
        out = run_clip(
            job, styles, cfg, vcfg, weights=w, identity=identity, runtime=runtime, targets=source, cache=cache, raft=raft, init_image=init_im,
            on_start=lambda clip, total: bars.start("video", total), frame_callback=bars.on_frame, callback=bars.on_iterate, opened=opened,
            memory=a["memory"],
        )  # fmt: skip
    finally:
        if bars.progress is not None:
            bars.progress.stop()
    phases.update(out.phases)
    _notes(out, quiet=quiet, plan_shown=True)
    cfg = out.cfg or cfg
    if out.status != "done":
        kept = len(out.journal.entries)
        if out.status == "interrupted":
            console.print(f"[yellow]interrupted:[/] {out.message}; {kept} finished frame(s) are kept in {out.journal.folder}: run the same command again to continue")
            raise typer.Exit(interrupted_code())
        raise fail(f"{out.message}; {kept} finished frame(s) are kept in {out.journal.folder}", code=1)
    data = clip_report(out, phases, runtime, w, tinfo, cfg, vcfg)
    if report is not None:
        from .report import write_json

        write_json(report, {**data, "versions": _versions()})
    if not quiet:
        console.print(_frames_table(out, phases, runtime))
        console.print(_wrote(out))


def _plan_notes(plan: Any, source: str) -> None:
    """The plan's warning (a changed optimiser) and, when it tiles, its lines."""
    if plan.optimizer_note:
        console.print(f"[yellow]warning:[/] memory plan for {source}: {plan.optimizer_note}", highlight=False)
    if any(s.mode == "tiled" for s in plan.stages):
        for line in plan_lines(plan):
            console.print(line, highlight=False)


def _notes(out: Any, *, quiet: bool, plan_shown: bool = False) -> None:
    if quiet:
        return
    if out.plan is not None and not plan_shown:
        _plan_notes(out.plan, out.job.source)
    if out.journal.restarted:
        console.print(f"[yellow]note:[/] {out.journal.restarted}")
    if out.result.resumed:
        console.print(f"resumed: {out.result.resumed} frame(s) of {out.job.source} finished by an earlier run were kept, not redone")
    if out.encoded is not None and out.encoded.note:
        console.print(f"[yellow]warning:[/] {out.encoded.note}; wrote the video without it")


def _wrote(out: Any) -> str:
    n = len(out.result.frames)
    if out.encoded is None:
        return f"wrote {out.job.output} ({n} PNG frames)"
    e = out.encoded
    return f"wrote {out.job.output} ({n} frames, {e.encoder}, {e.size[0]}x{e.size[1]}, {out.fps} fps{', audio copied' if e.audio else ''})"


def clip_report(out: Any, phases: Mapping[str, float], runtime: Any, w: Any, tinfo: Mapping[str, object], cfg: C.StyleConfig, vcfg: VideoConfig) -> dict[str, object]:
    """One clip's `--report` JSON (without `versions`)."""
    res = out.result
    desc: dict[str, object] = {"path": str(out.job.output), "kind": "video" if out.job.to_video else "frames", "frames": len(res.frames), "fps": str(out.fps)}
    if out.encoded is not None:
        desc.update(encoder=out.encoded.encoder, size=f"{out.encoded.size[0]}x{out.encoded.size[1]}", audio=out.encoded.audio)
    return {
        "output": desc, "input": out.clip.describe(), "status": out.status,
        "frames": {"total": len(res.frames), "computed": len(res.frames) - res.resumed, "resumed": res.resumed},
        "phases": dict(phases), "seconds_per_frame": res.seconds_per_frame,
        "temporal": {"weight": vcfg.temporal_weight, "flow": vcfg.flow.value, "warm_start": vcfg.starts_warm,
                     "warping_error_mean": res.warping_error_mean, "warping_error_per_frame": res.warping_errors,
                     "reliable_fraction_per_frame": [f.get("reliable") for f in res.frames]},
        "per_frame": res.frames, "device": str(runtime.device) if runtime is not None else out.worker.get("device"),
        "precision": runtime.precision.value if runtime is not None else out.worker.get("precision"), "weights": w.to_dict(),
        "targets": {**res.targets, **tinfo}, "config": cfg.to_dict(), "video": vcfg.to_dict(), "selection": out.job.selection.to_dict(),
        "worker": out.worker, "plan": out.plan.to_dict() if out.plan is not None else None,
    }  # fmt: skip


def _versions() -> dict[str, str]:
    from .report import versions

    out = versions()
    for mod, name in (("av", "av"), ("cv2", "opencv")):
        try:
            out[name] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _frames_table(out: Any, phases: Mapping[str, float], runtime: Any) -> Any:
    from rich.table import Table

    res = out.result
    table = Table(title="video", show_header=True, header_style="bold")
    for col in ("frame", "seconds", "iterations", "reliable", "warping error"):
        table.add_column(col, justify="right")
    rows = res.frames if len(res.frames) <= 24 else [*res.frames[:10], None, *res.frames[-10:]]
    for f in rows:
        if f is None:
            table.add_row("...", "", "", "", "")
            continue
        err = "-" if f.get("warping_error") is None else f"{f['warping_error']:.2f}"
        rel = "-" if f.get("reliable") is None else f"{100 * f['reliable']:.0f}%"
        table.add_row(str(f["index"] + 1), "resumed" if f.get("resumed") else f"{f['seconds']:.2f}", str(f["iterations"]), rel, err)
    table.add_section()
    spf, mean = res.seconds_per_frame, res.warping_error_mean
    table.add_row("mean", "-" if spf is None else f"{spf:.2f}", "", "", "-" if mean is None else f"{mean:.2f}", style="bold")
    table.caption = (
        "warping error: mean |output t - output t-1 warped onto t| over reliable pixels, in 8-bit levels. "
        f"{res.resumed} frame(s) resumed. Phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f"; total {sum(phases.values()):.2f}. "
        f"{runtime.device}, {runtime.precision.value}; targets {res.targets.get('source')}: style computed {res.targets.get('style_computed')}x, "
        f"content {res.targets.get('content_computed')}x"
    )
    return table


def _run_many(a: Mapping[str, Any], jobs: list, styles: list, init_im: Any, cfg: C.StyleConfig, vcfg: VideoConfig, identity: dict, raft_file: Path | None, *, report: Path | None, quiet: bool, on_ray: bool) -> None:
    """Several clips: one after another here, or one per worker on Ray; a clip that fails is a
    line in the closing table and the others go on (exit code 1 if any failed)."""
    from nst.engine.errors import EngineError

    from .common import flag_message
    from .targets_opt import choose_targets

    t0 = time.perf_counter()
    results: list[tuple[Any, Any, str]] = []  # (job, outcome or None, reason)
    reports: list[dict[str, object]] = []
    interrupted = False
    if on_ray:
        dev, prec = ray_device_and_precision(a["device"], a["precision"])
        try:
            from nst.engine.video.ray_runner import ClipRayRunner
        except ImportError as e:
            raise UserError(f"--ray needs Ray ({e.name or e} is not installed): pip install 'nst[ray]'") from None
        w = load_weights_for(str(a["weights"]), cfg.seed)
        targets = functools.partial(choose_targets, a["targets"], onnx_path=a["onnx"], provider=a["provider"], quiet=True)
        runner = ClipRayRunner(weights=w, device=dev, precision=str(a["precision"]), threads=a["threads"], targets=targets, address=a["ray_address"],
                               on_warning=lambda m: console.print(f"[yellow]warning:[/] {m}"))  # fmt: skip
        if not quiet:
            console.print(f"ray: {len(jobs)} clip(s) on up to {runner.workers} worker(s), each {runner.ask}")
        bars = _Bars(quiet)
        try:
            if bars.progress is not None:
                bars.progress.start()
                task = bars.progress.add_task("videos", total=len(jobs), info="")
            for job, out, tinfo, err in runner.run(jobs, styles, cfg, vcfg, identity=identity, init_image=init_im, raft_file=str(raft_file) if raft_file else None,
                                                     memory=a["memory"]):  # fmt: skip
                if bars.progress is not None:
                    bars.progress.advance(task)
                if err is not None:
                    if not isinstance(err, EngineError):
                        raise err
                    results.append((job, None, flag_message(err)))
                    continue
                results.append((job, out, "" if out.status == "done" else out.message))
                if out.status == "done":
                    reports.append(clip_report(out, out.phases, None, w, tinfo, out.cfg or cfg, vcfg))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bars.progress is not None:
                bars.progress.stop()
            runner.close()
    else:
        from nst.engine.transfer import build_model
        from nst.engine.video.flow import RaftFlow
        from nst.engine.video.pipeline import run_clip

        C.set_threads(a["threads"])  # as a Ray worker would: the same sums, the same bytes
        runtime = _runtime(a)
        w, source, cache, tinfo, phases = _setup(a, cfg, runtime, quiet=quiet)
        raft = RaftFlow(raft_file, device=runtime.device) if raft_file is not None else None
        model = build_model(cfg, w, runtime)  # one network for every clip
        bars = _Bars(quiet)
        try:
            if bars.progress is not None:
                bars.progress.start()
            for i, job in enumerate(jobs):
                try:
                    out = run_clip(
                        job, styles, cfg, vcfg, weights=w, identity=identity, runtime=runtime, targets=source, cache=cache, raft=raft,
                        init_image=init_im, model=model, on_start=lambda clip, total, i=i: bars.start(f"video {i + 1}/{len(jobs)}", total),
                        frame_callback=bars.on_frame, callback=bars.on_iterate, memory=a["memory"],
                    )  # fmt: skip
                except EngineError as e:
                    results.append((job, None, flag_message(e)))
                    continue
                results.append((job, out, "" if out.status == "done" else out.message))
                if out.status == "interrupted":
                    interrupted = True
                    break
                if out.status == "done":
                    reports.append(clip_report(out, {**phases, **out.phases}, runtime, w, tinfo, out.cfg or cfg, vcfg))
        finally:
            if bars.progress is not None:
                bars.progress.stop()
    for job, out, _ in results:
        if out is not None:
            _notes(out, quiet=quiet)
    failed = [(job, reason) for job, out, reason in results if out is None or out.status not in ("done", "interrupted")]
    if report is not None:
        from .report import write_json

        write_json(report, {
            "videos": reports, "failed": [{"input": j.source, "output": str(j.output), "reason": r} for j, r in failed],
            "totals": {"videos": len(jobs), "done": len(reports), "failed": len(failed), "seconds": round(time.perf_counter() - t0, 3)},
            "runner": "ray" if on_ray else "in-process", "versions": _versions(),
        })  # fmt: skip
    if not quiet:
        console.print(_videos_table(results))
    if interrupted:
        console.print("[yellow]interrupted:[/] finished frames are kept in each OUTPUT.nst-work: run the same command again to continue")
        raise typer.Exit(interrupted_code())
    if failed:
        if quiet:  # the table says why; without it, one line each (exit 1 alone said nothing)
            for job, reason in failed:
                console.print(f"[bold red]error:[/] {job.source}: {reason}", highlight=False)
        raise typer.Exit(1)


def _videos_table(results: list[tuple[Any, Any, str]]) -> Any:
    from rich.table import Table

    table = Table(title="videos", show_header=True, header_style="bold")
    # Paths fold onto a second line rather than end in "…" (at 80 columns the output was cut).
    for col, just in (("input", "left"), ("output", "left"), ("frames", "right"), ("resumed", "right"), ("s/frame", "right"), ("warping error", "right"), ("status", "left")):
        table.add_column(col, justify=just, overflow="fold" if col in ("input", "output") else "ellipsis")  # type: ignore[arg-type]
    for job, out, reason in results:
        if out is None:
            table.add_row(job.source, str(job.output), "", "", "", "", f"failed: {reason}")
            continue
        res = out.result
        spf, err = res.seconds_per_frame, res.warping_error_mean
        table.add_row(job.source, str(job.output), str(len(res.frames)), str(res.resumed), "-" if spf is None else f"{spf:.2f}",
                      "-" if err is None else f"{err:.2f}", out.status if not reason else f"{out.status}: {reason}")  # fmt: skip
    return table
