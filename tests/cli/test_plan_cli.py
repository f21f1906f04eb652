"""`--max-memory`, `--tile`, `--dry-run` and the report's `plan`, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()
# relu3_1 at most: a 12 px halo, so a 32 px tile is well inside a 64 px image.
SHALLOW = ["--weights", "random", "--targets", "auto", "--style-layers", "relu1_1,relu2_1,relu3_1", "--content-layers", "relu2_2", "--scales", "64"]


def run(*args: str):
    return runner.invoke(app, list(args))


def test_tiled_and_whole_runs_write_the_same_image(images, tmp_path: Path):
    """The first Done-means line at a test's size: Adam, fp32, 3 iterations, tiled against whole."""
    outs = {}
    for tile in ("32", "off"):
        out, rep = tmp_path / f"{tile}.png", tmp_path / f"{tile}.json"
        r = run(
            "stylize", str(images["content"]), str(images["style"]), "-o", str(out), *SHALLOW, "--size", "64", "--tile", tile,
            "--optimizer", "adam", "--lr", "0.02", "--precision", "fp32", "--iterations", "3", "--report", str(rep),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[tile] = np.asarray(Image.open(out), dtype=np.int16)
        plan = json.loads(rep.read_text())["plan"]
        (stage,) = plan["stages"]
        assert stage["size"] == 64 and stage["estimated_peak_bytes"] > 0
        if tile == "off":
            assert (stage["mode"], stage["tile"], stage["tiles"]) == ("whole", None, 1)
        else:
            assert (stage["mode"], stage["tile"], stage["tiles"]) == ("tiled", 32, 2 * 2)
            assert "tiled, 32 px tiles, 2x2 = 4" in r.output
            assert stage["target_tile"] < 64  # the targets were tiled too
        # `auto` takes ONNX Runtime for a whole plan, and the loop's own network for a tiled one
        # (no second copy of the weights in a run short of memory; --targets onnx tiles: see below)
        targets = json.loads(rep.read_text())["targets"]
        if tile == "off":
            assert targets["source"] == "onnxruntime" and "fallback" not in targets
        else:
            assert targets["source"] == "torch" and targets["fallback"].startswith("torch: the plan is tiled")
    assert int(np.abs(outs["32"] - outs["off"]).max()) <= 1
    # One pass per tile with the last iteration's Grams: the first gradient is exact (no Grams
    # yet), later ones are linearised around the last image's Grams, while every loss stays exact.
    out, rep = tmp_path / "prev.png", tmp_path / "prev.json"
    r = run(
        "stylize", str(images["content"]), str(images["style"]), "-o", str(out), *SHALLOW, "--size", "64", "--tile", "32",
        "--tile-grams", "previous", "--optimizer", "adam", "--lr", "0.02", "--precision", "fp32", "--iterations", "3", "--report", str(rep),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["config"]["tile_grams"] == "previous" and report["plan"]["stages"][0]["mode"] == "tiled"
    exact = json.loads((tmp_path / "32.json").read_text())["loss"]["history"]
    prev = report["loss"]["history"]
    assert prev[:2] == pytest.approx(exact[:2], rel=1e-5) and prev[2] != pytest.approx(exact[2], rel=1e-3)
    assert int(np.abs(np.asarray(Image.open(out), dtype=np.int16) - outs["off"]).max()) > 1  # another second step


def test_a_tiled_plan_computes_its_targets_tile_by_tile_from_the_source_asked_for(images, tmp_path: Path, monkeypatch):
    """`--targets onnx` with a tiled plan: crops through ONNX Runtime, and the report says so; the
    image is PyTorch's tiled run's within one 8-bit level (fp32; the sources agree within 1e-6)."""
    import nst.engine.onnx_targets as onnx_targets
    import nst.engine.targets as torch_targets

    crops: list[str] = []
    for module in (onnx_targets, torch_targets):  # counts the crops each source runs
        inner = module.tiled_targets

        def counted(features, image, *, _inner=inner, _name=module.__name__, **kw):
            def each(crop, owned):
                crops.append(_name)
                return features(crop, owned)

            return _inner(each, image, **kw)

        monkeypatch.setattr(module, "tiled_targets", counted)
    outs = {}
    for targets, module in (("onnx", onnx_targets), ("torch", torch_targets)):
        crops.clear()
        out, rep = tmp_path / f"{targets}.png", tmp_path / f"{targets}.json"
        r = run(
            "stylize", str(images["content"]), str(images["style"]), "-o", str(out), *SHALLOW, "--size", "64", "--tile", "32",
            "--targets", targets, "--optimizer", "adam", "--lr", "0.02", "--precision", "fp32", "--iterations", "2", "--report", str(rep),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        report = json.loads(rep.read_text())
        assert report["plan"]["stages"][0]["mode"] == "tiled"
        assert report["targets"]["source"] == ("onnxruntime" if targets == "onnx" else "torch") and "fallback" not in report["targets"]
        # the content (64x43) and the style (64x64), each in more than one crop, all from the source asked for
        assert len(crops) >= 4 and set(crops) == {module.__name__}
        outs[targets] = np.asarray(Image.open(out), dtype=np.int16)
    assert int(np.abs(outs["onnx"] - outs["torch"]).max()) <= 1


def test_the_plan_counts_onnx_runtimes_session_where_the_targets_come_from_it(images, tmp_path: Path):
    """ONNX Runtime's session is a copy of the weights held through the run: the plan's part
    `source` where the targets come from it, none for PyTorch's. Under auto, a budget that holds
    the run whole only without the session runs it whole on PyTorch's targets, and says so."""
    from nst.engine.plan import onnx_session_bytes

    base = ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "o.png"), *SHALLOW, "--size", "64", "--precision", "fp32", "--iterations", "1"]

    def plan_of(*args: str) -> dict:
        rep = tmp_path / "r.json"
        r = run(*base, *args, "--report", str(rep))
        assert r.exit_code == 0, r.output
        return json.loads(rep.read_text())

    session = onnx_session_bytes(("relu2_2", "relu1_1", "relu2_1", "relu3_1"))
    (onnx,) = plan_of("--targets", "onnx", "--tile", "off", "--dry-run")["plan"]["stages"]
    (torch_,) = plan_of("--targets", "torch", "--tile", "off", "--dry-run")["plan"]["stages"]
    assert onnx["parts"]["source"] == session and "source" not in torch_["parts"]
    assert onnx["estimated_peak_bytes"] > torch_["estimated_peak_bytes"] + session
    report = plan_of("--targets", "auto", "--max-memory", str(torch_["estimated_peak_bytes"]))
    (stage,) = report["plan"]["stages"]
    assert stage["mode"] == "whole" and "source" not in stage["parts"] and report["status"] == "done"
    assert report["targets"]["source"] == "torch" and "whole only without ONNX Runtime" in report["targets"]["fallback"]
    report = plan_of("--targets", "auto")  # the default budget: whole, with the session
    assert report["plan"]["stages"][0]["parts"]["source"] == session and report["targets"]["source"] == "onnxruntime"


def test_dry_run_prints_a_tiled_plan_for_a_print_size_output(images, tmp_path: Path):
    rep = tmp_path / "plan.json"
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "8192", "--max-memory", "8GB", "--dry-run", "--device", "cpu", "--report", str(rep))
    assert r.exit_code == 0, r.output
    assert "tiled" in r.output and "halo 80 px" in r.output and not (tmp_path / "c.png").exists()
    assert all(len(line) <= 80 for line in r.output.splitlines() if not line.startswith("wrote "))  # that one names the path
    plan = json.loads(rep.read_text())["plan"]
    assert plan["budget_bytes"] == 8 * 10**9 and plan["stages"][-1]["mode"] == "tiled"
    assert all(s["estimated_peak_bytes"] <= 8 * 10**9 for s in plan["stages"])
    assert plan["stages"][-1]["size"] == 8192 and plan["optimizer"] == "adam" and "Adam" in plan["optimizer_note"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_8192_px_fits_4gb_tiled(images, tmp_path: Path, precision):
    """The issue's print-size plan: 8192 px in 4 GB. It fits because the loop keeps only the image,
    its gradient, a half-precision last good copy, Adam's moments and the content targets: bf16
    ones held, or in fp32 (where `--precision auto` goes on a CPU without bf16 units) made again at
    each tile's pass, which the plan prints."""
    rep = tmp_path / "plan.json"
    args = ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "8192", "--max-memory", "4GB", "--dry-run", "--device", "cpu"]
    r = run(*args, "--precision", precision, "--report", str(rep))
    assert r.exit_code == 0, r.output
    plan = json.loads(rep.read_text())["plan"]
    last = plan["stages"][-1]
    assert last["size"] == 8192 and last["mode"] == "tiled" and all(s["estimated_peak_bytes"] <= 4 * 10**9 for s in plan["stages"])
    assert last["parts"]["optimizer"] == 2 * 3 * 4 * last["hw"][0] * last["hw"][1]  # Adam's two fp32 moments, the fallback
    assert last["content_targets"] == ("held" if precision == "bf16" else "per tile")
    assert ("content targets made again at each tile's pass" in r.output) == (precision == "fp32")
    assert all(len(line) <= 80 for line in r.output.splitlines() if not line.startswith("wrote "))


