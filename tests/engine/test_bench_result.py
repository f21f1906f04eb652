"""The to-result phase: settings parsed, a reference computed once and kept, time to result
measured at the output size only. Tiny sizes and a short reference (monkeypatched); no test
asserts a time."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from nst.engine import bench_result as BR
from nst.engine.bench import ROW_KEYS
from nst.engine.bench_result import ReferenceStore, ResultCase, parse_scales, reference_loss, result_config, synthetic_pair, time_to_result
from nst.engine.config import Optimizer, Precision
from nst.engine.transfer import fit_scales

CPU = torch.device("cpu")


@pytest.fixture
def pair():
    return synthetic_pair(seed=0, size=64)


def test_parse_scales():
    assert parse_scales("single", 256) == ((256,), ())
    assert parse_scales("auto", 256) == ("auto", ())
    assert parse_scales("64:100, 128:50,256", 256) == ((64, 128, 256), (100, 50))
    with pytest.raises(ValueError, match="must end at the size"):
        parse_scales("64,128", 256)
    with pytest.raises(ValueError, match="iteration count"):
        parse_scales("64,256", 256)
    with pytest.raises(ValueError, match="bad scales"):
        parse_scales("big", 256)


def test_result_config_runs_the_last_stage_to_the_limit():
    cfg = result_config(ResultCase(256, scales="auto"), max_iterations=300)
    assert cfg.sizes == (64, 128, 256) and cfg.stage_iterations == (50, 50, 300)  # the preset's own split of 500
    fitted = fit_scales([Image.new("RGB", (256, 170))], [[Image.new("RGB", (256, 256))]], cfg)
    assert fitted.stage_iterations == (50, 50, 300)  # what runs: the limit, not auto's split (400)
    cfg = result_config(ResultCase(256, optimizer="adam", scales="128:40,256"), max_iterations=90)
    assert cfg.optimizer == Optimizer.ADAM and cfg.lr == 0.05 and cfg.stage_iterations == (40, 90)
    assert result_config(ResultCase(64, preset="seed", optimizer="adam"), max_iterations=5).lr == 5.0  # the seed preset's own
    short = result_config(ResultCase(64, optimizer="lbfgs:5"), max_iterations=5)  # what the memory planner falls back to
    assert (short.optimizer, short.lbfgs_history) == ("lbfgs", 5) and result_config(ResultCase(64), max_iterations=5).lbfgs_history == 20
    ref = BR.reference_config(ResultCase(64, optimizer="adam", precision=Precision.BF16, scales="auto"))
    assert ref.optimizer == Optimizer.LBFGS and ref.sizes == (64,) and ref.stage_iterations == (BR.REFERENCE_ITERATIONS,)
    assert ref.lbfgs_patience == 0  # every one of its iterations: the lowest loss of all of them


def test_reference_is_computed_once_and_kept(pair, weights, tmp_path, monkeypatch):
    monkeypatch.setattr(BR, "REFERENCE_ITERATIONS", 4)
    store = ReferenceStore(tmp_path)
    case = ResultCase(48)
    first, hit1 = reference_loss(case, *pair, weights=weights, device=CPU, store=store)
    again, hit2 = reference_loss(ResultCase(48, optimizer="adam", scales="auto"), *pair, weights=weights, device=CPU, store=store)
    assert (hit1, hit2) == (False, True) and again == first > 0  # the same problem, whatever the setting
    files = list((tmp_path / "references").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["iterations"] == 4
    files[0].write_text("{not json")  # damaged: recomputed, not trusted
    assert reference_loss(case, *pair, weights=weights, device=CPU, store=store) == (first, False)
    other, hit3 = reference_loss(case, pair[1], pair[0], weights=weights, device=CPU, store=store)  # other images: another key
    assert not hit3 and other != first


def test_time_to_result_counts_all_stages_and_stops_when_reached(pair, weights):
    case = ResultCase(48, scales="32:3,48")
    # A reference any first loss is within 1% of: reached at the first output-size iteration.
    row, curve = time_to_result(case, *pair, weights=weights, device=CPU, reference=1e9, max_iterations=5)
    assert tuple(row.to_dict()) == ROW_KEYS and row.phase == "result" and row.scales == "32:3,48"
    assert row.reached and row.iterations_to_result == 4 and row.iterations == 4 and len(curve.losses) == 1
    assert row.seconds_to_result == curve.seconds[0] >= curve.start_seconds > 0
    assert row.cpu_seconds_to_result == curve.cpu_seconds[0] > 0
    assert row.stage_iterations == "32:3,48:1" and row.size == "48x48"
    # A reference nothing reaches: every iteration runs, reached is false.
    row, curve = time_to_result(case, *pair, weights=weights, device=CPU, reference=1e-12, max_iterations=5)
    assert not row.reached and row.seconds_to_result is None and row.iterations_to_result is None
    assert row.iterations == 8 and len(curve.losses) == 5 and row.final_loss == min(curve.losses)
    assert row.stage_iterations == "32:3,48:5" and row.ms_per_iteration > 0


def test_time_to_result_runs_tiled_with_either_grams(pair, weights, monkeypatch):
    """`tile`: the run follows a plan that tiles the output size (the 32 px stage fits one tile);
    `tile_grams`: the objective's Grams; both in the row and the label."""
    import nst.engine.tiles as tiles

    seen = []
    real = tiles.TiledObjective.loss_and_grad
    monkeypatch.setattr(tiles.TiledObjective, "loss_and_grad", lambda self, x: seen.append((self.tile, self.grams.value)) or real(self, x))
    for grams in ("exact", "previous"):
        seen.clear()
        case = ResultCase(48, optimizer="adam", scales="32:1,48", tile=32, tile_grams=grams)
        row, curve = time_to_result(case, *pair, weights=weights, device=CPU, reference=1e-12, max_iterations=3)
        assert (row.tile, row.tile_grams) == (32, grams) and curve.label.endswith("tile 32" + (" previous" if grams == "previous" else ""))
        assert seen == [(32, grams)] * 3 and row.iterations == 4  # the 48 px stage's iterations only


def test_time_to_result_makes_content_targets_per_tile_when_asked(pair, weights, monkeypatch):
    """`tile_content="per tile"`: the tiled stage holds no content targets and makes them at each
    tile's pass, as a plan does where held ones do not fit; the same losses as held, up to rounding."""
    import nst.engine.tiles as tiles

    seen = []
    real = tiles.TiledObjective.loss_and_grad
    monkeypatch.setattr(tiles.TiledObjective, "loss_and_grad", lambda self, x: seen.append(self.content_images is not None) or real(self, x))
    curves = {}
    for content in ("held", "per tile"):
        seen.clear()
        row, curves[content] = time_to_result(ResultCase(48, optimizer="adam", tile=32, tile_content=content), *pair, weights=weights, device=CPU,
                                              reference=1e-12, max_iterations=3)  # fmt: skip
        assert row.status == "ok" and row.tile_content == content and seen == [content == "per tile"] * 3
    assert curves["per tile"].label == "adam fp32 single tile 32 content per tile" and curves["held"].label == "adam fp32 single tile 32"
    assert curves["per tile"].losses == pytest.approx(curves["held"].losses, rel=1e-4)


def test_unsupported_precision_is_a_skipped_row(pair, weights):
    row, curve = time_to_result(ResultCase(48, precision=Precision.TF32), *pair, weights=weights, device=CPU, reference=1.0)
    assert row.status == "skipped" and "CUDA" in row.reason and not curve.losses
