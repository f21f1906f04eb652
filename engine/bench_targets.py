"""The targets phase of `nst bench`: content features and style Grams for one image pair, in
PyTorch and on ONNX Runtime, one `BenchRow` per source that can run here."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .bench import BenchCase, BenchRow, case_images, row_from_times, skipped_row, bench_config, check_case_size, unless_out_of_memory
from .config import Precision, StyleConfig
from .device import Runtime, device_context, precision_context, synchronize
from .features import VGGFeatures
from .flops import count_flops
from .losses import gram_matrix
from .peaks import peak_for
from .targets import TorchTargets
from .transfer import build_model
from .weights import Weights


@torch.no_grad()
def bench_targets(case: BenchCase, *, weights: Weights, device: torch.device, iterations: int = 5, warmup: int = 1, seed: int = 0, onnx_path: Path | None = None, peaks: dict | None = None) -> list[BenchRow]:
    """The targets phase: content features and style Grams for one image pair, PyTorch against
    ONNX Runtime, in ms per pair.

    With `onnx_path` (an exported target module for these weights and layers) the ONNX rows run
    `onnx_targets.OnnxTargets`, what `stylize --targets onnx` runs, on its CPU and CUDA providers.
    Without it they run a minimal in-memory export of the cut network on ONNX Runtime's CPU (and
    CUDA) provider, Grams taken in PyTorch on the host. TensorRT is not benchmarked (its engine
    build takes minutes). `peaks` is the sweep's cache of peaks (see `peaks.peak_for`)."""
    cfg = bench_config(case)
    check_case_size(cfg, case)

    def measure() -> list[BenchRow]:
        with device_context(device):
            return _measure_targets(case, cfg, weights=weights, device=device, iterations=iterations, warmup=warmup, seed=seed, onnx_path=onnx_path, peaks=peaks)

    return unless_out_of_memory(
        measure, device, lambda reason: [skipped_row(dataclasses.replace(case, precision=Precision.FP32, loop="torch"), device, reason, phase="targets")],
    )


def _measure_targets(case: BenchCase, cfg: StyleConfig, *, weights: Weights, device: torch.device, iterations: int, warmup: int, seed: int, onnx_path: Path | None, peaks: dict | None) -> list[BenchRow]:
    runtime = Runtime(device=device, precision=Precision.FP32, channels_last=case.channels_last, cudnn_benchmark=case.cudnn_benchmark)
    content, style = case_images(case, device, seed)
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
    peak = peak_for(device, Precision.FP32, peaks)
    rows.append(row_from_times(dataclasses.replace(base, loop="torch"), device, times, fwd, peak, (None, "not measured for targets rows"), **extra))
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
        return [skipped_row(case, device, f"ONNX Runtime targets unavailable ({e})", **extra)]
    rows = []
    for provider in ("cpu", "cuda") if device.type == "cuda" else ("cpu",):
        problem = provider_problem(provider)
        if problem is not None:
            rows.append(skipped_row(case, device, f"{provider}: {problem}", provider=f"onnxruntime {provider}", **extra))
            continue
        try:
            src = OnnxTargets(path, provider=provider, device=device)
        except Exception as e:  # a provider that fails to load is a row, not a crash
            rows.append(skipped_row(case, device, f"{provider} failed to load: {str(e).splitlines()[0]}", provider=f"onnxruntime {provider}", **extra))
            continue

        def run_onnx() -> None:
            src.compute(content, content_layers=cfg.content_layers, style_layers=())
            src.compute(style, content_layers=(), style_layers=cfg.style_layers)

        times = _time_plain(run_onnx, device, iterations, warmup)
        row = row_from_times(case, device, times, fwd, peak, (None, "not measured for targets rows"), **extra)
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

        from .onnx_targets import cuda_options
    except ImportError:
        return [skipped_row(case, device, "onnxruntime is not installed", **extra)]
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
        return [skipped_row(case, device, f"ONNX export failed: {str(e).splitlines()[0]}", **extra)]
    model.to(device, memory_format=torch.channels_last if base.channels_last else torch.contiguous_format)
    rows = []
    want = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if device.type == "cuda" else [])
    for provider in want:
        if provider not in ort.get_available_providers():
            rows.append(skipped_row(case, device, f"{provider} is not in this onnxruntime build", provider=provider, **extra))
            continue
        options = cuda_options(device_id=device.index or 0) if provider == "CUDAExecutionProvider" else {}
        try:
            sess = ort.InferenceSession(buf.getvalue(), providers=[(provider, options)])
        except Exception as e:
            rows.append(skipped_row(case, device, f"{provider} failed to load: {str(e).splitlines()[0]}", provider=provider, **extra))
            continue
        c_np, s_np = content.cpu().numpy(), style.cpu().numpy()

        def run_ort() -> None:
            sess.run(None, {"image": c_np})
            outs = sess.run(None, {"image": s_np})
            for n, o in zip(names, outs):  # the Grams, on the host, as a target source would
                if n in cfg.style_layers:
                    gram_matrix(torch.from_numpy(o))

        times = _time_plain(run_ort, torch.device("cpu"), iterations, warmup)
        row = row_from_times(case, device, times, fwd, peak, (None, "not measured for targets rows"), **extra)
        row.provider = f"onnxruntime {provider}"
        rows.append(row)
    return rows


__all__ = ["bench_targets"]
