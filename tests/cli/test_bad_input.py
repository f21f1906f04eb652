"""Every user mistake: one `error:` line, a non-zero exit, no traceback, no input touched."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


BASE = ["--weights", "random", "--size", "48", "--iterations", "1", "--targets", "torch"]


def _cases(images: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    c, s = str(images["content"]), str(images["style"])
    broken = tmp / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    thin = tmp / "thin.png"
    from PIL import Image

    Image.new("RGB", (600, 10)).save(thin)
    nan = tmp / "nan.tif"
    Image.fromarray(np.full((40, 40), np.nan, np.float32), "F").save(nan)
    badw = tmp / "w.pth"
    badw.write_bytes(b"nope")
    evil = tmp / "evil.pth"
    evil.write_bytes(pickle.dumps(_RunsCode(), protocol=4))  # what torch.load(weights_only=False) would run
    out = str(tmp / "o.png")
    return {
        "missing content": (["stylize", str(tmp / "none.png"), s, "-o", out, *BASE], "image not found"),
        "missing style": (["stylize", c, str(tmp / "none.jpg"), "-o", out, *BASE], "image not found"),
        "broken image": (["stylize", str(broken), s, "-o", out, *BASE], "broken.png"),
        "no finite value": (["stylize", str(nan), s, "-o", out, *BASE], "nan.tif: holds no finite pixel values"),
        "too thin": (["stylize", str(thin), s, "-o", out, *BASE], "use a larger --size, or layers no deeper than"),
        "unknown layer": (["stylize", c, s, "-o", out, *BASE, "--style-layers", "relu1_1,relu9_1"], "unknown layer 'relu9_1'"),
        # An empty list is a mistake, not "the default" (for no content loss: --content-weight 0).
        "style layers twice": (["stylize", c, s, "-o", out, *BASE, "--style-layers", "relu1_1,relu1_1"], "--style-layers names relu1_1 more than once"),
        "style layers empty": (["stylize", c, s, "-o", out, *BASE, "--style-layers", ""], "--style-layers '' names no layer"),
        "style layers comma": (["stylize", c, s, "-o", out, *BASE, "--style-layers", ","], "--style-layers ',' names no layer"),
        "content layers empty": (["stylize", c, s, "-o", out, *BASE, "--content-layers", ""], "or --content-weight 0 for no content loss"),
        "scales comma": (["stylize", c, s, "-o", out, *BASE, "--scales", " , "], "--scales ' , ' names no size"),
        "bad layer weight": (["stylize", c, s, "-o", out, *BASE, "--style-layer-weights", "1,x"], "bad weight 'x'"),
        "size zero": (["stylize", c, s, "-o", out, *BASE[:2], "--size", "0"], "--size 0 is out of range"),
        "size absurd": (["stylize", c, s, "-o", out, *BASE[:2], "--size", "1000000"], "out of range"),
        "output is content": (["stylize", c, s, "-o", c, *BASE], "inputs are never overwritten"),
        "output is style": (["stylize", c, s, "-o", s, *BASE], "inputs are never overwritten"),
        "report over input": (["stylize", c, s, "-o", out, *BASE, "--report", c], "would overwrite an input"),
        "format without rgb": (["stylize", c, s, "-o", str(tmp / "o.xbm"), *BASE], "Pillow cannot write an RGB image as XBM (.xbm)"),
        "webp too large": (["stylize", c, s, "-o", str(tmp / "o.webp"), *BASE[:2], "--size", "16384"], "WEBP cannot hold a 16384x"),
        "unknown extension": (["stylize", c, s, "-o", str(tmp / "o.xyz"), *BASE], "unknown image extension"),
        "output is a folder": (["stylize", c, s, "-o", str(tmp), *BASE], f"output {tmp} is a folder; give a file name such as"),
        "blend count": (["stylize", c, s, "-o", out, *BASE, "--style-blend", "1,2"], "2 weights for 1 style"),
        "negative lr": (["stylize", c, s, "-o", out, *BASE, "--lr", "-1"], "--lr must be positive"),
        "negative weight": (["stylize", c, s, "-o", out, *BASE, "--style-weight", "-5"], "--style-weight must be"),
        "scales down": (["stylize", c, s, "-o", out, *BASE[:2], "--scales", "64,32"], "scales must increase"),
        "scales vs size": (["stylize", c, s, "-o", out, *BASE, "--scales", "32,64"], "last scale is the output size"),
        "scales word": (["stylize", c, s, "-o", out, *BASE, "--scales", "automatic"], "--scales 'automatic': bad size 'automatic'"),
        "scales zero": (["stylize", c, s, "-o", out, *BASE[:2], "--scales", "0,48"], "--scales entry 0 is out of range"),
        "compare no extension": (["stylize", c, s, "-o", out, *BASE, "--compare", str(tmp / "sheet")], "--compare: cannot write 'sheet': unknown image extension"),
        "style scale": (["stylize", c, s, "-o", out, *BASE, "--style-scale", "100"], "--style-scale must be between"),
        "init missing": (["stylize", c, s, "-o", out, *BASE, "--init", str(tmp / "init.png")], "--init: image not found"),
        "tf32 on cpu": (["stylize", c, s, "-o", out, *BASE, "--device", "cpu", "--precision", "tf32"], "tf32 is a CUDA"),
        "no gpu": (["stylize", c, s, "-o", out, *BASE, "--device", "cuda"], "no CUDA GPU"),
        "bad device": (["stylize", c, s, "-o", out, *BASE, "--device", "tpu"], "device"),
        "weights file is text": (["stylize", c, s, "-o", out, *BASE[2:], "--weights", str(badw)], "is not a weights file (it is text): expected a VGG19 state_dict"),
        "weights file runs code": (["stylize", c, s, "-o", out, *BASE[2:], "--weights", str(evil)], "is not a plain state_dict"),
        "weights missing": (["stylize", c, s, "-o", out, *BASE[2:], "--weights", str(tmp / "x.pth")], "not imagenet, random"),
        "imagenet offline": (["stylize", c, s, "-o", out, *BASE[2:]], "nst weights import FILE"),
        "provider with torch": (["stylize", c, s, "-o", out, *BASE, "--provider", "cuda"], "--provider cuda chooses ONNX Runtime's provider: give it with --targets onnx or auto, not torch"),
        "bad enum": (["stylize", c, s, "-o", out, *BASE, "--optimizer", "sgd"], "error: invalid value for '--optimizer': 'sgd' is not one of"),
        "unknown option": (["stylize", c, s, "-o", out, *BASE, "--bogus"], "error: no such option: --bogus (help: nst stylize -h)"),
        "unknown command": (["stylzie", c, s], "error: no such command 'stylzie'"),
        "no style given": (["stylize", c], "error: missing argument 'STYLE'"),
        "bad int": (["stylize", c, s, "-o", out, *BASE[:2], "--size", "big"], "error: invalid value for '--size'"),
        # A seed past 64 bits overflowed torch's generator with a traceback; an infinite blend weight made the loss nan.
        "seed huge": (["stylize", c, s, "-o", out, *BASE, "--seed", "99999999999999999999"], "--seed must be 0 to 9223372036854775807, got 99999999999999999999"),
        "seed negative": (["stylize", c, s, "-o", out, *BASE, "--seed", "-1"], "--seed must be 0 to"),
        # A 20-digit --iterations ran until interrupted.
        "iterations huge": (["stylize", c, s, "-o", out, *BASE[:2], "--iterations", "99999999999999999999"], "--iterations must be 0 to 1,000,000, got 99999999999999999999"),
        "blend infinite": (["stylize", c, s, "-o", out, *BASE, "--style-blend", "1e400"], "--style-blend weights must be finite"),
        "import missing": (["weights", "import", str(tmp / "none.pth")], "weights file not found"),
        "import a folder": (["weights", "import", str(tmp)], f"{tmp} is a folder, not a weights file"),
    }


@pytest.mark.parametrize("case", [
    "missing content", "missing style", "broken image", "no finite value", "too thin", "unknown layer", "style layers twice", "style layers empty", "style layers comma",
    "content layers empty", "scales comma", "bad layer weight", "size zero",
    "size absurd", "output is content", "output is style", "report over input", "format without rgb", "webp too large", "unknown extension", "output is a folder",
    "blend count", "negative lr", "negative weight", "scales down", "scales vs size", "scales word", "scales zero", "compare no extension", "style scale", "init missing",
    "tf32 on cpu", "no gpu", "bad device", "weights file is text", "weights file runs code", "weights missing", "imagenet offline", "provider with torch", "bad enum",
    "unknown option", "unknown command", "no style given", "bad int", "seed huge", "seed negative", "iterations huge", "blend infinite", "import missing", "import a folder",
])  # fmt: skip
def test_bad_input(case: str, images: dict[str, Path], tmp_path: Path):
    before = {p: p.read_bytes() for p in images.values()}
    args, expect = _cases(images, tmp_path)[case]
    r = runner.invoke(app, args)
    # 2 for a mistake in the input; 3 for something this machine lacks (the README lists the codes)
    assert r.exit_code == (3 if case == "imagenet offline" else 2), r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    assert expect in r.output, r.output
    errors = [line for line in r.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Usage:" not in r.output, r.output  # one line says what is wrong
    assert {p: p.read_bytes() for p in images.values()} == before
    assert not (tmp_path / "o.png").exists()
    assert "weights_only" not in r.output and "UserWarning" not in r.output


def test_a_bug_keeps_its_traceback(images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only the engine's own errors are user mistakes: a bare ValueError from a bug is not hidden."""
    import nst.cli.stylize_cmd as S

    def broken(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(S, "stylize", broken)
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "o.png"), *BASE, "-q"])
    assert isinstance(r.exception, ValueError) and str(r.exception) == "boom"
    assert "error:" not in r.output


