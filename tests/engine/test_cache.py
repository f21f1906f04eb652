"""The target cache: hit, miss, namespaces, corruption (a warning and a miss, never a crash), concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from nst.engine.cache import TargetCache, TargetCacheWarning
from nst.engine.targets import ImageTargets


def _targets(seed: int = 0) -> ImageTargets:
    g = torch.Generator().manual_seed(seed)
    return ImageTargets({"relu4_2": torch.rand(1, 8, 3, 5, generator=g)}, {"relu1_1": torch.rand(1, 4, 4, generator=g), "relu2_1": torch.rand(1, 6, 6, generator=g)})


def _same(a: ImageTargets, b: ImageTargets) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_miss_then_hit_round_trip(tmp_path: Path):
    cache = TargetCache(tmp_path)
    assert cache.lookup("k" * 32) is None
    cache.store("k" * 32, _targets())
    hit = cache.lookup("k" * 32)
    assert hit is not None and _same(hit, _targets())
    assert cache.path("k" * 32).parent.parent == tmp_path / "targets"
    assert cache.info()["entries"] == 1 and cache.info()["bytes"] > 0


def test_namespaces_do_not_share_entries(tmp_path: Path):
    a, b = TargetCache(tmp_path, namespace="onnxruntime-fp32"), TargetCache(tmp_path, namespace="torch-fp32")
    a.store("key", _targets())
    assert a.lookup("key") is not None and b.lookup("key") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_entry_is_discarded_with_a_warning(tmp_path: Path, damage: str):
    cache = TargetCache(tmp_path)
    cache.store("key", _targets())
    path = cache.path("key")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0xFF  # inside the tensor bytes: only the checksum can tell
    elif damage == "garbage":
        data = bytearray(b"\x00" * 8 + b"{not json" + bytes(40))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.warns(TargetCacheWarning, match="damaged"):
        assert cache.lookup("key") is None
    assert not path.exists()
    cache.store("key", _targets())  # recomputed and stored again: valid from then on
    assert _same(cache.lookup("key"), _targets())


def test_warning_goes_to_callback_when_given(tmp_path: Path):
    seen: list[str] = []
    cache = TargetCache(tmp_path, on_warning=seen.append)
    cache.store("key", _targets())
    cache.path("key").write_bytes(b"junk")
    assert cache.lookup("key") is None and len(seen) == 1 and "\n" not in seen[0]


def test_entry_under_wrong_key_is_not_trusted(tmp_path: Path):
    cache = TargetCache(tmp_path)
    cache.store("a", _targets(0))
    cache.path("b").parent.mkdir(parents=True, exist_ok=True)
    cache.path("b").write_bytes(cache.path("a").read_bytes())
    with pytest.warns(TargetCacheWarning, match="wrong key"):
        assert cache.lookup("b") is None


def test_concurrent_writers_of_one_key(tmp_path: Path):
    """Writers race on one key while readers read it: every write succeeds, no reader sees half a file."""
    cache = TargetCache(tmp_path)
    errors: list[BaseException] = []
    seen: list[ImageTargets | None] = []
    warned: list[str] = []  # a reader that saw half a file would discard it with a warning
    start = threading.Barrier(12)

    def write() -> None:
        try:
            start.wait()
            for _ in range(10):
                TargetCache(tmp_path).store("key", _targets())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def read() -> None:
        start.wait()
        for _ in range(20):
            seen.append(TargetCache(tmp_path, on_warning=warned.append).lookup("key"))

    threads = [threading.Thread(target=write) for _ in range(8)] + [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not warned
    assert all(s is None or _same(s, _targets()) for s in seen)
    assert _same(cache.lookup("key"), _targets())
    assert [p.name for p in cache.path("key").parent.iterdir()] == [cache.path("key").name]  # no temp files left


def test_clear_keeps_imported_weights(tmp_path: Path):
    cache = TargetCache(tmp_path)
    cache.store("key", _targets())
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "targets.onnx").write_bytes(b"x" * 10)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vgg19.safetensors").write_bytes(b"w")
    assert cache.info()["models"][0]["name"] == "m"
    removed = cache.clear()
    assert removed == {"entries": 1, "models": 1, "temporaries": 0, "bytes": removed["bytes"]} and removed["bytes"] > 10
    assert cache.info()["entries"] == 0 and not cache.info()["models"]
    assert (tmp_path / "weights" / "vgg19.safetensors").exists()


def test_stylize_counts_a_damaged_entry_as_a_miss(tmp_path: Path, weights):
    from PIL import Image

    from nst.engine.config import preset
    from nst.engine.transfer import stylize

    cfg = preset("gatys", size=32, iterations=1, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1"))
    content = Image.new("RGB", (40, 32), (200, 30, 30))
    style = Image.effect_noise((32, 32), 60).convert("RGB")
    cache = TargetCache(tmp_path)
    runs = [stylize(content, [style], cfg, weights=weights, cache=cache) for _ in range(2)]
    assert [r.targets["cache"] for r in runs] == ["miss", "hit"]
    for p in cache.entries():
        p.write_bytes(p.read_bytes()[:-7])
    with pytest.warns(TargetCacheWarning):
        third = stylize(content, [style], cfg, weights=weights, cache=cache)
    assert third.targets["cache"] == "miss" and torch.allclose(third.image, runs[0].image)
    assert stylize(content, [style], cfg, weights=weights, cache=cache).targets["cache"] == "hit"


def test_a_full_disk_costs_one_warning_and_no_entries(full_disk: Path):
    """On a real full filesystem every write fails (safetensors raises its own error type):
    the first failure is one warning naming the folder, later ones are silent, nothing is raised."""
    seen: list[str] = []
    cache = TargetCache(full_disk, on_warning=seen.append)
    for key in ("a", "b", "c"):
        cache.store(key, _targets())
        assert cache.lookup(key) is None
    assert len(seen) == 1 and "\n" not in seen[0]
    assert "No space left on device" in seen[0] and str(full_disk / "targets") in seen[0]
    assert cache.info()["entries"] == 0 and not cache.temporaries()


def test_killed_writers_leftovers_are_shown_then_swept_on_first_use(tmp_path: Path, killed_writer):
    cache = TargetCache(tmp_path)
    cache.store("kept", _targets())
    dead = killed_writer(cache.path("a"), tmp_path / "weights" / "vgg19-imagenet-convs.safetensors")
    temps = cache.info()["temporaries"]
    assert len(temps) == 2 and all(t["stale"] and t["writer"] == dead and t["bytes"] == 1000 for t in temps)
    assert cache.info()["temporary_bytes"] == 2000
    fresh = TargetCache(tmp_path)
    assert fresh.lookup("kept") is not None  # first use sweeps
    assert not fresh.info()["temporaries"] and fresh.info()["entries"] == 1
