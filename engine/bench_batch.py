"""The batch phase of the profiler: jobs per minute with several images optimised together.

What a user of `nst batch --batch-size N` waits for is finished jobs, so this times whole jobs
through the batch worker (decoding, content targets, every iteration, the result copied back),
not one iteration: `jobs` same-size jobs of `iterations` iterations each, run N at a time. Each
batch size gets a fresh worker, warmed up on one job first (network built, style targets in
memory, convolution algorithms chosen), so every size pays the same for what a batch does once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bench import BenchCase, BenchRow, bench_config, check_case_size
from .device import is_out_of_memory, out_of_memory_message, release_memory
from .jobs.joblist import Job
from .jobs.worker import JobInput, Worker
from .weights import Weights


def _png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _inputs(case: BenchCase, cfg, n: int, seed: int, style: bytes) -> list[JobInput]:  # noqa: ANN001
    out = []
    for i in range(n):
        data = _png(case.height, case.width, seed + 1 + i)
        job = Job(f"bench-{i}.png", Path(f"bench-{i}.png"), (Path("bench-style.png"),), Path(f"bench-{i}.png"), cfg)
        out.append(JobInput(job, data, (style,), hashlib.sha256(data).hexdigest(), (hashlib.sha256(style).hexdigest(),)))
    return out


def bench_batch(
    case: BenchCase, *, weights: Weights, device: torch.device, batch_sizes: Sequence[int], jobs: int | None = None, iterations: int = 20, seed: int = 0
) -> list[BenchRow]:
    """One row per batch size: `jobs_per_minute`, and ms per batched iteration."""
    cfg = dataclasses.replace(bench_config(case), iterations=iterations, save_every=0)
    check_case_size(cfg, case)
    n_jobs = jobs or max(batch_sizes)
    style = _png(case.height, case.width, seed)
    rows = []
    for b in batch_sizes:
        base = dict(
            size=f"{case.height}x{case.width}", precision=case.precision.value, device=str(device), phase="batch", loop="fast",
            optimizer=case.optimizer, preset=case.preset, provider=str(device), height=case.height, width=case.width,
            iterations=iterations, batch_size=b, percent_of_peak=None, tflops=None, peak_memory_mb=None, ms_per_iteration_p10=None, ms_per_iteration_p90=None,
        )  # fmt: skip
        try:
            worker = Worker(weights, device=str(device), precision=case.precision.value)
            worker.run_many(_inputs(case, dataclasses.replace(cfg, iterations=1), 1, seed + 1000, style))  # warm-up
            chunks = [list(range(i, min(i + b, n_jobs))) for i in range(0, n_jobs, b)]
            todo = _inputs(case, cfg, n_jobs, seed, style)
            t0 = time.perf_counter()
            outcomes = [o for c in chunks for o in worker.run_many([todo[i] for i in c])]
            seconds = time.perf_counter() - t0
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            release_memory(device)
            rows.append(BenchRow(ms_per_iteration=None, iterations_per_second=None, megapixel_iterations_per_second=None, status="skipped", reason=out_of_memory_message(e, device), **base))  # type: ignore[arg-type]
            continue
        bad = [o.reason for o in outcomes if o.status != "done"]
        if bad:
            rows.append(BenchRow(ms_per_iteration=None, iterations_per_second=None, megapixel_iterations_per_second=None, status="skipped", reason=bad[0], **base))  # type: ignore[arg-type]
            continue
        ms = seconds * 1e3 / (len(chunks) * iterations)  # one batched iteration, all its images
        rows.append(
            BenchRow(
                ms_per_iteration=ms, iterations_per_second=1e3 / ms, megapixel_iterations_per_second=b * case.height * case.width / 1e6 * 1e3 / ms,
                jobs_per_minute=n_jobs / seconds * 60, **base,  # type: ignore[arg-type]
            )
        )
    return rows
