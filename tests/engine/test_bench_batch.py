"""The batch phase of nst bench: rows with batch_size and jobs_per_minute, from whole jobs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine.bench import ROW_KEYS, BenchCase
from nst.engine.bench_batch import bench_batch
from nst.engine.config import Precision


def test_bench_batch_rows(weights):
    rows = bench_batch(BenchCase(32, 48, precision=Precision.FP32, preset="seed", optimizer="adam"), weights=weights, device=torch.device("cpu"), batch_sizes=[1, 2], iterations=2)
    assert [r.batch_size for r in rows] == [1, 2] and all(r.status == "ok" and r.phase == "batch" for r in rows)
    assert all(r.jobs_per_minute > 0 and r.ms_per_iteration > 0 and r.size == "32x48" for r in rows)
    assert {"batch_size", "jobs_per_minute"} <= set(ROW_KEYS)


def test_nst_bench_batch_size_sweep(tmp_path: Path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--sizes", "32", "--precision", "fp32", "--iterations", "1", "--warmup", "0", "--batch-size", "1,2",
                                 "--no-optimizer-phase", "--no-targets-phase", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [x for x in json.loads(out.read_text())["results"] if x["phase"] == "batch"]
    assert [x["batch_size"] for x in rows] == [1, 2] and all(x["jobs_per_minute"] > 0 for x in rows)
    assert "jobs/min" in r.output
    bad = CliRunner().invoke(app, ["bench", "--sizes", "32", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output
