"""`nst stylize` end to end on tiny images with random weights: files, sizes, report, repeatability."""

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
from nst.engine.device import resolve_precision

runner = CliRunner()
FAST = ["--weights", "random", "--size", "48", "--iterations", "4", "--targets", "torch", "--style-layers", "relu1_1,relu2_1,relu3_1", "--content-layers", "relu3_2"]


def run(*args: str):
    return runner.invoke(app, list(args))


def test_stylize_writes_image_report_and_sheet(images, tmp_path: Path):
    out, rep, sheet = tmp_path / "out" / "result.jpg", tmp_path / "r.json", tmp_path / "sheet.png"
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--report", str(rep), "--compare", str(sheet))
    assert r.exit_code == 0, r.output
    assert "not pretrained" in r.output and "timing" in r.output and "optimisation" in r.output
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (48, 32)
    with Image.open(sheet) as im:
        assert im.width > 3 * 32 and im.height >= 32
    data = json.loads(rep.read_text())
    assert set(data["phases"]) >= {"images", "weights", "targets", "optimisation", "save"}
    assert data["iterations"] == 4 and len(data["loss"]["history"]) == 4
    assert data["loss"]["initial"] == data["loss"]["history"][0] and data["loss"]["final"] == data["loss"]["history"][-1]
    assert set(data["seconds_per_iteration"]) == {"mean", "median"} and data["seconds_per_iteration"]["median"] > 0
    # --precision auto: bf16 on a CPU with bf16 units, else fp32.
    assert data["device"] == "cpu" and data["precision"] == resolve_precision(torch.device("cpu"), "auto").value
    assert data["weights"]["kind"] == "random" and len(data["weights"]["fingerprint"]) == 16
    assert data["config"]["size"] == 48 and data["config"]["style_layers"] == ["relu1_1", "relu2_1", "relu3_1"]
    assert data["targets"]["source"] == "torch"
    assert {"torch", "python", "pillow"} <= set(data["versions"])


def test_same_seed_same_image(images, tmp_path: Path):
    outs = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for out, seed in zip(outs, ("3", "3", "4")):
        r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--init", "noise", "--seed", seed, "-q")
        assert r.exit_code == 0, r.output
    a, b, c = (np.asarray(Image.open(p)) for p in outs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_quiet_prints_nothing(images, tmp_path: Path):
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "q.png"), *FAST, "--quiet")
    assert r.exit_code == 0 and r.output.strip() == ""
    # but a warning that the run is not what was asked for (here the memory plan's) still prints
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "q.png"), *FAST, "--optimizer-state", "host", "--quiet")
    assert r.exit_code == 0 and r.output.startswith("warning: memory plan:") and len(r.output.strip().splitlines()) == 1, r.output


def test_seed_preset_save_every_two_styles_and_options(images, tmp_path: Path):
    out, rep = tmp_path / "seed.png", tmp_path / "seed.json"
    r = run(
        "stylize", str(images["content"]), str(images["style"]), str(images["style2"]), "-o", str(out),
        "--preset", "seed", "--size", "48", "--iterations", "4", "--save-every", "2", "--weights", "random",
        "--targets", "torch", "--style-blend", "3,7", "--preserve-colors", "luminance", "--pooling", "avg",
        "--report", str(rep), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "seed.0002.png").is_file() and not (tmp_path / "seed.0004.png").exists()
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["optimizer"] == "adam" and cfg["lr"] == 5.0 and cfg["loss_form"] == "keras" and cfg["pixel_scale"] == 255.0
    assert cfg["style_blend"] == [3.0, 7.0] and cfg["preserve_colors"] == "luminance" and cfg["pooling"] == "avg"
    assert cfg["size"] == 48 and cfg["size_edge"] == "longest"  # --size overrides the preset's 400 px high


def test_scales_run_coarse_to_fine(images, tmp_path: Path):
    out, rep = tmp_path / "ms.png", tmp_path / "ms.json"
    no_size = [*FAST[:2], *FAST[4:]]  # the last scale is the output's size
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *no_size, "--scales", "32,48", "--report", str(rep), "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert Image.open(out).size == (48, 32) and report["iterations"] == 8
    assert report["config"]["size"] == 48 and report["config"]["scales"] == [32, 48]  # the output's size (it said 512 without --size)


