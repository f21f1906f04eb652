"""`nst video` end to end on real files: a synthetic pan encoded with PyAV, random weights.

The pan is a photo moved 3 px per frame (2.25 px at the 64 px output), so the flow is known and
a flicker measure can tell temporally consistent output from independent frames.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()
CLI = Path(__file__).resolve().parents[2] / "cli" / "video_cmd.py"
# Fast settings for the tests that are not about flicker: a network cut at relu3_2.
FAST = ["--weights", "random", "--targets", "torch", "--style-layers", "relu1_1,relu2_1,relu3_1", "--content-layers", "relu3_2"]


def make_pan(path: Path, examples: Path, *, frames: int = 12, step: int = 3, w: int = 96, h: int = 72, fps: int = 24, audio: bool = False) -> Path:
    """A photo panned `step` px per frame, H.264 at near-lossless quality (and a 440 Hz tone)."""
    photo = Image.open(examples / "chelsea.png").convert("RGB")
    wide = w + step * frames
    photo = photo.resize((wide, round(photo.height * wide / photo.width)), Image.Resampling.LANCZOS)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.options = {"crf": "10"}
        sound = out.add_stream("aac", rate=8000) if audio else None
        for i in range(frames):
            for packet in video.encode(av.VideoFrame.from_image(photo.crop((step * i, 4, step * i + w, 4 + h)))):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            t = np.arange(8000 * frames // fps) / 8000
            tone = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono")
            tone.sample_rate = 8000
            for packet in [*sound.encode(tone), *sound.encode()]:
                out.mux(packet)
    return path


def probe(path: Path) -> tuple[int, Fraction, tuple[int, int], bool, str]:
    """(decoded frames, frame rate, (W, H), has audio, codec) of a video file."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, Fraction(s.average_rate), (s.codec_context.width, s.codec_context.height), bool(c.streams.audio), s.codec_context.name


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_a_clip_longer_than_the_encoders_lookahead_is_written_in_order(tmp_path, suffix):
    """The muxer writes its header on the first packet, which the encoder holds back for its
    lookahead (H.264 at `medium`: some 40 frames; VP9 25), and then changes the stream's time
    base: frames must keep the one they were numbered in. 100 frames of 32x24, 25 fps."""
    from nst.engine.video.media import write_video

    frames = []
    for i in range(100):
        frames.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(np.full((24, 32, 3), (2 * i, 255 - 2 * i, 128), np.uint8)).save(frames[-1])
    out = tmp_path / f"long{suffix}"
    enc = write_video(frames, out, fps=Fraction(25))
    assert enc.frames == 100
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        times = [float(f.pts * f.time_base) for f in c.decode(s)]
    assert len(times) == 100 and Fraction(s.average_rate) == 25
    assert times == pytest.approx([i / 25 for i in range(100)], abs=1e-3)  # one frame every 40 ms, in order


@pytest.fixture(scope="module")
def pan(tmp_path_factory, examples_dir) -> Path:
    return make_pan(tmp_path_factory.mktemp("pan") / "pan.mp4", examples_dir)


@pytest.fixture(scope="module")
def examples_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "examples"


def style(examples_dir: Path) -> str:
    return str(examples_dir / "starry_night.jpeg")


