"""nst.engine: the pure core of neural style transfer (tensors and configs in, results out)."""

from .config import (
    GATYS,
    PRESETS,
    SEED,
    LossForm,
    Optimizer,
    Pooling,
    Precision,
    Preset,
    PreserveColors,
    SizeEdge,
    StyleConfig,
    preset,
)
from .device import DeviceError, Runtime, resolve_device, resolve_precision
from .features import LAYER_NAMES, VGGFeatures
from .images import ImageError, load_image, save_image
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .transfer import Iterate, StopRun, StyleResult, stylize
from .weights import Weights, WeightsError, load_weights, random_weights

__all__ = [
    "GATYS", "LAYER_NAMES", "PRESETS", "SEED", "DeviceError", "ImageError", "Iterate", "LossForm",
    "Optimizer", "Pooling", "Precision", "Preset", "PreserveColors", "Runtime", "SizeEdge",
    "StopRun", "StyleConfig", "StyleResult", "VGGFeatures", "Weights", "WeightsError",
    "content_loss", "gram_matrix", "load_image", "load_weights", "preset", "random_weights",
    "resolve_device", "resolve_precision", "save_image", "style_loss", "stylize", "tv_loss",
]  # fmt: skip
