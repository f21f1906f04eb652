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


def test_the_errors_the_readme_names_come_from_nst_engine():
    import nst.engine as E

    assert (E.EngineError, E.ConfigError, E.ImageError, E.WeightsError, E.DeviceError) == (EngineError, ConfigError, ImageError, WeightsError, DeviceError)


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


def test_api_misuse_is_one_config_error_naming_the_argument(weights):
    """What a Python caller can get wrong about types, before any work: one ConfigError (or
    DeviceError) naming the argument or field, not an AttributeError or TypeError from inside."""
    import numpy as np
    from PIL import Image

    from nst.engine import Runtime

    img, cfg = Image.new("RGB", (48, 32)), C.preset("gatys", size=32, iterations=1)
    calls = {
        "`content` must be a PIL image, got ndarray": lambda: stylize(np.zeros((32, 48, 3)), [img], cfg, weights=weights),
        "got str (read files with `load_image`)": lambda: stylize("photo.png", [img], cfg, weights=weights),
        "`styles` must be a list of PIL images, got Image": lambda: stylize(img, img, cfg, weights=weights),
        "`weights` must be Weights": lambda: stylize(img, [img], cfg, weights="random"),
        "`cfg` must be a StyleConfig": lambda: stylize(img, [img], "gatys", weights=weights),
        "`runtime` must be a Runtime": lambda: stylize(img, [img], cfg, weights=weights, runtime="cpu"),
        "`callback` must be callable": lambda: stylize(img, [img], cfg, weights=weights, callback=5),
        "`content` is an empty image (0x0)": lambda: stylize(Image.new("RGB", (0, 0)), [img], cfg, weights=weights),
        "`masks` must be a list of PIL images": lambda: stylize(img, [img], cfg, weights=weights, masks=Image.new("L", (48, 32))),
        "`size` takes an integer, got 'big'": lambda: C.preset("gatys", size="big"),
        "`iterations` takes an integer, got 2.5": lambda: C.preset("gatys", iterations=2.5),
        "`style_layers` takes a tuple, e.g. ('relu1_1',), not the string 'relu1_1'": lambda: C.preset("gatys", style_layers="relu1_1"),
        "`lr` takes a number, got '1'": lambda: C.preset("gatys", lr="1"),
        "unknown setting(s) 'bogus'": lambda: C.preset("gatys", bogus=1),
        "`precision` must be one of fp32": lambda: Runtime(precision="fp8"),
        "`check_every` must be 0": lambda: Runtime(check_every=-1),
    }
    for message, call in calls.items():
        with pytest.raises(ConfigError) as e:
            call()
        assert message in str(e.value), (message, str(e.value))
    # Lists are taken as tuples (as JSON gives them); names resolve as `resolve_device` does.
    assert C.preset("gatys", style_layers=["relu1_1", "relu2_1"], scales=[64, 128]).style_layers == ("relu1_1", "relu2_1")
    assert Runtime(device="cpu", precision="bf16").device == torch.device("cpu") and Runtime(precision="bf16").precision == C.Precision.BF16
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is available here"):
            Runtime(device="cuda")
