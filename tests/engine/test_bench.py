"""The measurement core on the CPU at tiny sizes: rows, skipped cases, the reference loop's loss,
reduced precision against fp32. No test asserts a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nst.engine.bench import ROW_KEYS, BenchCase, BenchRow, bench_case, bench_config, expand_cases, parse_size
from nst.engine.bench_loops import fast_loss, reference_loss
from nst.engine.bench_targets import bench_targets
from nst.engine.config import Precision
from nst.engine.device import DeviceError, Runtime, autocast_dtype, check_precision, precision_context
from nst.engine.transfer import build_model, loop_network
from nst.engine.peaks import measured_matmul_peak

CPU = torch.device("cpu")
ISSUE_KEYS = ("size", "precision", "device", "ms_per_iteration", "iterations_per_second", "megapixel_iterations_per_second", "tflops", "percent_of_peak", "peak_memory_mb")


def _peaks() -> dict:
    # A small matmul for the measured peak keeps the tests fast.
    return {(str(CPU), p.value): measured_matmul_peak(CPU, p, n=128, repeats=1) for p in (Precision.FP32, Precision.BF16)}


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam", "torch-lbfgs"])
def test_row_has_every_key_and_consistent_numbers(weights, optimizer):
    row = bench_case(BenchCase(32, 48, optimizer=optimizer), weights=weights, device=CPU, iterations=2, warmup=1, peaks=_peaks())
    d = row.to_dict()
    assert set(ISSUE_KEYS) <= set(d) and tuple(d) == ROW_KEYS
    assert row.status == "ok" and row.size == "32x48" and row.device == "cpu"
    assert row.ms_per_iteration_p10 <= row.ms_per_iteration <= row.ms_per_iteration_p90
    assert row.iterations_per_second == pytest.approx(1e3 / row.ms_per_iteration)
    assert row.megapixel_iterations_per_second == pytest.approx(32 * 48 / 1e6 * row.iterations_per_second)
    assert row.tflops == pytest.approx(row.gflop_per_iteration / row.ms_per_iteration)  # GFLOP/ms = TFLOP/s
    assert row.percent_of_peak == pytest.approx(100 * row.tflops / row.peak_tflops)
    assert "measured torch.matmul" in row.peak_source
    assert row.peak_memory_mb and row.peak_memory_mb > 0 and "RSS" in row.memory_source


def test_tf32_and_cuda_graph_are_skipped_on_the_cpu_with_a_reason(weights):
    row = bench_case(BenchCase(32, 32, precision=Precision.TF32), weights=weights, device=CPU, iterations=1)
    assert row.status == "skipped" and "CUDA" in row.reason and row.ms_per_iteration is None
    row = bench_case(BenchCase(32, 32, optimizer="adam", cuda_graph=True), weights=weights, device=CPU, iterations=1)
    assert row.status == "skipped" and "CUDA" in row.reason


def _supports(p: Precision) -> bool:
    try:
        check_precision(CPU, p)
        return True
    except DeviceError:
        return False


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_reduced_precision_matches_fp32_loss(weights, precision):
    # Stated tolerance: the loss (and its gradient's direction) under bf16/fp16 autocast, with
    # Grams and loss sums in fp32, within 5% of fp32's (bf16 keeps 8 bits of mantissa).
    if not _supports(precision):
        pytest.skip(f"{precision.value} does not run on this CPU")
    case = BenchCase(32, 32, preset="gatys")
    cfg = bench_config(case)
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    out = {}
    for p in (Precision.FP32, precision):
        rt = Runtime(precision=p, channels_last=False)
        with precision_context(rt):
            loss_fn, _ = fast_loss(cfg, weights, rt, content, style)
            x = (0.5 * content + 0.5 * style).requires_grad_(True)
            loss, _ = loss_fn(x)
            loss.backward()
        assert loss.dtype == torch.float32
        out[p] = (float(loss.detach()), x.grad.flatten())
    (l32, g32), (lp, gp) = out[Precision.FP32], out[precision]
    assert lp == pytest.approx(l32, rel=5e-2)
    assert torch.nn.functional.cosine_similarity(g32, gp, dim=0) > 0.95


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_lowp_weights_compute_what_autocast_computes(weights, precision):
    # Casting the weights once must give the loss and gradient autocast gives by casting them at
    # every call, while the network the targets use stays fp32.
    if not _supports(precision):
        pytest.skip(f"{precision.value} does not run on this CPU")
    cfg = bench_config(BenchCase(32, 32, preset="seed"))
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    out = {}
    for lowp in (True, False):
        rt = Runtime(precision=precision, lowp_weights=lowp)
        with precision_context(rt):
            model = build_model(cfg, weights, rt)
            net = loop_network(model, rt)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            want = autocast_dtype(precision) if lowp else torch.float32
            assert {p.dtype for p in net.parameters()} == {want}
            loss_fn, _ = fast_loss(cfg, weights, rt, content, style)
            x = (0.5 * content + 0.5 * style).requires_grad_(True)
            loss, _ = loss_fn(x)
            loss.backward()
        out[lowp] = (loss.detach(), x.grad)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-6, atol=1e-12)
    assert loop_network(model, Runtime(precision=Precision.FP32)) is model


@pytest.mark.parametrize("preset", ["gatys", "seed"])
def test_reference_loop_computes_the_same_loss_as_the_fast_loop(weights, preset):
    # Same loss by two routes: targets recomputed from a batch of three every step, against
    # targets computed once. Only the structure (and so the cost) differs.
    case = BenchCase(32, 48, preset=preset)
    cfg = bench_config(case)
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 32, 48, generator=gen), torch.rand(1, 3, 32, 48, generator=gen)
    rt = Runtime(channels_last=False)
    fast, _ = fast_loss(cfg, weights, rt, content, style)
    ref = reference_loss(cfg, weights, rt, content, style)
    x = ((0.7 * content + 0.3 * style) * cfg.pixel_scale).requires_grad_(True)
    lf, tf = fast(x)
    lr, tr = ref(x)
    for k in tf:
        assert float(tr[k].detach()) == pytest.approx(float(tf[k].detach()), rel=1e-4, abs=1e-6), k
    (gf,) = torch.autograd.grad(lf, x)
    (gr,) = torch.autograd.grad(lr, x)
    assert torch.allclose(gf, gr, rtol=1e-3, atol=1e-5 * float(gf.abs().max()))


def test_reference_row_counts_three_images(weights):
    fast = bench_case(BenchCase(32, 32, optimizer="adam"), weights=weights, device=CPU, iterations=1, warmup=0, peaks=_peaks())
    ref = bench_case(BenchCase(32, 32, optimizer="adam", loop="reference"), weights=weights, device=CPU, iterations=1, warmup=0, peaks=_peaks())
    assert ref.loop == "reference" and ref.status == "ok"
    assert 2.9 < ref.gflop_per_iteration / fast.gflop_per_iteration < 4  # 3 images, all 16 convs forward


def test_targets_phase_rows(weights):
    rows = bench_targets(BenchCase(32, 32), weights=weights, device=CPU, iterations=1, warmup=1)
    assert rows[0].phase == "targets" and rows[0].loop == "torch" and rows[0].status == "ok"
    ort = [r for r in rows if r.loop == "onnxruntime"]
    assert ort and all(r.status == "ok" or r.reason for r in ort)
    assert any("CPUExecutionProvider" in r.provider for r in ort)


def test_expand_and_parse():
    cases = expand_cases([(32, 32), (64, 48)], precisions=[Precision.FP32], optimizers=["lbfgs"], presets=["gatys"], loops=["fast"], ablate=True, cuda=False)
    assert [(c.height, c.channels_last) for c in cases] == [(32, True), (64, True), (32, False), (64, False)]
    assert len(expand_cases([(32, 32)], precisions=[Precision.FP32], optimizers=["lbfgs"], presets=["gatys"], loops=["fast"], ablate=True, cuda=True)) == 3
    # In bf16 the ablation also flips the weights' cast-once switch; nothing else changes with it.
    bf = expand_cases([(32, 32)], precisions=[Precision.BF16], optimizers=["lbfgs"], presets=["gatys"], loops=["fast"], ablate=True, cuda=False)
    assert [(c.channels_last, c.lowp_weights) for c in bf] == [(True, True), (False, True), (True, False)]
    with pytest.raises(ValueError, match="optimizer"):
        expand_cases([(32, 32)], precisions=[Precision.FP32], optimizers=["sgd"], presets=["gatys"], loops=["fast"])
    assert parse_size("128x192") == (128, 192) and parse_size("64") == (64, 64)
    for bad in ("0", "x", "12x", "-5"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_too_small_for_the_layers(weights):
    with pytest.raises(ValueError, match="too small"):
        bench_case(BenchCase(8, 8), weights=weights, device=CPU, iterations=1)


def test_rows_say_what_the_case_was():
    fields = {f.name for f in dataclasses.fields(BenchRow)}
    assert {"status", "reason", "loop", "optimizer", "preset", "channels_last", "peak_source", "memory_source"} <= fields


def test_a_size_that_does_not_fit_is_a_skipped_row(weights, monkeypatch):
    # What a sweep up to 4096 px does on a smaller GPU: the row says why, and the sweep goes on.
    import nst.engine.bench as bench
    import nst.engine.bench_targets as bt

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB. GPU 0 has a total capacity of 22 GiB")

    monkeypatch.setattr(bench, "_measure_case", oom)
    monkeypatch.setattr(bt, "_measure_targets", oom)
    row = bench.bench_case(BenchCase(32, 32), weights=weights, device=CPU, iterations=1, warmup=0)
    assert row.status == "skipped" and row.ms_per_iteration is None
    assert row.reason == "ran out of memory on cpu (an allocation of 12.0 GiB failed): this size does not fit here"
    rows = bt.bench_targets(BenchCase(32, 32), weights=weights, device=CPU, iterations=1, warmup=0)
    assert [(r.phase, r.status) for r in rows] == [("targets", "skipped")] and "12.0 GiB" in rows[0].reason

    def other(*a, **k):
        raise RuntimeError("a shape mismatch is a bug, not a size")

    monkeypatch.setattr(bench, "_measure_case", other)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.bench_case(BenchCase(32, 32), weights=weights, device=CPU, iterations=1, warmup=0)


def test_every_phase_times_under_its_device_context(weights, device_contexts, monkeypatch):
    """CUDA events, streams and graphs act on the current device: each phase must make the
    bench's device current around its timing (checked here through a stand-in context on the CPU)."""
    import nst.engine.bench as bench
    import nst.engine.bench_targets as bench_targets_module
    import nst.engine.device as device

    device_contexts.patch(device, bench, bench_targets_module)
    timed_under: list[object] = []
    real_time_steps = bench.time_steps

    def time_steps(*args, **kwargs):
        timed_under.append(device_contexts.current)
        return real_time_steps(*args, **kwargs)

    def measure_targets(*args, **kwargs):  # the targets phase's whole measurement (its timing inside)
        timed_under.append(device_contexts.current)
        return []

    monkeypatch.setattr(bench, "time_steps", time_steps)
    monkeypatch.setattr(bench_targets_module, "_measure_targets", measure_targets)
    assert bench_case(BenchCase(32, 32, optimizer="adam"), weights=weights, device=CPU, iterations=1, warmup=0, peaks=_peaks()).status == "ok"
    assert bench.bench_optimizer(BenchCase(32, 32, optimizer="lbfgs"), device=CPU, iterations=1, warmup=0, history=2).status == "ok"
    assert bench_targets(BenchCase(32, 32), weights=weights, device=CPU, iterations=1, warmup=1) == []
    assert timed_under == [CPU, CPU, CPU]


