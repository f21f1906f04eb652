"""GPU checks: run only where CUDA is present (skipped on CPU machines and in CI)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nst.engine.config import GATYS, Precision
from nst.engine.device import Runtime, check_precision, resolve_device, resolve_precision
from nst.engine.images import load_image
from nst.engine.transfer import stylize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = dataclasses.replace(GATYS, size=128, iterations=20)


@pytest.fixture
def pics(images):
    return load_image(images["content"]), load_image(images["style"])


def test_cuda_matches_cpu_in_fp32(pics, weights):
    c, s = pics
    cpu = stylize(c, [s], CFG, weights=weights)
    gpu = stylize(c, [s], CFG, weights=weights, runtime=Runtime(device=resolve_device("cuda"), precision=Precision.FP32))
    assert gpu.loss_history[0] == pytest.approx(cpu.loss_history[0], rel=1e-3)
    assert (gpu.image - cpu.image).abs().mean() < 0.01


@pytest.mark.parametrize("precision", [Precision.TF32, Precision.BF16, Precision.FP16])
def test_reduced_precisions_close_to_fp32(pics, weights, precision):
    c, s = pics
    dev = resolve_device("cuda")
    check_precision(dev, precision)
    ref = stylize(c, [s], CFG, weights=weights, runtime=Runtime(device=dev, precision=Precision.FP32))
    got = stylize(c, [s], CFG, weights=weights, runtime=Runtime(device=dev, precision=precision))
    assert got.status == "done"
    assert got.loss_history[0] == pytest.approx(ref.loss_history[0], rel=0.05)
    assert (got.image - ref.image).abs().mean() < 0.03


def test_auto_precision_on_the_gpu():
    dev = resolve_device("cuda")
    want = Precision.BF16 if torch.cuda.get_device_capability(dev)[0] >= 8 else Precision.FP32
    assert resolve_precision(dev, "auto") == want


def test_bf16_gram_runs_on_the_tensor_cores_and_matches_fp32():
    from nst.engine.losses import _tensor_core_gram, gram_matrix

    dev = resolve_device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 48, 40, generator=gen).to(dev, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    if torch.cuda.get_device_capability(dev)[0] >= 8:
        assert _tensor_core_gram(x), "torch.mm(bf16, bf16, out_dtype=float32) should run on this GPU"
    fast = x.clone().requires_grad_(True)
    ref = x.float().requires_grad_(True)
    w = torch.randn(1, 64, 64, device=dev)
    g = gram_matrix(fast)
    (g * w).sum().backward()
    want = gram_matrix(ref)
    (want * w).sum().backward()
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.grad.float(), ref.grad, rtol=2e-2, atol=1e-3)
