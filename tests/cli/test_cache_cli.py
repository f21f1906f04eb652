"""`nst cache info` and `nst cache clear`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()


def test_info_and_clear(images, tmp_path: Path, _private_cache: Path):
    r = runner.invoke(app, ["cache", "info", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["entries"] == 0
    out = tmp_path / "o.png"
    args = ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), "--weights", "random", "--size", "48", "--iterations", "1",
            "--content-layers", "relu1_2", "--style-layers", "relu1_1", "--targets", "onnx", "-q"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert info["entries"] == 2 and info["bytes"] > 0 and len(info["models"]) == 1 and info["folder"] == str(_private_cache)
    table = runner.invoke(app, ["cache", "info"])
    assert table.exit_code == 0 and "target entries" in table.output and info["models"][0]["name"] in table.output
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 2 target entries and 1 models" in cleared.output
    assert json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout) | {"folder": ""} == {
        "folder": "", "entries": 0, "bytes": 0, "models": [], "model_bytes": 0, "temporaries": [], "temporary_bytes": 0}  # fmt: skip


def test_a_file_where_the_cache_folder_goes_is_one_error_line(images, tmp_path: Path, monkeypatch):
    """`nst cache info` printed an empty table for it, `nst cache clear` said it removed nothing,
    and `nst export` did the export's work before failing to write into it. `stylize`, for which
    the cache is only an optimisation, goes on without it after one warning."""
    file = tmp_path / "cache"
    file.write_text("x")
    monkeypatch.setenv("NST_CACHE_DIR", str(file))
    for args in (["cache", "info"], ["cache", "clear"], ["export", "--weights", "random"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"error: the cache folder {file} cannot be used: {file} is a file, not a folder; set NST_CACHE_DIR to a folder"), r.output
        assert r.output.strip().count("\n") == 0 and "exporting" not in r.output, r.output
    out = tmp_path / "o.png"
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), "--weights", "random", "--size", "48",
                            "--iterations", "1", "--targets", "torch", "-q"])
    assert r.exit_code == 0 and out.is_file(), r.output
    (warning,) = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert "target cache" in warning and "going on without caching" in warning, r.output
    assert file.read_text() == "x"
