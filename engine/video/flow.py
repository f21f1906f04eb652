"""Optical flow between two frames: OpenCV's DIS or Farneback on the CPU, or torchvision's RAFT.

Every method takes two (1, 3, H, W) images in [0, 1] and returns the flow from the first to the
second, (1, 2, H, W) in pixels (x then y): the first frame's pixel p shows what the second frame
shows at p + flow(p). OpenCV and RAFT are imported only when a flow is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EngineError
from ..weights import WeightsUnavailable
from .config import FlowMethod


class FlowError(EngineError):
    """A flow method that cannot run here; the message says what to do."""


class RaftWeightsMissing(FlowError, WeightsUnavailable):
    """RAFT's weights are not on this machine: a missing resource (as the ImageNet weights
    are), not a mistake in the input."""


def _grey_u8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W) uint8 luma, what OpenCV's flow methods take."""
    rgb = image[0].detach().float().cpu().clamp(0, 1)
    y = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (y * 255.0 + 0.5).to(torch.uint8).numpy()


def _to_tensor(flow: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0).to(device)


def _dis():  # noqa: ANN202 - cv2's DISOpticalFlow
    """DIS at OpenCV's `MEDIUM` preset (variational refinement on): good on small frames, fast."""
    import cv2

    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def dis_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """DIS (`_dis`) from `first` to `second`."""
    return _to_tensor(_dis().calc(_grey_u8(first), _grey_u8(second), None), first.device)


# pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags
FARNEBACK_ARGS = (0.5, 3, 15, 3, 5, 1.2, 0)


def farneback_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Farneback with OpenCV's documented example settings (pyramid 0.5 x 3, window 15)."""
    import cv2

    flow = cv2.calcOpticalFlowFarneback(_grey_u8(first), _grey_u8(second), None, *FARNEBACK_ARGS)
    return _to_tensor(flow, first.device)


# torchvision's RAFT files, named as torch.hub saves them (Raft_*_Weights.DEFAULT).
RAFT_FILES = {"large": "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "small": "raft_small_C_T_V2-01064c6d.pth"}


def find_raft_weights(*, hub_dir: Path | None = None, path: Path | None = None) -> Path:
    """A RAFT weights file: `path` if given, else torchvision's file in the torch hub cache."""
    if path is not None:
        if not Path(path).is_file():
            raise FlowError(f"{path} is a folder, not a RAFT weights file" if Path(path).is_dir() else f"RAFT weights file not found: {path}")
        return Path(path)
    folder = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    for name in RAFT_FILES.values():
        if (folder / name).is_file():
            return folder / name
    raise RaftWeightsMissing(
        f"`flow` raft needs torchvision's RAFT weights ({RAFT_FILES['large']} or {RAFT_FILES['small']}) in {folder} "
        "or a file given with `flow_weights`, and they cannot be downloaded here; use `flow` dis",
        params=("flow", "flow_weights"),
    )


RAFT_MIN_SIDE = 128


class RaftFlow:
    """torchvision's RAFT with weights read from a local file (large or small, told by its keys)."""

    def __init__(self, weights_file: Path, *, device: torch.device, iterations: int = 12) -> None:
        from torchvision.models.optical_flow import raft_large, raft_small

        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file: torch raises many types
            raise FlowError(f"cannot read RAFT weights {weights_file}: {type(e).__name__}") from None
        if not isinstance(state, dict):
            raise FlowError(f"{weights_file}: not a RAFT state_dict")
        errors = []
        for build in (raft_large, raft_small):
            model = build(weights=None, progress=False)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                errors.append(str(e).splitlines()[0])
                continue
            self.model = model.eval().requires_grad_(False).to(device)
            self.kind = build.__name__
            break
        else:
            raise FlowError(f"{weights_file}: not torchvision's raft_large or raft_small weights ({errors[-1]})")
        self.device, self.iterations = device, iterations

    @torch.no_grad()
    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        h, w = first.shape[-2:]
        a, b = (t.to(self.device).float() * 2 - 1 for t in (first, second))  # RAFT takes [-1, 1]
        # RAFT's correlation pyramid needs 128 px a side: enlarge smaller frames, and scale the
        # flow back down with them.
        scale = max(1.0, RAFT_MIN_SIDE / min(h, w))
        if scale > 1:
            size = (max(RAFT_MIN_SIDE, round(h * scale)), max(RAFT_MIN_SIDE, round(w * scale)))
            a, b = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (a, b))
        sh, sw = a.shape[-2:]
        # It works at 1/8 of the resolution: pad to multiples of 8 (by replication), crop back.
        ph, pw = (-sh) % 8, (-sw) % 8
        a, b = (F.pad(t, (0, pw, 0, ph), mode="replicate") for t in (a, b))
        flow = self.model(a, b, num_flow_updates=self.iterations)[-1][..., :sh, :sw]  # (1, 2, sh, sw), the last refinement
        if scale > 1:
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([w / sw, h / sh], device=flow.device).view(1, 2, 1, 1)
        return flow.to(first.device)


def _check(first: torch.Tensor, second: torch.Tensor, method: FlowMethod, raft: RaftFlow | None) -> None:
    if first.shape != second.shape:
        raise ValueError(f"flow needs two frames of one size, got {tuple(first.shape)} and {tuple(second.shape)}")
    if method == FlowMethod.RAFT and raft is None:
        raise FlowError("`flow` raft needs a loaded RaftFlow (see find_raft_weights)", params=("flow",))


def optical_flow(first: torch.Tensor, second: torch.Tensor, *, method: FlowMethod | str = FlowMethod.DIS, raft: RaftFlow | None = None) -> torch.Tensor:
    """Flow from `first` to `second`, (1, 2, H, W) in pixels; `raft` is the loaded model for RAFT."""
    method = FlowMethod(method)
    _check(first, second, method, raft)
    if method == FlowMethod.DIS:
        return dis_flow(first, second)
    if method == FlowMethod.FARNEBACK:
        return farneback_flow(first, second)
    assert raft is not None
    return raft(first, second)


def flow_pair(first: torch.Tensor, second: torch.Tensor, *, method: FlowMethod | str = FlowMethod.DIS, raft: RaftFlow | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flow from `first` to `second`, flow from `second` to `first`): what a frame's warping and
    reliability need. The same flows as two `optical_flow` calls, for less: OpenCV's methods take
    each frame's luma once (and DIS is set up once); RAFT runs both directions as one batch of two.
    """
    method = FlowMethod(method)
    _check(first, second, method, raft)
    if method == FlowMethod.RAFT:
        assert raft is not None
        both = raft(torch.cat([first, second]), torch.cat([second, first]))
        return both[:1], both[1:]
    import cv2

    a, b = _grey_u8(first), _grey_u8(second)
    if method == FlowMethod.DIS:
        dis = _dis()
        flows = dis.calc(a, b, None), dis.calc(b, a, None)
    else:
        flows = tuple(cv2.calcOpticalFlowFarneback(p, q, None, *FARNEBACK_ARGS) for p, q in ((a, b), (b, a)))
    return _to_tensor(flows[0], first.device), _to_tensor(flows[1], first.device)
