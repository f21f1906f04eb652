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
    with pytest.raises(ConfigError, match="size 10 is out of range"):
        dataclasses.replace(GATYS, size=10)
    with pytest.raises(ConfigError, match="scales must increase"):
        dataclasses.replace(GATYS, scales=(512, 256))
    with pytest.raises(ConfigError, match="tv_weight must be a finite number"):
        dataclasses.replace(GATYS, tv_weight=-1)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("picasso")
    assert preset("seed", iterations=5).iterations == 5 and preset("seed").lr == 5.0
