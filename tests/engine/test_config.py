"""The configuration: presets term by term, and validation that names the bad field."""

from __future__ import annotations

import dataclasses

import pytest

from nst.engine.config import GATYS, SEED, LossForm, Optimizer, SizeEdge, preset
from nst.engine.errors import ConfigError


def test_seed_preset_is_the_notebook_term_by_term():
    assert SEED.size == 400 and SEED.size_edge == SizeEdge.HEIGHT and SEED.iterations == 2000
    assert SEED.optimizer == Optimizer.ADAM and SEED.lr == 5.0 and SEED.adam_betas == (0.9, 0.999) and SEED.adam_eps == 1e-7
    assert SEED.content_layers == ("relu5_2",) and SEED.style_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    assert SEED.content_weight == 1 and SEED.style_weight == 1e6 and SEED.tv_weight == 1e2
    assert SEED.style_match_output and SEED.init == "content" and SEED.pixel_scale == 255 and SEED.save_every == 500
    assert SEED.loss_form == LossForm.KERAS


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="unknown layer 'relu6_1'"):
        dataclasses.replace(GATYS, style_layers=("relu6_1",))
    with pytest.raises(ConfigError, match="`size` 10 is out of range"):
        dataclasses.replace(GATYS, size=10)
    with pytest.raises(ConfigError, match="scales must increase"):
        dataclasses.replace(GATYS, scales=(512, 256))
    with pytest.raises(ConfigError, match="`tv_weight` must be a finite number"):
        dataclasses.replace(GATYS, tv_weight=-1)
    with pytest.raises(ConfigError, match="`iterations` must be 0 to 1,000,000, got 1000001"):
        dataclasses.replace(GATYS, iterations=1_000_001)
    with pytest.raises(ConfigError, match=r"one count \(0 to 1,000,000\) per stage"):
        dataclasses.replace(GATYS, scales=(128, 256), scale_iterations=(1, 10**7))
    with pytest.raises(ConfigError, match="`style_layers` names relu1_1 more than once"):
        dataclasses.replace(GATYS, style_layers=("relu1_1", "relu2_1", "relu1_1"))
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("picasso")
    assert preset("seed", iterations=5).iterations == 5 and preset("seed").lr == 5.0


def test_auto_scales_halve_from_the_size_to_a_quarter():
    from nst.engine.config import auto_iterations, auto_sizes

    assert auto_sizes(96) == (96,) and auto_sizes(128) == (64, 128) and auto_sizes(256) == (64, 128, 256)
    assert auto_sizes(1024) == (256, 512, 1024) and auto_sizes(1000) == (250, 500, 1000) and auto_sizes(600) == (150, 300, 600)
    assert auto_iterations(500, 1) == (500,) and auto_iterations(500, 3) == (50, 50, 400) and auto_iterations(4, 2) == (1, 3)
    assert auto_iterations(0, 3) == (0, 0, 0) and auto_iterations(2, 3) == (0, 0, 2)
    cfg = preset("gatys", size=256, scales="auto", iterations=40)
    assert cfg.sizes == (64, 128, 256) and cfg.stage_iterations == (4, 4, 32)
    assert dataclasses.replace(cfg, size=512).sizes == (128, 256, 512)  # follows the size
    assert dataclasses.replace(cfg, scale_iterations=(1, 2, 3)).stage_iterations == (1, 2, 3)
    with pytest.raises(ValueError, match="one count"):
        dataclasses.replace(cfg, scale_iterations=(1, 2))
    with pytest.raises(ValueError, match="auto"):
        preset("gatys", scales="coarse")


def test_switching_optimiser_takes_its_own_lr():
    assert preset("gatys", optimizer=Optimizer.ADAM).lr == 0.05  # image units, not L-BFGS's 1
    assert preset("gatys", optimizer=Optimizer.ADAM, lr=0.3).lr == 0.3  # given: kept
    assert preset("seed", optimizer=Optimizer.LBFGS).lr == 1.0  # not Adam's 5 pixel levels
    assert preset("seed", optimizer=Optimizer.ADAM).lr == 5.0 and preset("gatys", optimizer=Optimizer.LBFGS).lr == 1.0
    assert preset("gatys", optimizer="adam", pixel_scale=255.0).lr == pytest.approx(0.05 * 255)


def test_choices_given_as_strings_become_their_enums():
    """As a JSON file or a keyword caller gives them: `.value` works on every choice after."""
    from nst.engine.config import Pooling, TileGrams

    cfg = preset("gatys", pooling="avg", optimizer="adam", tile_grams="previous")
    assert cfg.pooling is Pooling.AVG and cfg.optimizer is Optimizer.ADAM and cfg.tile_grams is TileGrams.PREVIOUS
    assert cfg.to_dict()["pooling"] == "avg"
    with pytest.raises(ConfigError, match="pooling must be one of max, avg, got 'mean'"):
        preset("gatys", pooling="mean")


def test_thread_counts_are_checked_where_torch_is_given_them():
    """The bound lives with the call (`set_threads`, used by the batch worker, the video Ray worker
    and nst video), so the Python API cannot hang torch with a thread pool of 99999999 either."""
    import torch

    from nst.engine.config import MAX_THREADS, check_threads, set_threads
    from nst.engine.errors import ConfigError

    before = torch.get_num_threads()
    for bad in (0, -1, MAX_THREADS + 1, 99999999):
        with pytest.raises(ConfigError, match=f"`threads` must be 1 to {MAX_THREADS}, got {bad}"):
            set_threads(bad)
        assert torch.get_num_threads() == before
    check_threads(None)
    set_threads(None)
    assert torch.get_num_threads() == before
    set_threads(before)
    assert torch.get_num_threads() == before
