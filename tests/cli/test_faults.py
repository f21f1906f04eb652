"""Faults a run must survive: a full disk under the cache or the outputs, a damaged stored model,
and what kill -9 leaves behind. The disk is really full (a tmpfs with no byte free, where the
tests may mount one), the damage is real bytes flipped on disk, the leftovers come from a really
killed process."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine import onnx_meta as M
from nst.engine.cache import TargetCache

runner = CliRunner()
LAYERS = ["--content-layers", "relu1_2", "--style-layers", "relu1_1"]
FAST = ["--weights", "random", "--size", "48", "--iterations", "3", *LAYERS]


@pytest.fixture
def cache(models_cache: Path) -> Path:
    """A fresh cache folder holding this module's model (`LAYERS`), exported once (conftest)."""
    return models_cache


def stylize(images: dict[str, Path], out: Path, *extra: str):
    report = out.parent / f"{out.stem}.json"
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--report", str(report), *extra])
    return r, (json.loads(report.read_text()) if report.is_file() else None)


def lines(output: str, start: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(start)]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


# --- 1. a full disk under the cache ------------------------------------------------------------


@pytest.mark.parametrize("targets", ["torch", "auto"])
def test_a_full_cache_disk_never_fails_a_run(images, tmp_path: Path, full_disk: Path, monkeypatch: pytest.MonkeyPatch, targets: str):
    monkeypatch.setenv("NST_CACHE_DIR", str(full_disk))
    r, rep = stylize(images, tmp_path / "a.png", "--targets", targets)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.png").is_file() and "Traceback" not in r.output
    cache_warnings = [w for w in lines(r.output, "warning:") if "target cache" in w]
    assert len(cache_warnings) == 1 and "No space left on device" in cache_warnings[0]
    assert rep["targets"]["source"] == "torch"
    if targets == "auto":  # the export could not be written either: PyTorch targets, and the reason
        assert "cannot write" in rep["targets"]["fallback"] and str(full_disk / "models") in rep["targets"]["fallback"]
        assert len([w for w in lines(r.output, "warning:") if "ONNX export failed" in w]) == 1


