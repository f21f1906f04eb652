"""Seeded runs hashed bit for bit, so a refactor of the core can show that results did not change.

The references were made with the torch version and CPU kernels named in `MADE_WITH`; elsewhere
floating-point kernels may round differently, so the test skips rather than fail on a machine
it cannot speak for. fp32 on the CPU and one thread make the runs repeatable (a multi-threaded
reduction may add in another order). To regenerate after a change that is *meant* to change the
numbers: `python tests/engine/test_reference_hashes.py` prints the new table; say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine.config import PreserveColors, preset
from nst.engine.config import Precision
from nst.engine.device import Runtime
from nst.engine.transfer import stylize
from nst.engine.weights import random_weights

MADE_WITH = {"torch": "2.14.1", "cpu_capability": "AVX512"}

# Small enough for the suite, deep enough to use every default layer (relu5_x needs 16 px).
BASE = {"size": 48, "iterations": 4}
CASES: dict[str, tuple[str, dict, int]] = {  # name: (preset, overrides, number of styles)
    "gatys-lbfgs": ("gatys", {}, 1),
    "seed-adam": ("seed", {}, 1),
    "blend": ("gatys", {"style_blend": (3.0, 7.0)}, 2),
    "scales": ("gatys", {"scales": (32, 48), "size": 48}, 1),
    "noise-init": ("gatys", {"init": "noise", "seed": 3}, 1),
    "luminance": ("gatys", {"preserve_colors": PreserveColors.LUMINANCE}, 1),
    "histogram": ("gatys", {"preserve_colors": PreserveColors.HISTOGRAM}, 1),
    "seed-luminance": ("seed", {"preserve_colors": PreserveColors.LUMINANCE}, 1),
}

REFERENCE = {  # made on db00db2; the L-BFGS cases remade when issue 8's scale-invariant L-BFGS changed them
    "blend": "2a1a51758b8cef62cf0618b4",
    "gatys-lbfgs": "02b1d68bcb243cbeda2ba434",
    "histogram": "1c8b0aa9fc1a60f515b1c527",
    "luminance": "020d134038feef57f8da4cef",
    "noise-init": "9ed7cab843e66e26253d5375",
    "scales": "3b2bba81aeee76e02f3ddbe8",
    "seed-adam": "4e2d616bf1ee13625910eff8",
    "seed-luminance": "cee40bd3f81c95485c92b9c6",
    "cli-gatys": "cd494ecf34ae2cd96717fb74",
}


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + seed)), np.cos(yy / (4 + seed)), np.sin((xx + yy) / 5)], -1)
    return Image.fromarray(((base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1) * 255).astype(np.uint8), "RGB")


def digest(image: torch.Tensor, losses: list[float]) -> str:
    """sha256 of the image's exact float32 bytes and the loss history's exact values."""
    h = hashlib.sha256(image.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps([float(x).hex() for x in losses]).encode())
    return h.hexdigest()[:24]


def run_case(name: str) -> str:
    preset_name, overrides, n_styles = CASES[name]
    cfg = preset(preset_name, **{**BASE, **overrides})
    content = _pattern(96, 64, 1)
    styles = [_pattern(64, 64, 2 + i) for i in range(n_styles)]
    runtime = Runtime(device=torch.device("cpu"), precision=Precision.FP32)
    result = stylize(content, styles, cfg, weights=random_weights(seed=0), runtime=runtime)
    assert result.status == "done" and result.steps == cfg.iterations * len(cfg.sizes)
    return digest(result.image, result.loss_history)


def run_cli(folder: Path) -> str:
    """The same through `nst stylize` (options, weights and output as a user gives them): the PNG's
    bytes and the report's loss history."""
    from typer.testing import CliRunner

    from nst.cli.app import app

    _pattern(96, 64, 1).save(folder / "content.png")
    _pattern(64, 64, 2).save(folder / "style.png")
    out, report = folder / "out.png", folder / "report.json"
    args = ["stylize", str(folder / "content.png"), str(folder / "style.png"), "-o", str(out), "--size", "48",
            "--iterations", "4", "--weights", "random", "--device", "cpu", "--precision", "fp32",
            "--targets", "torch", "--report", str(report), "-q"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    h = hashlib.sha256(out.read_bytes())
    h.update(json.dumps([float(x).hex() for x in json.loads(report.read_text())["loss"]["history"]]).encode())
    return h.hexdigest()[:24]


def _machine_matches() -> str | None:
    here = {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    return None if here == MADE_WITH else f"references made with {MADE_WITH}, this is {here}"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_run_matches_reference(name, one_thread):
    why = _machine_matches()
    if why:
        pytest.skip(why)
    assert run_case(name) == REFERENCE[name], f"{name}: the seeded result changed"


def test_cli_run_matches_reference(tmp_path, one_thread):
    why = _machine_matches()
    if why:
        pytest.skip(why)
    assert run_cli(tmp_path) == REFERENCE["cli-gatys"], "nst stylize: the seeded result changed"


def test_same_hash_twice_in_one_process(one_thread):
    """The hash is a function of the inputs alone: nothing from an earlier run leaks into a later one."""
    assert run_case("gatys-lbfgs") == run_case("gatys-lbfgs")


def test_digest_sees_one_ulp():
    img = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    bumped = img.clone()
    bumped.view(-1)[5] = torch.nextafter(bumped.view(-1)[5], torch.tensor(2.0))
    assert digest(img, [1.0]) != digest(bumped, [1.0])
    assert digest(img, [1.0]) != digest(img, [1.0 + 2**-52])


if __name__ == "__main__":
    torch.set_num_threads(1)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps({**{n: run_case(n) for n in sorted(CASES)}, "cli-gatys": run_cli(Path(d))}, indent=4))
