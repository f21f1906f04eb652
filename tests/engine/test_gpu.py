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