def test_after_warmup_runs_between_the_warmup_and_the_timed_steps():
    """The bench resets CUDA's peak memory there, so a row's peak leaves out cuDNN's tuning."""
    from nst.engine.bench import time_steps

    calls: list[str] = []
    times = time_steps(lambda: calls.append("step"), CPU, iterations=2, warmup=3, after_warmup=lambda: calls.append("reset"))
    assert calls == ["step"] * 3 + ["reset"] + ["step"] * 2 and len(times) == 2


def test_peaks_of_precisions_without_fast_kernels_are_measured_small():
    """fp16 on the CPU, and bf16 on a CPU without bf16 units, are emulated: a 2048 px matmul and a
    256-channel convolution in bf16 took minutes on such a CPU, so their peaks are measured small."""
    from nst.engine.device import has_fast_bf16
    from nst.engine.peaks import measured_conv_peak

    for precision, emulated in ((Precision.FP16, True), (Precision.BF16, not has_fast_bf16(CPU)), (Precision.FP32, False)):
        _, source = measured_matmul_peak(CPU, precision, repeats=1) if emulated else (None, "")
        conv = measured_conv_peak(CPU, precision, repeats=1)[1]
        assert ("32->32 at 16x16" in conv) == emulated, (precision, conv)
        if emulated:
            assert "256x256" in source


