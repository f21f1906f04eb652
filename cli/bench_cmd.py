"""`nst bench`: sweep sizes, precisions, optimisers, presets and loops; table, JSON, CSV, plot."""

from __future__ import annotations

import csv
import datetime
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from nst.engine.config import MAX_ITERATIONS, Precision, Preset, TileGrams, check_seed, preset
from nst.engine.files import write_atomic
from nst.engine.layers import deepest_layer

from .common import UserError, cache_dir, check_writable, console, load_weights_for, parse_list, user_errors, warn
from .report import versions, write_figure, write_json

if TYPE_CHECKING:
    import torch

    from nst.engine.bench import BenchRow
    from nst.engine.weights import Weights


def _choices(text: str, allowed: tuple[str, ...], what: str, *, alone: str = "") -> list[str]:
    """`text` as a comma list of `allowed`; `alone` names a value that stands by itself (told in the error)."""
    items = list(parse_list(text, what=what))
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        either = f"{alone}, or " if alone else ""
        raise UserError(f"unknown {what} {', '.join(bad) or repr(text)}: use {either}a comma list of {', '.join(allowed)}")
    return items


def bench_command(
    sizes: Annotated[str, typer.Option("--sizes", help="Comma list of N (square) or HxW, e.g. 256,512 or 128x192.")] = "256,512,1024",
    precision: Annotated[str, typer.Option("--precision", help="Comma list of fp32, tf32, bf16, fp16 and auto (what stylize's auto picks here), or all (the four; on the CPU fp16, and bf16 without bf16 units, are then reported as skipped). Ones this device lacks are reported as skipped.")] = "all",
    optimizer: Annotated[str, typer.Option("--optimizer", help="Comma list of lbfgs (ours), adam, torch-lbfgs (torch.optim.LBFGS); with --to-result also lbfgs:H, L-BFGS with a history of H.")] = "lbfgs",
    preset_names: Annotated[str, typer.Option("--preset", help="Comma list of presets whose layer sets and losses to run: gatys, seed.")] = "gatys",
    loop: Annotated[str, typer.Option("--loop", help="Comma list: fast (what stylize runs), reference (the notebook's: content, style and output through all of VGG19 every step).")] = "fast",
    iterations: Annotated[int, typer.Option("--iterations", min=1, max=MAX_ITERATIONS, help="Timed iterations per case.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=0, max=MAX_ITERATIONS, help="Untimed iterations first (autotuning, allocator, compile).")] = 3,
    weights: Annotated[str, typer.Option("--weights", help="random (natural here: the cost does not depend on the values), imagenet or a file.")] = "random",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights and images.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="NHWC for the convolutions.")] = True,
    cudnn_benchmark: Annotated[bool, typer.Option("--cudnn-benchmark/--no-cudnn-benchmark", help="cuDNN autotuning (GPU only).")] = True,
    lowp_weights: Annotated[bool, typer.Option("--lowp-weights/--no-lowp-weights", help="bf16/fp16: hold the weights in that dtype (cast once) rather than let autocast cast them at every call.")] = True,
    tile: Annotated[str, typer.Option("--tile", help="Comma list of tile edges in px and/or off: the fast loop also timed tile by tile, as a tiled plan runs it (same loss and gradient; rows carry `tile`).")] = "off",
    tile_grams: Annotated[str, typer.Option("--tile-grams", help="Comma list of exact and/or previous: a tiled case's Grams from a first pass (exact) or the last iteration's (one pass; rows carry `tile_grams`).")] = "exact",
    tile_content: Annotated[str, typer.Option("--tile-content", help="Comma list of held and/or per-tile: a tiled case's content targets held, or made again at each tile's pass (as a plan does where held ones do not fit; rows carry `tile_content`).")] = "held",
    ablate: Annotated[bool, typer.Option("--ablate", help="Also run each case with channels-last, cudnn.benchmark (GPU) and --lowp-weights (bf16/fp16) flipped, one at a time.")] = False,
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the loss function (first iterations compile).")] = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="Capture the whole Adam step in a CUDA graph (GPU, --optimizer adam).")] = False,
    optimizer_phase: Annotated[bool, typer.Option("--optimizer-phase/--no-optimizer-phase", help="Also time each optimiser's step alone (no network) at each size.")] = True,
    targets_phase: Annotated[bool, typer.Option("--targets-phase/--no-targets-phase", help="Also time the targets: PyTorch against ONNX Runtime.")] = True,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="Comma list, e.g. 1,2,4: also time whole jobs with that many images optimised together (rows with batch_size and jobs_per_minute).", show_default=False)] = None,
    flops: Annotated[bool, typer.Option("--flops", help="Print the per-layer FLOP count for the sizes and presets, and exit.")] = False,
    to_result: Annotated[bool, typer.Option("--to-result", help="Instead of throughput: seconds until each setting's loss is within 1% of a reference (500 single-scale fp32 L-BFGS iterations, computed once and cached).")] = False,
    result_scales: Annotated[Optional[list[str]], typer.Option("--result-scales", metavar="SCALES", help="--to-result: a scales setting to time, repeatable: single, auto, or sizes with iterations such as 64:100,128:50,256 [single, auto].", show_default=False)] = None,
    result_iterations: Annotated[int, typer.Option("--result-iterations", min=1, max=MAX_ITERATIONS, help="--to-result: most iterations at the output size before a setting counts as not reached.")] = 500,
    content: Annotated[Optional[Path], typer.Option("--content", help="--to-result: content image [seeded synthetic images].", show_default=False)] = None,
    style: Annotated[Optional[Path], typer.Option("--style", help="--to-result: style image.", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write {results: [...], device, date, torch_threads, weights, versions, command} here.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write one CSV row per result here.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="PNG: ms/iteration and TFLOP/s against size, a line per precision.")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Print every column (about 190 wide) instead of the table that fits the terminal.")] = False,
) -> None:
    """Measure the optimisation loop's throughput.

    Per case: ms/iteration, TFLOP/s, percent of peak and peak memory.
    """
    from nst.engine.bench import CPU_BF16_REASON, CPU_FP16_REASON, LOOPS, OPTIMIZERS, TILE_CONTENT, BenchCase, bench_case, bench_optimizer, expand_cases, parse_size, settle_peaks, skipped_row
    from nst.engine.bench_targets import bench_targets
    from nst.engine.device import is_emulated, resolve_device, resolve_precision

    with user_errors():
        check_seed(seed)
        hw = [parse_size(s) for s in parse_list(sizes, what="size")]
        if not hw:
            raise UserError("--sizes is empty: give e.g. 256,512")
        every = precision.strip().lower() == "all"
        names = [p.value for p in Precision] if every else _choices(precision, ("auto", *(p.value for p in Precision)), "precision", alone="all")
        # --to-result also takes lbfgs:H, L-BFGS with a history of H (`result_cases` checks them)
        opts = list(parse_list(optimizer, what="optimizer")) if to_result else _choices(optimizer, OPTIMIZERS, "optimizer")
        presets = _choices(preset_names, tuple(p.value for p in Preset), "preset")
        loops = _choices(loop, LOOPS, "loop")
        if flops:
            _print_flops(hw, presets)
            return
        dev = resolve_device(device)
        precs = list(dict.fromkeys(resolve_precision(dev, n) if n == "auto" else Precision(n) for n in names))
        tiles, grams = _tiles(tile), _choices(tile_grams, tuple(m.value for m in TileGrams), "tile grams")
        contents = [c.replace("-", " ") for c in _choices(tile_content, tuple(c.replace(" ", "-") for c in TILE_CONTENT), "tile content")]
        cases = expand_cases(hw, precisions=precs, optimizers=list(dict.fromkeys(o.split(":")[0] for o in opts)), presets=presets, loops=loops, channels_last=channels_last,
                             cudnn_benchmark=cudnn_benchmark, compile=compile_, cuda_graph=cuda_graph, lowp_weights=lowp_weights,
                             ablate=ablate, cuda=dev.type == "cuda", tiles=tiles, tile_grams=grams, tile_contents=contents)
        batch_sizes = parse_list(batch_size, cast=int, what="batch size")
        if any(b < 1 for b in batch_sizes):
            raise UserError(f"--batch-size takes sizes of 1 or more, got {batch_size}")
        for path, flag, example in ((json_path, "--json", "bench.json"), (csv_path, "--csv", "bench.csv"), (plot_path, "--plot", "bench.png")):
            check_writable(path, flag, example=example)  # not only once the cases have run
        if to_result:
            from .bench_result import result_cases

            result_case_list = result_cases(hw, presets=presets, optimizers=opts, precisions=precs, scales=result_scales or ["single", "auto"],
                                            tiles=tiles, tile_grams=grams, tile_contents=contents)
        w = load_weights_for(weights, seed)
        if to_result:
            _to_result(result_case_list, w, dev, content=content, style=style, seed=seed, max_iterations=result_iterations,
                       json_path=json_path, csv_path=csv_path, plot_path=plot_path, wide=wide)
            return
        rows: list[BenchRow] = []
        peaks: dict = {}
        meta = _meta(dev, w)
        partial_json = json_path  # None once a write of the rows so far has failed
        with console.status("benchmarking") as status:
            for i, case in enumerate(cases, 1):
                what = f"case {i}/{len(cases)}: {case.loop} {case.preset} {case.optimizer} {case.precision.value} {case.height}x{case.width}"
                status.update(what)
                if every and is_emulated(dev, case.precision):  # fp16 on a CPU, bf16 without bf16 units
                    rows.append(skipped_row(case, dev, CPU_FP16_REASON if case.precision == Precision.FP16 else CPU_BF16_REASON))
                    continue
                rows.append(bench_case(case, weights=w, device=dev, iterations=iterations, warmup=warmup, seed=seed, peaks=peaks))
                partial_json = _partial(partial_json, rows, meta, what)
            if optimizer_phase:
                for o in opts:
                    for h, wd in hw:
                        status.update(f"optimizer phase {o} {h}x{wd}")
                        rows.append(bench_optimizer(BenchCase(h, wd, optimizer=o, preset=presets[0]), device=dev, iterations=iterations, warmup=warmup, seed=seed))
            if batch_sizes:
                from nst.engine.bench_batch import bench_batch

                for h, wd in hw:
                    for p in precs:
                        status.update(f"batch phase {h}x{wd} {p.value}: batch sizes {','.join(map(str, batch_sizes))}")
                        rows.extend(bench_batch(BenchCase(h, wd, precision=p, optimizer=opts[0], preset=presets[0]), weights=w, device=dev,
                                                batch_sizes=batch_sizes, iterations=iterations, seed=seed))
            if targets_phase:
                for pr in presets:
                    status.update(f"targets phase {pr}: exporting the target module (once per weights and layers)")
                    onnx_path = _exported(w, pr)
                    for h, wd in hw:
                        status.update(f"targets phase {pr} {h}x{wd}")
                        rows.extend(bench_targets(BenchCase(h, wd, preset=pr, channels_last=channels_last, cudnn_benchmark=cudnn_benchmark),
                                                  weights=w, device=dev, iterations=iterations, warmup=min(warmup, 1) or 1, seed=seed, onnx_path=onnx_path, peaks=peaks))
        rows = settle_peaks(rows)
        if wide:  # every column: let it run past the terminal's edge rather than wrap its cells
            Console(file=console.file, width=max(console.width, 200), highlight=False).print(_table(rows, dev))
        else:
            console.print(_narrow_table(rows, dev))
        for reason in dict.fromkeys(f"{r.precision} {r.loop}: {r.reason}" for r in rows if r.status != "ok"):
            console.print(f"[yellow]skipped[/] {reason}")
        if json_path is not None:
            write_json(json_path, {"results": [r.to_dict() for r in rows], **meta, "complete": True})
            console.print(f"wrote {json_path}")
        if csv_path is not None:
            write_csv(csv_path, rows)
            console.print(f"wrote {csv_path}")
        if plot_path is not None:
            write_plot(plot_path, rows, title=f"nst bench on {meta['device']}")
            console.print(f"wrote {plot_path}")


