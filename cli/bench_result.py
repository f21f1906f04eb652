"""`nst bench --to-result`: time to a finished image for each setting; table, rows and a plot of
loss against seconds."""

from __future__ import annotations

import re

from pathlib import Path

import torch
from rich import box
from rich.table import Table

from nst.engine.bench import BenchRow, tile_settings
from nst.engine.bench_result import TOLERANCE, ReferenceStore, ResultCase, ResultCurve, parse_scales, reference_loss, setting_label, synthetic_pair, time_to_result
from nst.engine.config import Optimizer, Precision
from nst.engine.images import load_image
from nst.engine.weights import Weights

from .common import UserError, cache_dir
from .report import write_figure

# Imported by `nst bench` only when --to-result is given (it loads torch).

RESULT_OPTIMIZERS = tuple(o.value for o in Optimizer)


def result_cases(
    sizes: list[tuple[int, int]], *, presets: list[str], optimizers: list[str], precisions: list[Precision], scales: list[str],
    tiles: list[int | None] | None = None, tile_grams: list[str] | None = None, tile_contents: list[str] | None = None,
) -> list[ResultCase]:
    """Every setting, checked before any work: square sizes only (the content's aspect decides
    the shape), optimisers stylize has, scales that parse."""
    out = []
    for h, w in sizes:
        if h != w:
            raise UserError(f"--to-result takes sizes as N (the longest side; the content image sets the shape), not {h}x{w}")
    bad = [o for o in optimizers if o not in RESULT_OPTIMIZERS and not re.fullmatch(r"lbfgs:[1-9]\d*", o)]
    if bad:
        raise UserError(f"--to-result runs stylize's optimisers ({', '.join(RESULT_OPTIMIZERS)}, or lbfgs:H for a history of H), not {', '.join(bad)}")
    for (size, _) in sizes:
        for text in scales:
            parse_scales(text, size)  # ConfigError: one line from user_errors
        for pr in presets:
            for o in optimizers:
                for p in precisions:
                    for text in scales:
                        for tile, tg, tc in tile_settings(tiles or [None], tile_grams or ["exact"], tile_contents or ["held"]):
                            out.append(ResultCase(size, pr, o, p, text.strip().lower(), tile, tg, tc))
    return out


def run_result_phase(cases: list[ResultCase], *, weights: Weights, device: torch.device, content: Path | None, style: Path | None, seed: int,
                     max_iterations: int, status) -> tuple[list[BenchRow], list[ResultCurve], dict[str, object]]:  # noqa: ANN001
    """Reference once per problem (from the store when it has it), then every setting."""
    if (content is None) != (style is None):
        raise UserError("give both --content and --style, or neither (seeded synthetic images)")
    images = (load_image(content), load_image(style)) if content is not None and style is not None else synthetic_pair(seed)
    store = ReferenceStore(cache_dir())
    rows: list[BenchRow] = []
    curves: list[ResultCurve] = []
    refs: dict[str, object] = {}
    for i, case in enumerate(cases, 1):
        problem = f"{case.preset} {case.size}"
        if problem not in refs:
            status.update(f"reference for {problem} px: 500 single-scale fp32 L-BFGS iterations (once; then kept in the cache)")
            loss, hit = reference_loss(case, *images, weights=weights, device=device, store=store)
            refs[problem] = {"loss": loss, "stored": hit}
        status.update(f"to result {i}/{len(cases)}: {case.preset} {case.size} px {case.label}")
        row, curve = time_to_result(case, *images, weights=weights, device=device, reference=float(refs[problem]["loss"]), max_iterations=max_iterations)  # type: ignore[index]
        rows.append(row)
        curves.append(curve)
    meta = {"images": [str(content), str(style)] if content is not None else f"synthetic (seed {seed})", "references": refs, "tolerance": TOLERANCE}
    return rows, curves, meta


