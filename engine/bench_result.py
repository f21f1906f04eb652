"""The to-result phase of `nst bench`: how long each setting takes to reach a finished image.

A setting (size, preset, optimiser, precision, scales) runs the real `stylize` and reads the
loss at every iteration. It has reached the result at the first iteration at the output size
whose loss is within `TOLERANCE` of the reference loss: the lowest loss of
`REFERENCE_ITERATIONS` single-scale fp32 L-BFGS iterations on the same problem (its last accepted
point). The reference is computed once per problem and kept in a small JSON store, keyed by
everything that decides it. Time runs from the `stylize` call, so later stages' targets and the
coarse stages themselves are counted. Pure measurement: no printing; the CLI writes the rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .bench import BenchRow, unless_out_of_memory
from .cache import REFERENCES_DIR
from .config import AUTO, Optimizer, Precision, StyleConfig, TileGrams, preset
from .device import DeviceError, Runtime, check_precision, synchronize
from .errors import ConfigError
from .files import write_atomic
from .images import output_shape
from .plan import plan_run
from .transfer import Iterate, StopRun, stylize
from .weights import Weights

REFERENCE_ITERATIONS = 500
TOLERANCE = 0.01  # "reached": loss <= (1 + TOLERANCE) * reference
# Bump when the optimiser's iterates change, so that a stored reference is recomputed.
REFERENCE_FORMAT = "1"


@dataclass(frozen=True)
class ResultCase:
    """One setting to time. `scales`: "single", "auto", or sizes ending at `size`, each with an
    optional iteration count ("64:100,128:50,256"; the last stage runs until it reaches the
    result or `max_iterations`)."""

    size: int
    preset: str = "gatys"
    optimizer: str = "lbfgs"  # lbfgs, adam, or lbfgs:H (L-BFGS with a history of H)
    precision: Precision = Precision.FP32
    scales: str = "single"
    tile: int | None = None  # every stage larger than this runs tiled (`plan.plan_run`'s `tile`)
    tile_grams: str = "exact"  # with `tile`: StyleConfig.tile_grams
    tile_content: str = "held"  # with `tile`: the content targets held, or made at each tile's pass ("per tile")

    @property
    def label(self) -> str:
        return setting_label(self.optimizer, self.precision.value, self.scales, self.tile, self.tile_grams, self.tile_content)


def setting_label(optimizer: str, precision: str, scales: str, tile: int | None, tile_grams: str, tile_content: str = "held") -> str:
    """`adam fp32 single`, `adam fp32 single tile 128 previous content per tile`: a setting in a
    table or a plot."""
    tiled = "" if tile is None else (f" tile {tile}" + (" previous" if tile_grams == TileGrams.PREVIOUS.value else "")
                                     + (" content per tile" if tile_content == "per tile" else ""))  # fmt: skip
    return f"{optimizer} {precision} {scales}{tiled}"


@dataclass
class ResultCurve:
    """Loss against seconds at the output size, for the plot (one line per setting)."""

    label: str
    seconds: list[float] = field(default_factory=list)  # wall time from the stylize call
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads) from the call
    losses: list[float] = field(default_factory=list)
    start_seconds: float = 0.0  # when the output-size stage began (after the coarse stages)


def parse_scales(text: str, size: int) -> tuple[tuple[int, ...] | str, tuple[int, ...]]:
    """`single`, `auto` or `S[:N],...` -> (scales for StyleConfig, coarse stages' iterations or ())."""
    text = text.strip().lower()
    if text == "single":
        return (size,), ()
    if text == AUTO:
        return AUTO, ()
    sizes, its = [], []
    for part in text.split(","):
        s, _, n = part.strip().partition(":")
        try:
            sizes.append(int(s))
            its.append(int(n) if n else None)
        except ValueError:
            raise ConfigError(f"bad scales {text!r}: use single, auto, or sizes such as 64:100,128:50,256") from None
    if sizes[-1] != size:
        raise ConfigError(f"scales {text!r} must end at the size, {size}")
    if any(n is None for n in its[:-1]):
        raise ConfigError(f"scales {text!r}: give every stage but the last an iteration count (e.g. 128:100,256)")
    return tuple(sizes), tuple(n for n in its[:-1] if n is not None)


def result_config(case: ResultCase, *, max_iterations: int) -> StyleConfig:
    """The StyleConfig a setting runs: the preset at `case.size` with the case's optimiser (at that
    optimiser's lr, `config.preset`'s rule), its stages, and the last stage given up to
    `max_iterations`."""
    scales, coarse = parse_scales(case.scales, case.size)
    name, _, history = case.optimizer.partition(":")  # `lbfgs:5`: L-BFGS with a history of 5
    extra = {"lbfgs_history": int(history)} if history else {}
    cfg = preset(case.preset, size=case.size, optimizer=Optimizer(name), scales=scales, scale_iterations=(), save_every=0, tile_grams=case.tile_grams, **extra)
    coarse = coarse or cfg.stage_iterations[:-1]  # auto: the preset's own split of its budget
    return dataclasses.replace(cfg, scale_iterations=(*coarse, max_iterations))


def reference_config(case: ResultCase) -> StyleConfig:
    """Single-scale fp32 L-BFGS, REFERENCE_ITERATIONS iterations, on the case's problem: every one
    of them (no `lbfgs_patience`), so the reference is the lowest loss of all 500."""
    whole = dataclasses.replace(case, optimizer="lbfgs", precision=Precision.FP32, scales="single", tile=None, tile_grams="exact")
    return dataclasses.replace(result_config(whole, max_iterations=REFERENCE_ITERATIONS), lbfgs_patience=0)


def reference_key(cfg: StyleConfig, weights: Weights, content: Image.Image, style: Image.Image, device: torch.device) -> str:
    """Everything that decides the reference loss: format, config, weights, pixels, device type."""
    h = hashlib.sha256()
    for part in (REFERENCE_FORMAT, json.dumps(cfg.to_dict(), sort_keys=True), weights.fingerprint, device.type):
        h.update(str(part).encode() + b"\0")
    for im in (content, style):
        h.update(f"{im.mode}{im.size}".encode() + b"\0")
        h.update(im.tobytes())
    return h.hexdigest()[:32]


class ReferenceStore:
    """Reference losses as JSON files under `<root>/references/`; an unreadable file is a miss."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / REFERENCES_DIR

    def lookup(self, key: str) -> float | None:
        try:
            data = json.loads((self.root / f"{key}.json").read_text())
            loss = float(data["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return loss if loss > 0 and loss == loss else None

    def store(self, key: str, record: dict[str, object]) -> None:
        write_atomic(self.root / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def reference_loss(case: ResultCase, content: Image.Image, style: Image.Image, *, weights: Weights, device: torch.device, store: ReferenceStore | None = None) -> tuple[float, bool]:
    """(reference loss, whether it came from the store) for the case's problem."""
    cfg = reference_config(case)
    key = reference_key(cfg, weights, content, style, device)
    if store is not None:
        hit = store.lookup(key)
        if hit is not None:
            return hit, True
    t = time.perf_counter()
    r = stylize(content, [style], cfg, weights=weights, runtime=Runtime(device=device, precision=Precision.FP32))
    loss = min(r.loss_history)  # the last accepted point: L-BFGS takes back steps that rose
    if store is not None:
        store.store(key, {"loss": loss, "iterations": len(r.loss_history), "seconds": time.perf_counter() - t,
                          "device": str(device), "config": cfg.to_dict(), "weights": weights.fingerprint, "format": REFERENCE_FORMAT})
    return loss, False


def time_to_result(case: ResultCase, content: Image.Image, style: Image.Image, *, weights: Weights, device: torch.device, reference: float,
                   max_iterations: int = REFERENCE_ITERATIONS) -> tuple[BenchRow, ResultCurve]:
    """Run one setting until its output-size loss is within TOLERANCE of `reference` (or the last
    stage's `max_iterations` run out): its row and its loss-against-seconds curve."""
    label = case.label
    cfg = result_config(case, max_iterations=max_iterations)
    hw = output_shape(content.width, content.height, case.size)
    try:
        check_precision(device, case.precision)
    except DeviceError as e:
        return _row(case, device, reference, hw=hw, status="skipped", reason=str(e)), ResultCurve(label)
    return unless_out_of_memory(
        lambda: _run(case, cfg, content, style, weights=weights, device=device, reference=reference),
        device, lambda reason: (_row(case, device, reference, hw=hw, status="skipped", reason=reason), ResultCurve(label)),
    )


def _run(case: ResultCase, cfg: StyleConfig, content: Image.Image, style: Image.Image, *, weights: Weights, device: torch.device, reference: float) -> tuple[BenchRow, ResultCurve]:
    target = (1 + TOLERANCE) * reference
    last = len(cfg.sizes) - 1
    curve = ResultCurve(case.label)
    hit: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()

    def watch(it: Iterate) -> None:
        loss = float(it.loss)  # a sync: what the clock reads is finished work
        now, cpu = time.perf_counter() - t0, time.process_time() - c0
        if it.stage != last:
            return
        if it.iteration == 1:
            curve.start_seconds = now
        curve.seconds.append(now)
        curve.cpu_seconds.append(cpu)
        curve.losses.append(loss)
        if loss <= target and not hit:
            hit.update(seconds=now, cpu=cpu, step=it.step)
            raise StopRun

    plan = None if case.tile is None else plan_run(cfg, content.size, [style.size], precision=case.precision, device=str(device), tile=case.tile,
                                                   content_targets=case.tile_content)  # fmt: skip
    synchronize(device)
    r = stylize(content, [style], cfg, weights=weights, runtime=Runtime(device=device, precision=case.precision), callback=watch, plan=plan)
    steps = [b - a for a, b in zip(curve.seconds, curve.seconds[1:])]  # the output-size stage's iterations
    return _row(
        case, device, reference, hw=output_shape(content.width, content.height, case.size),
        seconds_to_result=hit.get("seconds"), cpu_seconds_to_result=hit.get("cpu"), iterations_to_result=int(hit["step"]) if hit else None, reached=bool(hit),
        final_loss=min(curve.losses) if curve.losses else None, iterations=r.steps,
        ms_per_iteration=1e3 * statistics.median(steps) if steps else None,
        stage_iterations=",".join(f"{s}:{n}" for s, n in zip(cfg.sizes, [*cfg.stage_iterations[:-1], len(curve.losses)])),
        seconds_run=time.perf_counter() - t0,
    ), curve  # fmt: skip


def _row(case: ResultCase, device: torch.device, reference: float, *, hw: tuple[int, int] | None = None, ms_per_iteration: float | None = None, iterations: int = 0, **extra: object) -> BenchRow:
    h, w = hw or (case.size, case.size)
    return BenchRow(
        size=f"{h}x{w}", height=h, width=w, precision=case.precision.value, device=str(device), ms_per_iteration=ms_per_iteration,
        ms_per_iteration_p10=None, ms_per_iteration_p90=None, iterations_per_second=1e3 / ms_per_iteration if ms_per_iteration else None,
        megapixel_iterations_per_second=None, tflops=None, percent_of_peak=None, peak_memory_mb=None, phase="result", loop="fast",
        optimizer=case.optimizer, preset=case.preset, provider=str(device), iterations=iterations, scales=case.scales,
        tile=case.tile, tile_grams="" if case.tile is None else case.tile_grams, tile_content="" if case.tile is None else case.tile_content,
        reference_loss=reference, **extra,  # type: ignore[arg-type]
    )


def synthetic_pair(seed: int = 0, size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A seeded content and style image for when no photos are given: smooth colour fields
    (content) and a finer, busier pattern (style). Photos give a more typical problem."""
    gen = torch.Generator().manual_seed(seed)

    def field(cells: int) -> torch.Tensor:
        low = torch.rand(1, 3, cells, cells, generator=gen)
        return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)

    content = field(6)
    style = (0.6 * field(24) + 0.4 * torch.rand(1, 3, size, size, generator=gen)).clamp(0, 1)
    to_pil = lambda t: Image.fromarray((t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), "RGB")  # noqa: E731
    return to_pil(content), to_pil(style)


__all__ = ["REFERENCE_ITERATIONS", "TOLERANCE", "ReferenceStore", "ResultCase", "ResultCurve", "parse_scales", "reference_loss", "result_config", "setting_label", "synthetic_pair", "time_to_result"]
