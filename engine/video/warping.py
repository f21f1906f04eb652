"""Warping by a flow field, and which warped pixels to trust (Ruder, Dosovitskiy & Brox 2016).

Conventions: for frames t-1 and t, `backward` is the flow from t to t-1 and `forward` the flow
from t-1 to t, both (1, 2, H, W) in pixels. Frame t's pixel p shows what frame t-1 showed at
p + backward(p), so `warp(previous, backward)` brings frame t-1 (or its stylised output) onto
frame t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _sample_grid(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid for grid_sample, mask of positions inside the frame), for positions p + flow(p)."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype), torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    x = xs + flow[:, 0]  # (N, H, W)
    y = ys + flow[:, 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx = 2 * x / max(w - 1, 1) - 1
    gy = 2 * y / max(h - 1, 1) - 1
    return torch.stack([gx, gy], dim=-1), inside.unsqueeze(1)


def warp(image: torch.Tensor, flow: torch.Tensor, *, mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """`image` sampled at p + flow(p) (`mode`: bilinear or bicubic), and the (N, 1, H, W) mask
    where that position lies inside the frame (outside it the edge pixels are repeated, and
    nothing is known)."""
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"warp: image {tuple(image.shape)} and flow {tuple(flow.shape)} differ in size")
    grid, inside = _sample_grid(flow.float())
    out = F.grid_sample(image.float(), grid, mode=mode, padding_mode="border", align_corners=True)
    return out.to(image.dtype), inside


def _gradient_sq(field: torch.Tensor) -> torch.Tensor:
    """|grad u|^2 for each channel u of (N, C, H, W), by central differences (one-sided at edges)."""
    h, w = field.shape[-2:]
    dy = torch.gradient(field, dim=-2)[0] if h > 1 else torch.zeros_like(field)
    dx = torch.gradient(field, dim=-1)[0] if w > 1 else torch.zeros_like(field)
    return dx.pow(2) + dy.pow(2)


@dataclass
class Reliability:
    """Where frame t-1's warped content can be trusted on frame t."""

    weights: torch.Tensor  # (1, 1, H, W): 1 where reliable, 0 at disocclusions and motion boundaries
    disoccluded: torch.Tensor  # (1, 1, H, W) bool: not visible in frame t-1 (or warped from outside it)
    motion_boundary: torch.Tensor  # (1, 1, H, W) bool

    @property
    def fraction(self) -> float:
        """Share of pixels that are reliable."""
        return float(self.weights.mean())


def reliability(forward: torch.Tensor, backward: torch.Tensor) -> Reliability:
    """Ruder et al. 2016, section 3.2, with their thresholds.

    Disocclusion: the forward flow, warped to frame t, should cancel the backward flow, so p is
    marked where |f~ + b|^2 > 0.01 (|f~|^2 + |b|^2) + 0.5 (f~ = forward sampled at p + b(p)).
    Motion boundary: where |grad b_x|^2 + |grad b_y|^2 > 0.01 |b|^2 + 0.002. A position that the
    backward flow sends outside the frame counts as disoccluded as well.
    """
    forward, backward = forward.float(), backward.float()
    f_t, inside = warp(forward, backward)  # (1, 2, H, W)
    s = (f_t + backward).pow(2).sum(1, keepdim=True)
    disoccluded = (s > 0.01 * (f_t.pow(2).sum(1, keepdim=True) + backward.pow(2).sum(1, keepdim=True)) + 0.5) | ~inside
    grad = _gradient_sq(backward).sum(1, keepdim=True)
    boundary = grad > 0.01 * backward.pow(2).sum(1, keepdim=True) + 0.002
    weights = (~(disoccluded | boundary)).float()
    return Reliability(weights, disoccluded, boundary)
