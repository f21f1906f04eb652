"""Colour preservation (Gatys, Bethge, Hertzmann, Shechtman 2016, "Preserving Color in Neural
Artistic Style Transfer"): luminance-only transfer, and colour histogram matching."""

from __future__ import annotations

import torch

# RGB <-> YIQ, the colour space the paper uses for luminance-only transfer.
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> YIQ (Y in [0, 1])."""
    m = _RGB_TO_YIQ.to(image.device, image.dtype)
    return torch.einsum("ij,njhw->nihw", m, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(_RGB_TO_YIQ.double()).to(image.device, image.dtype)
    return torch.einsum("ij,njhw->nihw", m, image)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """The Y channel repeated into three, so VGG sees a grey image of the same brightness."""
    return rgb_to_yiq(image)[:, :1].expand(-1, 3, -1, -1).contiguous()


def match_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Grey style image whose luminance mean and spread match the content's (paper, eq. 1)."""
    ys, yc = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    y = (ys - ys.mean()) * (yc.std() / ys.std().clamp_min(1e-8)) + yc.mean()
    return y.expand(-1, 3, -1, -1).contiguous()


def combine_luminance(stylised: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The stylised image's luminance with the content's I and Q (its colour)."""
    y = rgb_to_yiq(stylised)[:, :1]
    iq = rgb_to_yiq(content)[:, 1:]
    if iq.shape[-2:] != y.shape[-2:]:
        iq = torch.nn.functional.interpolate(iq, size=y.shape[-2:], mode="bilinear", align_corners=False)
    return yiq_to_rgb(torch.cat([y, iq], dim=1)).clamp(0, 1)


def _sqrtm(cov: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Symmetric square root (or its inverse) of a 3x3 covariance, via eigendecomposition."""
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(1e-10)
    d = vals.rsqrt() if inverse else vals.sqrt()
    return vecs @ torch.diag(d) @ vecs.T


def match_histogram(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style image recoloured so its colours' mean and covariance match the content's.

    x' = A (x - mu_s) + mu_c with A = Sigma_c^(1/2) Sigma_s^(-1/2): the paper's linear colour
    transfer (the "image analogies" variant), applied before the run.
    """
    s = style[0].double().reshape(3, -1)  # (3, HW)
    c = content[0].double().reshape(3, -1)
    mu_s, mu_c = s.mean(1, keepdim=True), c.mean(1, keepdim=True)
    eye = torch.eye(3, dtype=torch.float64, device=s.device) * 1e-5
    cov_s = torch.cov(s) + eye
    cov_c = torch.cov(c) + eye
    a = _sqrtm(cov_c) @ _sqrtm(cov_s, inverse=True)
    out = (a @ (s - mu_s) + mu_c).reshape_as(style[0]).unsqueeze(0)
    return out.clamp(0, 1).to(style.dtype)
