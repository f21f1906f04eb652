"""GPU checks: marked `gpu`, so they run only where CUDA is present (tests/conftest.py skips
them elsewhere, CI included). `pytest -m gpu` runs every CUDA-only test of the suite."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

# Imported here, not in the tests: collection runs on every machine, so a name that moved fails
# CI rather than the next GPU run (the CUDA-graph test's imports once did).
from nst.engine.bench import BenchCase, bench_config, case_images
from nst.engine.bench_loops import _graphed, fast_loss
from nst.engine.config import GATYS, Precision
from nst.engine.device import Runtime, check_precision, precision_context, resolve_device, resolve_precision
from nst.engine.images import load_image
from nst.engine.transfer import stylize

pytestmark = [pytest.mark.gpu]

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
    # Relative to the gradient's largest entry (about 4.4e-4 here), so that a zero or a
    # wrongly scaled gradient fails. bf16 rounding of dG + dG^T and of the product: about 0.3%.
    scale = ref.grad.abs().max()
    assert scale > 0
    assert (fast.grad.float() - ref.grad).abs().max() <= 1e-2 * scale


def test_fp32_means_fp32_on_the_gpu():
    """Under an fp32 run's switches, cuDNN convolutions and cuBLAS products are not TF32."""
    dev = resolve_device("cuda")
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, 32, 32, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 256, generator=gen)
    conv_ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    mm_ref = a.double() @ b.double()
    with precision_context(Runtime(device=dev, precision=Precision.FP32)):
        conv = torch.nn.functional.conv2d(x.to(dev), w.to(dev), padding=1).cpu().double()
        mm = (a.to(dev) @ b.to(dev)).cpu().double()
    # fp32: about 1e-6 of the largest value (Winograd or FFT algorithms a little more); TF32
    # (10-bit mantissa): about 1e-3.
    assert (conv - conv_ref).abs().max() <= 1e-4 * conv_ref.abs().max()
    assert (mm - mm_ref).abs().max() <= 1e-4 * mm_ref.abs().max()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_replayed_cuda_graph_adam_step_equals_the_eager_step(weights, precision):
    """`nst bench --cuda-graph`'s step (forward, backward and Adam(capturable) in one graph),
    replayed, moves the image as the same step run eagerly from the same state does."""
    dev = resolve_device("cuda")
    check_precision(dev, precision)
    case = BenchCase(64, 64, precision=precision, optimizer="adam", cuda_graph=True)
    cfg = bench_config(case)
    runtime = Runtime(device=dev, precision=precision)
    content, style = case_images(case, dev, 0)

    def adam(p: torch.Tensor) -> torch.optim.Adam:
        return torch.optim.Adam([p], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, capturable=True)

    with precision_context(runtime):
        loss_fn, _ = fast_loss(cfg, weights, runtime, content, style)
        x = (content * cfg.pixel_scale).contiguous().requires_grad_(True)
        opt = adam(x)
        replay = _graphed(x, loss_fn, opt)  # three eager warm-up steps, then the capture
        torch.cuda.synchronize(dev)
        twin = x.detach().clone().requires_grad_(True)  # the same image and optimiser state
        twin_opt = adam(twin)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        tol = 1e-3 if precision == Precision.FP32 else 2e-2
        for _ in range(2):  # the second step checks that the graph advances Adam's step count
            x0, t0 = x.detach().clone(), twin.detach().clone()
            replay()
            twin.grad = None
            loss, _ = loss_fn(twin)
            loss.backward()
            twin_opt.step()
            torch.cuda.synchronize(dev)
            moved, want = x.detach() - x0, twin.detach() - t0
            assert want.abs().max() > 0
            assert ((moved - want).norm() / want.norm()).item() < tol


def test_lbfgs_step_never_synchronises_with_the_host():
    """Our L-BFGS's claim: no host synchronisation in a step, from the first step through a
    full history and past it (slots reused, pairs maybe rejected)."""
    from nst.engine.lbfgs import LBFGS

    dev = resolve_device("cuda")
    gen = torch.Generator().manual_seed(0)
    shape = (1, 3, 48, 40)
    curvature = (10.0 ** (2 * torch.rand(shape, generator=gen) - 1)).to(dev)  # 0.1 to 10
    target = torch.rand(shape, generator=gen).to(dev)
    x = torch.zeros(shape, device=dev, requires_grad=True)
    opt = LBFGS(x, lr=1.0, history=5)
    losses = []
    for _ in range(12):
        x.grad = None
        loss = 0.5 * (curvature * (x - target).pow(2)).sum()
        loss.backward()
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(loss.detach())
    assert float(losses[-1]) < 0.1 * float(losses[0])  # and it optimised


