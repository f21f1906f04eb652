"""`nst export`: into the model store once, to an explicit file, fp16, and one-line errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine import onnx_meta as M

runner = CliRunner()
SMALL = ["--weights", "random", "--content-layers", "relu1_2", "--style-layers", "relu1_1,relu2_1"]


def test_export_into_store_then_found(_private_cache: Path):
    r = runner.invoke(app, ["export", *SMALL])
    assert r.exit_code == 0, r.output
    assert "largest relative error" in r.output and "64x48" in r.output and "40x64" in r.output and "opset 18" in r.output
    (model,) = M.stored_models(_private_cache)
    assert str(model) in r.output
    meta = M.read_meta(model)
    assert meta.style_layers == ("relu1_1", "relu2_1") and meta.weights_kind == "random"
    again = runner.invoke(app, ["export", *SMALL])
    assert again.exit_code == 0 and "already in the model store" in again.output
    assert M.stored_models(_private_cache) == [model]


def test_export_to_file_fp16_and_avg_pooling(tmp_path: Path):
    out = tmp_path / "sub" / "half.onnx"
    r = runner.invoke(app, ["export", *SMALL, "--fp16", "--pooling", "avg", "--seed", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    meta = M.read_meta(out)
    assert meta.precision == "fp16" and meta.pooling == "avg"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_export_errors_are_one_line(tmp_path: Path):
    for args, msg in (
        (["-o", str(tmp_path / "x.txt")], "should end in .onnx"),
        (["--style-layers", "relu9_9"], "unknown layer"),
        (["--weights", str(tmp_path / "none.pth")], ""),
    ):
        r = runner.invoke(app, ["export", "--weights", "random", *args])
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error:") and msg in r.output and "Traceback" not in r.output