def _tiles(text: str) -> list[int | None]:
    """`off,256` -> [None, 256]: the whole image and 256 px tiles."""
    out: list[int | None] = []
    for part in parse_list(text, what="tile", option="--tile"):
        if part.lower() == "off":
            out.append(None)
        elif part.isdigit() and int(part) >= 16:
            out.append(int(part))
        else:
            raise UserError(f"--tile takes off and tile edges of 16 px or more, got {part!r}")
    return list(dict.fromkeys(out)) or [None]


def _partial(json_path: Path | None, rows: list[BenchRow], meta: dict[str, object], what: str) -> Path | None:
    """After each case: the rows so far in --json (`complete: false`), so a sweep stopped by a time
    limit keeps what it measured; and, where the console is no terminal (a log), one line per case,
    since the spinner prints nothing there. Returns where to write them next time: None after a
    failed write (one warning; the final write says it again if it still fails)."""
    if json_path is not None:
        try:
            write_json(json_path, {"results": [r.to_dict() for r in rows], **meta, "complete": False})
        except OSError as e:
            warn(f"could not write the rows so far to {json_path}: {e.strerror or e}")
            json_path = None
    if not console.is_terminal:
        r = rows[-1]
        got = f"{r.ms_per_iteration:.2f} ms/it" if r.status == "ok" and r.ms_per_iteration is not None else "skipped (why: below the table)"
        console.print(f"{what}: {got}", highlight=False)
    return json_path


