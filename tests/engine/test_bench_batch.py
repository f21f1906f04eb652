"""The batch phase of nst bench: rows with batch_size and jobs_per_minute, from whole jobs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine.bench import ROW_KEYS


def test_nst_bench_batch_size_sweep(tmp_path: Path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--sizes", "32", "--precision", "fp32", "--iterations", "1", "--warmup", "0", "--batch-size", "1,2",
                                 "--no-optimizer-phase", "--no-targets-phase", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [x for x in json.loads(out.read_text())["results"] if x["phase"] == "batch"]
    assert [x["batch_size"] for x in rows] == [1, 2] and all(x["jobs_per_minute"] > 0 and x["ms_per_iteration"] > 0 and x["size"] == "32x32" for x in rows)
    assert {"batch_size", "jobs_per_minute"} <= set(ROW_KEYS) <= set(rows[0])
    assert "jobs/min" in r.output
    bad = CliRunner().invoke(app, ["bench", "--sizes", "32", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output