def test_engine_parameter_names_read_as_flags():
    from nst.cli.common import flag_message
    from nst.engine.errors import ConfigError

    e = ConfigError("`style_blend` has 2 weights; the `style_blend` of `size`", params=("style_blend",))
    assert flag_message(e) == "--style-blend has 2 weights; the --style-blend of `size`"


def test_too_thin_names_what_can_help_and_the_advice_works(images: dict[str, Path], tmp_path: Path):
    """A content image too thin for the deepest layer: the error names a larger --size or
    shallower layers (not --style-scale, which does not change the output), and both work."""
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (600, 20), "gray").save(thin)
    out, s = tmp_path / "o.png", str(images["style"])
    r = runner.invoke(app, ["stylize", str(thin), s, "-o", str(out), *BASE])  # 48x2 px: relu1_x fits at most
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "the output would be 48x2 px, too small for layer relu5_1 (needs at least 16 px on each side)" in msg
    assert "--style-scale" not in msg and "a larger --size" in msg and "layers no deeper than relu2_2" in msg, msg
    r = runner.invoke(app, ["stylize", str(thin), s, "-o", str(out), *BASE, "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_2", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["stylize", str(thin), s, "-o", str(out), *BASE[:2], "--size", "480", "--iterations", "1", "--targets", "torch", "-q"])
    assert r.exit_code == 0, r.output  # 480x16: relu5_1 fits
    # A style image too small: there --style-scale does help, and is named.
    r = runner.invoke(app, ["stylize", str(images["content"]), s, "-o", str(out), *BASE, "--style-scale", "0.1"])
    assert r.exit_code == 2 and "a larger --style-scale" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("case", [
    "stylize report is a folder", "stylize report under a file", "stylize output under a file", "stylize compare is a folder",
    "batch report is a folder", "batch output under a file", "video report is a folder", "video output under a file",
    "bench json is a folder", "bench csv under a file", "export output under a file",
])  # fmt: skip
def test_a_path_nothing_can_be_written_at_is_refused_before_any_work(case: str, images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A report, sheet, table or output whose path is a folder, or lies under a file, was found
    only when written: after the whole run, as `error: .<temporary>.tmp: Is a directory` or
    `error: file: File exists`. Now it is one line naming the path, before the weights load."""
    import nst.cli.bench_cmd as bench_cmd
    import nst.cli.common as common
    import nst.cli.export_cmd as export_cmd
    import nst.cli.stylize_cmd as stylize_cmd
    import nst.cli.video_cmd as video_cmd
    from PIL import Image

    def no_work(*a, **k):
        raise AssertionError("the weights were loaded: work began before the paths were checked")

    for module in (common, stylize_cmd, video_cmd, bench_cmd, export_cmd):
        monkeypatch.setattr(module, "load_weights_for", no_work)
    c, s = str(images["content"]), str(images["style"])
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.open(c).save(frames / f"{i:04d}.png")
    run = ["--weights", "random", "--size", "48", "--iterations", "1", "-q"]
    o = str(tmp_path / "o.png")
    bench = ["bench", "--device", "cpu", "--weights", "random", "--sizes", "32", "--precision", "fp32", "--iterations", "1", "--warmup", "0"]
    args, path, why = {
        "stylize report is a folder": (["stylize", c, s, "-o", o, *run, "--report", str(folder)], folder, "is a folder; give a file name such as"),
        "stylize report under a file": (["stylize", c, s, "-o", o, *run, "--report", str(file / "r.json")], file / "r.json", f"{file} is a file, not a folder"),
        "stylize output under a file": (["stylize", c, s, "-o", str(file / "o.png"), *run], file / "o.png", f"{file} is a file, not a folder"),
        "stylize compare is a folder": (["stylize", c, s, "-o", o, *run, "--compare", str(folder)], folder, "is a folder"),
        "batch report is a folder": (["batch", c, "--style", s, "-o", str(tmp_path / "out"), *run, "--report", str(folder)], folder, "is a folder"),
        "batch output under a file": (["batch", c, "--style", s, "-o", str(file / "out"), *run], file / "out", f"{file} is a file, not a folder"),
        "video report is a folder": (["video", str(frames), s, "-o", str(tmp_path / "v.mp4"), *run, "--report", str(folder)], folder, "is a folder"),
        "video output under a file": (["video", str(frames), s, "-o", str(file / "v.mp4"), *run], file / "v.mp4", f"{file} is a file, not a folder"),
        "bench json is a folder": ([*bench, "--json", str(folder)], folder, "is a folder; give a file name such as"),
        "bench csv under a file": ([*bench, "--csv", str(file / "b.csv")], file / "b.csv", f"{file} is a file, not a folder"),
        "export output under a file": (["export", "--weights", "random", "-o", str(file / "t.onnx")], file / "t.onnx", f"{file} is a file, not a folder"),
    }[case]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    line = " ".join(r.output.split())
    assert r.output.startswith("error: cannot write") and f" {path}: " in line and why in line, r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output and ".tmp" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in ["content.png", "style.jpg", "style2.png", "folder", "file", "frames"])
    assert list(folder.iterdir()) == [] and file.read_text() == "x"


def test_a_snapshot_that_would_overwrite_an_input_is_refused_before_any_work(images: dict[str, Path], tmp_path: Path):
    """`--save-every N` writes OUT.NNNN.ext: an input of that name beside the output (content,
    style, or --compare's sheet in stylize; any job's input or output in batch) was overwritten."""
    import shutil

    s = str(images["style"])
    content = shutil.copy(images["content"], tmp_path / "o.0002.png")
    style = shutil.copy(images["style"], tmp_path / "s.0002.jpg")
    before = {p: p.read_bytes() for p in (content, style)}
    run = ["--weights", "random", "--size", "48", "--iterations", "4", "--save-every", "2", "--targets", "torch"]
    cases = {
        "content": (["stylize", str(content), s, "-o", str(tmp_path / "o.png"), *run], f"--save-every 2 would write a snapshot (o.NNNN.png) over the input {content}"),
        "style": (["stylize", s, str(style), "-o", str(tmp_path / "s.jpg"), *run], f"over the input {style}"),
        "sheet": (["stylize", s, s, "-o", str(tmp_path / "x.png"), *run, "--compare", str(tmp_path / "x.0002.png")], "over the file given as --report or --compare"),
        "batch": (["batch", s, "--style", str(style), "-o", str(tmp_path), "--name", "s.jpg", *run], f"job s.jpg's --save-every snapshots (s.NNNN.jpg) would overwrite the input {style}"),
    }
    for name, (args, expect) in cases.items():
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and expect in " ".join(r.output.split()), (name, r.output)
        assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output, r.output
    assert {p: p.read_bytes() for p in (content, style)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["content.png", "style.jpg", "style2.png", "o.0002.png", "s.0002.jpg"])
    # Where the snapshot's iteration is not one the run saves at, the name is free.
    r = runner.invoke(app, ["stylize", str(content), s, "-o", str(tmp_path / "o.png"), *run, "--iterations", "2"])
    assert r.exit_code == 0 and before[content] == content.read_bytes(), r.output


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nothing can be made in: mode 0555, or for root (whom modes do not stop) the
    immutable flag where the file system has it."""
    import shutil
    import subprocess

    from nst.engine.files import unwritable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    flagged = False
    if unwritable(ro / "x.png") is None and shutil.which("chattr"):
        flagged = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    if unwritable(ro / "x.png") is None:
        pytest.skip("no way to make a read-only folder here")
    yield ro
    if flagged:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    ro.chmod(0o755)


@pytest.mark.parametrize("where", ["-o", "--report", "batch -o"])
def test_a_folder_that_cannot_be_written_is_found_before_the_work(where: str, images: dict[str, Path], tmp_path: Path, read_only_folder: Path):
    """It was found when the result was written, after the run (the report's error named its
    temporary file, in errno's words)."""
    c, s = str(images["content"]), str(images["style"])
    args = {"-o": ["stylize", c, s, "-o", str(read_only_folder / "o.png")],
            "--report": ["stylize", c, s, "-o", str(tmp_path / "o.png"), "--report", str(read_only_folder / "sub" / "r.json")],
            "batch -o": ["batch", c, "--style", s, "-o", str(read_only_folder / "out")]}[where]  # fmt: skip
    r = runner.invoke(app, [*args, *BASE])
    assert r.exit_code == 2, r.output
    assert f"{read_only_folder} is not writable" in r.output and "iteration" not in r.output, r.output
    assert not (tmp_path / "o.png").exists()


def test_damaged_exif_data_is_one_warning_line_and_the_run_goes_on(images: dict[str, Path], tmp_path: Path):
    """Pillow's own warnings (two of them, each with its source line) were printed as they came."""
    from PIL import Image

    damaged = tmp_path / "damaged.jpg"  # an EXIF block whose Make tag points past its end
    exif = bytes.fromhex("4578696600004d4d002a000000082002010f000200003c0600000026011200030000000100e60000000000004d616b657200")
    Image.open(images["content"]).convert("RGB").save(damaged, exif=exif)
    r = runner.invoke(app, ["stylize", str(damaged), str(images["style"]), "-o", str(tmp_path / "o.png"), *BASE, "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"warning: {damaged}: read despite a problem (Tag data larger than file. Skipping tag 271 and 1 more)"], r.output
    assert (tmp_path / "o.png").is_file()
