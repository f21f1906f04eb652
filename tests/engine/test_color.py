"""Colour preservation on plain tensors."""

from __future__ import annotations

import torch

from nst.engine import color


def test_histogram_matching_moves_style_colours():
    style = torch.rand(1, 3, 16, 16) * torch.tensor([1.0, 0.2, 0.2]).view(1, 3, 1, 1)  # reddish
    content = torch.rand(1, 3, 16, 16) * 0.5 + torch.tensor([0.0, 0.0, 0.5]).view(1, 3, 1, 1)  # bluish
    out = color.match_histogram(style, content)
    torch.testing.assert_close(out.mean((2, 3)), content.mean((2, 3)), atol=0.03, rtol=0)
    cov_c = torch.cov(content[0].reshape(3, -1))
    cov_o = torch.cov(out[0].reshape(3, -1))
    assert (cov_c - cov_o).abs().max() < 0.01
