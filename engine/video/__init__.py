"""Video with temporal consistency (Ruder, Dosovitskiy & Brox 2016): frames in and out through
PyAV, optical flow through OpenCV or RAFT, warping, the temporal loss, a resumable frame loop.

Only the settings (`config`) load with the package; the rest loads on first use, so neither
torch nor PyAV nor OpenCV is paid for by code that only names a flow method.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import DEFAULT_TEMPORAL_WEIGHT, FlowMethod, VideoConfig

_LAZY = {
    "flow": ("FlowError", "RaftFlow", "RaftWeightsMissing", "find_raft_weights", "flow_pair", "optical_flow"),
    "journal": ("FrameJournal",),
    "media": ("Clip", "Encoded", "FrameSelection", "VideoError", "count_frames", "is_video_path", "open_clip", "read_frames", "write_frame_folder", "write_video"),
    "pipeline": ("WORK_SUFFIX", "ClipJob", "ClipOutcome", "file_digest", "open_job", "run_clip", "work_folder"),
    "run": ("FrameEvent", "VideoResult", "stylize_video"),
    "temporal": ("TemporalTerm", "temporal_loss", "warping_error"),
    "warping": ("Reliability", "reliability", "warp"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_TEMPORAL_WEIGHT", "FlowMethod", "VideoConfig", *sorted(_WHERE)]