def test_scales_auto_splits_the_iterations(images, tmp_path: Path):
    # 128 px: auto runs 64 then 128 px (halving down to a quarter, not below 64), the budget split.
    out, rep = tmp_path / "auto.png", tmp_path / "auto.json"
    args = [*FAST]
    args[args.index("--size") + 1] = "128"
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *args, "--scales", "auto", "--report", str(rep), "-q")
    assert r.exit_code == 0, r.output
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["scales"] == "auto" and cfg["sizes"] == [64, 128] and cfg["stage_iterations"] == [1, 3]
    assert Image.open(out).size == (128, 85) and json.loads(rep.read_text())["iterations"] == 4


def test_every_weight_times_1e8_reaches_the_same_relative_loss(examples, tmp_path: Path):
    # The check, smaller: weights x1e-8 must not leave the optimiser stuck.
    base = ["stylize", str(examples / "chelsea.png"), str(examples / "the_scream.jpg"), "--weights", "random", "--size", "64",
            "--iterations", "40", "--precision", "fp32", "--scales", "64", "--targets", "torch", "-q"]
    rel = []
    for name, extra in (("a", []), ("b", ["--style-weight", "1e-2", "--content-weight", "1e-8", "--tv-weight", "1e-11"])):
        rep = tmp_path / f"{name}.json"
        r = run(*base, "-o", str(tmp_path / f"{name}.png"), "--report", str(rep), *extra)
        assert r.exit_code == 0, r.output
        loss = json.loads(rep.read_text())["loss"]
        rel.append(loss["final"] / loss["initial"])
    assert rel[0] <= 0.1 and rel[1] == pytest.approx(rel[0], rel=0.05)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_keeps_latest_image(interrupted_stylize, tmp_path: Path, sig, code):
    """SIGINT mid-run: exit 130, the output holds the latest image, no temporary files left.
    SIGTERM (`timeout`, `docker stop`, a scheduler) likewise, exit 143: it ended the process with
    nothing saved."""
    import signal

    got, err, out = interrupted_stylize("-q", sig=getattr(signal, sig))
    assert got == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert Image.open(out).size == (48, 32)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_nonfinite_loss_exits_nonzero_and_keeps_image(images, tmp_path: Path):
    out = tmp_path / "nan.png"
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--optimizer", "adam", "--lr", "1e6", "--style-weight", "1e30", "-q")
    assert r.exit_code == 1, r.output
    assert "loss became" in r.output and "Lower --lr or the loss weights." in r.output and "Traceback" not in r.output
    assert out.is_file()
    # Infinite from the start, before any step: the weights, not the lr, are what to lower.
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--style-weight", "1e300")
    assert r.exit_code == 1 and "the loss was inf at the start, before any step; kept the starting image" in r.output, r.output
    assert "Lower the loss weights (--style-weight" in r.output and "--lr" not in r.output
    assert "0 iterations:" not in r.output and "per iteration" not in r.output  # no rate for iterations that did not count


def test_out_of_memory_is_one_line_and_a_later_scale_keeps_the_earlier_image(images, tmp_path: Path, monkeypatch):
    import torch

    import nst.cli.stylize_cmd as cmd

    real = cmd.stylize

    def fails_at(stage, error):
        def fake(*args, callback=None, **kw):
            def cb(it):
                if it.stage == stage:
                    raise error
                callback(it)

            return real(*args, callback=cb, **kw)

        return fake

    out = tmp_path / "o.png"
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes.")
    monkeypatch.setattr(cmd, "stylize", fails_at(0, cpu_oom))
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error: ran out of memory on cpu (an allocation of 3.0 GiB failed) at size 48; try a smaller --size" in " ".join(r.output.split())
    assert not out.exists()

    monkeypatch.setattr(cmd, "stylize", fails_at(1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")))
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--scales", "32,48", "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "kept the 32x21 result of the previous scale" in " ".join(r.output.split())
    with Image.open(out) as im:
        assert im.size == (32, 21)


def test_cuda_out_of_memory_is_one_line(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    import nst.cli.stylize_cmd as cmd

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cmd, "stylize", oom)
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "o.png"), *FAST, "-q")
    # Exit 1, as for any failed allocation (2 is for usage mistakes).
    assert r.exit_code == 1 and "(an allocation of 20.0 GiB failed) at size 48" in r.output and "--size" in r.output


