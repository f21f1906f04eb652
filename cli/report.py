"""Timing reports: the terminal table, the JSON file, and the side-by-side comparison sheet."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from nst.engine.files import write_atomic

if TYPE_CHECKING:
    import torch
    from PIL import Image


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "onnx", "onnxruntime", "numpy", "PIL", "typer"):
        try:
            m = __import__(mod)
            out[mod if mod != "PIL" else "pillow"] = getattr(m, "__version__", "?")
        except ImportError:
            pass
    try:
        from importlib.metadata import version

        out["nst"] = version("nst")
    except Exception:  # not installed as a distribution (running from a checkout)
        pass
    return out


def seconds_per_iteration(times: list[float]) -> dict[str, float | None]:
    if not times:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(times), "median": statistics.median(times)}


def timing_table(phases: dict[str, float], per_iter: dict[str, float | None], *, iterations: int, extra: dict[str, str] | None = None) -> Table:
    table = Table(title="timing", show_header=True, header_style="bold")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, secs in phases.items():
        table.add_row(name, f"{secs:.3f}")
    table.add_row("total", f"{sum(phases.values()):.3f}", style="bold")
    if per_iter["mean"] is not None and iterations > 0:  # none kept: a loss infinite from the start times one that is not counted
        # Two rates, labelled: the overall one (iterations over the optimisation phase, what the
        # progress bar ends on) counts the slow first iterations and any per-scale setup; the
        # median iteration's does not.
        optim = phases.get("optimisation", 0.0)
        overall = f"{iterations / optim:.1f} it/s overall (as the bar)" if optim > 0 else "no time measured"
        median = f"median {per_iter['median']:.4f} s" + (f" ({1 / per_iter['median']:.1f} it/s)" if per_iter["median"] else "")
        table.caption = f"{iterations} iterations: {overall}; per iteration {median}, mean {per_iter['mean']:.4f} s"
    for k, v in (extra or {}).items():
        table.add_row(k, v, style="dim")
    return table


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_figure(path: Path, fig: Any, *, title: str) -> Path:
    """Give a matplotlib figure its title and layout, write it as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def comparison_sheet(
    content: Image.Image, styles: list[Image.Image], result: torch.Tensor, *, labels: list[str] | None = None, note: str | None = None,
    masks: list[tuple[str, Image.Image]] | None = None,
) -> Image.Image:
    """Content, style(s), any masks (label, greyscale image) and result side by side at the
    result's height, labelled underneath; `note` (e.g. that the weights were random) on a line of
    its own below the labels."""
    from PIL import Image, ImageDraw

    from nst.engine.images import to_pil

    out = to_pil(result)
    h = out.height
    shown = [m.convert("RGB") for _, m in masks or []]
    tiles = [content, *styles, *shown, out]
    names = labels or (["content"] + [f"style {i + 1}" if len(styles) > 1 else "style" for i in range(len(styles))] + [name for name, _ in masks or []] + ["result"])
    scaled = [t.resize((max(1, round(t.width * h / t.height)), h), Image.Resampling.LANCZOS) for t in tiles]
    gap, band = 8, 18
    note_band = band if note else 0
    width = sum(t.width for t in scaled) + gap * (len(scaled) + 1)
    if note:  # wide enough for the note (Pillow's default font: about 6 px a character)
        width = max(width, 2 * gap + round(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(note)))
    sheet = Image.new("RGB", (width, h + 2 * gap + band + note_band), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    first_mask = 1 + len(styles)
    for i, (tile, name) in enumerate(zip(scaled, names)):
        sheet.paste(tile, (x, gap))
        if first_mask <= i < first_mask + len(shown):  # a mask's white would melt into the page
            draw.rectangle((x - 1, gap - 1, x + tile.width, gap + tile.height), outline=(150, 150, 150))
        draw.text((x, h + gap + 3), name, fill="black")
        x += tile.width + gap
    if note:
        draw.text((gap, h + gap + band + 3), note, fill=(180, 0, 0))
    return sheet
