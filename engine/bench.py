"""Throughput of the optimisation loop: warm-up, N timed iterations, one `BenchRow` per case.

Pure measurement: no printing, no files. The CLI (`nst bench`) sweeps cases and writes the
table, JSON, CSV and plot. Each timed iteration is the real step: the loss, its gradient with
respect to the image, and the optimiser's update. On a GPU each iteration is timed with CUDA
events recorded on the stream and read once after the last one (no sync inside the loop); on
the CPU with `time.perf_counter`.

Two loops:

- `fast`: what `stylize` runs. Targets computed once, the frozen network cut after the deepest
  layer in use, the image in channels-last if asked.
- `reference`: the structure of the Keras notebook the seed preset comes from. Content, style
  and output go through the whole of VGG19 as one batch of three at every step, and the targets
  (content features, style Grams) are recomputed from that batch each time. Gradients only with
  respect to the image, as the notebook's `GradientTape` asks.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LossForm, Optimizer, Precision, StyleConfig, content_layer_weights, preset, style_layer_weights
from .device import DeviceError, Runtime, autocast, check_precision, precision_context, synchronize
from .features import LAYER_NAMES, VGGFeatures, layer_stride
from .flops import count_flops
from .lbfgs import LBFGS
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .targets import TorchTargets
from .transfer import _feat_hw, _make_loss, build_model
from .weights import Weights, load_into

OPTIMIZERS = ("lbfgs", "adam", "torch-lbfgs")
# fp16 autocast runs on the CPU but without fast kernels (measured: ~100x slower than fp32 on the
# 2-core AMD EPYC this was written on), so a default sweep skips it there; naming it runs it.
CPU_FP16_REASON = "fp16 on the CPU runs without fast kernels (~100x slower than fp32 where measured); skipped by default, pass --precision fp16 to time it anyway; use bf16"
LOOPS = ("fast", "reference")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets (H100/H200: "NVIDIA H100 Tensor Core
# GPU" and "NVIDIA H200" datasheets; A100: "NVIDIA A100 Tensor Core GPU" datasheet; L4: "NVIDIA
# L4" datasheet). The datasheets print tensor-core figures "with sparsity"; these are half of
# those. Matched against `torch.cuda.get_device_name` by substring, first match wins.
KNOWN_GPU_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("H200", "NVIDIA H200 SXM datasheet", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100 PCIe", "NVIDIA H100 PCIe datasheet", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", "NVIDIA H100 NVL datasheet", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}),
    ("H100", "NVIDIA H100 SXM datasheet", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", "NVIDIA A100 datasheet", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L4", "NVIDIA L4 datasheet", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
)


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
    phase: str = "optimisation"  # optimisation | targets
    loop: str = "fast"  # fast | reference | torch (targets) | onnxruntime (targets)
    optimizer: str = ""
    preset: str = ""
    layers: str = ""  # content+style layers, comma separated
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    cuda_graph: bool = False
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


def parse_size(text: str) -> tuple[int, int]:
    """`256` (square) or `128x192` (H x W) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use N or HxW, e.g. 256 or 128x192") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"bad size {text!r}: sizes must be positive, N or HxW")
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


def known_peak(device: torch.device, precision: Precision) -> tuple[float, str] | None:
    """Datasheet peak TFLOP/s for a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, source, peaks in KNOWN_GPU_PEAKS:
        if key in name:
            return peaks[precision.value], f"{source} ({name}, dense {precision.value})"
    return None


@torch.no_grad()
def measured_matmul_peak(device: torch.device, precision: Precision, *, n: int | None = None, repeats: int = 5) -> tuple[float, str]:
    """TFLOP/s of a square torch.matmul in `precision` on `device` (the best of `repeats`)."""
    if n is None:
        # CPU fp16 matmul has no fast kernel on most CPUs (about 3 GFLOP/s here): keep it short.
        n = 8192 if device.type == "cuda" else (256 if precision == Precision.FP16 else 2048)
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    with precision_context(Runtime(device=device, precision=precision)):
        a @ b
        synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12, f"measured torch.matmul {n}x{n} {dtype} on {device}"


@torch.no_grad()
def measured_conv_peak(device: torch.device, precision: Precision, *, channels: int = 256, hw: int = 64, repeats: int = 5) -> tuple[float, str]:
    """TFLOP/s of a VGG-like 3x3 convolution (channels in and out, hw x hw, channels-last) in
    `precision`: on the CPU oneDNN's convolutions run well above its square matmul."""
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and precision == Precision.FP16:
        channels, hw = 32, 16  # no fast fp16 kernels: keep it short
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, channels, hw, hw, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    with precision_context(Runtime(device=device, precision=precision)):
        torch.nn.functional.conv2d(x, w, padding=1)
        synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    flops = 2 * channels * channels * 9 * hw * hw
    return flops / best / 1e12, f"measured 3x3 conv {channels}->{channels} at {hw}x{hw} {dtype} on {device}"


