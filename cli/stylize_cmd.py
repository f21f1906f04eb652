"""`nst stylize`: the command line over `nst.engine.stylize`."""

from __future__ import annotations

import inspect
import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nst.engine import config as C
from nst.engine.files import intermediate_path, remove, same_file, snapshot_over, temporaries_beside

from .common import UserError, check_writable, console, fail, interrupted_code, load_weights_for, parse_list, user_errors, warn_if_weights_missing
from .report import comparison_sheet, seconds_per_iteration, timing_table, versions, write_json
from .targets_opt import TargetsMode, check_targets_options, choose_targets, planned_source_bytes

if TYPE_CHECKING:
    from PIL import Image

    from nst.engine.device import Runtime
    from nst.engine.plan import Plan
    from nst.engine.transfer import Iterate, MemoryRequest, StyleResult
    from nst.engine.weights import Weights


def stylize(*args: object, **kwargs: object) -> StyleResult:
    """`nst.engine.stylize`, imported when a run starts (torch with it); tests replace this name."""
    from nst.engine.transfer import stylize as run

    return run(*args, **kwargs)  # type: ignore[arg-type]


def _default(name: str) -> str:
    """`[gatys X, seed Y]` (or `[X]`) read from the presets themselves, so help cannot drift."""
    def fmt(v: object) -> str:
        v = getattr(v, "value", v)
        if isinstance(v, tuple):
            return ",".join(fmt(x) for x in v) if v else "-"
        return f"{v:g}" if isinstance(v, float) else str(v)

    vals = {p.value: fmt(getattr(cfg, name)) for p, cfg in C.PRESETS.items()}
    return f"[{next(iter(vals.values()))}]" if len(set(vals.values())) == 1 else "[" + ", ".join(f"{k} {v}" for k, v in vals.items()) + "]"


def check_output(out: Path, inputs: list[Path], *, what: str = "output") -> None:
    """Refuse an output that would overwrite an input, sits in a missing folder, or has no known format."""
    from nst.engine.images import output_format

    if out.is_dir():
        raise UserError(f"{what} {out} is a folder; give a file name such as {out / 'out.png'}")
    output_format(out)
    for p in inputs:
        if same_file(out, p):
            raise UserError(f"{what} {out} is one of the input images; inputs are never overwritten, choose another name")
    check_writable(out, what)  # a file where one of its folders would be


def build_config(preset: C.Preset, overrides: dict[str, object]) -> C.StyleConfig:
    """The preset with the options actually given on the command line applied over it."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "size" in given:
        given["size_edge"] = C.SizeEdge.LONGEST  # --size is the longest side, whatever the preset
    return C.preset(preset, **given)


# The options that decide a run's StyleConfig (the rest say where and how it runs, or where
# its results go). `nst batch` takes the same ones, and a --jobs row may override any of them.
CONFIG_OPTIONS = (
    "preset", "size", "iterations", "optimizer", "lr", "content_weight", "style_weight", "tv_weight", "content_layers",
    "style_layers", "style_layer_weights", "style_blend", "style_scale", "init", "preserve_colors", "scales", "pooling",
    "seed", "save_every", "masks", "style_regions", "content_mask",
)  # fmt: skip


def _parse_scales(text: str | None) -> tuple[int, ...] | str | None:
    """`--scales`: `auto`, or a comma list of sizes; None when not given."""
    if text is not None and text.strip().lower() == C.AUTO:
        return C.AUTO
    return parse_list(text, cast=int, what="size", option="--scales") or None


def _mask_list(text: str | None, option: str) -> tuple[str, ...] | None:
    """`a.png,-,b.png`; a value that is one existing file is that file, commas and all (a comma
    list has no way to quote one)."""
    if text is not None and "," in text and Path(text).is_file():
        return (text,)
    return parse_list(text, what="mask", option=option) or None


def config_from_options(a: Mapping[str, Any]) -> C.StyleConfig:
    """The StyleConfig that the command line's options (by parameter name, None: not given) ask for."""
    overrides = dict(
        size=a["size"], iterations=a["iterations"], optimizer=a["optimizer"], lr=a["lr"],
        content_weight=a["content_weight"], style_weight=a["style_weight"], tv_weight=a["tv_weight"],
        content_layers=parse_list(a["content_layers"], what="layer", option="--content-layers") or None,
        style_layers=parse_list(a["style_layers"], what="layer", option="--style-layers") or None,
        style_layer_weights=parse_list(a["style_layer_weights"], cast=float, what="weight", option="--style-layer-weights") or None,
        style_blend=parse_list(a["style_blend"], cast=float, what="blend weight", option="--style-blend") or None,
        style_scale=a["style_scale"], init=a["init"], preserve_colors=a["preserve_colors"],
        scales=_parse_scales(a["scales"]),
        pooling=a["pooling"], seed=a["seed"], save_every=a["save_every"],
        masks=_mask_list(a.get("masks"), "--masks"),
        style_regions=_mask_list(a.get("style_regions"), "--style-regions"),
        content_mask=a.get("content_mask"), tile_grams=a.get("tile_grams"), lbfgs_patience=a.get("lbfgs_patience"),
    )  # fmt: skip
    if isinstance(overrides["scales"], tuple) and a["size"] is not None and overrides["scales"][-1] != a["size"]:
        raise UserError(f"--scales ends at {overrides['scales'][-1]} but --size is {a['size']}; the last scale is the output size")
    if overrides["style_layers"] is not None and a["style_layer_weights"] is None:
        overrides["style_layer_weights"] = ()  # the preset's per-layer weights were for its layers
    cfg = build_config(a["preset"], overrides)
    if isinstance(overrides["scales"], tuple) and a["size"] is None:  # the output's size, as the report says it
        cfg = dataclasses.replace(cfg, size=overrides["scales"][-1])
    return cfg


