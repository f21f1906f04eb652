"""What "100%" is for a bench row's `percent_of_peak`: datasheet peaks for known GPUs, else the
better of a measured square matmul and a measured VGG-like convolution on this device."""

from __future__ import annotations

import time

import torch

from .config import Precision
from .device import Runtime, is_emulated, precision_context, synchronize

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
        # CPU fp16 matmul has no fast kernel on most CPUs (about 3 GFLOP/s here), nor bf16 on a CPU
        # without bf16 units (1.4 GFLOP/s on one): keep it short.
        n = 8192 if device.type == "cuda" else (256 if is_emulated(device, precision) else 2048)
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
    if is_emulated(device, precision):
        channels, hw = 32, 16  # no fast kernels: keep it short
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


__all__ = ["KNOWN_GPU_PEAKS", "known_peak", "measured_conv_peak", "measured_matmul_peak", "measured_peak", "peak_for"]
