"""Shared fixtures: tiny images written per test, seeded random weights, a private cache folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder and no downloads: nothing leaks into ~/.cache."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NST_CACHE_DIR", str(d))
    monkeypatch.setenv("NST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(d / "torch-home"))
    return d


@pytest.fixture(scope="session")
def weights():
    from nst.engine.weights import random_weights

    return random_weights(seed=0)


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + seed)) , np.cos(yy / (4 + seed)), np.sin((xx + yy) / 5)], -1)
    a = (base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1)
    return Image.fromarray((a * 255).astype(np.uint8), "RGB")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """A 96x64 content and two 64x64 style images as PNG/JPEG files."""
    paths = {"content": tmp_path / "content.png", "style": tmp_path / "style.jpg", "style2": tmp_path / "style2.png"}
    _pattern(96, 64, 1).save(paths["content"])
    _pattern(64, 64, 2).save(paths["style"], quality=95)
    _pattern(64, 64, 3).save(paths["style2"])
    return paths


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