def test_temporal_loss_at_least_halves_the_flicker_of_independent_frames(pan, examples_dir, tmp_path):
    """The issue's acceptance command, against the same command with --temporal-weight 0."""
    assert probe(pan)[:2] == (12, Fraction(24))
    runs = {}
    for name, extra in (("consistent", []), ("independent", ["--temporal-weight", "0"])):
        out, rep = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--size", "64", "--iterations", "10", "--weights", "random", "--report", str(rep), *extra])
        assert r.exit_code == 0, r.output
        n, rate, size, _, codec = probe(out)
        assert (n, rate, size, codec) == (12, Fraction(24), (64, 48), "h264")
        runs[name] = json.loads(rep.read_text())
        assert not (tmp_path / f"{name}.mp4.nst-work").exists()  # the work folder goes once the video is written
    c, i = runs["consistent"], runs["independent"]
    for rep in (c, i):
        per = rep["temporal"]["warping_error_per_frame"]
        assert len(per) == 12 and per[0] is None and all(v >= 0 for v in per[1:])
        assert rep["temporal"]["warping_error_mean"] == pytest.approx(np.mean(per[1:]))
        assert rep["frames"] == {"total": 12, "computed": 12, "resumed": 0}
        assert rep["output"]["encoder"] == "libx264" and rep["output"]["fps"] == "24"
        assert rep["targets"]["content_computed"] == 12
    # The style targets once for the clip; the second run finds them in the target cache.
    assert c["targets"]["style_computed"] == 1 and i["targets"]["style_computed"] == 0
    assert c["temporal"]["weight"] > 0 and i["temporal"]["weight"] == 0 and not i["temporal"]["warm_start"]
    assert c["temporal"]["warping_error_mean"] <= 0.5 * i["temporal"]["warping_error_mean"], (c["temporal"], i["temporal"])
    assert "warping error" in r.output and "mean" in r.output  # the closing table of the last run