def measured_peak(device: torch.device, precision: Precision) -> tuple[float, str]:
    """The better of a measured square matmul and a measured VGG-like convolution."""
    return max(measured_matmul_peak(device, precision), measured_conv_peak(device, precision), key=lambda r: r[0])


def peak_for(device: torch.device, precision: Precision, cache: dict[tuple[str, str], tuple[float, str]] | None = None) -> tuple[float, str]:
    """The peak a row's `percent_of_peak` is against: datasheet for known GPUs, else measured."""
    key = (str(device), precision.value)
    if cache is not None and key in cache:
        return cache[key]
    got = known_peak(device, precision) or measured_peak(device, precision)
    if cache is not None:
        cache[key] = got
    return got


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
    ablate: bool = False,
    cuda: bool = True,
) -> list[BenchCase]:
    """Every combination, sizes innermost (so a plot's line is one run of cases); with `ablate`
    each case also runs with channels-last and (on `cuda`) cuDNN autotuning flipped, one at a time."""
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}: use {', '.join(OPTIMIZERS)}")
    for lp in loops:
        if lp not in LOOPS:
            raise ValueError(f"unknown loop {lp!r}: use {', '.join(LOOPS)}")
    for h, w in sizes:
        if min(h, w) < 1:
            raise ValueError(f"size {h}x{w}: sizes must be positive")
    out = []
    for pr in presets:
        for lp in loops:
            for o in optimizers:
                for p in precisions:
                    variants = [(channels_last, cudnn_benchmark)]
                    if ablate:
                        variants.append((not channels_last, cudnn_benchmark))
                        if cuda:  # cuDNN autotuning means nothing on the CPU
                            variants.append((channels_last, not cudnn_benchmark))
                    for cl, cb in variants:
                        for h, w in sizes:
                            out.append(BenchCase(h, w, Precision(p), o, str(pr), lp, cl, cb, compile, cuda_graph))
    return out


def bench_config(case: BenchCase) -> StyleConfig:
    opt = Optimizer.ADAM if case.optimizer == "adam" else Optimizer.LBFGS
    return preset(case.preset, size=max(32, max(case.height, case.width)), optimizer=opt, scales=())


def check_case_size(cfg: StyleConfig, case: BenchCase) -> None:
    """Raise ValueError if the image is too small for the deepest layer the case runs."""
    deepest = LAYER_NAMES[-1] if case.loop == "reference" else max((*cfg.content_layers, *cfg.style_layers), key=LAYER_NAMES.index)
    need = layer_stride(deepest)
    if min(case.height, case.width) < need:
        raise ValueError(f"size {case.height}x{case.width} is too small for the {case.preset} preset's {case.loop} loop (layer {deepest} needs at least {need} px a side)")