def test_a_budget_too_small_names_the_smallest_that_works(images, tmp_path: Path):
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "8192", "--max-memory", "1GiB", "--dry-run")
    assert r.exit_code == 2
    (line,) = r.output.strip().splitlines()
    assert line.startswith("error: --max-memory 1.1 GB is too small for size 8192: even 64 px tiles need about ")
    need = line.split("need about ")[1].split(";")[0]
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "8192", "--max-memory", need.replace(" ", ""), "--dry-run")
    assert r.exit_code == 0, r.output


def test_an_image_larger_than_the_machine_is_refused_before_any_work(images, tmp_path: Path, monkeypatch):
    import nst.engine.device as device

    monkeypatch.setattr(device, "host_memory_bytes", lambda: 10**9)
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "8192", "--weights", "random", "--device", "cpu")
    assert r.exit_code == 2
    assert "for its image buffers alone, more than this machine's 1.0 GB of memory" in r.output and "Traceback" not in r.output
    assert "weights: random" not in r.output  # refused before the weights were even made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-memory", "lots"], "--max-memory 'lots' not understood"),
        (["--tile", "huge"], "--tile 'huge' not understood"),
        (["--tile", "8"], "--tile 8 is too small"),
    ],
)
def test_bad_plan_options_are_one_error_line(images, tmp_path: Path, args, message):
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--weights", "random", "--size", "96", "--iterations", "1", *args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output and len(r.output.strip().splitlines()) == 1