def _journalled(work: Path) -> int:
    try:
        return len((work / "journal.jsonl").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def test_sigkill_then_rerun_resumes_without_redoing_finished_frames(pan, examples_dir, tmp_path):
    out = tmp_path / "frames"  # a folder of frames: the resumed ones can be compared byte for byte
    args = [sys.executable, "-m", "nst.cli.app", "video", str(pan), style(examples_dir), "-o", str(out), "--size", "48", "--iterations", "3", *FAST, "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    work = tmp_path / "frames.nst-work"
    deadline = time.monotonic() + 240
    while _journalled(work) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _journalled(work)
    assert 3 <= done < 12 and not out.exists()
    before = {i: (work / "frames" / f"{i:06d}.png").read_bytes() for i in range(1, done + 1)}

    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--size", "48", "--iterations", "3", *FAST, "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert f"resumed: {done} frame(s)" in r.output
    data = json.loads(rep.read_text())
    assert data["frames"] == {"total": 12, "computed": 12 - done, "resumed": done}
    assert [f["resumed"] for f in data["per_frame"]] == [True] * done + [False] * (12 - done)
    assert data["targets"]["content_computed"] == 12 - done  # the finished frames were not redone
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{i:06d}.png" for i in range(1, 13)]
    assert all((out / f"{i:06d}.png").read_bytes() == b for i, b in before.items())
    assert data["temporal"]["warping_error_per_frame"][done] is not None  # re-warped from the last finished frame
    assert not work.exists()


def test_frames_folder_in_range_every_and_audio_copied(examples_dir, tmp_path, monkeypatch):
    import nst.engine.video.pipeline as pipeline

    clip = make_pan(tmp_path / "tone.mp4", examples_dir, frames=8, w=64, h=48, audio=True)
    out, rep = tmp_path / "preview.mkv", tmp_path / "r.json"
    opened: list[str] = []
    real_open = pipeline.open_clip
    monkeypatch.setattr(pipeline, "open_clip", lambda source: opened.append(str(source)) or real_open(source))
    r = runner.invoke(app, ["video", str(clip), style(examples_dir), "-o", str(out), "--size", "40", "--iterations", "2", *FAST,
                            "--frames", "2:8", "--every", "2", "--flow", "farneback", "--report", str(rep), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.strip() == ""  # -q
    assert opened == [str(clip)]  # checked before the weights load, and that opening is the run's
    n, rate, size, audio, _ = probe(out)
    assert (n, rate, size, audio) == (3, Fraction(12), (40, 30), True)  # frames 2, 4, 6 at half the rate, with the tone
    data = json.loads(rep.read_text())
    assert data["selection"] == {"start": 2, "stop": 8, "every": 2} and data["temporal"]["flow"] == "farneback"
    assert data["output"]["audio"] is True

    # The same clip as a folder of PNG frames in, a folder of frames out.
    frames = tmp_path / "in"
    frames.mkdir()
    with av.open(str(clip)) as c:
        for i, f in enumerate(c.decode(video=0)):
            f.to_image().save(frames / f"f{i}.png")  # f10 sorts after f9: natural order
    out_dir = tmp_path / "outframes"
    r = runner.invoke(app, ["video", str(frames), style(examples_dir), "-o", str(out_dir), "--size", "40", "--iterations", "2", *FAST, "--frames", ":3", "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["000001.png", "000002.png", "000003.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    assert Image.open(out_dir / "000001.png").size == (40, 30)
    # A glob of frames written as a video at --fps.
    out2 = tmp_path / "g.mp4"
    r = runner.invoke(app, ["video", str(frames / "f[0-2].png"), style(examples_dir), "-o", str(out2), "--size", "40", "--iterations", "1", *FAST, "--fps", "10", "-q"])
    assert r.exit_code == 0, r.output
    assert probe(out2)[:2] == (3, Fraction(10))


def _bad_cases(tmp: Path, pan: Path, examples_dir: Path) -> dict[str, tuple[list[str], str]]:
    s = style(examples_dir)
    text = tmp / "notes.mp4"
    text.write_text("not a video\n" * 20)
    cut = tmp / "cut.mp4"
    cut.write_bytes(pan.read_bytes()[:1500])  # the header without the rest
    empty = tmp / "empty"
    empty.mkdir()
    still = tmp / "still.png"
    Image.new("RGB", (64, 48)).save(still)
    frames = tmp / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(frames / f"f{i}.png")
    mask = tmp / "mask.png"
    Image.new("L", (96, 72), 255).save(mask)
    out = str(tmp / "o.mp4")
    return {
        "report over a frame": ([str(frames), s, "-o", out, "--report", str(frames / "f1.png")], "would overwrite an input (a frame, a mask"),
        "report over a mask": ([str(pan), s, "-o", out, "--masks", str(mask), "--report", str(mask)], "would overwrite an input (a frame, a mask"),
        "text file": ([str(text), s, "-o", out], "not a video FFmpeg can read"),
        "truncated": ([str(cut), s, "-o", out], "cut.mp4"),
        "missing": ([str(tmp / "none.mp4"), s, "-o", out], "input not found"),
        "empty folder": ([str(empty), s, "-o", out], "a folder without frames"),
        "glob no match": ([str(tmp / "*.jpg"), s, "-o", out], "no files match"),
        "a still image": ([str(still), s, "-o", out], "a still image"),
        "output is input": ([str(pan), s, "-o", str(pan)], "inputs are never overwritten"),
        "output extension": ([str(pan), s, "-o", str(tmp / "o.png")], "use a video file"),
        "bad range": ([str(pan), s, "-o", out, "--frames", "5:2"], "--frames range 5:2 is empty"),
        "range past end": ([str(pan), s, "-o", out, "--frames", "40:50"], "none of them in the range 40:50"),
        "every zero": ([str(pan), s, "-o", out, "--every", "0"], "every must be"),
        "every huge": ([str(pan), s, "-o", out, "--every", "99999999999999999999"], "--every must be 1 to 1000000"),
        "threads huge": ([str(pan), s, "-o", out, "--threads", "99999999"], "--threads must be 1 to 1024"),
        "negative weight": ([str(pan), s, "-o", out, "--temporal-weight", "-1"], "--temporal-weight must be"),
        "raft without weights": ([str(pan), s, "-o", out, "--flow", "raft"], "cannot be downloaded here; use --flow dis"),
        "missing style": ([str(pan), str(tmp / "none.jpg"), "-o", out], "image not found"),
        "gif style": ([str(pan), str(tmp / "style.gif"), "-o", out], "a .gif is read as a video: save the style as .png"),
        "budget too small": ([str(pan), s, "-o", out, "--max-memory", "2MB"], "--max-memory 2.0 MB is too small"),
        "bad tile": ([str(pan), s, "-o", out, "--tile", "8"], "--tile 8 is too small"),
        "dry run on ray": ([str(pan), s, "-o", out, "--dry-run", "--ray"], "leave out --ray"),
        "provider with torch": ([str(pan), s, "-o", out, "--targets", "torch", "--provider", "cpu"], "--provider cpu chooses ONNX Runtime's provider"),
    }


@pytest.mark.parametrize("case", ["report over a frame", "report over a mask", "text file", "truncated", "missing", "empty folder", "glob no match", "a still image", "output is input",
                                  "output extension", "bad range", "range past end", "every zero", "every huge", "threads huge", "negative weight", "raft without weights", "missing style", "gif style", "provider with torch",
                                  "budget too small", "bad tile", "dry run on ray"])  # fmt: skip
def test_bad_input_is_one_error_line(case, pan, examples_dir, tmp_path):
    args, expect = _bad_cases(tmp_path, pan, examples_dir)[case]
    before = pan.read_bytes()
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = runner.invoke(app, ["video", *args, "--size", "48", "--iterations", "1", *FAST])
    # 2 for a mistake in the input, 3 for what this machine lacks (RAFT's weights), as in stylize
    assert r.exit_code == (3 if case == "raft without weights" else 2), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output and expect in r.output, r.output
    assert [line for line in r.output.splitlines() if line.strip()] == [next(line for line in r.output.splitlines() if line.startswith("error:"))]
    assert pan.read_bytes() == before and not (tmp_path / "o.mp4").exists()
    assert all(p.read_bytes() == data for p, data in kept.items())  # frames and masks included


def test_tiled_frames_are_the_whole_frames_and_the_report_has_the_plan(pan, examples_dir, tmp_path):
    """--tile on nst video: each frame's stages run tile by tile (L-BFGS, the gatys default, in
    fp32: bf16's rounding differs between a tile and the whole image), and the frames are the
    untiled run's within one 8-bit level."""
    frames: dict[str, list[np.ndarray]] = {}
    reports = {}
    for tile, targets in (("off", "torch"), ("32", "torch"), ("32", "onnx")):
        key = f"{tile}-{targets}"
        out, rep = tmp_path / key, tmp_path / f"{key}.json"
        r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--size", "64", "--iterations", "4", *FAST, "--targets", targets,
                                "--frames", ":3", "--tile", tile, "--precision", "fp32", "--report", str(rep)])  # fmt: skip
        assert r.exit_code == 0, r.output
        frames[key] = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.iterdir())]
        reports[key] = json.loads(rep.read_text())
        if tile != "off":
            assert "tiled, 32 px tiles" in r.output  # the plan is printed when it tiles
    whole = reports["off-torch"]["plan"]["stages"]
    assert [s["mode"] for s in whole] == ["whole"] * len(whole)
    for key in ("32-torch", "32-onnx"):
        tiled = reports[key]["plan"]["stages"]
        assert tiled[-1]["mode"] == "tiled" and tiled[-1]["tile"] == 32 and tiled[-1]["tiles"] > 1
        assert reports[key]["targets"]["source"] == ("torch" if key.endswith("torch") else "onnxruntime")
        assert "fallback" not in reports[key]["targets"]
        assert reports[key]["targets"]["content_computed"] >= 3  # each frame's content through the clip's (counted) source
        assert len(frames[key]) == len(frames["off-torch"]) == 3
        for a, b in zip(frames["off-torch"], frames[key]):
            assert np.abs(a - b).max() <= 1, key


def test_dry_run_prints_each_clips_plan_and_writes_nothing(pan, examples_dir, tmp_path):
    out, rep = tmp_path / "big.mp4", tmp_path / "plan.json"
    r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--size", "2048", "--max-memory", "1GB", "--dry-run",
                            "--device", "cpu", "--precision", "fp32", "--report", str(rep)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "stage" in r.output and "tiled" in r.output and "Adam" in r.output  # L-BFGS's history does not fit 1 GB at 2048 px
    data = json.loads(rep.read_text())
    assert data["status"] == "dry-run" and data["plans"][0]["input"] == str(pan)
    plan = data["plans"][0]["plan"]
    assert plan["stages"][-1]["mode"] == "tiled" and plan["stages"][-1]["hw"] == [1536, 2048]
    assert all(s["estimated_peak_bytes"] <= 1e9 for s in plan["stages"])
    assert all(s["parts"]["source"] > 0 for s in plan["stages"])  # --targets auto: ONNX Runtime's session, tiled or whole
    # the frame loop's own: 5.75 images of 12 bytes an output pixel, and the 96x72 frame as decoded
    assert all(s["parts"]["video"] == 69 * 1536 * 2048 + 3 * 96 * 72 for s in plan["stages"])
    # after the last frame, libx264 writes the .mp4: its frames in flight, 240 B a pixel
    assert plan["write_bytes"] == 240 * 1536 * 2048 and "writing the video, after the last frame: the encoder 755 MB" in r.output
    assert data["plans"][0]["config"]["optimizer"] == "adam"
    assert not out.exists() and not (tmp_path / ("big.mp4" + ".nst-work")).exists()


def test_video_cmd_imports_nothing_heavy_at_module_level():
    heavy = {"torch", "onnx", "onnxruntime", "av", "cv2"}
    tree = ast.parse(CLI.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & heavy, top & heavy


@pytest.mark.slow
def test_several_videos_here_and_on_ray_one_per_worker_give_the_same_frames(cluster, examples_dir, tmp_path, monkeypatch):
    import ray

    cancelled: list[object] = []
    real_cancel = ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: (cancelled.append((ref, kw)), real_cancel(ref, **kw))[1])
    a = make_pan(tmp_path / "a.mp4", examples_dir, frames=4, w=64, h=48)
    b = make_pan(tmp_path / "b.mp4", examples_dir, frames=3, step=2, w=64, h=48)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    args = ["video", str(a), str(b), str(broken), style(examples_dir), "--size", "40", "--iterations", "2", *FAST, "--threads", "1"]
    reports = {}
    for name, extra in (("here", []), ("ray", ["--ray"])):
        out, rep = tmp_path / name, tmp_path / f"{name}.json"
        r = runner.invoke(app, [*args, "-o", str(out), "--report", str(rep), *extra])
        assert r.exit_code == 1, r.output  # one input failed, the others were done
        assert "videos" in r.output and "failed:" in r.output  # the closing table
        assert probe(out / "a.mp4")[:2] == (4, Fraction(24)) and probe(out / "b.mp4")[:2] == (3, Fraction(24))
        reports[name] = json.loads(rep.read_text())
    here, ray_ = reports["here"], reports["ray"]
    assert here["runner"] == "in-process" and ray_["runner"] == "ray"
    for rep in (here, ray_):
        assert rep["totals"]["done"] == 2 and [f["input"] for f in rep["failed"]] == [str(broken)]
        assert "not a video FFmpeg can read" in rep["failed"][0]["reason"]
    # One video per worker process, each its own clip's frames in order, the same numbers as here.
    assert all(v["worker"]["pid"] != os.getpid() and v["worker"]["threads"] == 1 for v in ray_["videos"])
    by_input = {v["input"]["path"]: v["temporal"]["warping_error_per_frame"] for v in here["videos"]}
    assert {v["input"]["path"]: v["temporal"]["warping_error_per_frame"] for v in ray_["videos"]} == by_input
    # Every clip had finished: closing the runner cancels none (force-cancelling finished tasks
    # once aborted this very process inside Ray).
    assert cancelled == []


def test_readme_video_example_runs(examples_dir, tmp_path):
    """The README's Python example for video, on a 4-frame pan at a smaller size."""
    import re

    readme = (examples_dir.parent / "README.md").read_text()
    section = readme[readme.index("## Video: `nst video`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pan = make_pan(tmp_path / "pan.mp4", examples_dir, frames=4, w=64, h=48)
    code = code.replace('"pan.mp4"', repr(str(pan))).replace('Path("out.mp4")', f"Path({str(tmp_path / 'out.mp4')!r})")
    code = code.replace('"examples/', '"' + str(examples_dir) + '/').replace("size=64, iterations=10", "size=40, iterations=2")
    ns: dict = {}
    exec(compile(code, "README", "exec"), ns)
    assert ns["out"].status == "done" and probe(tmp_path / "out.mp4")[0] == 4
    assert not (tmp_path / "out.mp4.nst-work").exists()


def test_readme_documents_every_video_option():
    from typer.main import get_command

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    cmd = get_command(app).commands["video"]  # type: ignore[attr-defined]
    stylize_opts = {o for p in get_command(app).commands["stylize"].params for o in p.opts}  # type: ignore[attr-defined]
    missing = [o for p in cmd.params for o in p.opts if o.startswith("--") and o not in text and o not in stylize_opts and o != "--help"]
    assert not missing, f"video options not in the README: {missing}"


def test_a_clip_whose_frames_cannot_fit_on_the_disk_is_refused_before_any_work(pan, examples_dir, tmp_path, monkeypatch):
    """The finished frames wait as PNG in OUTPUT.nst-work until the output is written: a clip
    whose frames cannot fit on that disk (each at least half its raw size) is one error line, and
    frames already in the folder count as done."""
    import collections
    import shutil

    from nst.engine.config import preset
    from nst.engine.video import pipeline
    from nst.engine.video.media import VideoError

    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 30_000}
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(10**12, 0, free["bytes"]))
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--size", "48", "--iterations", "1", *FAST])
    # 12 frames of 48x36: 31,104 bytes at half their raw size, more than 30,000
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in r.output
    assert "12 frames of 48x36 need at least 31.1 kB" in r.output and "30.0 kB free" in r.output and "--frames A:B" in r.output
    assert not out.exists() and not pipeline.work_folder(out).exists()
    # Two frames already finished there: ten to go, 25,920 bytes, which fit.
    job = pipeline.ClipJob(str(pan), out)
    done = pipeline.work_folder(out) / "frames"
    done.mkdir(parents=True)
    for k in (1, 2):
        (done / f"{k:06d}.png").write_bytes(b"")
    cfg = preset("gatys", size=48, scales=())
    pipeline.check_disk(job, (96, 72), 12, cfg)
    shutil.rmtree(done)
    with pytest.raises(VideoError, match="12 frames of 48x36"):
        pipeline.check_disk(job, (96, 72), 12, cfg)
    pipeline.check_disk(job, (96, 72), None, cfg)  # a count not known: not checked


# The track header's display matrix: identity, and a 90-degree turn as a phone writes a portrait
# clip (FFmpeg reads it as a rotation of -90: a player turns the stored frames clockwise).
_IDENTITY = bytes.fromhex("00010000" "00000000" "00000000" "00000000" "00010000" "00000000" "00000000" "00000000" "40000000")
_PORTRAIT = bytes.fromhex("00000000" "00010000" "00000000" "ffff0000" "00000000" "00000000" "00000000" "00000000" "40000000")


def test_a_rotated_clip_is_stylised_upright(examples_dir, tmp_path):
    """A clip with a display rotation (a phone held upright) is read and written as a player
    shows it: the frames turned, the output upright with no rotation of its own. It came out
    sideways, and masks drawn on the upright frame were refused for their shape."""
    from nst.engine.video.media import open_clip, read_frames

    stored = make_pan(tmp_path / "stored.mp4", examples_dir, frames=3, w=64, h=48)
    data = stored.read_bytes()
    at = data.index(b"tkhd")
    assert data.count(_IDENTITY, at) >= 1
    rotated = tmp_path / "portrait.mp4"
    rotated.write_bytes(data[:at] + data[at:].replace(_IDENTITY, _PORTRAIT, 1))
    clip = open_clip(rotated)
    assert (clip.width, clip.height, clip.turn) == (48, 64, "rotate 90 clockwise")
    with av.open(str(stored)) as c:
        first = next(c.decode(video=0)).to_image()
    upright = next(read_frames(clip))
    assert upright.size == (48, 64) and upright.tobytes() == first.transpose(Image.Transpose.ROTATE_270).tobytes()
    out = tmp_path / "out.mp4"
    mask = Image.new("L", (48, 64), 255)  # drawn on the upright frame
    mask.save(tmp_path / "m.png")
    r = runner.invoke(app, ["video", str(rotated), style(examples_dir), "-o", str(out), *FAST, "--size", "64", "--iterations", "1",
                            "--masks", str(tmp_path / "m.png"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    n, _, (w, h), _, _ = probe(out)
    assert (n, w, h) == (3, 48, 64)
    with av.open(str(out)) as c:
        assert (next(c.decode(video=0)).rotation or 0) == 0


@pytest.mark.parametrize(("abcd", "turn", "corner"), [
    ((1, 0, 0, 1), None, (0, 0)), ((0, 1, -1, 0), "rotate 90 clockwise", (0, 1)), ((0, -1, 1, 0), "rotate 90 counterclockwise", (2, 0)),
    ((-1, 0, 0, -1), "rotate 180", (1, 2)), ((-1, 0, 0, 1), "mirror left-right", (0, 2)), ((1, 0, 0, -1), "flip top-bottom", (1, 0)),
    ((0, 1, 1, 0), "transpose", (0, 0)), ((0, -1, -1, 0), "transverse", (2, 1)),
])  # fmt: skip
def test_every_turn_and_mirror_of_a_display_matrix(abcd, turn, corner):
    """A display matrix maps a stored pixel (x, y) to (a x + c y, b x + d y); the stored top-left
    corner of a 3x2 frame lands at `corner` (row, column) of what a player shows. A mirrored matrix
    was read by its rotation alone (a left-right mirror as a 180-degree turn)."""
    from nst.engine.video.media import _TURNS, display_turn

    a, b, c, d = abcd
    assert display_turn([a * 65536, b * 65536, 0, c * 65536, d * 65536, 0, 0, 0, 1 << 30]) == turn
    stored = np.zeros((2, 3), np.uint8)
    stored[0, 0] = 255
    shown = np.asarray(Image.fromarray(stored).transpose(_TURNS[turn])) if turn else stored
    assert tuple(int(i) for i in np.argwhere(shown == 255)[0]) == corner


def test_quiet_several_inputs_still_say_which_failed(pan, examples_dir, tmp_path):
    """-q skips the closing table; a failed input then went unmentioned (exit 1 and no word)."""
    broken = tmp_path / "notes.mp4"
    broken.write_text("not a video\n")
    r = runner.invoke(app, ["video", str(pan), str(broken), style(examples_dir), "-o", str(tmp_path / "out"), "--frames", "0:2",
                            "--size", "48", "--iterations", "1", *FAST, "-q"])  # fmt: skip
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: ") and "not a video FFmpeg can read" in lines[0], r.output


def test_an_empty_folder_with_a_dot_in_its_name_takes_the_frames(pan, examples_dir, tmp_path):
    """It was refused as a file name with an unknown extension; the README promises any new or
    empty folder."""
    out = tmp_path / "shots.d"
    out.mkdir()
    r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(out), "--frames", "0:2", "--size", "48", "--iterations", "1", *FAST, "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png"]
    r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(tmp_path / "new.d"), *FAST, "-q"])
    assert r.exit_code == 2 and "use a video file" in r.output  # a new one with an extension: a typo for a video name


def test_threads_apply_to_one_input_as_to_several(pan, examples_dir, tmp_path):
    """--threads set torch's thread count for several inputs here, and was ignored for one."""
    import torch

    before = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["video", str(pan), style(examples_dir), "-o", str(tmp_path / "o.mp4"), "--frames", "0:1", "--size", "48",
                                "--iterations", "1", *FAST, "--threads", "1", "-q"])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_several_inputs_name_a_glob_or_folder_here_for_the_folder(tmp_path, monkeypatch):
    """`*.png` and `.` in the current folder had an empty name: their video became a hidden
    `.mp4` folder of frames."""
    from nst.cli.video_cmd import _outputs

    here = tmp_path / "holiday"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _outputs(["*.png", "../clip.mp4"], tmp_path / "out") == [tmp_path / "out" / "holiday.mp4", tmp_path / "out" / "clip.mp4"]
    assert _outputs([".", "../clip.mp4"], tmp_path / "out")[0] == tmp_path / "out" / "holiday.mp4"


def test_audio_follows_a_source_clock_that_does_not_start_at_0(tmp_path):
    """MPEG-TS (and a camera's or a cut clip's) timestamps start late: the audio was copied 10 s
    after the video, a window of frames copied none, and the report said "audio" all the same."""
    from nst.engine.video.media import write_video

    source = tmp_path / "late.ts"
    with av.open(str(source), "w", format="mpegts") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        video.time_base = Fraction(1, 24)
        sound = out.add_stream("aac", rate=8000)
        for i in range(48):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 5 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 240 + i, Fraction(1, 24)  # from 10 s
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        tone = av.AudioFrame.from_ndarray((0.3 * np.sin(np.arange(16000) / 8000 * 2 * np.pi * 440)).astype(np.float32)[None], format="fltp", layout="mono")
        tone.sample_rate, tone.pts, tone.time_base = 8000, 80000, Fraction(1, 8000)  # from 10 s too
        for packet in [*sound.encode(tone), *sound.encode()]:
            out.mux(packet)
    frames = []
    for i in range(12):
        frames.append(tmp_path / f"{i:02d}.png")
        Image.new("RGB", (32, 24), (10 * i, 0, 0)).save(frames[-1])
    encoded = write_video(frames, tmp_path / "out.mp4", fps=Fraction(24), audio_from=source, window=(Fraction(1, 2), Fraction(1)))
    with av.open(str(tmp_path / "out.mp4")) as c:
        times = [float(p.pts * p.time_base) for p in c.demux(c.streams.audio[0]) if p.pts is not None and p.size]
    assert encoded.audio and times and 0 <= times[0] < 0.1 and times[-1] < 0.55, times  # half a second, from the window's start


def test_a_long_clips_bar_keeps_its_count_at_80_columns(monkeypatch):
    """From 1,000 frames the count was cut ("1100/12…") where the notes could give way."""
    from rich.console import Console

    from nst.cli import video_cmd

    screen = Console(width=80, record=True, force_terminal=True, file=open(os.devnull, "w"))
    monkeypatch.setattr(video_cmd, "console", screen)
    bars = video_cmd._Bars(quiet=False)
    bars.start("pan.mp4", 12000)
    bars.progress.update(bars.tasks["video"], completed=1100, info="12.3 s/frame, warping error 1.23")
    bars.progress.reset(bars.tasks["frame"], total=500, description="frame 1101", info="loss 0.1234")
    screen.print(bars.progress.make_tasks_table(bars.progress.tasks))
    text = screen.export_text()
    assert "1100/12000" in text and "0/500" in text and all(len(line) <= 80 for line in text.splitlines()), text


def test_the_videos_table_cuts_no_path_at_80_columns():
    """Long paths ended in "…" in the closing table of several inputs; they fold instead."""
    import types

    from rich.console import Console

    from nst.cli.video_cmd import _videos_table

    screen = Console(width=80, record=True, file=open(os.devnull, "w"))
    job = types.SimpleNamespace(source="some/long/folder/holiday_clip_number_one.mp4", output=Path("results/some/long/folder/holiday_clip_number_one.mp4"))
    screen.print(_videos_table([(job, None, "not a video FFmpeg can read")]))
    text = screen.export_text()
    cells = "".join(line.split("│")[2] for line in text.splitlines() if line.count("│") > 2)  # the output column, line by line
    assert "…" not in text and "results/some/long/folder/holiday_clip_number_one.mp4" in cells.replace(" ", ""), text
