"""The temporal loss (Ruder et al. 2016, eq. 7) and the flicker measure reported per frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def temporal_loss(image: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/D) sum_k c_k (x_k - w_k)^2 over D = C*H*W values: the weighted mean squared distance
    from the warped previous output `target`, `weights` (1, 1, H, W) broadcast over channels."""
    diff = image.float() - target.float()
    return (weights * diff.pow(2)).sum() / diff.numel()


class TemporalTerm:
    """The temporal loss as an extra objective term (`stylize(..., extra_terms=...)`), times `weight`.

    With coarse-to-fine scales the optimised image is smaller at first: the target and weights
    follow it down by area averaging, so each stage is held to the same previous frame.
    """

    def __init__(self, target: torch.Tensor, weights: torch.Tensor, weight: float) -> None:
        self.target, self.weights, self.weight = target, weights, float(weight)
        self._resized: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _at(self, hw: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if hw not in self._resized:
            t, w = self.target.to(device, torch.float32), self.weights.to(device, torch.float32)
            if tuple(t.shape[-2:]) != hw:
                t = F.interpolate(t, size=hw, mode="area")
                w = F.interpolate(w, size=hw, mode="area")
            self._resized[hw] = (t, w)
        return self._resized[hw]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        target, weights = self._at(tuple(image.shape[-2:]), image.device)
        return self.weight * temporal_loss(image, target, weights)


def to_levels(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the 8-bit values a saved frame holds, as floats."""
    return (image.float().clamp(0, 1) * 255.0 + 0.5).floor()


def warping_error(image: torch.Tensor, warped_previous: torch.Tensor, weights: torch.Tensor) -> float | None:
    """Flicker: the mean absolute difference, in 8-bit levels, between a frame's output and the
    previous output warped onto it, over the reliable pixels (None when none is)."""
    total = weights.sum() * image.shape[1]
    if float(total) == 0:
        return None
    # The output as saved (8-bit); the warped previous output is an interpolation, left unrounded.
    diff = (to_levels(image) - warped_previous.float() * 255.0).abs()
    return float((weights * diff).sum() / total)