def test_host_history_runs_end_to_end_and_matches_the_device_history(images, tmp_path: Path, monkeypatch):
    """`--optimizer-state host` on the CPU: the same memory, but the chunked, streamed path runs
    (chunks of 1000 columns here: several for a 48 px image), and the run is the default's up to
    the chunked sums' rounding."""
    import nst.engine.lbfgs as lbfgs

    streamed = []
    store = lbfgs.LBFGS._store_streamed
    monkeypatch.setattr(lbfgs, "HISTORY_CHUNK_BYTES", 2 * 20 * 4 * 1000)
    monkeypatch.setattr(lbfgs.LBFGS, "_store_streamed", lambda self, *a: streamed.append(len(self._chunks)) or store(self, *a))
    outs, reports = {}, {}
    for state in ("auto", "host"):
        out, rep = tmp_path / f"{state}.png", tmp_path / f"{state}.json"
        r = run(
            "stylize", str(images["content"]), str(images["style"]), "-o", str(out), *SHALLOW[:-2], "--scales", "48", "--size", "48",
            "--precision", "fp32", "--iterations", "6", "--optimizer-state", state, "--report", str(rep),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[state], reports[state] = np.asarray(Image.open(out), dtype=np.int16), json.loads(rep.read_text())
        if state == "host":
            assert "warning: memory plan: on the CPU host memory is the device's" in " ".join(r.output.split())
    h, w = reports["host"]["plan"]["stages"][0]["hw"]
    assert streamed == [-(-3 * h * w // 1000)] * 5  # the host run's steps after the first, each streamed in its chunks
    assert (reports["auto"]["plan"]["optimizer_state"], reports["host"]["plan"]["optimizer_state"]) == ("device", "host")
    assert reports["host"]["config"]["optimizer"] == "lbfgs" and reports["host"]["iterations"] == 6
    # fp32; the chunked first pass adds in another order, so the losses agree to rounding and
    # the images to within one 8-bit level.
    assert reports["host"]["loss"]["history"] == pytest.approx(reports["auto"]["loss"]["history"], rel=1e-4)
    assert int(np.abs(outs["host"] - outs["auto"]).max()) <= 1


def test_dry_run_says_where_the_optimizer_state_lives(images, tmp_path: Path):
    rep = tmp_path / "plan.json"
    args = ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "256", "--dry-run", "--device", "cpu"]
    r = run(*args, "--optimizer-state", "host", "--report", str(rep))
    assert r.exit_code == 0, r.output
    assert "optimiser state on host" in r.output
    assert json.loads(rep.read_text())["plan"]["optimizer_state"] == "host"
    r = run(*args)
    assert r.exit_code == 0 and "optimiser state on cpu" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer-state", "disk"], "error: invalid value for '--optimizer-state'"),
        (["--optimizer-state", "host", "--optimizer", "adam"], "error: --optimizer-state host keeps L-BFGS's history in host memory, and Adam has none"),
    ],
)
def test_bad_optimizer_states_are_one_error_line(images, tmp_path: Path, args, message):
    r = run("stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--weights", "random", "--size", "48", "--iterations", "1", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if "error" in line.lower()]) == 1, r.output
    assert not (tmp_path / "c.png").exists()


def test_a_dry_run_warns_when_the_run_would_lack_the_imagenet_weights(images, tmp_path: Path):
    """The plan loads no weights, so it exits 0 either way; but without the ImageNet weights here
    (none in the tests' private cache and hub folders) the run itself would stop: one warning."""
    args = ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "c.png"), "--size", "64", "--dry-run"]
    r = run(*args)
    assert r.exit_code == 0 and not (tmp_path / "c.png").exists(), r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: no ImageNet weights here: the run would stop (nst weights import FILE)"], r.output
    r = run(*args, "--weights", "random")
    assert r.exit_code == 0 and "warning:" not in r.output, r.output