def _images(case: BenchCase, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random content and style images: the cost does not depend on their values."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(1, 3, case.height, case.width, generator=gen).to(device)
    style = torch.rand(1, 3, case.height, case.width, generator=gen).to(device)
    return content, style


def _fast_loss(cfg: StyleConfig, weights: Weights, runtime: Runtime, content: torch.Tensor, style: torch.Tensor) -> tuple[Callable, VGGFeatures]:
    model = build_model(cfg, weights, runtime)
    source = TorchTargets(model)
    ct = source.compute(content, content_layers=cfg.content_layers, style_layers=())
    st = source.compute(style, content_layers=(), style_layers=cfg.style_layers)
    grams = {}
    for layer in cfg.style_layers:
        g = st.grams[layer]
        if cfg.loss_form == LossForm.KERAS:
            fh, fw = _feat_hw(style, layer)
            g = g * (g.shape[-1] * fh * fw)  # the notebook's plain sum F F^T
        grams[layer] = g
    return _make_loss(model, runtime, cfg, ct.content, grams, tuple(content.shape[-2:])), model


def reference_loss(cfg: StyleConfig, weights: Weights, runtime: Runtime, content: torch.Tensor, style: torch.Tensor) -> Callable:
    """The notebook's step: [content, style, output] through all of VGG19, targets recomputed."""
    taps = tuple(dict.fromkeys((*cfg.content_layers, *cfg.style_layers, LAYER_NAMES[-1])))
    model = VGGFeatures(taps, pooling=cfg.pooling)
    load_into(model.features, weights)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cw = dict(zip(cfg.content_layers, content_layer_weights(cfg)))
    sw = dict(zip(cfg.style_layers, style_layer_weights(cfg)))
    form = cfg.loss_form
    pixels = content.shape[-2] * content.shape[-1]
    keras = form == LossForm.KERAS

    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = x / cfg.pixel_scale
        batch = torch.cat([content, style, img])  # (3, 3, H, W)
        if runtime.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(runtime):
            feats = model(batch)
        zero = x.new_zeros(())
        c = sum((w * content_loss(feats[k][2:3], feats[k][0:1], form=form) for k, w in cw.items()), zero)
        s = sum(
            (w * style_loss(feats[k][2:3], gram_matrix(feats[k][1:2], normalize=not keras), form=form, image_pixels=pixels) for k, w in sw.items()),
            zero,
        )
        tv = tv_loss(x if keras else img, form=form)
        terms = {"content": cfg.content_weight * c, "style": cfg.style_weight * s, "tv": cfg.tv_weight * tv}
        return terms["content"] + terms["style"] + terms["tv"], terms

    return loss_fn


def _flops(cfg: StyleConfig, case: BenchCase) -> int:
    hw = (case.height, case.width)
    layers = (*cfg.content_layers, *cfg.style_layers)
    if case.loop == "reference":
        # Three images forward through all of VGG19 and back to the deepest tap (autograd runs the
        # input gradient for the whole batch tensor); Grams for style and output.
        fc = count_flops(hw, layers=layers, batch=3, forward_to=LAYER_NAMES[-1], pooling=cfg.pooling)
        grams = count_flops(hw, layers=layers, style_layers=cfg.style_layers, pooling=cfg.pooling)
        g = sum(layer.forward for layer in grams.layers if layer.kind == "gram")
        return fc.total + 2 * g + 2 * g  # style's and output's Gram forward, output's backward
    return count_flops(hw, layers=layers, style_layers=cfg.style_layers, pooling=cfg.pooling).total


def skipped_row(case: BenchCase, device: torch.device, reason: str) -> BenchRow:
    """A row for a case that was not run, with the reason."""
    return _skipped(case, device, reason)


def _skipped(case: BenchCase, device: torch.device, reason: str, **extra: object) -> BenchRow:
    fields: dict[str, object] = dict(
        size=f"{case.height}x{case.width}", precision=case.precision.value, device=str(device),
        ms_per_iteration=None, ms_per_iteration_p10=None, ms_per_iteration_p90=None,
        iterations_per_second=None, megapixel_iterations_per_second=None, tflops=None,
        percent_of_peak=None, peak_memory_mb=None, loop=case.loop, optimizer=case.optimizer,
        preset=case.preset, channels_last=case.channels_last, cudnn_benchmark=case.cudnn_benchmark,
        compile=case.compile, cuda_graph=case.cuda_graph, provider=str(device), height=case.height,
        width=case.width, status="skipped", reason=reason,
    )
    fields.update(extra)
    return BenchRow(**fields)  # type: ignore[arg-type]


def _row_from_times(case: BenchCase, device: torch.device, times_ms: list[float], flops: int, peak: tuple[float, str], memory: tuple[float | None, str], **extra: object) -> BenchRow:
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
        provider=str(device), height=case.height, width=case.width, iterations=len(ts),
        gflop_per_iteration=flops / 1e9, peak_tflops=peak[0], peak_source=peak[1], memory_source=memory[1],
        **extra,  # type: ignore[arg-type]
    )


