"""Throughput of the optimisation loop: warm-up, N timed iterations, one `BenchRow` per case.

Pure measurement: no printing, no files. The CLI (`nst bench`) sweeps cases and writes the
table, JSON, CSV and plot. Each timed iteration is the real step: the loss, its gradient with
respect to the image, and the optimiser's update. On a GPU each iteration is timed with CUDA
events recorded on the stream and read once after the last one (no sync inside the loop); on
the CPU with `time.perf_counter`.

The two loops, `fast` and `reference`, and the step they time are in `bench_loops`; what a row's
`percent_of_peak` is against is in `peaks`; the targets phase is in `bench_targets`.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .bench_loops import fast_loss, case_flops, make_step, reference_loss
from .config import Optimizer, Precision, StyleConfig, TileGrams, preset
from .device import DeviceError, Runtime, autocast_dtype, check_precision, device_context, is_out_of_memory, out_of_memory_message, precision_context, release_memory, synchronize
from .errors import ConfigError
from .layers import LAYER_NAMES, deepest_layer, min_input_size
from .peaks import peak_for
from .plan import CONTENT_TARGETS
from .tiles import TiledObjective
from .weights import Weights

T = TypeVar("T")

OPTIMIZERS = ("lbfgs", "adam", "torch-lbfgs")
# fp16 autocast runs on the CPU but without fast kernels (measured: ~100x slower than fp32 on the
# 2-core AMD EPYC this was written on), so a default sweep skips it there; naming it runs it.
CPU_FP16_REASON = "fp16 on the CPU runs without fast kernels (~100x slower than fp32 where measured); skipped by default, pass --precision fp16 to time it anyway; use bf16"
# bf16 on a CPU without bf16 units (AVX512-BF16 or AMX) is emulated: measured on such a 2-core
# AMD EPYC, a bf16 matmul ran at 1.4 GFLOP/s, about a sixtieth of its fp32 convolution's rate.
CPU_BF16_REASON = ("this CPU has no bf16 units (AVX512-BF16 or AMX): bf16 is emulated, far slower than fp32; skipped by default, "
                   "pass --precision bf16 to time it anyway; --precision auto runs fp32 here")
LOOPS = ("fast", "reference")


@dataclass
class BenchRow:
    """One measured (or skipped) case. The first block holds the keys the issue names."""

    size: str  # "HxW"
    precision: str
    device: str
    ms_per_iteration: float | None  # median
    ms_per_iteration_p10: float | None
    ms_per_iteration_p90: float | None
    iterations_per_second: float | None
    megapixel_iterations_per_second: float | None
    tflops: float | None  # achieved: counted FLOPs / median time
    percent_of_peak: float | None
    peak_memory_mb: float | None
    # What the case was.
    phase: str = "optimisation"  # optimisation | targets | optimizer | batch
    loop: str = "fast"  # fast | reference | torch (targets) | onnxruntime (targets)
    optimizer: str = ""
    preset: str = ""
    layers: str = ""  # content+style layers, comma separated
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    cuda_graph: bool = False
    lowp_weights: bool = True  # bf16/fp16 rows: weights cast once (Runtime.lowp_weights)
    tile: int | None = None  # the fast loop tile by tile (tiles.TiledObjective), tile edge in px
    tile_grams: str = ""  # a tiled row's Grams: exact (two passes) or previous (one pass); "" when whole
    tile_content: str = ""  # a tiled row's content targets: held, or per tile (made at each tile's pass); "" when whole
    provider: str = ""  # the device, or the ONNX Runtime provider of a targets row
    height: int = 0
    width: int = 0
    iterations: int = 0
    warmup: int = 0
    gflop_per_iteration: float | None = None
    peak_tflops: float | None = None
    peak_source: str = ""  # where `peak_tflops` comes from: a datasheet, or a measured matmul or conv
    memory_source: str = ""  # what `peak_memory_mb` measures
    status: str = "ok"  # ok | skipped
    reason: str = ""  # why a row was skipped
    # The batch phase (`--batch-size`): images optimised together, and whole jobs finished per minute.
    batch_size: int | None = None
    jobs_per_minute: float | None = None
    # The to-result phase (phase "result", `bench_result`): how long until a finished image.
    scales: str = ""  # single | auto | sizes with their iterations
    stage_iterations: str = ""  # what ran: size:iterations per stage
    reference_loss: float | None = None  # lowest loss of 500 single-scale fp32 L-BFGS iterations
    seconds_to_result: float | None = None  # from the stylize call to the first loss within 1% of it
    # The same in this process's CPU time, all threads: steadier than wall time on a shared CPU;
    # meaningless for GPU work.
    cpu_seconds_to_result: float | None = None
    iterations_to_result: int | None = None  # over all stages
    reached: bool | None = None
    final_loss: float | None = None  # the lowest output-size loss seen
    seconds_run: float | None = None  # the whole run, to the result or to the iteration limit

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


ROW_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BenchRow))


@dataclass(frozen=True)
class BenchCase:
    """How one case runs (what it computes comes from the preset)."""

    height: int
    width: int
    precision: Precision = Precision.FP32
    optimizer: str = "lbfgs"
    preset: str = "gatys"
    loop: str = "fast"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False  # torch.compile the loss function (forward; autograd traces backward)
    cuda_graph: bool = False  # capture forward, backward and Adam(capturable) in one CUDA graph
    lowp_weights: bool = True  # bf16/fp16: weights held in that dtype, not cast at every call
    tile: int | None = None  # the fast loop evaluated tile by tile, as a tiled plan runs it; None: whole
    tile_grams: str = "exact"  # with `tile`: StyleConfig.tile_grams
    tile_content: str = "held"  # with `tile`: the content targets held, or made at each tile's pass ("per tile")


# `--tile-content`: how a tiled case has its content targets, as a plan's stage has them.
TILE_CONTENT = CONTENT_TARGETS


def parse_size(text: str) -> tuple[int, int]:
    """`256` (square) or `128x192` (H x W) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"bad size {text!r}: use N or HxW, e.g. 256 or 128x192") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"bad size {text!r}: sizes must be positive, N or HxW")
    return hw  # type: ignore[return-value]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _rss_mb() -> float:
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def expand_cases(
    sizes: list[tuple[int, int]],
    *,
    precisions: list[Precision],
    optimizers: list[str],
    presets: list[str],
    loops: list[str],
    channels_last: bool = True,
    cudnn_benchmark: bool = True,
    compile: bool = False,
    cuda_graph: bool = False,
    lowp_weights: bool = True,
    ablate: bool = False,
    cuda: bool = True,
    tiles: Sequence[int | None] = (None,),
    tile_grams: Sequence[str] = ("exact",),
    tile_contents: Sequence[str] = ("held",),
) -> list[BenchCase]:
    """Every combination, sizes innermost (so a plot's line is one run of cases); with `ablate`
    each case also runs with channels-last, (on `cuda`) cuDNN autotuning and (in bf16/fp16) the
    low-precision weights flipped, one at a time."""
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {o!r}: use {', '.join(OPTIMIZERS)}")
    for lp in loops:
        if lp not in LOOPS:
            raise ConfigError(f"unknown loop {lp!r}: use {', '.join(LOOPS)}")
    for tg in tile_grams:
        if tg not in {m.value for m in TileGrams}:
            raise ConfigError(f"unknown tile grams {tg!r}: use {', '.join(m.value for m in TileGrams)}")
    for tc in tile_contents:
        if tc not in TILE_CONTENT:
            raise ConfigError(f"unknown tile content {tc!r}: use {', '.join(TILE_CONTENT)}")
    for h, w in sizes:
        if min(h, w) < 1:
            raise ConfigError(f"size {h}x{w}: sizes must be positive")
    out = []
    for pr in presets:
        for lp in loops:
            for o in optimizers:
                for p in precisions:
                    variants = [(channels_last, cudnn_benchmark, lowp_weights)]
                    if ablate:
                        variants.append((not channels_last, cudnn_benchmark, lowp_weights))
                        if cuda:  # cuDNN autotuning means nothing on the CPU
                            variants.append((channels_last, not cudnn_benchmark, lowp_weights))
                        if autocast_dtype(Precision(p)) is not None:
                            variants.append((channels_last, cudnn_benchmark, not lowp_weights))
                    for cl, cb, lw in variants:
                        for tile, tg, tc in tile_settings(tiles, tile_grams, tile_contents):
                            for h, w in sizes:
                                out.append(BenchCase(h, w, Precision(p), o, str(pr), lp, cl, cb, compile, cuda_graph, lw, tile, tg, tc))
    return out