def _meta(dev: torch.device, w: Weights) -> dict[str, object]:
    import torch

    return {
        "device": _device_name(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "weights": w.to_dict(),
        "versions": versions(),
        "command": "nst " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "nst" in Path(sys.argv[0]).name else "nst bench",
    }


def _to_result(cases: list, w: Weights, dev: torch.device, *, content: Path | None, style: Path | None, seed: int, max_iterations: int,
               json_path: Path | None, csv_path: Path | None, plot_path: Path | None, wide: bool) -> None:
    """The --to-result phase: rows, table, JSON/CSV like the other phases, and a loss-against-seconds plot."""
    from .bench_result import result_table, run_result_phase, write_result_plot

    with console.status("to result") as status:
        rows, curves, extra = run_result_phase(cases, weights=w, device=dev, content=content, style=style, seed=seed, max_iterations=max_iterations, status=status)
    table = result_table(rows, f"nst bench --to-result: {_device_name(dev)}", wide=wide)
    (Console(file=console.file, width=max(console.width, 160), highlight=False) if wide else console).print(table)
    meta = {**_meta(dev, w), **extra}
    if json_path is not None:
        write_json(json_path, {"results": [r.to_dict() for r in rows], "curves": [c.__dict__ for c in curves], **meta})
        console.print(f"wrote {json_path}")
    if csv_path is not None:
        write_csv(csv_path, rows)
        console.print(f"wrote {csv_path}")
    if plot_path is not None:
        write_result_plot(plot_path, curves, rows, title=f"nst bench --to-result on {meta['device']}")
        console.print(f"wrote {plot_path}")


def _exported(w: Weights, preset_name: str) -> Path | None:
    """The store's exported target module for the preset's layers (exported once), or None to
    let the bench fall back to a minimal in-memory export."""
    try:
        from nst.export import ModuleSpec, export_to_store
    except ImportError:
        return None
    cfg = preset(preset_name)
    try:
        return export_to_store(cache_dir(), w, ModuleSpec.of(cfg)).path
    except Exception as e:  # the bench still runs; the table says which ONNX path it timed
        console.print(f"[yellow]note:[/] exporting the target module failed ({str(e).splitlines()[0]}); timing a minimal in-memory export instead")
        return None


def _device_name(dev: torch.device) -> str:
    import torch

    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def _fmt(v: object, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _case_note(r: BenchRow) -> str:
    notes = ["compiled"] if r.compile else []
    if r.cuda_graph:
        notes.append("CUDA graph")
    if r.precision in ("bf16", "fp16") and not r.lowp_weights:
        notes.append("weights cast per call")
    if r.tile_grams == "previous":
        notes.append("previous Grams")
    if r.tile_content == "per tile":
        notes.append("content per tile")
    return ", ".join(notes)


def _case_label(r: BenchRow, *, presets_vary: bool) -> tuple[str, str]:
    """What a row timed, in a few words (`fast lbfgs`, `adam step alone`, `targets onnxruntime
    cpu`), and its flags that differ from the defaults (`weights cast per call`), or ""."""
    if r.phase == "optimisation":
        parts = [r.loop, r.optimizer]
    elif r.phase == "optimizer":
        parts = [r.optimizer, "step alone"]
    elif r.phase == "targets":
        parts = ["targets", r.provider.removesuffix(" (OnnxTargets)")]
    elif r.phase == "batch":
        parts = [f"batch of {r.batch_size}", r.optimizer]
    else:
        parts = [r.phase, r.loop, r.optimizer]
    if presets_vary:
        parts.append(r.preset)
    if not r.channels_last:
        parts.append("NCHW")
    if r.tile is not None:
        parts.append(f"tile {r.tile}")
    note = _case_note(r)
    if r.phase == "batch" and r.status == "ok" and r.jobs_per_minute is not None:
        note = ", ".join(x for x in (f"{r.jobs_per_minute:.2f} jobs/min", note) if x)
    return " ".join(p for p in parts if p and p not in ("-", "none")), note


def _narrow_table(rows: list[BenchRow], dev: torch.device) -> Table:
    """The columns that fit 80: what ran, precision, size, ms/it, TFLOP/s, % of peak, memory.
    `--wide`, `--json` and `--csv` have the rest (p10-p90, it/s, MP-it/s, each flag)."""
    presets_vary = len({r.preset for r in rows}) > 1
    table = Table(title=f"nst bench: {_device_name(dev)}", header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("case", overflow="fold")
    table.add_column("prec")
    for col in ("size", "ms/it", "TFLOP/s", "% peak", "MB"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        ok = r.status == "ok"
        label, note = _case_label(r, presets_vary=presets_vary)
        table.add_row(label, r.precision, r.size, f"{r.ms_per_iteration:.2f}" if ok else "skipped",
                      _fmt(r.tflops, 3), _fmt(r.percent_of_peak, 1), _fmt(r.peak_memory_mb, 0))
        if note:  # on a line of its own, so the case column stays narrow
            table.add_row(f"  {note}", style="dim")
    sources = sorted({r.peak_source for r in rows if r.peak_source})
    notes = (["preset " + rows[0].preset] if rows and not presets_vary else []) + (["peak: " + "; ".join(sources)] if sources else [])
    table.caption = "; ".join(notes) + ("; more columns: --wide, --json, --csv" if rows else "")
    return table


def _table(rows: list[BenchRow], dev: torch.device) -> Table:
    table = Table(title=f"nst bench: {_device_name(dev)}", header_style="bold")
    for col in ("phase", "loop", "preset", "optimizer", "precision", "size", "CL", "ms/it", "p10-p90", "it/s", "MP-it/s", "TFLOP/s", "% peak", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("phase", "loop", "preset", "optimizer", "precision", "note") else "right", no_wrap=True)
    for r in rows:
        ok = r.status == "ok"
        ms = f"{r.ms_per_iteration:.2f}" if ok else "skipped"
        spread = f"{r.ms_per_iteration_p10:.2f}-{r.ms_per_iteration_p90:.2f}" if ok and r.ms_per_iteration_p10 is not None else "-"
        note = "skipped (below)" if not ok else (r.provider if r.phase == "targets" else _case_note(r))
        if r.phase == "optimizer":
            note = r.layers
        if r.phase == "batch" and ok:
            note = f"batch {r.batch_size}: {r.jobs_per_minute:.2f} jobs/min"
        table.add_row(r.phase, r.loop + (f" tile {r.tile}" if r.tile is not None else ""), r.preset, r.optimizer if r.phase != "targets" else "-", r.precision, r.size,
                      "y" if r.channels_last else "n", ms, spread, _fmt(r.iterations_per_second, 1), _fmt(r.megapixel_iterations_per_second, 3),
                      _fmt(r.tflops, 3), _fmt(r.percent_of_peak, 1), _fmt(r.peak_memory_mb, 0), note)
    sources = sorted({r.peak_source for r in rows if r.peak_source})
    table.caption = "peak: " + "; ".join(sources) if sources else None
    return table


def write_csv(path: Path, rows: list[BenchRow]) -> Path:
    """One row per result, the columns of BenchRow, atomically."""
    from nst.engine.bench import ROW_KEYS

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
            wr.writeheader()
            for r in rows:
                wr.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})

    return write_atomic(Path(path), write)


def write_plot(path: Path, rows: list[BenchRow], *, title: str = "nst bench") -> Path:
    """Two panels against megapixels: ms/iteration and TFLOP/s, one line per (precision, case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_tf) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[BenchRow]] = {}
    for r in rows:
        if r.status == "ok" and r.phase == "optimisation":
            label = r.precision
            if len({(x.loop, x.preset, x.optimizer, x.channels_last, x.lowp_weights, x.tile, x.tile_grams, x.tile_content) for x in rows if x.phase == "optimisation"}) > 1:
                label += f" {r.loop} {r.preset} {r.optimizer}" + ("" if r.channels_last else " nchw") + ("" if r.lowp_weights else " cast-per-call")
                label += "" if r.tile is None else f" tile {r.tile}" + (" content per tile" if r.tile_content == "per tile" else "")
            lines.setdefault(label, []).append(r)
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r.height * r.width)
        xs = [r.height * r.width / 1e6 for r in rs]
        ax_ms.plot(xs, [r.ms_per_iteration for r in rs], marker="o", label=label)
        ax_tf.plot(xs, [r.tflops for r in rs], marker="o", label=label)
    for ax, ylabel in ((ax_ms, "ms per iteration (median)"), (ax_tf, "achieved TFLOP/s")):
        ax.set_xlabel("image size (megapixels)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_ms.set_yscale("log")
    if lines:
        ax_ms.legend(fontsize=7)
    return write_figure(path, fig, title=title)


def _print_flops(hw: list[tuple[int, int]], presets: list[str]) -> None:
    from nst.engine.flops import count_flops

    for name in presets:
        cfg = preset(name)
        layers = (*cfg.content_layers, *cfg.style_layers)
        for h, w in hw:
            fc = count_flops((h, w), layers=layers, style_layers=cfg.style_layers, pooling=cfg.pooling)
            deepest = deepest_layer(layers)
            table = Table(title=f"FLOPs per iteration: {name} preset at {h}x{w}, cut after {deepest}", header_style="bold")
            for col in ("layer", "kind", "output C x H x W", "forward GFLOP", "input-grad GFLOP"):
                table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
            for layer in fc.layers:
                c, lh, lw = layer.shape
                table.add_row(layer.name, layer.kind, f"{c}x{lh}x{lw}", f"{layer.forward / 1e9:.4f}", f"{layer.input_grad / 1e9:.4f}")
            table.add_row("convs", "", "", f"{fc.conv_forward / 1e9:.4f}", f"{fc.conv_input_grad / 1e9:.4f}", style="bold")
            table.caption = f"total {fc.total / 1e9:.3f} GFLOP (convs {(fc.conv_forward + fc.conv_input_grad) / 1e9:.3f}, relu/pool/gram {fc.other / 1e9:.3f}); 1 MAC = 2 FLOPs, biases and loss sums not counted"
            console.print(table)
            print(f"{name}\t{h}x{w}\tconv_forward={fc.conv_forward}\tconv_input_grad={fc.conv_input_grad}\tother={fc.other}\ttotal={fc.total}")