def _timer(device: torch.device, n: int) -> tuple[Callable[[int], None], Callable[[], list[float]]]:
    """(mark(i), read()): marks before iteration i and after the last; read() gives ms per iteration."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]

        def mark(i: int) -> None:
            events[i].record()

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


def bench_case(case: BenchCase, *, weights: Weights, device: torch.device, iterations: int = 10, warmup: int = 3, seed: int = 0, peaks: dict | None = None) -> BenchRow:
    """Warm up, then time `iterations` real steps of one case; a case that cannot run here is
    returned as a skipped row with the reason."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    try:
        check_precision(device, case.precision)
    except DeviceError as e:
        return _skipped(case, device, str(e))
    if case.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {case.optimizer!r}: use {', '.join(OPTIMIZERS)}")
    if case.loop not in LOOPS:
        raise ValueError(f"unknown loop {case.loop!r}: use {', '.join(LOOPS)}")
    if case.cuda_graph and device.type != "cuda":
        return _skipped(case, device, "CUDA graphs need a CUDA device; not available on the CPU")
    if case.cuda_graph and (case.optimizer != "adam" or case.loop != "fast" or case.compile):
        return _skipped(case, device, "CUDA-graph capture is implemented for the fast loop with Adam(capturable=True) only")
    cfg = bench_config(case)
    check_case_size(cfg, case)
    runtime = Runtime(device=device, precision=case.precision, channels_last=case.channels_last, cudnn_benchmark=case.cudnn_benchmark)
    content, style = _images(case, device, seed)
    flops = _flops(cfg, case)
    peak = peak_for(device, case.precision, peaks)
    layers = ",".join(dict.fromkeys((*cfg.content_layers, *cfg.style_layers)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with precision_context(runtime):
        if case.loop == "reference":
            loss_fn = reference_loss(cfg, weights, runtime, content, style)
        else:
            loss_fn, _ = _fast_loss(cfg, weights, runtime, content, style)
        if case.compile:
            loss_fn = torch.compile(loss_fn)
        x = (content * cfg.pixel_scale).contiguous().requires_grad_(True)  # NCHW: L-BFGS flattens it
        step = _make_step(case, cfg, loss_fn, x)
        for _ in range(warmup):
            step()
        synchronize(device)
        mark, read = _timer(device, iterations)
        for i in range(iterations):
            mark(i)
            step()
        mark(iterations)
        times = read()
        synchronize(device)
    if device.type == "cuda":
        memory: tuple[float | None, str] = (torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated during the case")
    else:
        memory = (_rss_mb(), "process peak RSS so far (ru_maxrss): an upper bound, includes earlier cases")
    return _row_from_times(case, device, times, flops, peak, memory, layers=layers, warmup=warmup)


def _make_step(case: BenchCase, cfg: StyleConfig, loss_fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    """One iteration: loss, gradient with respect to the image, update. Never reads the loss."""
    if case.optimizer == "torch-lbfgs":
        # One gradient per step, as our LBFGS; tolerances off so it never stops early.
        topt = torch.optim.LBFGS([x], lr=cfg.lr, max_iter=1, history_size=cfg.lbfgs_history, tolerance_grad=-1, tolerance_change=-1)

        def closure() -> torch.Tensor:
            topt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(x)
            loss.backward()
            return loss

        return lambda: topt.step(closure) and None  # type: ignore[func-returns-value]
    if case.optimizer == "adam":
        opt: torch.optim.Adam | LBFGS = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, capturable=case.cuda_graph)
    else:
        opt = LBFGS(x, lr=cfg.lr, history=cfg.lbfgs_history)

    def step() -> None:
        x.grad = None
        loss, _ = loss_fn(x)
        loss.backward()
        opt.step()

    if not case.cuda_graph:
        return step
    return _graphed(x, loss_fn, opt)  # type: ignore[arg-type]


def _graphed(x: torch.Tensor, loss_fn: Callable, opt: torch.optim.Adam) -> Callable[[], None]:
    """Capture forward, backward and a capturable Adam step in one CUDA graph (static shapes).

    Not run on hardware in the session that wrote it: see benchmarks/README.md.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as the CUDA-graphs docs require
            opt.zero_grad(set_to_none=False)
            loss, _ = loss_fn(x)
            loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)  # inside the graph: each replay starts from a zero grad
        loss, _ = loss_fn(x)
        loss.backward()
        opt.step()
    return graph.replay


def bench_optimizer(case: BenchCase, *, device: torch.device, iterations: int = 20, warmup: int = 3, seed: int = 0, history: int | None = None) -> BenchRow:
    """The optimiser's own cost per step, without the network: the image-sized parameter of the
    case, the gradient of an ill-conditioned diagonal quadratic (O(pixels), curvatures 1e-3 to
    1e3, so pairs keep being accepted and the history stays full) and the update. At least
    history + 1 warm-up steps, so L-BFGS rows time a full history. Shows what the bookkeeping
    costs against the network's rows."""
    if case.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {case.optimizer!r}: use {', '.join(OPTIMIZERS)}")
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

    step = _make_step(dataclasses.replace(case, cuda_graph=False), dataclasses.replace(cfg, lbfgs_history=m, lr=1.0 if case.optimizer != "adam" else 0.01), quadratic, x)
    warmup = max(warmup, m + 1 if "lbfgs" in case.optimizer else warmup)
    for _ in range(warmup):
        step()
    synchronize(device)
    mark, read = _timer(device, iterations)
    for i in range(iterations):
        mark(i)
        step()
    mark(iterations)
    ts = sorted(read())
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


@torch.no_grad()
def bench_targets(case: BenchCase, *, weights: Weights, device: torch.device, iterations: int = 5, warmup: int = 1, seed: int = 0, onnx_path: Path | None = None) -> list[BenchRow]:
    """The targets phase: content features and style Grams for one image pair, PyTorch against
    ONNX Runtime, in ms per pair.

    With `onnx_path` (an exported target module for these weights and layers) the ONNX rows run
    `onnx_targets.OnnxTargets`, what `stylize --targets onnx` runs, on its CPU and CUDA providers.
    Without it they run a minimal in-memory export of the cut network on ONNX Runtime's CPU (and
    CUDA) provider, Grams taken in PyTorch on the host. TensorRT is not benchmarked (its engine
    build takes minutes)."""
    cfg = bench_config(case)
    check_case_size(cfg, case)
    runtime = Runtime(device=device, precision=Precision.FP32, channels_last=case.channels_last, cudnn_benchmark=case.cudnn_benchmark)
    content, style = _images(case, device, seed)
    layers = (*cfg.content_layers, *cfg.style_layers)
    flops = count_flops((case.height, case.width), layers=layers, style_layers=cfg.style_layers, backward_batch=0, pooling=cfg.pooling)
    # Forward only, for two images; Grams forward only.
    fwd = 2 * sum(layer.forward for layer in flops.layers if layer.kind != "gram") + sum(layer.forward for layer in flops.layers if layer.kind == "gram")
    base = dataclasses.replace(case, precision=Precision.FP32)
    rows: list[BenchRow] = []
    extra = {"phase": "targets", "layers": ",".join(dict.fromkeys(layers)), "warmup": warmup}
    with precision_context(runtime):
        model = build_model(cfg, weights, runtime)
        torch_src = TorchTargets(model)

        def run_torch() -> None:
            torch_src.compute(content, content_layers=cfg.content_layers, style_layers=())
            torch_src.compute(style, content_layers=(), style_layers=cfg.style_layers)

        times = _time_plain(run_torch, device, iterations, warmup)
    peak = peak_for(device, Precision.FP32)
    rows.append(_row_from_times(dataclasses.replace(base, loop="torch"), device, times, fwd, peak, (None, "not measured for targets rows"), **extra))
    rows[-1].provider = f"torch {device}"
    if onnx_path is not None:
        rows.extend(_onnx_targets_rows(base, cfg, Path(onnx_path), content, style, device, iterations, warmup, fwd, peak, extra))
    else:
        rows.extend(_ort_rows(base, cfg, model, content, style, device, iterations, warmup, fwd, peak, extra))
    return rows


def _onnx_targets_rows(base: BenchCase, cfg: StyleConfig, path: Path, content: torch.Tensor, style: torch.Tensor, device: torch.device, iterations: int, warmup: int, fwd: int, peak: tuple[float, str], extra: dict) -> list[BenchRow]:
    case = dataclasses.replace(base, loop="onnxruntime")
    try:
        from .onnx_targets import OnnxTargets, provider_problem
    except ImportError as e:
        return [_skipped(case, device, f"ONNX Runtime targets unavailable ({e})", **extra)]
    rows = []
    for provider in ("cpu", "cuda") if device.type == "cuda" else ("cpu",):
        problem = provider_problem(provider)
        if problem is not None:
            rows.append(_skipped(case, device, f"{provider}: {problem}", provider=f"onnxruntime {provider}", **extra))
            continue
        try:
            src = OnnxTargets(path, provider=provider, device=device)
        except Exception as e:  # a provider that fails to load is a row, not a crash
            rows.append(_skipped(case, device, f"{provider} failed to load: {str(e).splitlines()[0]}", provider=f"onnxruntime {provider}", **extra))
            continue

        def run_onnx() -> None:
            src.compute(content, content_layers=cfg.content_layers, style_layers=())
            src.compute(style, content_layers=(), style_layers=cfg.style_layers)

        times = _time_plain(run_onnx, device, iterations, warmup)
        row = _row_from_times(case, device, times, fwd, peak, (None, "not measured for targets rows"), **extra)
        row.provider = f"onnxruntime {src.provider} (OnnxTargets)"
        rows.append(row)
    return rows


def _time_plain(fn: Callable[[], None], device: torch.device, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _ort_rows(base: BenchCase, cfg: StyleConfig, model: VGGFeatures, content: torch.Tensor, style: torch.Tensor, device: torch.device, iterations: int, warmup: int, fwd: int, peak: tuple[float, str], extra: dict) -> list[BenchRow]:
    """ONNX Runtime rows from a minimal in-memory export of the same cut network (features only,
    Grams in NumPy-free torch on the host). One row per provider that can run here."""
    case = dataclasses.replace(base, loop="onnxruntime")
    try:
        import io

        import onnxruntime as ort
    except ImportError:
        return [_skipped(case, device, "onnxruntime is not installed", **extra)]
    names = list(dict.fromkeys((*cfg.content_layers, *cfg.style_layers)))

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            f = self.m(x)
            return tuple(f[n] for n in names)

    buf = io.BytesIO()
    try:
        cpu_model = Features().to("cpu", memory_format=torch.contiguous_format).float()
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and quick here
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(cpu_model, (content.cpu(),), buf, input_names=["image"], output_names=names, dynamo=False)
    except Exception as e:  # an exporter failure is a result to report, not a crash
        model.to(device)
        return [_skipped(case, device, f"ONNX export failed: {str(e).splitlines()[0]}", **extra)]
    model.to(device, memory_format=torch.channels_last if base.channels_last else torch.contiguous_format)
    rows = []
    want = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if device.type == "cuda" else [])
    for provider in want:
        if provider not in ort.get_available_providers():
            rows.append(_skipped(case, device, f"{provider} is not in this onnxruntime build", provider=provider, **extra))
            continue
        try:
            sess = ort.InferenceSession(buf.getvalue(), providers=[provider])
        except Exception as e:
            rows.append(_skipped(case, device, f"{provider} failed to load: {str(e).splitlines()[0]}", provider=provider, **extra))
            continue
        c_np, s_np = content.cpu().numpy(), style.cpu().numpy()

        def run_ort() -> None:
            sess.run(None, {"image": c_np})
            outs = sess.run(None, {"image": s_np})
            for n, o in zip(names, outs):  # the Grams, on the host, as a target source would
                if n in cfg.style_layers:
                    gram_matrix(torch.from_numpy(o))

        times = _time_plain(run_ort, torch.device("cpu"), iterations, warmup)
        row = _row_from_times(case, device, times, fwd, peak, (None, "not measured for targets rows"), **extra)
        row.provider = f"onnxruntime {provider}"
        rows.append(row)
    return rows


__all__ = ["BenchCase", "BenchRow", "KNOWN_GPU_PEAKS", "LOOPS", "OPTIMIZERS", "ROW_KEYS", "bench_case", "bench_optimizer", "bench_targets", "expand_cases", "measured_conv_peak", "measured_matmul_peak", "measured_peak", "parse_size", "skipped_row", "peak_for", "reference_loss"]
