"""`--targets`, `--onnx`, `--provider`: choosing where a run's style/content targets come from."""

from __future__ import annotations

import enum
from pathlib import Path

from nst.engine.config import StyleConfig
from nst.engine.device import Runtime
from nst.engine.targets import TargetSource
from nst.engine.transfer import TargetCacheLike
from nst.engine.weights import Weights


class TargetsMode(str, enum.Enum):
    AUTO = "auto"
    ONNX = "onnx"
    TORCH = "torch"


class Provider(str, enum.Enum):
    AUTO = "auto"
    TENSORRT = "tensorrt"
    CUDA = "cuda"
    CPU = "cpu"


def choose_targets(
    mode: TargetsMode, *, cfg: StyleConfig, weights: Weights, runtime: Runtime, onnx_path: Path | None, provider: Provider, quiet: bool
) -> tuple[TargetSource | None, TargetCacheLike | None, dict[str, object]]:
    """(source, cache, report info); a None source means PyTorch targets."""
    return None, None, {}