def result_table(rows: list[BenchRow], title: str, *, wide: bool = False) -> Table:
    """One line per setting: how long to within 1% of the reference, and how far it got. The
    default fits 80 columns; `wide` adds the preset, whether it was reached and the stages run."""
    cpu = any(r.device.startswith("cpu") for r in rows)
    table = Table(title=title, header_style="bold", box=None if wide else box.SIMPLE_HEAD)
    cols = [*(["preset"] if wide else []), "size", "setting", "s to result", *(["CPU s"] if cpu else []), "its", *(["reached"] if wide else []), "best/ref",
            *(["stages run"] if wide else [])]
    for col in cols:
        table.add_column(col, justify="right" if col in ("s to result", "CPU s", "its", "best/ref") else "left",
                         no_wrap=col not in ("setting", "stages run"), overflow="fold")
    base = {(r.preset, r.size, r.precision): r for r in rows if r.optimizer == "lbfgs" and r.scales == "single" and r.tile is None and r.reached}

    def fmt(v: float | None, b: float | None) -> str:
        return "-" if v is None else f"{v:.1f}" + (f" ({b / v:.2f}x)" if b else "")

    for r in rows:
        setting = setting_label(r.optimizer, r.precision, r.scales, r.tile, r.tile_grams, r.tile_content)
        if r.status != "ok":
            cells = {"s to result": "skipped", "stages run": r.reason}
        else:
            ref = base.get((r.preset, r.size, r.precision))
            cells = {
                "s to result": fmt(r.seconds_to_result, ref.seconds_to_result if ref else None),
                "CPU s": fmt(r.cpu_seconds_to_result, ref.cpu_seconds_to_result if ref else None),
                "its": str(r.iterations_to_result or "-"), "reached": "yes" if r.reached else "no",
                "best/ref": f"{r.final_loss / r.reference_loss:.4f}" if r.final_loss and r.reference_loss else "-", "stages run": r.stage_iterations,
            }
        cells.update({"preset": r.preset, "size": r.size, "setting": setting})
        table.add_row(*(cells.get(c, "-") for c in cols))
    table.caption = (f"to result: first output-size loss within {TOLERANCE:.0%} of the reference; '-': not reached; (Nx): single-scale L-BFGS's time / this row's"
                     + ("; CPU s: the process's CPU time, steadier than wall time on a shared machine" if cpu else "")
                     + ("" if wide else "; more: --wide, --json, --csv"))
    return table


def write_result_plot(path: Path, curves: list[ResultCurve], rows: list[BenchRow], *, title: str) -> Path:
    """Loss at the output size against seconds from the stylize call, one line per setting, with
    the reference's 1% band; one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys((r.preset, r.size) for r in rows))
    # On the CPU, the process's CPU time: a shared machine's load moves wall time, not the work.
    cpu = all(r.device.startswith("cpu") for r in rows)
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.5), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        ref = None
        for r, c in zip(rows, curves):
            if (r.preset, r.size) != problem or not c.seconds:
                continue
            ref = r.reference_loss
            xs = c.cpu_seconds if cpu else c.seconds
            (line,) = ax.plot(xs, c.losses, label=f"{c.label}" + ("" if r.reached else " (not reached)"), lw=1.2)
            hit = r.cpu_seconds_to_result if cpu else r.seconds_to_result
            if hit is not None:
                ax.axvline(hit, color=line.get_color(), lw=0.6, ls=":")
        ax.set_yscale("log")
        if ref is not None:
            ax.axhline(ref * (1 + TOLERANCE), color="k", lw=0.8, ls="--", label=f"reference + {TOLERANCE:.0%}")
            ax.set_ylim(ref * 0.97, ref * 20)  # the approach to the result; the first iterations run off the top
        ax.set_xlabel("CPU seconds from the stylize call (process time, all threads)" if cpu else "seconds from the stylize call")
        ax.set_ylabel("loss at the output size")
        ax.set_title(f"{problem[0]} {problem[1]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return write_figure(path, fig, title=title)
