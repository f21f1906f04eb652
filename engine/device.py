"""Devices and precisions: chosen once at the boundary, passed down as parameters."""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import Precision
from .errors import ConfigError, EngineError


class DeviceError(EngineError):
    """A device or precision this machine cannot provide; the message says what is there."""


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` (CUDA if present, else CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"`device` {spec}: no CUDA GPU is available here (torch {torch.__version__}); use `device` cpu", params=("device",))
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"`device` {spec}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)", params=("device",))
    return dev


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(Precision(precision))


def supported_precisions(device: torch.device) -> list[Precision]:
    """Precisions that run on `device` (each checked with a tiny convolution)."""
    out = []
    for p in Precision:
        try:
            check_precision(device, p)
            out.append(p)
        except DeviceError:
            pass
    return out


def check_precision(device: torch.device, precision: Precision | str) -> Precision:
    """Raise DeviceError if `precision` cannot run on `device`."""
    try:
        p = Precision(precision)
    except ValueError:
        raise DeviceError(f"unknown precision {precision!r}: use auto, {', '.join(x.value for x in Precision)}") from None
    if p == Precision.TF32 and device.type != "cuda":
        raise DeviceError("tf32 is a CUDA tensor-core mode: use fp32 (or bf16) on the CPU")
    if p == Precision.TF32 and torch.cuda.get_device_capability(device)[0] < 8:
        raise DeviceError(f"tf32 needs an Ampere or newer GPU; {torch.cuda.get_device_name(device)} is older")
    dt = autocast_dtype(p)
    if dt is not None:
        try:
            conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(device)
            x = torch.rand(1, 3, 8, 8, device=device, requires_grad=True)
            with torch.autocast(device.type, dtype=dt):
                y = conv(x)
            y.float().sum().backward()
        except (RuntimeError, AssertionError) as e:
            raise DeviceError(f"{p.value} does not run on {device} here ({str(e).splitlines()[0]}); use fp32") from None
    return p


def has_fast_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 matrix units: a CUDA GPU of compute capability 8.0 or newer, or a
    CPU with AVX512-BF16 or AMX tiles (asked through torch's CPU probes; absent probes mean no)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(bool(p()) for p in probes if p is not None)
    return False


def is_emulated(device: torch.device, precision: Precision) -> bool:
    """Whether `precision` runs on `device` without fast kernels: fp16 on any CPU, and bf16 on a CPU
    without bf16 units. Never on a GPU."""
    if device.type != "cpu":
        return False
    return precision == Precision.FP16 or (precision == Precision.BF16 and not has_fast_bf16(device))


def resolve_precision(device: torch.device, spec: Precision | str) -> Precision:
    """`auto`: bf16 where `device` has bf16 units and it runs there, else fp32. Otherwise the named
    precision, checked against the device (DeviceError if it cannot run)."""
    if str(getattr(spec, "value", spec)).strip().lower() == "auto":
        if has_fast_bf16(device):
            try:
                return check_precision(device, Precision.BF16)
            except DeviceError:
                pass
        return Precision.FP32
    return check_precision(device, spec)


@dataclass(frozen=True)
class Runtime:
    """How a run executes (never what it computes): device, precision and speed switches."""

    device: torch.device = torch.device("cpu")
    precision: Precision = Precision.FP32
    channels_last: bool = True  # NHWC for the convolutions (faster on tensor cores and oneDNN)
    cudnn_benchmark: bool = True  # autotune convolutions once per shape
    # bf16/fp16: the loop's network holds its weights in that dtype, cast once, instead of
    # autocast casting every weight at every call (targets still come from the fp32 network).
    lowp_weights: bool = True
    check_every: int = 0  # read the loss back (a sync) every N iterations; 0: 1 on CPU, 25 on GPU

    def __post_init__(self) -> None:
        """A device given by name, and checked against this machine (`Runtime(device="cuda")`
        without a GPU failed in torch's own words at the first tensor); a precision by name."""
        if not isinstance(self.device, torch.device) or self.device.type == "cuda":
            if not isinstance(self.device, (str, torch.device)):
                raise DeviceError(f"`device` must be a torch.device or a name such as cpu or cuda:0, got {self.device!r}", params=("device",))
            object.__setattr__(self, "device", resolve_device(self.device))
        if not isinstance(self.precision, Precision):
            try:
                object.__setattr__(self, "precision", Precision(str(self.precision).strip().lower()))
            except ValueError:
                choices = ", ".join(p.value for p in Precision)
                raise ConfigError(f"`precision` must be one of {choices}, got {self.precision!r}", params=("precision",)) from None
        if not isinstance(self.check_every, int) or isinstance(self.check_every, bool) or self.check_every < 0:
            raise ConfigError(f"`check_every` must be 0 (the device's default) or more, got {self.check_every!r}", params=("check_every",))

    @property
    def health_interval(self) -> int:
        if self.check_every > 0:
            return self.check_every
        return 1 if self.device.type == "cpu" else 25


def _fp32_precision_api() -> bool:
    """Whether this torch sets TF32 per backend through `fp32_precision` (torch 2.9 and later).

    Its legacy `allow_tf32` flags are to be deprecated, and reading one after the new API set a
    value the flag cannot express raises, so a torch that has the new API gets only the new API.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision")


@contextlib.contextmanager
def tf32_switches(*, matmul: bool, conv: bool) -> Iterator[None]:
    """TF32 on or off for cuBLAS matrix products and cuDNN convolutions, restored afterwards."""
    if _fp32_precision_api():
        mm_prec, conv_prec = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved: tuple[object, object] = (mm_prec.fp32_precision, conv_prec.fp32_precision)
        mm_prec.fp32_precision = "tf32" if matmul else "ieee"
        conv_prec.fp32_precision = "tf32" if conv else "ieee"
        try:
            yield
        finally:
            mm_prec.fp32_precision, conv_prec.fp32_precision = saved
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def precision_context(runtime: Runtime) -> Iterator[None]:
    """Set TF32 and cuDNN switches for the run and make its device the current CUDA device; put
    everything back afterwards."""
    tf32 = runtime.precision == Precision.TF32
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
    try:
        # cuDNN defaults to TF32 convolutions; fp32 must mean fp32. bf16/fp16 runs keep TF32 for
        # the convolutions that stay in fp32 outside autocast.
        with device_context(runtime.device), tf32_switches(matmul=tf32, conv=tf32 or runtime.precision in (Precision.BF16, Precision.FP16)):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


def device_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make `device` the current CUDA device (a no-op elsewhere).

    CUDA events recorded without a stream, `torch.cuda.Stream()`, `torch.cuda.graph` and the
    caching allocator's `empty_cache` all act on the *current* device, which is cuda:0 unless
    something sets it: without this, `--device cuda:1` would time and capture on cuda:0.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager[object]:
    """Autocast for the network in bf16/fp16, a no-op otherwise."""
    dt = autocast_dtype(runtime.precision)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=dt)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(e: BaseException) -> bool:
    """True for a failed allocation: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or
    ONNX Runtime's arena failing to allocate."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    if type(e).__module__.startswith("onnxruntime"):  # its exceptions are not RuntimeErrors
        return "failed to allocate memory" in text
    return isinstance(e, RuntimeError) and any(k in text for k in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def format_bytes(n: float, *, decimal: bool = False) -> str:
    """`9437184` -> `9.0 MiB`, `157286400` -> `150 MiB`: binary units, never rounded to zero;
    `decimal`: kB, MB, GB, TB (`1.3 GB`, `800 MB`), as `--max-memory` reads them."""
    base, units = (1000, ("B", "kB", "MB", "GB", "TB")) if decimal else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    for unit in units[:-1]:
        if abs(n) < base:
            break
        n /= base
    else:
        unit = units[-1]
    return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"


def failed_allocation_bytes(e: BaseException) -> int | None:
    """How many bytes the failed allocation asked for, when the error says (None otherwise).

    The formats met: CUDA's caching allocator ("Tried to allocate 2.00 GiB"), PyTorch's CPU
    allocator ("you tried to allocate 9437184 bytes"), ONNX Runtime's arena ("requested buffer of
    size 150994944") and NumPy ("Unable to allocate 2.00 GiB for an array"). A bare
    `std::bad_alloc` carries no size.
    """
    text = str(e)
    if m := re.search(r"allocate (\d+) bytes|requested buffer of size (\d+)", text):
        return int(m.group(1) or m.group(2))
    if m := re.search(r"[Tt]ried to allocate ([\d.]+) ([KMGT]?i?B)|[Uu]nable to allocate ([\d.]+) ([KMGT]?i?B)", text):
        value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        power = {"B": 0, "KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4, "KB": 1, "MB": 2, "GB": 3, "TB": 4}.get(unit, 0)
        return round(float(value) * 1024**power)
    return None


def out_of_memory_message(e: BaseException, device: torch.device | None = None) -> str:
    """One line: where memory ran out, and how much the failed allocation asked for."""
    n = failed_allocation_bytes(e)
    where = f" on {device}" if device is not None else (" on the GPU" if isinstance(e, torch.OutOfMemoryError) else "")
    size = f"an allocation of {format_bytes(n)} failed" if n is not None else "the failed allocation's size was not reported"
    return f"ran out of memory{where} ({size})"


def host_memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _mem_available() -> int | None:
    """Linux's estimate of memory available to a new allocation without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# The share of free memory a default budget leaves alone: other processes, the allocator's
# rounding, and what the memory model does not count.
BUDGET_MARGIN = 0.15


def default_memory_budget(device: torch.device) -> int | None:
    """Bytes a run may plan for: on CUDA the device's free memory, on the CPU the available RAM
    (physical memory where the system gives no estimate), each less BUDGET_MARGIN."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        avail: int | None = int(free)
    else:
        avail = _mem_available() or host_memory_bytes()
    return None if avail is None else int(avail * (1 - BUDGET_MARGIN))


def return_freed_memory() -> bool:
    """Ask glibc's malloc to give blocks of 128 KiB and more back to the system when they are freed
    (`mallopt(M_MMAP_THRESHOLD)`); True if it could. Process-wide, for runs whose memory matters.

    By default glibc raises that threshold to the size of the largest block freed (up to 32 MiB),
    after which feature maps below it are carved from the heap and kept when freed: measured on a
    tiled 512 px run, the heap then held 40% more than the tensors alive at its peak."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False


def release_memory(device: torch.device) -> None:
    """Give back what a failed case held: Python's garbage, and on CUDA the allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        with device_context(device):
            torch.cuda.empty_cache()