def _quadratic_run(x0: torch.Tensor, steps: int, **kw) -> tuple[list[torch.Tensor], int, object]:
    """L-BFGS on a diagonal quadratic from `x0` (on the GPU); its iterates (on the CPU), the peak
    memory it allocated beyond what was allocated before it started, and the optimiser."""
    from nst.engine.lbfgs import LBFGS

    dev = x0.device
    gen = torch.Generator().manual_seed(1)
    curvature = (10.0 ** (2 * torch.rand(x0.shape, generator=gen) - 1)).to(dev)  # 0.1 to 10
    target = torch.rand(x0.shape, generator=gen).to(dev)
    x = x0.clone().requires_grad_(True)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    opt = LBFGS(x, history=20, **kw)
    its = []
    for _ in range(steps):
        x.grad = None
        (0.5 * (curvature * (x - target).pow(2)).sum()).backward()
        opt.step()
        its.append(x.detach().cpu())
    torch.cuda.synchronize(dev)
    return its, torch.cuda.max_memory_allocated(dev) - before, opt


def test_host_history_saves_its_size_on_the_gpu_and_matches_the_device_history():
    """L-BFGS's history in pinned host memory, streamed in 4 MiB chunks: the GPU's peak drops by
    about the history (40 x a 512x512 image's fp32 vector, 126 MB), less the chunks in flight and
    plus the whole-vector temporaries of the first pass that the chunks replace (a few vectors,
    3.1 MB each): within 20%; the iterates are the in-device history's up to the chunked sums'
    rounding.

    The same chunks streamed through the GPU's own memory give the same iterates bit for bit, so
    the host's copies lose nothing. Against the whole history's single fp32 product per dot, the
    chunks' float64 sums differ by rounding: on an H100, up to 3.7e-5 over 25 iterates of about 1
    (from 6.4e-6 at the first one that uses a pair), more than the CPU's 1e-6."""
    dev = resolve_device("cuda")
    x0 = torch.zeros(1, 3, 512, 512, device=dev)
    history = 2 * 20 * x0.numel() * 4
    ref, peak_device, _ = _quadratic_run(x0, 25)
    got, peak_host, opt = _quadratic_run(x0, 25, history_device="cpu", chunk_bytes=4 * 2**20)
    chunked, _, on_device = _quadratic_run(x0, 25, history_device="cuda", chunk_bytes=4 * 2**20)
    assert opt.streamed and opt.history_device.type == "cpu" and all(c.is_pinned() for _, c in opt._chunks)
    assert on_device.streamed and on_device.history_device.type == "cuda"
    saved = peak_device - peak_host
    assert 0.8 * history < saved < 1.2 * history, (saved, history)
    for k, (a, b, c) in enumerate(zip(got, ref, chunked)):
        assert torch.equal(a, c), f"iterate {k}: the host's chunks differ from the same chunks on the GPU"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * max(1.0, float(b.abs().max())), msg=lambda m, k=k: f"iterate {k}: {m}")


def test_host_history_step_never_synchronises_with_the_host():
    """The streamed history keeps the step free of host syncs: pinned memory, non_blocking copies."""
    from nst.engine.lbfgs import LBFGS

    dev = resolve_device("cuda")
    x = torch.zeros(1, 3, 48, 40, device=dev, requires_grad=True)
    target = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)).to(dev)
    opt = LBFGS(x, history=5, history_device="cpu", chunk_bytes=2 * 5 * 4 * 1000)  # 6 chunks
    assert len(opt._chunks) == 6
    losses = []
    for _ in range(12):
        x.grad = None
        loss = (x - target).pow(2).sum()
        loss.backward()
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
        try:
            opt.step(loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(loss.detach())
    assert float(losses[-1]) < 0.1 * float(losses[0])


def test_bench_peak_memory_leaves_out_cudnns_tuning(weights):
    """cuDNN's kernel tuning, on the warm-up's first step, tries workspaces as large as the free
    memory (on the H200, 2026-11-26, the bench's 1024 px rows said 133 GB while the planner
    estimated 2.3 GB); a row's peak is the timed iterations', within 20% of the plan's estimate of
    the loop (not run on a GPU yet)."""
    from nst.engine.bench import bench_case
    from nst.engine.plan import TileMode, plan_run

    case = BenchCase(512, 512, optimizer="adam", precision=Precision.FP32)
    row = bench_case(case, weights=weights, device=torch.device("cuda"), iterations=2, warmup=1)
    assert row.status == "ok" and "after the warm-up" in row.memory_source
    plan = plan_run(bench_config(case), (512, 512), [(512, 512)], tile=TileMode.OFF, device="cuda", precision=Precision.FP32)
    assert row.peak_memory_mb * 2**20 <= 1.2 * plan.estimated_peak_bytes, (row.peak_memory_mb, plan.estimated_peak_bytes / 2**20)
