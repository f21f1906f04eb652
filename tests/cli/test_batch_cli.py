"""`nst batch` end to end (in-process): folders, failures, the journal and resuming, CSV jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine.jobs import JOURNAL_NAME

runner = CliRunner()
FAST = ["--weights", "random", "--size", "32", "--iterations", "2", "--targets", "torch", "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_2"]


@pytest.fixture
def batch_dir(tmp_path: Path, noise_png) -> dict[str, Path]:
    d = tmp_path / "photos"
    d.mkdir()
    noise_png(d / "cat.png", 48, 32, 1)
    noise_png(d / "dog.jpg", 32, 48, 2)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return {"dir": d, "a": noise_png(tmp_path / "monet.png", 40, 40, 3), "b": noise_png(tmp_path / "kahlo.jpg", 40, 32, 4), "tmp": tmp_path}


def _journal(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / JOURNAL_NAME).read_text().splitlines()]


def test_folder_with_a_broken_file_then_a_rerun_skips_what_is_done(batch_dir):
    out = batch_dir["tmp"] / "out"
    args = ["batch", str(batch_dir["dir"]), "--style", str(batch_dir["a"]), "--style", str(batch_dir["b"]), "-o", str(out), *FAST]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    made = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != JOURNAL_NAME)
    assert made == ["cat--kahlo.png", "cat--monet.png", "dog--kahlo.jpg", "dog--monet.jpg"]
    recs = _journal(out)
    assert len(recs) == 6 and len({x["job"] for x in recs}) == 6
    failed = [x for x in recs if x["status"] == "failed"]
    assert sorted(x["job"] for x in failed) == ["broken--kahlo.png", "broken--monet.png"]
    assert all("not an image Pillow can read" in x["reason"] for x in failed)
    assert "broken--monet.png" in r.output and "2 of 6 job(s) failed" in r.output and "Traceback" not in r.output
    done = [x for x in recs if x["status"] == "done"]
    assert all(x["steps"] == 2 and x["loss"] > 0 and len(x["styles_sha256"]) == 1 for x in done)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.*g")}

    r2 = runner.invoke(app, args)
    assert r2.exit_code == 1, r2.output
    assert "4 job(s) skipped" in r2.output and "0 done, 2 failed, 4 skipped" in r2.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.*g")} == stamps  # not recomputed
    recs2 = _journal(out)
    assert len(recs2) == 6 and len({x["job"] for x in recs2}) == 6  # each job once
    assert [x for x in recs2 if x["status"] == "done"] == done  # the skipped jobs' lines untouched


def test_a_failed_jobs_reason_names_flags_in_the_table_and_report(batch_dir, noise_png):
    """The journal keeps the engine's words (`size`); what the user reads says --size."""
    thin = noise_png(batch_dir["tmp"] / "thin.png", 300, 4, 5)
    out, rep = batch_dir["tmp"] / "out", batch_dir["tmp"] / "r.json"
    r = runner.invoke(app, ["batch", str(thin), "--style", str(batch_dir["a"]), "-o", str(out), *FAST, "--report", str(rep)])
    assert r.exit_code == 1, r.output
    reason = json.loads(rep.read_text())["jobs"][0]["reason"]
    assert "use a larger --size" in reason and "(--style-layers, --content-layers)" in reason and "`" not in reason
    assert "--size" in " ".join(r.output.split())
    assert "use a larger `size`" in _journal(out)[0]["reason"]


