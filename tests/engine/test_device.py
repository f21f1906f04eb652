"""Precision choice and out-of-memory recognition (CPU; the CUDA branches are in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from nst.engine.config import Precision
from nst.engine.device import DeviceError, format_bytes, has_fast_bf16, is_out_of_memory, out_of_memory_message, resolve_precision

CPU = torch.device("cpu")


def _probes(monkeypatch, avx512_bf16, amx):
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v)


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"), [(True, False, Precision.BF16), (False, True, Precision.BF16), (False, False, Precision.FP32), (None, None, Precision.FP32)])
def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, avx512_bf16, amx, want):
    _probes(monkeypatch, avx512_bf16, amx)
    assert has_fast_bf16(CPU) is (want == Precision.BF16)
    assert resolve_precision(CPU, "auto") == want
    assert resolve_precision(CPU, " AUTO ") == want


def test_auto_falls_back_to_fp32_when_bf16_does_not_run(monkeypatch):
    import nst.engine.device as device

    _probes(monkeypatch, True, False)

    def broken(dev, p):
        raise DeviceError("bf16 does not run here")

    monkeypatch.setattr(device, "check_precision", broken)
    assert resolve_precision(CPU, "auto") == Precision.FP32


def test_named_precisions_are_checked():
    assert resolve_precision(CPU, "fp32") == Precision.FP32
    with pytest.raises(DeviceError, match="tf32 is a CUDA tensor-core mode"):
        resolve_precision(CPU, "tf32")
    with pytest.raises(DeviceError, match="unknown precision 'fp64': use auto, fp32, tf32, bf16, fp16"):
        resolve_precision(CPU, "fp64")


def test_out_of_memory_is_recognised_in_either_wording():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes. Error code 12")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")
    assert is_out_of_memory(cpu) and is_out_of_memory(cuda) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not is_out_of_memory(ValueError("out of memory"))
    assert out_of_memory_message(cpu, CPU) == "ran out of memory on cpu (an allocation of 3.0 GiB failed)"
    assert out_of_memory_message(cuda) == "ran out of memory on the GPU (an allocation of 2.0 GiB failed)"
    assert out_of_memory_message(MemoryError()) == "ran out of memory (the failed allocation's size was not reported)"


def test_out_of_memory_names_small_allocations_in_their_own_unit():
    # Measured on this CPU under `ulimit -v`: most failed allocations are tens of MiB, which the
    # message once rounded to "0.0 GiB" (no size at all, in effect).
    small = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9437184 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(small, CPU) == "ran out of memory on cpu (an allocation of 9.0 MiB failed)"
    arena = Exception("Failed to allocate memory for requested buffer of size 150994944")
    assert "an allocation of 144 MiB failed" in out_of_memory_message(arena, CPU)
    numpy_error = MemoryError("Unable to allocate 1.50 GiB for an array with shape (402653184,) and data type float32")
    assert out_of_memory_message(numpy_error) == "ran out of memory (an allocation of 1.5 GiB failed)"
    assert [format_bytes(n) for n in (512, 1536, 22282240, 401866752, 45742080000)] == ["512 B", "1.5 KiB", "21.2 MiB", "383 MiB", "42.6 GiB"]


def test_onnx_runtime_allocation_failures_count_as_out_of_memory():
    # ONNX Runtime raises its own exception types (not RuntimeError) from its pybind module.
    Fail = type("RuntimeException", (Exception,), {"__module__": "onnxruntime.capi.onnxruntime_pybind11_state"})
    e = Fail("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
             "Failed to allocate memory for requested buffer of size 4294967296")
    assert is_out_of_memory(e)
    assert out_of_memory_message(e, torch.device("cuda:0")) == "ran out of memory on cuda:0 (an allocation of 4.0 GiB failed)"
    assert not is_out_of_memory(Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed"))



def test_device_context_makes_the_named_cuda_device_current():
    import contextlib

    from nst.engine.device import device_context

    ctx = device_context(torch.device("cuda:1"))  # built, not entered: no GPU needed
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(device_context(CPU), contextlib.nullcontext)


def test_precision_context_enters_the_run_device(device_contexts, monkeypatch):
    import nst.engine.device as device
    from nst.engine.device import Runtime, precision_context

    device_contexts.patch(device)
    monkeypatch.setattr(device, "resolve_device", torch.device)  # a Runtime checks its device against this machine
    with precision_context(Runtime(device=torch.device("cuda:1"), precision=Precision.FP32)):
        assert device_contexts.current == torch.device("cuda:1")
    assert device_contexts.current is None and device_contexts.entered == [torch.device("cuda:1")]


@pytest.mark.parametrize(("precision", "matmul", "conv"), [(Precision.FP32, "ieee", "ieee"), (Precision.TF32, "tf32", "tf32"), (Precision.BF16, "ieee", "tf32")])
def test_precision_context_sets_tf32_through_fp32_precision(precision, matmul, conv):
    """torch 2.9+: only the fp32_precision API, set for the run and restored after it."""
    from nst.engine.device import Runtime, _fp32_precision_api, precision_context

    assert _fp32_precision_api(), f"torch {torch.__version__} should have torch.backends.*.fp32_precision"
    mm, cv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (mm.fp32_precision, cv.fp32_precision, torch.backends.cudnn.benchmark)
    with precision_context(Runtime(device=CPU, precision=precision, cudnn_benchmark=not before[2])):
        assert (mm.fp32_precision, cv.fp32_precision) == (matmul, conv)
        assert torch.backends.cudnn.benchmark is (not before[2])
    assert (mm.fp32_precision, cv.fp32_precision, torch.backends.cudnn.benchmark) == before


def test_legacy_allow_tf32_flags_where_torch_has_no_fp32_precision():
    """Older torch: the allow_tf32 flags. In a fresh process, since reading them after the new API
    set a value they cannot express raises."""
    import subprocess
    import sys

    code = """
import torch
import nst.engine.device as d
from nst.engine.config import Precision
d._fp32_precision_api = lambda: False
b = torch.backends
before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
seen = {}
for p in (Precision.FP32, Precision.TF32, Precision.BF16):
    with d.precision_context(d.Runtime(precision=p)):
        seen[p.value] = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
assert seen == {"fp32": (False, False), "tf32": (True, True), "bf16": (False, True)}, seen
assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == before
print("ok")
"""
    run = subprocess.run([sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