def _rate(steps: int, seconds: float) -> str:
    """Iterations per second since the optimisation began: the bar's figure and the summary's."""
    return f"{steps / seconds:5.1f} it/s" if seconds > 0 else ""


def _bar_console() -> Console:
    """The progress bar's console: the terminal's width less 3 columns. A bar that fills the last
    column leaves the cursor on the edge, where the `^C` a terminal echoes on Ctrl-C wraps onto a
    new line and the bar is then drawn a second time."""
    return Console(file=console.file, width=max(20, console.width - 3), highlight=False)


class _ProgressSink:
    """Feeds the Rich bar and `--save-every`. Reads the loss (a GPU sync) at most 4 times a second."""

    def __init__(self, progress: Progress | None, task: int | None, cfg: C.StyleConfig, out: Path) -> None:
        self.progress, self.task, self.cfg, self.out = progress, task, cfg, out
        self.last_read = 0.0
        self.saved: list[Path] = []
        self.failed: list[Path] = []  # snapshots that could not be written
        self.latest: Iterate | None = None

    def __call__(self, it: Iterate) -> None:
        self.latest = it
        if self.progress is not None and self.task is not None:
            now = time.perf_counter()
            fields = {}
            if now - self.last_read > 0.25 or it.step == it.total_steps:
                self.last_read = now
                fields["loss"] = f"{float(it.loss):.4g}"
                fields["stage"] = f"{it.size[1]}x{it.size[0]}"
            self.progress.update(self.task, completed=it.step, **fields)
        if self.cfg.save_every and it.step % self.cfg.save_every == 0 and it.step != it.total_steps:
            self.save_snapshot(it)

    def save_snapshot(self, it: Iterate) -> None:
        """A snapshot is optional: one that cannot be written (disk full) is a warning, not the end."""
        from nst.engine.images import ImageError, save_image

        path = intermediate_path(self.out, it.step)
        try:
            self.saved.append(save_image(it.snapshot(), path))
        except ImageError as e:
            self.failed.append(path)
            if len(self.failed) == 1:  # the same cause would repeat at every snapshot
                why = f"cannot write snapshot {path}: a folder is in the way" if path.is_dir() else str(e)  # no "give a file name" advice
                console.print(f"[yellow]warning:[/] {why}; the run goes on (later snapshot failures are listed in the report)", highlight=False)


