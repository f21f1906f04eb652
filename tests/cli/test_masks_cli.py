"""`--masks`, `--style-regions`, `--content-mask` through `nst stylize` and `nst batch`: results,
the comparison sheet, and one `error:` line with exit code 2 for each mistake."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()
FAST = ["--weights", "random", "--size", "48", "--iterations", "4", "--targets", "torch", "--style-layers", "relu1_1,relu2_1,relu3_1", "--content-layers", "relu3_2", "-q"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def masks(tmp_path: Path) -> dict[str, Path]:
    """Masks for the 96x64 content of the `images` fixture, and some bad ones."""
    left = Image.new("L", (96, 64), 0)
    left.paste(255, (0, 0, 48, 64))
    paths = {}
    for name, im in {
        "left": left, "right": Image.eval(left, lambda v: 255 - v), "white": Image.new("L", (192, 128), 255),
        "black": Image.new("L", (96, 64), 0), "square": Image.new("L", (64, 64), 255), "region": Image.new("L", (64, 64), 0),
    }.items():  # fmt: skip
        paths[name] = tmp_path / f"{name}.png"
        im.save(paths[name])
    region = Image.new("L", (64, 64), 0)
    region.paste(255, (0, 0, 64, 32))
    region.save(paths["region"])
    paths["broken"] = tmp_path / "broken.png"
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return paths


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_mask_mistakes_are_one_error_line(images, masks, tmp_path: Path):
    c, s1, s2 = images["content"], images["style"], images["style2"]
    out = tmp_path / "o.png"
    cases = {
        "count": (["--masks", masks["left"]], "1 mask(s) for 2 style image(s)"),
        "missing": (["--masks", f"{masks['left']},{tmp_path / 'nope.png'}"], "--masks: image not found"),
        "broken": (["--masks", f"{masks['left']},{masks['broken']}"], "--masks: "),
        "black": (["--masks", f"{masks['left']},{masks['black']}"], "all black"),
        "aspect": (["--masks", f"{masks['left']},{masks['square']}"], "aspect ratios differ by 33.3%"),
        "region aspect": (["--style-regions", f"-,{masks['left']}"], "style image 2"),
        "content black": (["--content-mask", masks["black"]], "--content-mask"),
        "empty": (["--masks", ","], "--masks"),
        "regions count": (["--style-regions", "-"], "--style-regions has 1 mask(s) for 2"),
    }
    for name, (extra, expect) in cases.items():
        line = _error_line(run("stylize", c, s1, s2, "-o", out, *FAST, *extra))
        assert expect in line, (name, line)
    assert not out.exists()
    # A mask is an input: never overwritten.
    line = _error_line(run("stylize", c, s1, s2, "-o", masks["left"], *FAST, "--masks", f"{masks['left']},-"))
    assert "input" in line


def test_white_masks_give_the_unmasked_image(images, masks, tmp_path: Path):
    """The Done-means, at the default precision: all-white masks (a mask twice the content's size,
    resized per stage) give the image of no masks, within one 8-bit level."""
    c, s1, s2 = images["content"], images["style"], images["style2"]
    plain, masked = tmp_path / "plain.png", tmp_path / "masked.png"
    assert run("stylize", c, s1, s2, "-o", plain, *FAST).exit_code == 0
    r = run("stylize", c, s1, s2, "-o", masked, *FAST, "--masks", f"{masks['white']},{masks['white']}")
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, masked))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - np.asarray(Image.open(c).resize((48, 32)), dtype=np.int16)).max() > 8  # the run did something


def test_a_style_blended_at_0_under_its_mask_drops_out(images, masks, tmp_path: Path):
    """`--style-blend 0,1` with a mask per style: the first style's region has no style term (it
    divided by its group's zero weight with a traceback), so the run is the second style alone
    under its mask; tiled as well."""
    c, s1, s2 = images["content"], images["style"], images["style2"]
    alone = tmp_path / "alone.png"
    assert run("stylize", c, s2, "-o", alone, *FAST, "--masks", masks["right"]).exit_code == 0
    for extra in ([], ["--tile", "32"]):
        out = tmp_path / f"blend{len(extra)}.png"
        r = run("stylize", c, s1, s2, "-o", out, *FAST, "--style-blend", "0,1", "--masks", f"{masks['left']},{masks['right']}", *extra)
        assert r.exit_code == 0, r.output
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (alone, out))
        assert np.abs(a - b).max() <= 1, extra


def test_masked_runs_tiled_equal_untiled(images, masks, tmp_path: Path):
    """Two styles under left/right masks and a content mask, L-BFGS in fp32: tile by tile (a 2x2
    grid at 64 px) and whole give the same image within one 8-bit level."""
    c, s1, s2 = images["content"], images["style"], images["style2"]
    outs = {}
    for tile in ("32", "off"):
        out, rep = tmp_path / f"{tile}.png", tmp_path / f"{tile}.json"
        r = run("stylize", c, s1, s2, "-o", out, *FAST, "--size", "64", "--scales", "64", "--precision", "fp32", "--tile", tile,
                "--masks", f"{masks['left']},{masks['right']}", "--content-mask", masks["left"], "--report", rep)  # fmt: skip
        assert r.exit_code == 0, r.output
        (stage,) = json.loads(rep.read_text())["plan"]["stages"]
        assert stage["mode"] == ("whole" if tile == "off" else "tiled")
        outs[tile] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(outs["32"] - outs["off"]).max() <= 1
    assert np.abs(outs["off"] - np.asarray(Image.open(c).resize((64, 43)), dtype=np.int16)).max() > 8  # the run did something


def test_masks_regions_content_mask_and_the_sheet(images, masks, tmp_path: Path):
    c, s1, s2 = images["content"], images["style"], images["style2"]
    out, sheet, rep, sheet0 = tmp_path / "o.png", tmp_path / "sheet.png", tmp_path / "r.json", tmp_path / "sheet0.png"
    r = run("stylize", c, s1, s2, "-o", out, *FAST, "--scales", "32,48", "--masks", f"{masks['left']},{masks['right']}",
            "--style-regions", f"{masks['region']},-", "--content-mask", masks["left"], "--compare", sheet, "--report", rep)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (48, 32)
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["masks"] == [str(masks["left"]), str(masks["right"])] and cfg["style_regions"] == [str(masks["region"]), "-"]
    assert cfg["content_mask"] == str(masks["left"])
    assert json.loads(rep.read_text())["targets"]["style_regions"].startswith("torch")
    r = run("stylize", c, s1, s2, "-o", tmp_path / "o0.png", *FAST, "--iterations", "0", "--compare", sheet0)
    assert r.exit_code == 0, r.output
    # Four more tiles: mask 1, mask 2, region 1, content mask; a left mask shows white then black.
    with Image.open(sheet) as im, Image.open(sheet0) as im0:
        assert im.width - im0.width >= 4 * 40
        row, row0 = np.asarray(im.convert("L"))[8 + 8], np.asarray(im0.convert("L"))[8 + 8]
    assert (row < 30).sum() >= 3 * 24 - 6 and (row0 < 30).sum() < 10  # the black halves of three masks


def test_batch_takes_the_masks(images, masks, tmp_path: Path):
    c, s1, s2 = images["content"], images["style"], images["style2"]
    folder = tmp_path / "out"
    r = run("batch", c, "--style", f"{s1},{s2}", "-o", folder, *FAST, "--masks", f"{masks['left']},{masks['right']}", "--compare", tmp_path / "sheets")
    assert r.exit_code == 0, r.output
    made = list(folder.glob("*.png"))
    assert len(made) == 1 and Image.open(made[0]).size == (48, 32)
    assert Image.open(next((tmp_path / "sheets").rglob("*.png"))).width > 5 * 32
    # The journal knows the masks' contents: a rerun skips the job; after a mask is edited it runs again.
    batch = ["batch", c, "--style", f"{s1},{s2}", "-o", folder, *FAST, "--masks", f"{masks['left']},{masks['right']}"]
    stamp = made[0].stat().st_mtime_ns
    assert run(*batch).exit_code == 0 and made[0].stat().st_mtime_ns == stamp
    Image.new("L", (96, 64), 255).save(masks["right"])
    r = run(*batch)
    assert r.exit_code == 0 and made[0].stat().st_mtime_ns != stamp, r.output
    line = _error_line(run("batch", c, "--style", f"{s1},{s2}", "-o", folder, *FAST, "--masks", f"{masks['left']},{masks['black']}"))
    assert "all black" in line
    line = _error_line(run("batch", c, "--style", f"{s1},{s2}", "-o", folder, *FAST, "--masks", f"{masks['left']}"))
    assert "1 mask(s) for 2" in line


def test_readme_masks_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's masks section: its Pillow lines make the masks, and its first command runs with
    them (at a smaller size)."""
    import re

    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text().split("### Masks: a style per region", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n.*?\n(nst stylize .*?)\n#", section, re.S).group(1).replace("\\\n", " ")
    (tmp_path / "examples").symlink_to(root / "examples")  # the README's paths, from a scratch folder
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README", "exec"), {})
    assert Image.open("left.png").size == Image.open("examples/chelsea.png").size
    r = run(*command.split()[1:], *FAST)
    assert r.exit_code == 0, r.output
    assert Image.open("split-cat.png").size == (48, 32) and Image.open("sheet.png").width > 48 * 5


def test_video_takes_the_masks(images, masks, tmp_path: Path):
    """`nst video` passes stylize's options through, masks included: each frame is guided by them
    (frames must have the masks' shape)."""
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    content = Image.open(images["content"])
    for i in range(2):
        content.rotate(180 * i).save(frames / f"f{i}.png")
    base = ["video", frames, images["style"], images["style2"], "-o", out, *FAST, "--iterations", "2"]
    r = run(*base, "--masks", f"{masks['left']},{masks['right']}")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png"]
    line = _error_line(run(*base[:5], tmp_path / "out2", *base[6:], "--masks", f"{masks['left']},{masks['square']}"))
    assert "aspect" in line
    assert not (tmp_path / "out2.nst-work").exists()  # found before any work (it was at the first frame, leaving the work folder)


def test_a_mask_file_whose_name_has_a_comma(images, masks, tmp_path: Path):
    """A comma list cannot quote a comma: a value that is one existing file is that file (it was
    two masks for one style, an error with no way round it short of renaming)."""
    odd = tmp_path / "left, soft.png"
    odd.write_bytes(masks["left"].read_bytes())
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run("stylize", images["content"], images["style"], "-o", a, *FAST, "--masks", odd).exit_code == 0
    assert run("stylize", images["content"], images["style"], "-o", b, *FAST, "--masks", masks["left"]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
