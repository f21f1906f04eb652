"""`nst stylize --targets onnx|torch|auto`: cache miss then hit, a damaged entry, the same image, provider errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()
LAYERS = ["--content-layers", "relu2_2", "--style-layers", "relu1_1,relu2_1"]
FAST = ["--weights", "random", "--size", "48", "--iterations", "4", *LAYERS]


@pytest.fixture
def cache(models_cache: Path) -> Path:
    """A fresh cache folder holding this module's model (`LAYERS`), exported once (conftest)."""
    return models_cache


def stylize(images: dict[str, Path], out: Path, *extra: str):
    report = out.with_suffix(".json")
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--report", str(report), *extra])
    return r, (json.loads(report.read_text()) if r.exit_code == 0 else None)


def test_onnx_targets_miss_then_hit(images, cache: Path, tmp_path: Path):
    r1, rep1 = stylize(images, tmp_path / "a.png", "--targets", "onnx")
    assert r1.exit_code == 0, r1.output
    r2, rep2 = stylize(images, tmp_path / "b.png", "--targets", "onnx")
    assert r2.exit_code == 0, r2.output
    for rep in (rep1, rep2):
        t = rep["targets"]
        assert t["source"] == "onnxruntime" and t["provider"] in ("cpu", "cuda", "tensorrt") and t["seconds"] >= 0
        assert t["exported"] is False  # the model came from the store
    assert (rep1["targets"]["cache"], rep2["targets"]["cache"]) == ("miss", "hit")
    assert "onnxruntime" in r2.output and "cache hit" in r2.output  # the terminal report says the same
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_damaged_entry_is_recomputed(images, cache: Path, tmp_path: Path):
    assert stylize(images, tmp_path / "a.png", "--targets", "onnx")[0].exit_code == 0
    entries = sorted((cache / "targets").glob("*/*.safetensors"))
    assert len(entries) == 2  # the content's and the style's
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    r, rep = stylize(images, tmp_path / "b.png", "--targets", "onnx")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "damaged target cache entry" in r.output
    assert rep["targets"]["cache"] == "miss"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert stylize(images, tmp_path / "c.png", "--targets", "onnx")[1]["targets"]["cache"] == "hit"


def test_onnx_and_torch_targets_give_the_same_image(images, cache: Path, tmp_path: Path):
    # fp32: in bf16 the network's rounding would magnify the sources' 1e-6 differences.
    _, onnx_rep = stylize(images, tmp_path / "o.png", "--targets", "onnx", "--init", "noise", "--precision", "fp32")
    r, torch_rep = stylize(images, tmp_path / "t.png", "--targets", "torch", "--init", "noise", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    assert onnx_rep["targets"]["source"] == "onnxruntime" and torch_rep["targets"]["source"] == "torch"
    assert torch_rep["targets"]["cache"] == "miss"  # PyTorch's entries are kept apart from ONNX Runtime's
    a = np.asarray(Image.open(tmp_path / "o.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "t.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # 8-bit files: at most one level apart


def test_auto_uses_the_store_and_reports_fallbacks(images, cache: Path, tmp_path: Path):
    r, rep = stylize(images, tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    t = rep["targets"]
    assert t["source"] == "onnxruntime" and t["exported"] is False
    if not torch.cuda.is_available():
        assert t["provider"] == "cpu" and set(t["fallbacks"]) == {"tensorrt", "cuda"}


def test_auto_exports_when_the_store_lacks_the_model(images, tmp_path: Path):
    r, rep = stylize(images, tmp_path / "a.png", "--content-layers", "relu1_2", "--style-layers", "relu1_1")
    assert r.exit_code == 0, r.output
    assert rep["targets"]["source"] == "onnxruntime" and rep["targets"]["exported"] is True
    assert rep["targets"]["export_max_rel_error"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unavailable_provider_is_a_one_line_error(images, cache: Path, tmp_path: Path, provider: str):
    r, _ = stylize(images, tmp_path / "a.png", "--targets", "onnx", "--provider", provider)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"{provider} provider cannot load" in errors[0]
    assert "Traceback" not in r.output and not (tmp_path / "a.png").exists()


def test_onnx_file_must_match_the_run(images, cache: Path, tmp_path: Path):
    model = next((cache / "models").glob("*/targets.onnx"))
    r, rep = stylize(images, tmp_path / "a.png", "--onnx", str(model))
    assert r.exit_code == 0 and rep["targets"]["model"] == str(model)
    for extra, msg in ((["--pooling", "avg"], "pooling"), (["--seed", "5"], "weights"), (["--style-layers", "relu3_1"], "lacks")):
        r, _ = stylize(images, tmp_path / "b.png", "--onnx", str(model), *extra)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    r, _ = stylize(images, tmp_path / "b.png", "--onnx", str(tmp_path / "missing.onnx"))
    assert r.exit_code == 2 and "no ONNX model" in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage")
    r, _ = stylize(images, tmp_path / "b.png", "--onnx", str(bad))
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")  # protobuf reads it as an empty model: it said "has no nst metadata"
    r, _ = stylize(images, tmp_path / "b.png", "--onnx", str(empty))
    assert r.exit_code == 2 and "is empty (0 bytes), not an ONNX model" in r.output, r.output


def test_an_onnx_file_of_an_older_export_format_is_one_error_line(images, cache: Path, tmp_path: Path, as_format_1):
    """An export from before the style features were outputs (format 1) cannot tile: refused with
    what it lacks and what to do, whole or tiled, where the store would export its own anew."""
    old = as_format_1(next((cache / "models").glob("*/targets.onnx")), tmp_path / "old.onnx")
    for extra in ([], ["--tile", "32"]):
        r, _ = stylize(images, tmp_path / "a.png", "--onnx", str(old), *extra)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert "format 1" in line and "tiled runs" in line and "export it again" in line
        assert not (tmp_path / "a.png").exists()
