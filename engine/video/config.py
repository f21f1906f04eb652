"""What a video run adds to `StyleConfig`: the flow method and the temporal term (no torch here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config import StyleConfig
from ..errors import ConfigError


class FlowMethod(str, enum.Enum):
    DIS = "dis"  # OpenCV's dense inverse search (Kroeger et al. 2016), CPU
    FARNEBACK = "farneback"  # OpenCV's polynomial expansion (Farneback 2003), CPU
    RAFT = "raft"  # torchvision's RAFT (Teed & Deng 2020), on the run's device; needs its weights


# The temporal term's weight against the normalised content (1) and style (1e6) terms. Measured on
# a synthetic pan (README, "Video"; random weights, 64 px, 10 iterations a frame): 1 cuts the
# flicker of independent frames well below half with a style loss no higher than theirs; larger
# weights flicker less but hold each frame to the warped previous output at a higher style loss.
DEFAULT_TEMPORAL_WEIGHT = 1.0


@dataclass(frozen=True)
class VideoConfig:
    """The video-only settings; `StyleConfig` applies to every frame."""

    temporal_weight: float = DEFAULT_TEMPORAL_WEIGHT  # 0: frames independent of each other
    iterations_first: int | None = None  # the first frame's iterations per scale; None: 2x the others'
    flow: FlowMethod = FlowMethod.DIS
    # Start frame t from the warped output t-1. None: exactly when temporal_weight > 0, so that
    # weight 0 is the independent baseline; True with weight 0 measures the warm start alone.
    warm_start: bool | None = None

    def __post_init__(self) -> None:
        if not self.temporal_weight >= 0 or self.temporal_weight == float("inf"):
            raise ConfigError(f"`temporal_weight` must be a finite number >= 0, got {self.temporal_weight}", params=("temporal_weight",))
        if self.iterations_first is not None and self.iterations_first < 0:
            raise ConfigError(f"`iterations_first` must be 0 or more, got {self.iterations_first}", params=("iterations_first",))
        try:
            object.__setattr__(self, "flow", FlowMethod(self.flow))
        except ValueError:
            raise ConfigError(f"unknown `flow` method {self.flow!r}: use {', '.join(m.value for m in FlowMethod)}", params=("flow",)) from None

    @property
    def starts_warm(self) -> bool:
        return self.temporal_weight > 0 if self.warm_start is None else self.warm_start

    def first_iterations(self, cfg: StyleConfig) -> int:
        return 2 * cfg.iterations if self.iterations_first is None else self.iterations_first

    def to_dict(self) -> dict[str, object]:
        return {"temporal_weight": self.temporal_weight, "iterations_first": self.iterations_first, "flow": self.flow.value, "warm_start": self.starts_warm}
