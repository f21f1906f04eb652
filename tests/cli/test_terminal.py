"""What a user reads in an 80-column terminal: stylize's lines, the two it/s figures, the comparison
sheet, Ctrl-C's last lines, `nst info` without a GPU, `nst weights status` and `nst bench`'s table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app
from nst.cli.common import console

runner = CliRunner()
FAST = ["--weights", "random", "--size", "48", "--iterations", "4", "--targets", "torch", "--style-layers", "relu1_1,relu2_1,relu3_1", "--content-layers", "relu3_2"]
RANDOM_NOTE = "weights: random (seed 0), not pretrained: the result shows the method at work, not a painting"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@pytest.fixture
def terminal80(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared console as in an 80-column terminal: Rich wraps between words at 80."""
    monkeypatch.setattr(console, "width", 80)
    monkeypatch.setattr(console, "soft_wrap", False)


def _stylize(images: dict[str, Path], out: Path, *extra: str):
    return runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, *extra])


def _run_in_terminal(cmd: list[str], *, columns: int = 80) -> tuple[int, str]:
    """Run `cmd` with its stdin and stderr on a pseudo-terminal `columns` wide; (exit code, what
    the terminal received, escape sequences removed)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TTY_COMPATIBLE", "FORCE_COLOR")}
    p = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, env={**env, "NO_COLOR": "1", "TERM": "xterm"})
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = p.wait(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal sizes through termios")
def test_first_line_wraps_between_words_in_a_terminal(images, tmp_path: Path):
    """In a real (pseudo-)terminal 80 columns wide, the first message (longer than 80) wraps
    between words, and nothing printed passes column 80."""
    cmd = [sys.executable, "-c", "from nst.cli.app import main; main()", "stylize", str(images["content"]), str(images["style"]),
           "-o", str(tmp_path / "o.png"), *FAST]  # fmt: skip
    code, text = _run_in_terminal(cmd)
    assert code == 0, text
    lines = [line for line in re.split(r"\r?\n|\r", text)]
    first = [line.strip() for line in lines[:2]]
    assert " ".join(first) == RANDOM_NOTE, lines[:3]
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "timing" in text and "wrote" in text


def test_messages_stay_one_line_into_a_pipe(images, tmp_path: Path):
    """Out of a terminal (a pipe, a log file) each message is one line, whatever its length."""
    r = _stylize(images, tmp_path / "o.png")
    assert r.exit_code == 0, r.output
    assert RANDOM_NOTE in r.output.splitlines()


def test_stylize_output_fits_80_columns_and_the_two_rates_agree(images, tmp_path: Path, terminal80):
    sheet, rep = tmp_path / "sheet.png", tmp_path / "run.json"
    r = _stylize(images, tmp_path / "o.png", "--compare", str(sheet), "--report", str(rep))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert all(len(line) <= 80 for line in lines), r.output
    # The bar keeps 3 columns free: Ctrl-C's `^C` echo must not wrap it onto a second line.
    bar = [line for line in lines if line.startswith("stylize 48x32")]
    assert len(bar) == 1 and len(bar[0]) <= 77, r.output
    bar_rate = re.search(r"([\d.]+) it/s", bar[0]).group(1)
    text = " ".join(r.output.split())
    assert f"4 iterations: {bar_rate} it/s overall (as the bar)" in text, r.output
    median = json.loads(rep.read_text())["seconds_per_iteration"]["median"]
    assert f"per iteration median {median:.4f} s ({1 / median:.1f} it/s)" in text
    # --compare and --report say what they wrote. A path longer than the line is folded inside
    # itself (the temporary folder's depth decides: pytest-xdist's workers add one level), so
    # these are looked for with the line breaks and spaces taken out.
    flat = "".join(r.output.split())
    assert f"wrote{sheet}(comparisonsheet)" in flat and f"wrote{rep}(report)" in flat, r.output


def test_comparison_sheet_says_the_weights_were_random(images, tmp_path: Path):
    from nst.cli.report import comparison_sheet

    sheet = tmp_path / "sheet.png"
    r = _stylize(images, tmp_path / "o.png", "--compare", str(sheet), "-q")
    assert r.exit_code == 0, r.output
    with Image.open(sheet) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    # Result 48x32; tiles at the result's height, 8 px gaps, an 18 px label band, an 18 px note band.
    assert a.shape[0] == 32 + 2 * 8 + 18 + 18
    note_band = a[32 + 8 + 18 + 8 :]
    assert ((note_band[..., 0] > 120) & (note_band[..., 1] < 60)).sum() > 20  # red text drawn there
    plain = comparison_sheet(Image.open(images["content"]), [Image.open(images["style"])], torch.rand(1, 3, 32, 48))
    assert plain.height == 32 + 2 * 8 + 18  # no note, no band


def test_ctrl_c_prints_the_bar_once_and_saved_not_wrote(interrupted_stylize):
    code, err, out = interrupted_stylize(env={**os.environ, "COLUMNS": "80"})
    assert code == 130, err
    assert len([line for line in err.splitlines() if line.startswith("stylize 48x32")]) == 1, err
    assert f"saved {out}" in err and f"wrote {out}" not in err, err


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_info_says_no_gpu_first_and_which_providers_can_run(monkeypatch: pytest.MonkeyPatch, terminal80):
    _no_gpu(monkeypatch)
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert info["gpus"] == [] and info["onnxruntime_providers_usable"] == ["CPUExecutionProvider"]
    assert set(info["onnxruntime_providers_unusable"].values()) <= {"no CUDA GPU is visible"}
    r = runner.invoke(app, ["info"])
    assert r.exit_code == 0, r.output
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in r.output.splitlines() if line.startswith("│")]
    assert rows[0][0] == "GPU" and rows[0][1].startswith("no GPU"), r.output
    values = " ".join(value for _, value in rows)  # the right-hand column, its wrapped lines joined
    assert any(key == "onnxruntime providers" and value == "CPU" for key, value in rows), r.output
    if info["onnxruntime_providers_unusable"]:  # an onnxruntime-gpu build: TensorRT and CUDA are there, not usable
        assert "TensorRT, CUDA: built in, not usable here (no CUDA GPU is visible)" in values, r.output


def test_without_a_gpu_the_cuda_fallback_says_so_not_install_cuda(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from nst.engine.onnx_targets import provider_problem

    _no_gpu(monkeypatch)
    assert provider_problem("cuda") == provider_problem("tensorrt") == "no CUDA GPU is visible"
    rep = tmp_path / "r.json"
    r = _stylize(images, tmp_path / "o.png", "--targets", "auto", "--report", str(rep), "-q")
    assert r.exit_code == 0, r.output
    fallbacks = json.loads(rep.read_text())["targets"]["fallbacks"]
    assert fallbacks and all(why == "no CUDA GPU is visible" for why in fallbacks.values()), fallbacks


def test_weights_status_shows_whole_paths_at_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal80):
    deep = tmp_path / ("a-long-folder-name-" * 3) / "nst-cache"
    monkeypatch.setenv("NST_CACHE_DIR", str(deep))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / ("torch-home-" * 5)))
    st = json.loads(runner.invoke(app, ["weights", "status", "--json"]).stdout)
    assert len(st["imported_file"]) > 80 and len(st["hub_file"]) > 80
    r = runner.invoke(app, ["weights", "status"])
    assert r.exit_code == 0, r.output
    lines = [line.strip() for line in r.output.splitlines()]
    # Longer than the terminal, each path is still printed whole on a line of its own (the
    # terminal wraps it; nothing is cut, no border is mixed in), ready to copy.
    assert st["imported_file"] in lines and st["hub_file"] in lines, r.output
    assert all(len(line) <= 80 for line in r.output.splitlines() if "/" not in line)


def test_bench_default_table_fits_80_columns_and_wide_has_every_column(tmp_path: Path, terminal80):
    args = ["bench", "--device", "cpu", "--sizes", "32", "--precision", "fp32,tf32", "--iterations", "1", "--warmup", "0", "--no-targets-phase"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    table = r.output.split("skipped tf32")[0]
    assert all(len(line) <= 80 for line in table.splitlines()), table
    assert "fast lbfgs" in table and "lbfgs step alone" in table and "% peak" in table and "skipped" in table
    r = runner.invoke(app, [*args, "--wide"])
    assert r.exit_code == 0, r.output
    assert "p10-p90" in r.output and "MP-it/s" in r.output and max(len(line) for line in r.output.splitlines()) > 80


def test_batch_output_fits_80_columns_with_long_names(images, tmp_path: Path, terminal80):
    """The jobs bar kept its bar and times (they were squeezed to `…` by `done 2, failed 1,
    skipped 0, 164.2 jobs/min`), a long running job's name is cut, and the closing table names
    every job of up to 34 characters whole on one line (they wrapped mid-word)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(images["content"]).save(photos / "a_long_photo_name_here.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    r = runner.invoke(app, ["batch", str(photos), "--style", str(images["style"]), "-o", str(tmp_path / "out"), *FAST])
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert all(len(line) <= 80 for line in lines), r.output
    bar = next(line for line in lines if line.startswith("batch "))
    assert re.search(r"2/2 done 1, failed 1, [\d.]+ jobs/min +\d:\d\d:\d\d +\d:\d\d:\d\d$", bar), bar
    assert any("a_long_photo_name_here--style.png " in line for line in lines), r.output  # whole in the table