def tile_settings(tiles: Sequence[int | None], tile_grams: Sequence[str], tile_contents: Sequence[str]) -> list[tuple[int | None, str, str]]:
    """Each tile with each of the Grams and content targets asked for, as (tile, grams, content):
    an untiled case (`None`) has neither choice and runs once, as ("exact", "held")."""
    return [(tile, tg, tc) for tile in tiles for tg in (tile_grams if tile is not None else ("exact",))
            for tc in (tile_contents if tile is not None else ("held",))]  # fmt: skip


def bench_config(case: BenchCase) -> StyleConfig:
    opt = Optimizer.ADAM if case.optimizer == "adam" else Optimizer.LBFGS
    return preset(case.preset, size=max(32, max(case.height, case.width)), optimizer=opt, scales=())


def check_case_size(cfg: StyleConfig, case: BenchCase) -> None:
    """Raise ValueError if the image is too small for the deepest layer the case runs."""
    deepest = LAYER_NAMES[-1] if case.loop == "reference" else deepest_layer((*cfg.content_layers, *cfg.style_layers))
    need = min_input_size([deepest])
    if min(case.height, case.width) < need:
        raise ConfigError(f"size {case.height}x{case.width} is too small for the {case.preset} preset's {case.loop} loop (layer {deepest} needs at least {need} px a side)")