def test_settle_peaks_caps_every_row_at_100_percent():
    from nst.engine.bench import BenchRow, settle_peaks

    def row(tflops, peak, source, precision="fp32", device="cpu"):
        return BenchRow(size="32x32", precision=precision, device=device, ms_per_iteration=1.0, ms_per_iteration_p10=1.0,
                        ms_per_iteration_p90=1.0, iterations_per_second=1e3, megapixel_iterations_per_second=1.0, tflops=tflops,
                        percent_of_peak=100 * tflops / peak, peak_memory_mb=None, peak_tflops=peak, peak_source=source)  # fmt: skip

    rows = [row(0.2, 0.1, "measured a"), row(0.05, 0.08, "measured b"), row(0.3, 1.0, "measured c", precision="bf16"),
            row(80.0, 67.0, "NVIDIA H100 SXM datasheet", device="cuda:0"), BenchRow(**{**row(1, 1, "").to_dict(), "tflops": None, "percent_of_peak": None})]
    out = settle_peaks(rows)
    assert [r.percent_of_peak for r in out[:4]] == pytest.approx([100.0, 25.0, 30.0, 100.0])
    assert out[0].peak_tflops == out[1].peak_tflops == 0.2 and "above measured a at 0.1 TFLOP/s" in out[0].peak_source
    assert out[2].peak_source == "measured c"  # a peak no row beat is kept as it was
    assert "check its FLOP count" in out[3].peak_source  # beating a datasheet is a bug somewhere
    assert out[4].percent_of_peak is None
