"""nst.engine: the pure core of neural style transfer (tensors and configs in, results out).

The names below load their module on first use (PEP 562), so `import nst.engine`, and the
torch-free modules under it (`config`, `onnx_meta`, `files`, `weights`' paths and status), do
not pay for importing torch: `nst --help` and `nst weights status` answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "config": ("GATYS", "PRESETS", "SEED", "LossForm", "Optimizer", "OptimizerState", "Pooling", "Precision", "Preset", "PreserveColors", "SizeEdge", "StyleConfig", "preset"),
    "device": ("DeviceError", "Runtime", "resolve_device", "resolve_precision"),
    "errors": ("ConfigError", "EngineError", "EngineWarning"),
    "features": ("LAYER_NAMES", "VGGFeatures"),
    "images": ("ImageError", "load_image", "save_image"),
    "losses": ("content_loss", "gram_matrix", "style_loss", "tv_loss"),
    "plan": ("Plan", "PlanError", "TileMode", "parse_size", "plan_run"),
    "transfer": ("Iterate", "MemoryRequest", "StopRun", "StyleResult", "plan_for", "planned_config", "stylize"),
    "weights": ("Weights", "WeightsError", "load_weights", "random_weights"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:  # also how `from nst.engine import config` finds the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .config import GATYS, PRESETS, SEED, LossForm, Optimizer, OptimizerState, Pooling, Precision, Preset, PreserveColors, SizeEdge, StyleConfig, preset
    from .device import DeviceError, Runtime, resolve_device, resolve_precision
    from .errors import ConfigError, EngineError, EngineWarning
    from .features import LAYER_NAMES, VGGFeatures
    from .images import ImageError, load_image, save_image
    from .losses import content_loss, gram_matrix, style_loss, tv_loss
    from .plan import Plan, PlanError, TileMode, parse_size, plan_run
    from .transfer import Iterate, MemoryRequest, StopRun, StyleResult, plan_for, planned_config, stylize
    from .weights import Weights, WeightsError, load_weights, random_weights