def case_images(case: BenchCase, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random content and style images: the cost does not depend on their values."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(1, 3, case.height, case.width, generator=gen).to(device)
    style = torch.rand(1, 3, case.height, case.width, generator=gen).to(device)
    return content, style


def skipped_row(case: BenchCase, device: torch.device, reason: str, **extra: object) -> BenchRow:
    """A row for a case that was not run, with the reason (and any `extra` fields)."""
    fields: dict[str, object] = dict(
        size=f"{case.height}x{case.width}", precision=case.precision.value, device=str(device),
        ms_per_iteration=None, ms_per_iteration_p10=None, ms_per_iteration_p90=None,
        iterations_per_second=None, megapixel_iterations_per_second=None, tflops=None,
        percent_of_peak=None, peak_memory_mb=None, loop=case.loop, optimizer=case.optimizer,
        preset=case.preset, channels_last=case.channels_last, cudnn_benchmark=case.cudnn_benchmark,
        compile=case.compile, cuda_graph=case.cuda_graph, lowp_weights=case.lowp_weights, tile=case.tile,
        tile_grams=case.tile_grams if case.tile is not None else "", tile_content=case.tile_content if case.tile is not None else "",
        provider=str(device), height=case.height, width=case.width, status="skipped", reason=reason,
    )
    fields.update(extra)
    return BenchRow(**fields)  # type: ignore[arg-type]


def row_from_times(case: BenchCase, device: torch.device, times_ms: list[float], flops: int, peak: tuple[float, str], memory: tuple[float | None, str], **extra: object) -> BenchRow:
    ts = sorted(times_ms)
    med = statistics.median(ts)
    tflops = flops / (med / 1e3) / 1e12
    return BenchRow(
        size=f"{case.height}x{case.width}", precision=case.precision.value, device=str(device),
        ms_per_iteration=med, ms_per_iteration_p10=_quantile(ts, 0.1), ms_per_iteration_p90=_quantile(ts, 0.9),
        iterations_per_second=1e3 / med,
        megapixel_iterations_per_second=case.height * case.width / 1e6 * 1e3 / med,
        tflops=tflops, percent_of_peak=100.0 * tflops / peak[0], peak_memory_mb=memory[0],
        loop=case.loop, optimizer=case.optimizer, preset=case.preset, channels_last=case.channels_last,
        cudnn_benchmark=case.cudnn_benchmark, compile=case.compile, cuda_graph=case.cuda_graph,
        lowp_weights=case.lowp_weights, tile=case.tile, tile_grams=case.tile_grams if case.tile is not None else "",
        tile_content=case.tile_content if case.tile is not None else "", provider=str(device), height=case.height, width=case.width, iterations=len(ts),
        gflop_per_iteration=flops / 1e9, peak_tflops=peak[0], peak_source=peak[1], memory_source=memory[1],
        **extra,  # type: ignore[arg-type]
    )


def settle_peaks(rows: list[BenchRow]) -> list[BenchRow]:
    """The rows with one peak per (device, precision), never below the best rate a row reached,
    so no `percent_of_peak` is over 100.

    A measured peak (every CPU, and GPUs without a datasheet figure) is a lower bound on what the
    device can do, and so is each row's achieved rate: on a busy machine, or where oneDNN runs
    the real convolutions better than the micro-benchmark's, the measurement came out below the
    work (211% was seen on a CPU). The best of these lower bounds is the better peak, and
    `peak_source` says when it came from a row. A row beating a datasheet figure would mean its
    FLOP count or timing is wrong; it is capped the same way and the source says so.
    """
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        if r.peak_tflops is not None and r.tflops is not None:
            groups.setdefault((r.device, r.precision), []).append(r)
    settled: dict[tuple[str, str], tuple[float, str]] = {}
    for key, rs in groups.items():
        top = max(rs, key=lambda r: r.peak_tflops)  # type: ignore[arg-type,return-value]
        fastest = max(rs, key=lambda r: r.tflops)  # type: ignore[arg-type,return-value]
        peak, source = top.peak_tflops, top.peak_source
        if fastest.tflops > peak:  # type: ignore[operator]
            label = " ".join(x for x in (fastest.phase, fastest.loop, fastest.optimizer, fastest.precision, fastest.size) if x)
            why = "check its FLOP count and timing" if "datasheet" in source else "the measurement is a lower bound"
            source = f"the fastest row of this sweep ({label}), above {source} at {peak:.3g} TFLOP/s: {why}"
            peak = fastest.tflops
        settled[key] = (peak, source)  # type: ignore[assignment]
    out = []
    for r in rows:
        key = (r.device, r.precision)
        if key not in settled or r.tflops is None:
            out.append(r)
            continue
        peak, source = settled[key]
        # r.tflops / peak first: the fastest row's is then exactly 1 (100 * t / t is above 100 for one t in 20)
        out.append(dataclasses.replace(r, peak_tflops=peak, peak_source=source, percent_of_peak=100.0 * (r.tflops / peak)))
    return out


def _timer(device: torch.device, n: int) -> tuple[Callable[[int], None], Callable[[], list[float]]]:
    """(mark(i), read()): marks before iteration i and after the last; read() gives ms per iteration."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        stream = torch.cuda.current_stream(device)  # where the steps run (the caller made `device` current)

        def mark(i: int) -> None:
            events[i].record(stream)

        def read() -> list[float]:
            events[-1].synchronize()  # the only sync: after the last iteration
            return [events[i].elapsed_time(events[i + 1]) for i in range(n)]

        return mark, read
    stamps = [0.0] * (n + 1)

    def mark_cpu(i: int) -> None:
        stamps[i] = time.perf_counter()

    def read_cpu() -> list[float]:
        return [(stamps[i + 1] - stamps[i]) * 1e3 for i in range(n)]

    return mark_cpu, read_cpu


def time_steps(
    step: Callable[[], None], device: torch.device, *, iterations: int, warmup: int, after_warmup: Callable[[], None] | None = None
) -> list[float]:
    """Run `warmup` untimed steps, then `iterations` timed ones: ms each, with no sync between them.
    `after_warmup` runs between the two, once the warm-up's work is done. On CUDA the caller makes
    `device` current (`device.device_context`), as the steps need it too."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if after_warmup is not None:
        after_warmup()
    mark, read = _timer(device, iterations)
    for i in range(iterations):
        mark(i)
        step()
    mark(iterations)
    return read()


def bench_case(case: BenchCase, *, weights: Weights, device: torch.device, iterations: int = 10, warmup: int = 3, seed: int = 0, peaks: dict | None = None) -> BenchRow:
    """Warm up, then time `iterations` real steps of one case; a case that cannot run here is
    returned as a skipped row with the reason."""
    if iterations < 1:
        raise ConfigError(f"iterations must be at least 1, got {iterations}")
    try:
        check_precision(device, case.precision)
    except DeviceError as e:
        return skipped_row(case, device, str(e))
    if case.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {case.optimizer!r}: use {', '.join(OPTIMIZERS)}")
    if case.loop not in LOOPS:
        raise ConfigError(f"unknown loop {case.loop!r}: use {', '.join(LOOPS)}")
    if case.cuda_graph and device.type != "cuda":
        return skipped_row(case, device, "CUDA graphs need a CUDA device; not available on the CPU")
    if case.cuda_graph and (case.optimizer != "adam" or case.loop != "fast" or case.compile):
        return skipped_row(case, device, "CUDA-graph capture is implemented for the fast loop with Adam(capturable=True) only")
    if case.tile is not None and (case.loop != "fast" or case.compile or case.cuda_graph or case.optimizer == "torch-lbfgs"):
        return skipped_row(case, device, "tiles are timed for the fast loop with our L-BFGS or Adam, without compile or CUDA graphs")
    cfg = bench_config(case)
    check_case_size(cfg, case)
    return unless_out_of_memory(
        lambda: _measure_case(case, cfg, weights=weights, device=device, iterations=iterations, warmup=warmup, seed=seed, peaks=peaks),
        device, lambda reason: skipped_row(case, device, reason),
    )


def unless_out_of_memory(measure: Callable[[], T], device: torch.device, skipped: Callable[[str], T]) -> T:
    """`measure()`, or if it runs out of memory `skipped(reason)`: a size that does not fit is a
    row saying so, and the sweep goes on. Other errors propagate."""
    try:
        return measure()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        reason = f"{out_of_memory_message(e, device)}: this size does not fit here"
    release_memory(device)  # after the except block, which kept the failed case's frames alive
    return skipped(reason)


def _measure_case(case: BenchCase, cfg: StyleConfig, *, weights: Weights, device: torch.device, iterations: int, warmup: int, seed: int, peaks: dict | None) -> BenchRow:
    runtime = Runtime(device=device, precision=case.precision, channels_last=case.channels_last,
                      cudnn_benchmark=case.cudnn_benchmark, lowp_weights=case.lowp_weights)
    content, style = case_images(case, device, seed)
    flops = case_flops(cfg, case)
    peak = peak_for(device, case.precision, peaks)
    layers = ",".join(dict.fromkeys((*cfg.content_layers, *cfg.style_layers)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with precision_context(runtime):
        if case.loop == "reference":
            loss_fn = reference_loss(cfg, weights, runtime, content, style)
        else:
            loss_fn, model = fast_loss(cfg, weights, runtime, content, style, tile=case.tile)
            if case.tile is not None:  # the same loss and gradient, one tile (and its halo) at a time
                per_tile = case.tile_content == "per tile"  # no targets held: made from the content at each tile
                held = dataclasses.replace(loss_fn, content_feats={}) if per_tile else loss_fn
                loss_fn = TiledObjective(held, case.tile, grams=case.tile_grams, content_images=content if per_tile else None, content_net=model)
        if case.compile:
            loss_fn = torch.compile(loss_fn)
        x = (content * cfg.pixel_scale).contiguous().requires_grad_(True)  # NCHW: L-BFGS flattens it
        step = make_step(case, cfg, loss_fn, x)
        # On CUDA the peak is the timed iterations': the warm-up's first step holds cuDNN's kernel
        # tuning, which tries workspaces as large as the free memory (133 GB at 1024 px on an H200)
        # and gives them back; no later iteration needs them.
        reset = (lambda: torch.cuda.reset_peak_memory_stats(device)) if device.type == "cuda" and warmup > 0 else None
        times = time_steps(step, device, iterations=iterations, warmup=warmup, after_warmup=reset)
        synchronize(device)
    if device.type == "cuda":
        what = "over the timed iterations, after the warm-up (cuDNN's tuning)" if warmup > 0 else "during the case, cuDNN's tuning included (no warm-up)"
        memory: tuple[float | None, str] = (torch.cuda.max_memory_allocated(device) / 2**20, f"torch.cuda.max_memory_allocated {what}")
    else:
        memory = (_rss_mb(), "process peak RSS so far (ru_maxrss): an upper bound, includes earlier cases")
    return row_from_times(case, device, times, flops, peak, memory, layers=layers, warmup=warmup)


def bench_optimizer(case: BenchCase, *, device: torch.device, iterations: int = 20, warmup: int = 3, seed: int = 0, history: int | None = None) -> BenchRow:
    """The optimiser's own cost per step, without the network: the image-sized parameter of the
    case, the gradient of an ill-conditioned diagonal quadratic (O(pixels), curvatures 1e-3 to
    1e3, so pairs keep being accepted and the history stays full) and the update. At least
    history + 1 warm-up steps, so L-BFGS rows time a full history. Shows what the bookkeeping
    costs against the network's rows."""
    if case.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {case.optimizer!r}: use {', '.join(OPTIMIZERS)}")
    cfg = bench_config(case)
    m = history or cfg.lbfgs_history
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 3, case.height, case.width)
    weight = (10.0 ** (6 * torch.rand(shape, generator=gen) - 3)).to(device)  # curvatures 1e-3 to 1e3
    target = torch.rand(shape, generator=gen).to(device)
    x = torch.zeros(shape, device=device, requires_grad=True)

    def quadratic(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = 0.5 * (weight * (x - target).pow(2)).sum()
        return loss, {}

    step = make_step(dataclasses.replace(case, cuda_graph=False), dataclasses.replace(cfg, lbfgs_history=m, lr=1.0 if case.optimizer != "adam" else 0.01), quadratic, x)
    warmup = max(warmup, m + 1 if "lbfgs" in case.optimizer else warmup)
    with device_context(device):  # the timing events go on `device`'s stream
        ts = sorted(time_steps(step, device, iterations=iterations, warmup=warmup))
    med = statistics.median(ts)
    return BenchRow(
        size=f"{case.height}x{case.width}", precision="fp32", device=str(device), ms_per_iteration=med,
        ms_per_iteration_p10=_quantile(ts, 0.1), ms_per_iteration_p90=_quantile(ts, 0.9),
        iterations_per_second=1e3 / med, megapixel_iterations_per_second=case.height * case.width / 1e6 * 1e3 / med,
        tflops=None, percent_of_peak=None, peak_memory_mb=None, phase="optimizer", loop="none", optimizer=case.optimizer,
        preset=case.preset, layers=f"history {m}" if "lbfgs" in case.optimizer else "", provider=str(device),
        height=case.height, width=case.width, iterations=iterations, warmup=warmup,
        memory_source="not measured for optimizer rows",
    )


__all__ = ["BenchCase", "BenchRow", "CPU_BF16_REASON", "CPU_FP16_REASON", "LOOPS", "OPTIMIZERS", "ROW_KEYS", "TILE_CONTENT", "bench_case", "bench_config", "bench_optimizer", "case_images", "check_case_size", "expand_cases", "parse_size", "row_from_times", "settle_peaks", "skipped_row", "tile_settings"]