def test_options_object_has_every_parameter_of_the_command():
    """`stylize_command` hands its parameters to `StylizeOptions` by name: the two cannot drift."""
    import dataclasses
    import inspect

    from nst.cli.stylize_cmd import StylizeOptions, stylize_command

    assert [f.name for f in dataclasses.fields(StylizeOptions)] == list(inspect.signature(stylize_command).parameters)
    with pytest.raises(dataclasses.FrozenInstanceError):
        StylizeOptions(**dict.fromkeys(inspect.signature(stylize_command).parameters)).size = 3  # type: ignore[misc]



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and limits the address space")
def test_real_out_of_memory_names_the_allocation(images, tmp_path: Path):
    """A real failed allocation, not a simulated one: the process's address space is capped at
    what it has mapped after its imports plus 256 MiB, then asked for a 1024 px run. Measured on this
    CPU the failing allocations are tens of MiB, once printed as "0.0 GiB"."""
    code = (
        "import resource, sys\n"
        "from nst.cli.app import main\n"
        # The CLI imports torch and the engine only when a command runs: map them first, so
        # that the cap leaves 256 MiB for the run itself, not for loading libtorch.
        "import numpy, PIL.Image, torch, safetensors.torch\n"
        "import nst.cli.stylize_cmd, nst.engine.transfer, nst.engine.weights, nst.engine.images, nst.engine.cache\n"
        "vm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')][0] * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))\n"
        "main()\n"
    )
    out = tmp_path / "o.png"
    cmd = [sys.executable, "-c", code, "stylize", str(images["content"]), str(images["style"]), "-o", str(out), "--weights", "random",
           "--size", "1024", "--scales", "1024", "--iterations", "2", "--targets", "torch", "--precision", "fp32", "-q"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ran out of memory on cpu"), p.stderr
    # One pass at 1024 px: under `--scales auto` the first stage, 256 px, needs about the cap, and
    # where it then fails (in PyTorch's allocator, or creating a oneDNN primitive) varies.
    m = re.search(r"\(an allocation of (\d+(?:\.\d)?) (B|KiB|MiB|GiB) failed\) at size 1024; try a smaller --size", lines[0])
    assert m and float(m.group(1)) >= 1, lines[0]  # a size in a unit that shows it, never "0.0 GiB"
    assert not out.exists()


def test_lbfgs_patience_and_cudnn_benchmark_reach_the_run_and_its_report(images, tmp_path: Path):
    out, report = tmp_path / "o.png", tmp_path / "r.json"
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--lbfgs-patience", "7", "--report", str(report)])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["config"]["lbfgs_patience"] == 7 and data["stopped_early"] == [] and data["iterations"] == 4
    assert data["cudnn_benchmark"] is True
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(out), *FAST, "--no-cudnn-benchmark", "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert json.loads(report.read_text())["cudnn_benchmark"] is False  # the run's Runtime had it off
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "p.png"), *FAST, "--lbfgs-patience", "-1"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "--lbfgs-patience must be 0 (never stop early) or more, got -1" in r.output
    assert not (tmp_path / "p.png").exists()


def test_the_report_gives_the_stages_that_ran_when_auto_leaves_a_coarse_one_out(images, tmp_path: Path):
    """A wide, thin content: `--scales auto` (256 -> 64, 128, 256) leaves out 64 px, where the
    image would be 2 px high; the report's config said [64, 128, 256] and [1, 1, 4] while the plan
    and the run had two stages."""
    wide = tmp_path / "wide.png"
    Image.open(images["content"]).resize((512, 16)).save(wide)
    out, rep = tmp_path / "o.png", tmp_path / "r.json"
    args = [*FAST[:2], "--size", "256", "--iterations", "6", *FAST[6:]]
    r = run("stylize", str(wide), str(images["style"]), "-o", str(out), *args, "--scales", "auto", "--report", str(rep), "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    sizes = [s["size"] for s in report["plan"]["stages"]]
    assert report["config"]["sizes"] == sizes == [128, 256]
    assert report["config"]["stage_iterations"] == [1, 5] and report["iterations"] == 6