def stylize_command(
    content: Annotated[Path, typer.Argument(help="Content image.", show_default=False, metavar="CONTENT")],
    styles: Annotated[list[Path], typer.Argument(help="One or more style images.", show_default=False, metavar="STYLE")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output image; the format comes from the extension.")] = Path("out.png"),
    preset: Annotated[C.Preset, typer.Option(help="Starting settings; options given here override it.")] = C.Preset.GATYS,
    size: Annotated[Optional[int], typer.Option(help=f"Longest side of the output in pixels {_default('size')} (the seed preset measures its 400 px on the height).", show_default=False)] = None,
    iterations: Annotated[Optional[int], typer.Option(help=f"Iterations per scale; with --scales auto, the total split across the scales {_default('iterations')}. L-BFGS ends a scale sooner once it stops improving (--lbfgs-patience).", show_default=False)] = None,
    optimizer: Annotated[Optional[C.Optimizer], typer.Option(help=_default("optimizer"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Step size: L-BFGS scale or Adam learning rate {_default('lr')}; with the other --optimizer, L-BFGS 1 or Adam 0.05 in [0, 1] units.", show_default=False)] = None,
    content_weight: Annotated[Optional[float], typer.Option(help=_default("content_weight"), show_default=False)] = None,
    style_weight: Annotated[Optional[float], typer.Option(help=_default("style_weight"), show_default=False)] = None,
    tv_weight: Annotated[Optional[float], typer.Option(help=_default("tv_weight"), show_default=False)] = None,
    content_layers: Annotated[Optional[str], typer.Option(help=f"Comma-separated layer names {_default('content_layers')}.", show_default=False)] = None,
    style_layers: Annotated[Optional[str], typer.Option(help=f"Comma-separated layer names {_default('style_layers')}.", show_default=False)] = None,
    style_layer_weights: Annotated[Optional[str], typer.Option(help="Per style layer, comma-separated [equal, summing to 1].", show_default=False)] = None,
    style_blend: Annotated[Optional[str], typer.Option(help="Weight per style image, e.g. 3,7 [equal].", show_default=False)] = None,
    style_scale: Annotated[Optional[float], typer.Option(help=f"Style image size relative to the output {_default('style_scale')}.", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(help=f"content, noise, style, or an image path {_default('init')}.", show_default=False)] = None,
    preserve_colors: Annotated[Optional[C.PreserveColors], typer.Option(help=f"Keep the content's colours {_default('preserve_colors')}.", show_default=False)] = None,
    scales: Annotated[Optional[str], typer.Option(help=f"Coarse-to-fine sizes, e.g. 256,512,1024 (the last is the output's), or auto (halving from --size to about a quarter of it, the --iterations split across them) {_default('scales')}.", show_default=False)] = None,
    pooling: Annotated[Optional[C.Pooling], typer.Option(help=_default("pooling"), show_default=False)] = None,
    masks: Annotated[Optional[str], typer.Option(help="One greyscale mask per STYLE, comma-separated in their order (- for everywhere): white is that style here, grey a soft weight; where none covers, only content and TV act.", show_default=False)] = None,
    style_regions: Annotated[Optional[str], typer.Option(help="One greyscale mask per STYLE (- for all of it): the part of each style image its style is taken from.", show_default=False)] = None,
    content_mask: Annotated[Optional[str], typer.Option(help="A greyscale weight map on the content term (white: full weight).", show_default=False)] = None,
    weights: Annotated[str, typer.Option(help="imagenet, random, or a .pth/.safetensors file.")] = "imagenet",
    seed: Annotated[Optional[int], typer.Option(help=f"Seed for noise init and random weights {_default('seed')}.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, tf32, bf16 or fp16: the network's precision (Grams and losses stay fp32). auto: bf16 where the hardware has bf16 units (GPUs of compute capability 8.0+, CPUs with AVX512-BF16 or AMX), else fp32.")] = "auto",
    save_every: Annotated[Optional[int], typer.Option(help=f"Also save OUT.NNNN.ext every N iterations, 0 for never {_default('save_every')}.", show_default=False)] = None,
    targets: Annotated[TargetsMode, typer.Option(help="Where style/content targets come from.")] = TargetsMode.AUTO,
    onnx: Annotated[Optional[Path], typer.Option(help="An exported target module to use for the targets.", show_default=False)] = None,
    provider: Annotated[C.Provider, typer.Option(help="ONNX Runtime execution provider for the targets.")] = C.Provider.AUTO,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON report here.", show_default=False)] = None,
    compare: Annotated[Optional[Path], typer.Option(help="Write a content | style | result sheet here.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or report table.")] = False,
    max_memory: Annotated[Optional[str], typer.Option(help="Memory the run may plan for, e.g. 6GB, 800MB, 4GiB [the device's free memory less 15%].", show_default=False)] = None,
    tile: Annotated[str, typer.Option(help="auto (whole when it fits --max-memory, else the largest tile that does), off, or a tile edge in pixels.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan of each stage and exit without optimising.")] = False,
    tile_grams: Annotated[Optional[C.TileGrams], typer.Option(help="A tiled stage's Grams: exact (a pass without gradients first) or previous (the last iteration's: one pass, an approximate gradient) [exact].", show_default=False)] = None,
    optimizer_state: Annotated[C.OptimizerState, typer.Option(help="Where L-BFGS's history lives: device, host (host memory, streamed through the device every step; on the CPU the same memory), or auto (the device when it fits, else the fallback soonest to a result).")] = C.OptimizerState.AUTO,
    cudnn_benchmark: Annotated[bool, typer.Option("--cudnn-benchmark/--no-cudnn-benchmark", help="cuDNN tunes its convolutions once per shape (GPU only); the tuning briefly takes workspaces as large as the free GPU memory, which --max-memory does not limit.")] = True,
    lbfgs_patience: Annotated[Optional[int], typer.Option(help=f"End an L-BFGS scale after this many iterations without a lower loss; 0: run every iteration {_default('lbfgs_patience')}.", show_default=False)] = None,
) -> None:
    """Stylise CONTENT in the manner of one or more STYLE images.

    The method of Gatys, Ecker and Bethge (2015). Any option given here overrides the --preset.
    """
    with user_errors():
        _run(StylizeOptions(**locals()))


@dataclass(frozen=True)
class StylizeOptions:
    """`nst stylize`'s options by parameter name, as Typer parsed them (None: not given, so the
    preset's value holds)."""

    content: Path
    styles: list[Path]
    output: Path
    preset: C.Preset
    size: int | None
    iterations: int | None
    optimizer: C.Optimizer | None
    lr: float | None
    content_weight: float | None
    style_weight: float | None
    tv_weight: float | None
    content_layers: str | None
    style_layers: str | None
    style_layer_weights: str | None
    style_blend: str | None
    style_scale: float | None
    init: str | None
    preserve_colors: C.PreserveColors | None
    scales: str | None
    pooling: C.Pooling | None
    masks: str | None
    style_regions: str | None
    content_mask: str | None
    weights: str
    seed: int | None
    device: str
    precision: str
    save_every: int | None
    targets: TargetsMode
    onnx: Path | None
    provider: C.Provider
    report: Path | None
    compare: Path | None
    quiet: bool
    max_memory: str | None
    tile: str
    dry_run: bool
    tile_grams: C.TileGrams | None
    optimizer_state: C.OptimizerState
    cudnn_benchmark: bool = True
    lbfgs_patience: int | None = None

    @property
    def init_path(self) -> Path | None:
        """The image `--init` names, if it names one rather than a choice."""
        return Path(self.init) if self.init is not None and self.init not in C.INIT_CHOICES else None

    def input_paths(self) -> list[Path]:
        """Every file the run reads: never overwritten."""
        return [self.content, *self.styles, *([self.init_path] if self.init_path else []), *self.mask_paths()]

    def mask_paths(self) -> list[Path]:
        """The mask files the options name (inputs: never overwritten)."""
        return list(self.config().mask_files())

    def config(self) -> C.StyleConfig:
        return config_from_options(vars(self))


def _run(o: StylizeOptions) -> None:
    """Check the paths, configure, run, finish: each a step of its own."""
    _check_paths(o)
    cfg, runtime = _configure(o)
    run = _execute(o, cfg, runtime)
    _finish(o, run.cfg, runtime, run)  # the configuration that ran: the plan may change its optimiser


def _check_paths(o: StylizeOptions) -> None:
    """Refuse, before any work, outputs that would overwrite an input or cannot be written."""
    from nst.engine.images import output_format

    check_targets_options(o.targets, o.onnx, o.provider)
    inputs = o.input_paths()
    check_output(o.output, inputs)
    swept = remove(temporaries_beside(o.output))  # what killed runs writing this output left
    if swept and not o.quiet:
        console.print(f"removed {len(swept)} stale temporaries beside {o.output} that killed runs left")
    for extra, what in ((o.report, "report"), (o.compare, "comparison sheet")):
        if extra is not None and any(same_file(extra, p) for p in [*inputs, o.output]):
            raise UserError(f"the {what} path {extra} would overwrite an input or the output")
    check_writable(o.report, "--report", example="report.json")
    check_writable(o.compare, "--compare", example="compare.png")
    if o.compare is not None:
        try:
            output_format(o.compare)
        except ValueError as e:
            raise UserError(f"--compare: {e}") from None


def _configure(o: StylizeOptions) -> tuple[C.StyleConfig, Runtime]:
    """The run's configuration (preset and options) and where it runs."""
    from nst.engine.device import Runtime, resolve_device, resolve_precision

    cfg = o.config()
    if cfg.style_blend and len(cfg.style_blend) != len(o.styles):
        raise UserError(f"--style-blend has {len(cfg.style_blend)} weights for {len(o.styles)} style images")
    for name, paths in (("--masks", cfg.masks), ("--style-regions", cfg.style_regions)):
        if paths and len(paths) != len(o.styles):
            raise UserError(f"{name} has {len(paths)} mask(s) for {len(o.styles)} style image(s); give one per style, in their order (- for everywhere)")
    inputs = o.input_paths()
    over = snapshot_over(o.output, [*inputs, *(p for p in (o.report, o.compare) if p is not None)], cfg.save_every, sum(cfg.stage_iterations))
    if over is not None:
        what = "the input" if over in inputs else "the file given as --report or --compare"
        raise UserError(f"--save-every {cfg.save_every} would write a snapshot ({o.output.stem}.NNNN{o.output.suffix}) over {what} {over}; choose another -o name")
    dev = resolve_device(o.device)
    return cfg, Runtime(device=dev, precision=resolve_precision(dev, o.precision), cudnn_benchmark=o.cudnn_benchmark)


@dataclass
class _Run:
    """What `_execute` hands to `_finish`."""

    result: StyleResult
    content: Image.Image  # for the comparison sheet
    styles: list[Image.Image]
    masks: list[tuple[str, Image.Image]]  # labelled masks for the comparison sheet
    weights: Weights
    phases: dict[str, float]
    targets_info: dict[str, object]
    sink: _ProgressSink
    plan: Plan
    cfg: C.StyleConfig  # as it ran (the memory plan may shorten L-BFGS's history or choose Adam)


def load_mask_options(cfg: C.StyleConfig, content: Image.Image, styles: list[Image.Image]) -> tuple[list | None, list | None, Image.Image | None, list[tuple[str, Image.Image]]]:
    """The masks the configuration names, read and checked against the images before any work:
    (masks, style regions, content mask, labelled masks for the comparison sheet)."""
    from nst.engine.masks import load_mask, load_masks, make_guidance

    masks = load_masks(cfg.masks, param="masks") if cfg.masks else None
    regions = load_masks(cfg.style_regions, param="style_regions") if cfg.style_regions else None
    content_mask = load_mask(cfg.content_mask, param="content_mask") if cfg.content_mask and cfg.content_mask.strip() != "-" else None
    make_guidance([content], [styles], masks=masks, style_regions=regions, content_mask=content_mask)
    n = len(styles)
    shown = [(f"mask {i + 1}" if n > 1 else "mask", m) for i, m in enumerate(masks or []) if m is not None]
    shown += [(f"region {i + 1}" if n > 1 else "region", m) for i, m in enumerate(regions or []) if m is not None]
    shown += [("content mask", content_mask)] if content_mask is not None else []
    return masks, regions, content_mask, shown


def _oom_advice(runtime: Runtime) -> str:
    return ", --precision bf16" if runtime.precision in (C.Precision.FP32, C.Precision.TF32) else ""


def _execute(o: StylizeOptions, cfg: C.StyleConfig, runtime: Runtime) -> _Run:
    """Load the images and weights, choose the targets, and run `stylize` under a progress bar."""
    from nst.engine.device import is_out_of_memory, out_of_memory_message
    from nst.engine.images import load_image, load_named
    from nst.engine.transfer import check_job, fit_scales

    phases: dict[str, float] = {}
    t = time.perf_counter()
    content_im = load_image(o.content)
    style_ims = [load_image(p) for p in o.styles]
    init_im = load_named(o.init_path, "init") if o.init_path else None
    mask_ims, region_ims, content_mask_im, shown = load_mask_options(cfg, content_im, style_ims)
    phases["images"] = time.perf_counter() - t
    check_job(content_im, style_ims, cfg, o.output)
    plan, torch_because = make_plan(o, cfg, runtime, content_im, style_ims)
    tiled = any(s.mode == "tiled" for s in plan.stages)
    changes = plan.changes(cfg)
    if changes.get("optimizer") is not None:  # through the preset, so Adam gets its own lr
        cfg = dataclasses.replace(o, optimizer=changes["optimizer"]).config()
    elif changes:
        cfg = dataclasses.replace(cfg, **changes)
    fitted = fit_scales(cfg=cfg, contents=[content_im], styles=[style_ims])
    if fitted.sizes != cfg.sizes:  # `--scales auto` as it runs: the coarse stages too small for the layers left out
        cfg = fitted
    if plan.optimizer_note:  # a change to what runs: a warning, --quiet or not (as nst video)
        console.print(f"[yellow]warning:[/] memory plan: {plan.optimizer_note}", highlight=False)
    if o.dry_run:
        _dry_run(o, cfg, runtime, plan)
    if not o.quiet and tiled:
        for line in plan_lines(plan):
            console.print(line, highlight=False)

    t = time.perf_counter()
    w = load_weights_for(o.weights, cfg.seed)
    phases["weights"] = time.perf_counter() - t
    if w.is_random and not o.quiet:
        console.print(f"[yellow]weights: {w.description}, not pretrained: the result shows the method at work, not a painting[/]")

    t = time.perf_counter()
    # A tiled plan's targets come tile by tile (`plan.target_tile`). It is short of memory, so
    # `auto` takes them from the network the loop holds anyway: ONNX Runtime's session is a second
    # copy of the weights (measured at 2048 px, 1 GB budget, fp32: peak RSS 2.10 GB with it, 1.75
    # without). `--targets onnx` (or `--onnx`) still runs them tile by tile through ONNX Runtime.
    # The plan counts ONNX Runtime's session where the run opens one; under auto, a run that would
    # not fit whole with it plans (and runs) without (`make_plan` says why).
    source, cache, targets_info = choose_targets(
        TargetsMode.TORCH if torch_because else o.targets, cfg=cfg, weights=w, runtime=runtime, onnx_path=o.onnx, provider=o.provider, quiet=o.quiet,
        tile=plan.target_tile(),
    )  # fmt: skip
    if torch_because:
        targets_info = {**targets_info, "fallback": f"torch: {torch_because} without ONNX Runtime's copy of the weights"}
    phases["target setup"] = time.perf_counter() - t

    progress: Progress | None = None
    if not o.quiet:
        progress = Progress(
            TextColumn("[bold]stylize[/] {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=_bar_console(), transient=False,
        )  # fmt: skip
    sink = _ProgressSink(progress, None, cfg, o.output)

    def callback(it: Iterate) -> None:
        if progress is not None and sink.task is not None:
            progress.update(sink.task, rate=_rate(it.step, it.elapsed))
        sink(it)

    dev = runtime.device
    try:
        if progress is not None:
            progress.start()
            sink.task = progress.add_task("stylize", total=sum(cfg.stage_iterations), loss="-", stage="", rate="")
        result = stylize(content_im, style_ims, cfg, weights=w, runtime=runtime, targets=source, cache=cache, init_image=init_im, callback=callback,
                        masks=mask_ims, style_regions=region_ims, content_mask=content_mask_im, plan=plan)
        if progress is not None and sink.task is not None:  # the bar's last figure is the summary's
            progress.update(sink.task, rate=_rate(result.steps, result.phases["optimisation"]))
    except Exception as e:  # running out of memory in the first scale: nothing to keep
        if not is_out_of_memory(e):
            raise
        hint = f"try a smaller --size{_oom_advice(runtime)} or fewer --scales" + (", or --device cpu" if dev.type == "cuda" else "")
        raise fail(f"{out_of_memory_message(e, dev)} at size {cfg.sizes[0]}; {hint}", code=1) from None
    finally:
        if progress is not None:
            progress.stop()
    phases["targets"] = result.phases["targets"]
    phases["optimisation"] = result.phases["optimisation"]
    return _Run(result, content_im, style_ims, shown, w, phases, targets_info, sink, plan, cfg)


def parse_tile(text: str) -> str | int:
    """`--tile`: auto, off, or a tile edge in pixels (at least 16)."""
    t = text.strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        n = int(t)
    except ValueError:
        raise UserError(f"--tile {text!r} not understood: use auto, off, or a tile edge in pixels such as 512") from None
    if n < 16:
        raise UserError(f"--tile {n} is too small: use at least 16 pixels (the deepest layer's stride), auto or off")
    return n


def memory_request(max_memory: str | None, tile: str, optimizer_state: C.OptimizerState | str = C.OptimizerState.AUTO) -> MemoryRequest:
    """--max-memory, --tile and --optimizer-state as the engine's request (no budget: the device's
    free memory less a margin; for a history in host memory, the available RAM less one)."""
    from nst.engine.plan import TileMode, parse_size
    from nst.engine.transfer import MemoryRequest

    t = parse_tile(tile)
    return MemoryRequest(parse_size(max_memory) if max_memory is not None else None, t if isinstance(t, int) else TileMode(t), C.OptimizerState(optimizer_state))


def make_plan(o: StylizeOptions, cfg: C.StyleConfig, runtime: Runtime, content: Image.Image, styles: Sequence[Image.Image]) -> tuple[Plan, str | None]:
    """The run's memory plan from --max-memory, --tile and --optimizer-state, counting ONNX
    Runtime's session where the targets come from one; and None, or why the targets come from the
    loop's network instead: under `--targets auto` a run that does not fit whole with the session
    takes them from there, and its plan counts none."""
    from nst.engine.plan import PlanError
    from nst.engine.transfer import plan_for

    request = memory_request(o.max_memory, o.tile, o.optimizer_state)
    whs = (content.size, [s.size for s in styles])
    source = planned_source_bytes(o.targets, cfg=cfg, onnx_path=o.onnx)
    optional = bool(source) and TargetsMode(o.targets) == TargetsMode.AUTO and o.onnx is None  # auto can do without it
    try:
        plan = plan_for(*whs, cfg, runtime, dataclasses.replace(request, source_bytes=source))
        if not (optional and any(s.mode == "tiled" for s in plan.stages)):
            return plan, None
    except PlanError:
        if not optional:
            raise
    plan = plan_for(*whs, cfg, runtime, request)
    return plan, "the plan is tiled" if any(s.mode == "tiled" for s in plan.stages) else "the memory budget fits the run whole only"


def plan_lines(plan: Plan) -> list[str]:
    """The plan as lines of at most 80 columns: per stage its size, whole or the tile grid, and the
    estimated peak by part, with the phase it comes in."""
    from nst.engine.plan import format_size

    budget = format_size(plan.budget_bytes) if plan.budget_bytes is not None else "none"
    where = plan.device if plan.optimizer_state == "device" else "host"
    lines = [f"plan: {plan.device}, {plan.precision}, budget {budget}, optimiser state on {where}"]
    if plan.host_bytes:
        lines.append(f"  L-BFGS history in host memory: {format_size(plan.host_bytes)}, streamed")
    for i, s in enumerate(plan.stages, 1):
        how = "whole" if s.mode == "whole" else f"tiled, {s.tile} px tiles, {s.grid[0]}x{s.grid[1]} = {s.tiles}, halo {s.halo} px"
        lines.append(f"  stage {i}: {s.hw[1]}x{s.hw[0]} {how}")
        if s.content_targets == "per tile":
            lines.append("    content targets made again at each tile's pass (held ones do not fit)")
        when = "making its targets" if s.phase == "targets" else "optimising"
        lines.append(f"    estimated peak {format_size(s.estimated_peak_bytes)}, {when}:")
        parts = [f"{k} {format_size(v)}" for k, v in s.parts.items()]
        lines.append("      " + ", ".join(parts[:3]) + ",")
        lines.append("      " + ", ".join(parts[3:]))
    if plan.write_bytes:
        lines.append(f"  writing the video, after the last frame: the encoder {format_size(plan.write_bytes)}")
    return lines


def _dry_run(o: StylizeOptions, cfg: C.StyleConfig, runtime: Runtime, plan: Plan) -> None:
    """Print the plan (and write it under `plan` in --report) and exit 0 without optimising; a
    warning where the run itself would stop for want of the ImageNet weights (the plan does not
    load them)."""
    for line in plan_lines(plan):
        console.print(line, highlight=False)
    warn_if_weights_missing(o.weights)
    if o.report is not None:
        write_json(o.report, {"status": "dry-run", "plan": plan.to_dict(), "device": str(runtime.device), "precision": runtime.precision.value, "config": cfg.to_dict()})
        if not o.quiet:
            console.print(f"wrote {o.report} (report)")
    raise typer.Exit(0)


def _finish(o: StylizeOptions, cfg: C.StyleConfig, runtime: Runtime, run: _Run) -> None:
    """Write the image, the sheet and the report; print the table; exit by how the run ended."""
    from nst.engine.images import ImageError, save_image
    from nst.engine.transfer import RunStatus

    result, phases = run.result, run.phases
    t = time.perf_counter()
    save_image(result.image, o.output)
    sheet = None
    if o.compare is not None:  # an extra: one that cannot be written is a warning, the report still comes
        note = f"weights: {run.weights.description}, not pretrained" if run.weights.is_random else None
        try:
            sheet = save_image(comparison_sheet(run.content, run.styles, result.image, note=note, masks=run.masks), o.compare)
        except ImageError as e:
            console.print(f"[yellow]warning:[/] --compare: {e}; the image and the report are written all the same", highlight=False)
    phases["save"] = time.perf_counter() - t

    per = seconds_per_iteration(result.iteration_seconds)
    tinfo = {**result.targets, **run.targets_info}
    if o.report is not None:
        report = run_report(result, cfg, runtime, run.weights, phases, per, tinfo, o.output, run.sink.saved, run.sink.failed)
        write_json(o.report, {**report, "plan": run.plan.to_dict()})
    if not o.quiet:
        chosen = " (auto)" if o.precision.strip().lower() == "auto" else ""
        extra = {"device, precision": f"{runtime.device}, {runtime.precision.value}{chosen}",
                 "target source": f"{tinfo.get('source')} ({tinfo.get('provider')}{', fp32 as TF32' if tinfo.get('tf32') else ''}), cache {tinfo.get('cache')}"}  # fmt: skip
        console.print(timing_table(phases, per, iterations=result.steps, extra=extra))
        lowp = runtime.precision in (C.Precision.BF16, C.Precision.FP16)
        for e in result.stopped_early:
            console.print(f"L-BFGS found no lower loss after iteration {e['best_iteration']} at {e['size'][1]}x{e['size'][0]}: ended that scale at "
                          f"iteration {e['iteration']} of {e['iterations']} (--lbfgs-patience){'; --precision fp32 goes further' if lowp else ''}", highlight=False)
        if result.status == RunStatus.DONE:  # otherwise the status line below says where the image went
            console.print(f"wrote {o.output} ({result.image.shape[-1]}x{result.image.shape[-2]})")
        for extra_path, what in ((sheet, "comparison sheet"), (o.report, "report")):
            if extra_path is not None:
                console.print(f"wrote {extra_path} ({what})")
    if result.status == RunStatus.INTERRUPTED:
        console.print(f"[yellow]interrupted:[/] {result.message}; saved {o.output}")
        raise typer.Exit(interrupted_code())
    if result.status == RunStatus.NONFINITE:
        advice = "Lower --lr or the loss weights" if result.steps else "Lower the loss weights (--style-weight, --content-weight, --tv-weight)"
        console.print(f"[bold red]error:[/] {result.message}; saved {o.output}. {advice}.")
        raise typer.Exit(1)
    if result.status == RunStatus.OOM:
        console.print(f"[bold red]error:[/] {result.message}; saved {o.output}. Try without the last --scales entry{_oom_advice(runtime)}.")
        raise typer.Exit(1)


def keyword_option(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """One keyword-only parameter for a command's `__signature__` (its Typer option in `annotation`)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def stylize_parameters(*, without: Collection[str]) -> list[inspect.Parameter]:
    """`stylize`'s options as keyword-only parameters, less `without`: a command that takes them
    as they are declares them through this (in its `__signature__`), so none is copied."""
    params = inspect.signature(stylize_command, eval_str=True).parameters.values()
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.name not in without]


def run_report(
    result: StyleResult, cfg: C.StyleConfig, runtime: Runtime, w: Weights, phases: dict[str, float], per: dict, tinfo: dict, output: Path, saved: list[Path], failed: Sequence[Path] = ()
) -> dict:
    import torch

    hist = result.loss_history
    return {
        "output": str(output),
        "intermediate": [str(p) for p in saved],
        "intermediate_failed": [str(p) for p in failed],
        "status": result.status.value,
        "phases": phases,
        "iterations": result.steps,
        "stopped_early": result.stopped_early,
        "seconds_per_iteration": per,
        "loss": {"initial": hist[0] if hist else None, "final": result.final_loss, "terms": result.loss_terms, "history": hist},
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name(runtime.device)})" if runtime.device.type == "cuda" else ""),
        "precision": runtime.precision.value,
        "cudnn_benchmark": runtime.cudnn_benchmark,
        "weights": w.to_dict(),
        "targets": tinfo,
        "config": cfg.to_dict(),
        "versions": versions(),
    }
