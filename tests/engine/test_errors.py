"""The engine's errors: one base a front end can catch, messages that name parameters."""

from __future__ import annotations

import pytest
import torch

from nst.engine import config as C
from nst.engine.device import DeviceError, resolve_device
from nst.engine.errors import ConfigError, EngineError
from nst.engine.images import ImageError, load_image
from nst.engine.onnx_meta import ModelChecksumError
from nst.engine.transfer import stylize
from nst.engine.weights import WeightsError, load_weights


@pytest.mark.parametrize("cls", [ConfigError, DeviceError, ImageError, WeightsError, ModelChecksumError])
def test_every_engine_error_shares_the_base(cls):
    assert issubclass(cls, EngineError) and issubclass(cls, ValueError)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="`style_scale` must be between"):
        C.preset("gatys", style_scale=100.0)


def test_messages_mark_the_parameters_they_name(tmp_path, weights):
    from PIL import Image

    img = Image.new("RGB", (64, 64))
    with pytest.raises(ConfigError) as e:
        stylize(img, [img], C.preset("gatys", size=48, iterations=1, style_blend=(1.0, 2.0)), weights=weights)
    assert e.value.params == ("style_blend",) and "`style_blend` has 2 weights for 1 style images" in str(e.value)
    with pytest.raises(WeightsError) as e:
        load_weights(str(tmp_path / "none.pth"))
    assert "`weights`" in str(e.value) and e.value.params == ("weights",)
    with pytest.raises(ImageError):
        load_image(tmp_path / "none.png")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError) as e:
            resolve_device("cuda")
        assert str(e.value).startswith("`device` cuda: no CUDA GPU") and e.value.params == ("device",)