def test_a_full_disk_under_onnx_targets_or_export_is_one_error_naming_the_path(images, tmp_path: Path, full_disk: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NST_CACHE_DIR", str(full_disk))
    r, _ = stylize(images, tmp_path / "a.png", "--targets", "onnx")
    e = runner.invoke(app, ["export", "--weights", "random", *LAYERS])
    for result in (r, e):
        assert result.exit_code == 2 and "Traceback" not in result.output
        (error,) = lines(result.output, "error:")
        assert error.startswith(f"error: cannot write {full_disk / M.MODELS_DIR}") and "No space left on device" in error
    assert not (tmp_path / "a.png").exists()


def _limit_file_size() -> None:  # in the child: writes past 16 KiB fail with EFBIG instead of killing it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))


def test_a_write_limit_under_auto_falls_back_and_finishes(images, tmp_path: Path):
    """The same without root: the kernel refuses every write past 16 KiB (RLIMIT_FSIZE), which the
    cache entries and the model exceed and the 48 px output does not."""
    out, report = tmp_path / "a.png", tmp_path / "a.json"
    cmd = [sys.executable, "-c", "from nst.cli.app import main; main()", "stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--report", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "Traceback" not in r.stderr
    assert len([w for w in lines(r.stderr, "warning:") if "target cache" in w and "File too large" in w]) == 1
    rep = json.loads(report.read_text())
    assert rep["targets"]["source"] == "torch" and "File too large" in rep["targets"]["fallback"]


# --- 2. a damaged model in the store -----------------------------------------------------------


def test_a_damaged_stored_model_is_re_exported_with_one_warning(images, cache: Path, tmp_path: Path):
    r1, rep1 = stylize(images, tmp_path / "a.png", "--targets", "onnx", "--precision", "fp32")
    assert r1.exit_code == 0, r1.output
    model = Path(rep1["targets"]["model"])
    flip_64_bytes(model)
    shutil.rmtree(cache / "targets")  # the targets must come from the re-exported model, not the cache
    r2, rep2 = stylize(images, tmp_path / "b.png", "--targets", "onnx", "--precision", "fp32")
    assert r2.exit_code == 0, r2.output
    (warning,) = lines(r2.output, "warning:")
    assert "discarded the stored model" in warning and "checksum" in warning
    assert rep2["targets"]["exported"] is True and rep2["targets"]["cache"] == "miss"
    assert rep2["targets"]["model_sha256"] == M.file_sha256(model) == (model.parent / M.CHECKSUM_FILE).read_text().split()[0]
    assert np.abs(pixels(tmp_path / "a.png") - pixels(tmp_path / "b.png")).max() <= 1


def test_cached_targets_are_keyed_by_the_model_files_checksum(images, cache: Path, tmp_path: Path):
    """Targets computed from one model file are never served for another, even with the same
    weights fingerprint in its metadata: a damaged copy misses, and so does the file once repaired."""
    good = next((cache / M.MODELS_DIR).glob(f"*/{M.TARGETS_FILE}"))
    mine = tmp_path / "mine.onnx"
    shutil.copy(good, mine)
    r, ref = stylize(images, tmp_path / "ref.png", "--onnx", str(mine), "--precision", "fp32")
    assert r.exit_code == 0 and ref["targets"]["cache"] == "miss", r.output
    flip_64_bytes(mine)
    r, damaged = stylize(images, tmp_path / "damaged.png", "--onnx", str(mine), "--precision", "fp32")
    assert damaged["targets"]["cache"] == "miss"  # not the good file's targets
    assert damaged["targets"]["model_sha256"] != ref["targets"]["model_sha256"]
    shutil.copy(good, mine)
    r, repaired = stylize(images, tmp_path / "repaired.png", "--onnx", str(mine), "--precision", "fp32")
    assert r.exit_code == 0 and repaired["targets"]["cache"] == "hit"  # its own targets, not the damaged copy's
    assert np.array_equal(pixels(tmp_path / "ref.png"), pixels(tmp_path / "repaired.png"))


# --- 3. what kill -9 leaves behind ---------------------------------------------------------------


def test_killed_runs_leftovers_are_shown_then_swept(images, cache: Path, tmp_path: Path, killed_writer):
    out = tmp_path / "out.png"
    entry = TargetCache(cache).path("0" * 32)
    store = cache / M.MODELS_DIR
    staging = lambda: [p for p in store.iterdir() if p.name.startswith(".")]  # noqa: E731
    # One real process, killed while it writes a cache entry and a --save-every snapshot, with an
    # export into the model store under way.
    dead = killed_writer(entry, tmp_path / "out.0001.png", export=True, until=lambda: bool(staging()))
    assert len(staging()) == 1 and any(entry.parent.glob(".*.tmp")) and any(tmp_path.glob(".out.0001.*.png.tmp"))

    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert sorted(Path(t["path"]).parent for t in info["temporaries"]) == sorted([store, entry.parent])
    assert all(t["stale"] and t["writer"] == dead for t in info["temporaries"]) and info["temporary_bytes"] >= 1000
    table = runner.invoke(app, ["cache", "info"], env={"COLUMNS": "200"})
    assert "temporaries" in table.output and "2 stale" in table.output and f"process {dead}, is gone" in table.output

    r, _ = stylize(images, out, "--targets", "onnx")
    assert r.exit_code == 0, r.output
    assert len(lines(r.output, "removed 2 stale temporaries")) == 1 and len(lines(r.output, "removed 1 stale temporaries beside")) == 1
    assert not staging() and not list(entry.parent.glob(".*.tmp")) and not list(tmp_path.glob(".out.*.tmp"))
    assert json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)["temporaries"] == []


# --- 4. snapshots that cannot be written ---------------------------------------------------------


def test_a_snapshot_that_cannot_be_written_is_a_warning(images, tmp_path: Path):
    out = tmp_path / "out.png"
    (tmp_path / "out.0001.png").mkdir()  # a folder where the first snapshot goes: its rename fails
    r, rep = stylize(images, out, "--targets", "torch", "--save-every", "1")
    assert r.exit_code == 0, r.output
    (warning,) = lines(r.output, "warning:")
    assert str(tmp_path / "out.0001.png") in warning and "the run goes on" in warning
    assert "a folder is in the way" in warning and "give a file name" not in warning  # no advice to name a snapshot
    assert out.is_file() and (tmp_path / "out.0002.png").is_file()
    assert rep["intermediate"] == [str(tmp_path / "out.0002.png")] and rep["intermediate_failed"] == [str(tmp_path / "out.0001.png")]


def test_snapshots_on_a_full_disk_warn_once_and_the_final_write_still_errors(images, full_disk: Path):
    out = full_disk / "out.png"
    r, _ = stylize(images, out, "--targets", "torch", "--save-every", "1", "--iterations", "4", "--report", str(full_disk.parent / "r.json"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    (warning,) = lines(r.output, "warning:")  # three snapshots failed: one line
    assert "out.0001.png" in warning and "No space left on device" in warning
    (error,) = lines(r.output, "error:")
    assert error == f"error: cannot write {out}: No space left on device"


def test_a_sheet_that_cannot_be_written_is_a_warning_and_the_report_still_comes(images, tmp_path: Path, full_disk: Path):
    """`--compare` is an extra: its failure ended the run with an error before the report was written."""
    out, sheet = tmp_path / "out.png", full_disk / "sheet.png"
    r, data = stylize(images, out, "--targets", "torch", "--compare", str(sheet))
    assert r.exit_code == 0, r.output
    (warning,) = lines(r.output, "warning:")
    assert warning.startswith(f"warning: --compare: cannot write {sheet}: No space left on device")
    assert out.is_file() and data["status"] == "done" and not sheet.exists()
    assert f"wrote {sheet}" not in r.output