def test_jobs_csv_with_per_row_options_blend_report_and_sheets(batch_dir):
    tmp = batch_dir["tmp"]
    csv = tmp / "jobs.csv"
    csv.write_text(
        "content,style,output,size,style_weight,init\n"
        "photos/cat.png,monet.png,big/cat.png,40,,\n"
        'photos/dog.jpg,"monet.png,kahlo.jpg",,,1e3,noise\n'
    )
    out, rep, sheets = tmp / "out", tmp / "batch.json", tmp / "sheets"
    r = runner.invoke(app, ["batch", "--jobs", str(csv), "-o", str(out), *FAST, "--style-blend", "1,1", "--report", str(rep), "--compare", str(sheets), "--save-every", "1"])
    assert r.exit_code == 2, r.output  # checked before any work: row 1 has one style for two blend weights
    assert "line 2: --style-blend has 2 weights for 1 style images" in r.output and not out.exists()

    r = runner.invoke(app, ["batch", "--jobs", str(csv), "-o", str(out), *FAST, "--report", str(rep), "--compare", str(sheets), "--save-every", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == ""
    assert Image.open(out / "big" / "cat.png").size == (40, 27)  # the row's size
    assert Image.open(out / "dog--monet+kahlo.jpg").size == (21, 32)
    assert (out / "big" / "cat.0001.png").is_file()  # --save-every per job
    assert (sheets / "big" / "cat.png").is_file() and (sheets / "dog--monet+kahlo.jpg").is_file()
    data = json.loads(rep.read_text())
    assert data["totals"]["jobs"] == 2 and data["totals"]["done"] == 2 and data["totals"]["jobs_per_minute"] > 0
    by = {j["job"]: j for j in data["jobs"]}
    cat, dog = by["big/cat.png"], by["dog--monet+kahlo.jpg"]
    # the keys of stylize --report, per job
    assert {"output", "status", "phases", "iterations", "seconds_per_iteration", "loss", "device", "precision", "weights", "targets", "config"} <= set(cat)
    assert cat["config"]["size"] == 40 and dog["config"]["size"] == 32
    assert dog["config"]["style_weight"] == 1e3 and dog["config"]["init"] == "noise" and cat["config"]["style_weight"] == 1e6
    assert cat["intermediate"] == [str(out / "big" / "cat.0001.png")]
    assert data["runner"]["runner"] == "in-process" and data["weights"]["kind"] == "random"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--jobs", "JOBS", "CONTENT"], "not with them"),
        ([], "at least one --style"),
        (["--style", "STYLE", "--name", "{style}.png"], "would both write"),
        (["--style", "STYLE", "--name", "{who}.png"], "unknown field {who}"),
        (["--style", "STYLE", "--threads", "0"], "--threads must be 1 to 1024"),
        (["--style", "STYLE", "--threads", "99999999"], "--threads must be 1 to 1024"),  # torch's pool of that size never returned
        (["--style", "STYLE", "--seed", "99999999999999999999"], "--seed must be 0 to 9223372036854775807"),
        (["--style", "STYLE", "--device", "cuda:3", "--ray"], "with Ray"),
        (["--style", "STYLE", "--size", "5"], "out of range"),
        (["--jobs", "BADCOL"], "cannot change per row"),
        (["--jobs", "BADVAL"], "line 2: bad size 'big'"),
        (["--jobs", "BADENUM"], "bad optimizer 'sgd' (use lbfgs, adam)"),
        (["--style", "STYLE", "--tile", "8"], "--tile 8 is too small"),
        (["--style", "STYLE", "--max-memory", "lots"], "--max-memory 'lots' not understood"),
        # The sheets are named as the outputs: at the -o or the content folder they overwrote those.
        (["--style", "STYLE", "--compare", "OUT"], "would write job cat--monet.png's sheet over an output"),
        (["--style", "STYLE", "--name", "{content}.{ext}", "--compare", "PHOTOS"], "would write job cat.png's sheet over an input"),
        (["--style", "STYLE", "--report", "JOURNAL"], "would overwrite the batch's journal"),  # a rerun then failed reading it
        (["--style", "STYLE", "--report", "OUT"], "it is the -o folder; give a file name such as"),  # refused only after every job ran
        (["--style", "STYLE", "--targets", "torch", "--onnx", "JOBS"], "--onnx needs --targets onnx or auto, not torch"),  # it was found once a job had started
        (["PHOTOS", "--style", "STYLE", "-o", "PHOTOS"], "is the output folder, whose images are results, not inputs"),  # it said "has no images"
    ],
)
def test_mistakes_are_one_line(batch_dir, extra, message):
    tmp = batch_dir["tmp"]
    for name, text in (("BADCOL", "content,style,device\nphotos/cat.png,monet.png,cpu\n"), ("BADVAL", "content,style,size\nphotos/cat.png,monet.png,big\n"),
                       ("BADENUM", "content,style,optimizer\nphotos/cat.png,monet.png,sgd\n"), ("JOBS", "content,style\nphotos/cat.png,monet.png\n")):  # fmt: skip
        (tmp / f"{name}.csv").write_text(text)
    subst = {"JOBS": str(tmp / "JOBS.csv"), "BADCOL": str(tmp / "BADCOL.csv"), "BADVAL": str(tmp / "BADVAL.csv"), "BADENUM": str(tmp / "BADENUM.csv"),
             "CONTENT": str(batch_dir["dir"] / "cat.png"), "STYLE": str(batch_dir["a"]), "OUT": str(tmp / "out"), "PHOTOS": str(batch_dir["dir"]),
             "JOURNAL": str(tmp / "out" / "nst-journal.jsonl")}  # fmt: skip
    before = {p: p.read_bytes() for p in batch_dir["dir"].iterdir()}
    args = [subst.get(x, x) for x in extra]
    contents = [] if "--jobs" in extra or "PHOTOS" in extra[:1] else [str(batch_dir["dir"] / "cat.png"), str(batch_dir["dir"] / "dog.jpg")]
    r = runner.invoke(app, ["batch", *contents, *(["-o", str(tmp / "out")] if "-o" not in extra else []), *FAST, *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.count("error:") == 1
    assert {p: p.read_bytes() for p in batch_dir["dir"].iterdir()} == before and not (tmp / "out").exists()


def test_tile_and_max_memory_plan_each_job(batch_dir):
    """--tile N runs each job tile by tile (its report's plan says so; the images are the untiled
    ones within one level in fp32); a --max-memory too small for any tile fails each job with
    the plan's reason and the batch exits 1."""
    tmp = batch_dir["tmp"]
    contents = [str(batch_dir["dir"] / "cat.png"), str(batch_dir["dir"] / "dog.jpg")]
    images = {}
    for tile, targets in (("off", "torch"), ("16", "torch"), ("16", "onnx")):
        out, rep = tmp / f"out-{tile}-{targets}", tmp / f"r-{tile}-{targets}.json"
        r = runner.invoke(app, ["batch", *contents, "--style", str(batch_dir["a"]), "-o", str(out), *FAST, "--precision", "fp32", "--tile", tile,
                                "--targets", targets, "--report", str(rep), "-q"])  # fmt: skip
        assert r.exit_code == 0, r.output
        jobs = json.loads(rep.read_text())["jobs"]
        assert {j["plan"]["stages"][-1]["mode"] for j in jobs} == {"whole" if tile == "off" else "tiled"}
        # each worker's plan counts its target source's own memory: ONNX Runtime's session, none for PyTorch's
        assert all(j["targets"]["source"] == {"torch": "torch", "onnx": "onnxruntime"}[targets] for j in jobs)
        assert all(("source" in j["plan"]["stages"][-1]["parts"]) == (targets == "onnx") for j in jobs)
        images[tile, targets] = {j["job"]: np.asarray(Image.open(out / j["job"]), dtype=np.int16) for j in jobs}
    for key, whole in images["off", "torch"].items():
        assert np.abs(whole - images["16", "torch"][key]).max() <= 1, key
        assert np.abs(whole - images["16", "onnx"][key]).max() <= 1, key
    r = runner.invoke(app, ["batch", *contents, "--style", str(batch_dir["a"]), "-o", str(tmp / "small"), *FAST, "--max-memory", "1kB"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    reasons = [j["reason"] for j in _journal(tmp / "small")]
    assert len(reasons) == 2 and all("`max_memory` 1.0 kB is too small for size 32" in x for x in reasons), reasons


def test_output_folder_that_is_a_file(batch_dir):
    f = batch_dir["tmp"] / "file.png"
    f.write_bytes(b"x")
    r = runner.invoke(app, ["batch", str(batch_dir["dir"]), "--style", str(batch_dir["a"]), "-o", str(f), *FAST])
    assert r.exit_code == 2 and "is a file" in r.output


def test_ctrl_c_keeps_finished_jobs_and_the_journal_and_a_rerun_resumes(batch_dir):
    """SIGINT while the second job runs: exit 130, the first job journalled, the second job's
    latest image kept but not journalled; the rerun skips the first and does the second."""
    tmp = batch_dir["tmp"]
    out = tmp / "out"
    contents = [str(batch_dir["dir"] / "cat.png"), str(batch_dir["dir"] / "dog.jpg")]
    slow = ["--weights", "random", "--size", "32", "--targets", "torch", "--style-layers", "relu1_1", "--content-layers", "relu1_2", "-q"]
    csv = tmp / "jobs.csv"
    csv.write_text(f"content,style,output,iterations\n{contents[0]},{batch_dir['a']},first.png,2\n{contents[1]},{batch_dir['a']},second.png,100000\n")
    p = subprocess.Popen(
        [sys.executable, "-c", "from nst.cli.app import main; main()", "batch", "--jobs", str(csv), "-o", str(out), *slow, "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "second.0001.png").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert (out / "second.0001.png").exists(), "snapshots are written as they are made"
    assert p.returncode == 130, err
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err
    assert [x["job"] for x in _journal(out)] == ["first.png"]
    assert (out / "first.png").is_file() and (out / "second.png").is_file()  # the latest image kept
    assert not [q for q in out.iterdir() if q.name.startswith(".") and q.name != ".nst-journal.lock"]
    stamp = (out / "first.png").stat().st_mtime_ns

    csv.write_text(csv.read_text().replace("100000", "2"))
    r = runner.invoke(app, ["batch", "--jobs", str(csv), "-o", str(out), *slow])
    assert r.exit_code == 0, r.output
    assert sorted(x["job"] for x in _journal(out)) == ["first.png", "second.png"]
    assert (out / "first.png").stat().st_mtime_ns == stamp


def test_outputs_a_format_cannot_hold_are_found_before_the_work(batch_dir):
    """A content in a format Pillow reads but cannot write RGB in (XBM) gets a .png result under
    the default name (it failed once its job had run); a WebP name for a 16384 px result is the
    job's failure before it runs (WebP stops at 16383 px), not after."""
    d = batch_dir["tmp"] / "mono"
    d.mkdir()
    Image.new("1", (48, 32), 1).save(d / "sketch.xbm")
    out = batch_dir["tmp"] / "out"
    r = runner.invoke(app, ["batch", str(d), "--style", str(batch_dir["a"]), "-o", str(out), *FAST])
    assert r.exit_code == 0, r.output
    assert (out / "sketch--monet.png").is_file()
    big = batch_dir["tmp"] / "big"
    r = runner.invoke(app, ["batch", str(d), "--style", str(batch_dir["a"]), "-o", str(big), "--name", "{content}.webp", *FAST, "--size", "16384"])
    assert r.exit_code == 1, r.output
    (rec,) = _journal(big)
    assert rec["status"] == "failed" and "WEBP cannot hold a 16384x10923 image" in rec["reason"], rec
    assert rec.get("steps", 0) == 0 and not (big / "sketch.webp").exists()


def test_dry_run_prints_each_jobs_plan_and_writes_nothing(batch_dir):
    """As `stylize --dry-run`, per job (it was refused as an unknown option): the plan each
    worker would make on this device, or why the job cannot run; exit 0, no folder, no journal."""
    out, rep = batch_dir["tmp"] / "out", batch_dir["tmp"] / "plans.json"
    args = ["batch", str(batch_dir["dir"]), "--style", str(batch_dir["a"]), "-o", str(out), *FAST[:2], "--targets", "torch",
            "--size", "2048", "--max-memory", "1GB", "--device", "cpu", "--precision", "fp32", "--dry-run", "--report", str(rep)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert not out.exists()
    plans = {p["job"]: p for p in json.loads(rep.read_text())["plans"]}
    assert sorted(plans) == ["broken--monet.png", "cat--monet.png", "dog--monet.jpg"]
    assert "not an image Pillow can read" in plans["broken--monet.png"]["reason"]
    for key in ("cat--monet.png", "dog--monet.jpg"):
        last = plans[key]["plan"]["stages"][-1]
        assert last["mode"] == "tiled" and max(last["hw"]) == 2048 and last["estimated_peak_bytes"] <= 1e9
        assert plans[key]["config"]["optimizer"] == "adam"  # L-BFGS's history does not fit 1 GB at 2048 px
    assert "cat--monet.png:" in r.output and "stage 3: 2048x1365 tiled" in r.output and "cannot run:" in r.output
    r = runner.invoke(app, [*args, "--ray"])
    assert r.exit_code == 2 and "leave out --ray" in r.output, r.output


def test_dry_run_finds_what_the_jobs_would_fail_on(batch_dir):
    """A mask of another shape than a content, a missing --init and an --onnx file that is no
    model: a job that the run would fail is not planned as if it would run."""
    d = batch_dir["tmp"] / "two"
    d.mkdir()
    (d / "cat.png").write_bytes((batch_dir["dir"] / "cat.png").read_bytes())  # 48x32
    Image.new("L", (48, 32), 255).save(batch_dir["tmp"] / "wide.png")
    base = ["batch", str(d), "--style", str(batch_dir["a"]), "-o", str(batch_dir["tmp"] / "out"), *FAST, "--dry-run"]
    r = runner.invoke(app, [*base, "--masks", str(batch_dir["tmp"] / "wide.png")])
    assert r.exit_code == 0 and "cannot run" not in r.output and "stage 1" in r.output, r.output
    Image.new("L", (20, 60), 255).save(batch_dir["tmp"] / "tall.png")
    r = runner.invoke(app, [*base, "--masks", str(batch_dir["tmp"] / "tall.png")])
    assert r.exit_code == 0 and "cannot run:" in r.output and "aspect" in r.output and "stage 1" not in r.output, r.output
    r = runner.invoke(app, [*base, "--init", str(batch_dir["tmp"] / "none.png")])
    assert r.exit_code == 0 and "cannot run: --init: image not found" in r.output, r.output
    bogus = batch_dir["tmp"] / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    r = runner.invoke(app, [*[x for x in base if x != "torch" and x != "--targets"], "--onnx", str(bogus)])
    assert r.exit_code == 2 and "is not a readable ONNX model" in r.output, r.output
    assert not (batch_dir["tmp"] / "out").exists()
