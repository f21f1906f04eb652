"""Losses against plain, obviously correct formulas (numpy, loops where they help)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nst.engine.config import LossForm
from nst.engine.losses import _Gram, content_loss, gram_matrix, style_loss, tv_loss


def _np_gram(f: np.ndarray) -> np.ndarray:
    c = f.shape[1]
    flat = f[0].reshape(c, -1)
    g = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            g[i, j] = float(np.sum(flat[i] * flat[j]))
    return g


def test_gram_matches_loops():
    f = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    expect = _np_gram(f.numpy())
    np.testing.assert_allclose(gram_matrix(f, normalize=False)[0].numpy(), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gram_matrix(f)[0].numpy(), expect / (4 * 5 * 6), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("positions_first", [True, False])
@pytest.mark.parametrize("batch", [None, 2])
def test_gram_one_product_backward_passes_gradcheck(positions_first, batch):
    """The hand-written backward, dF = F (dG + dG^T), against finite differences in float64."""
    shape = (7, 3) if positions_first else (3, 7)
    f = torch.randn(*((batch,) if batch else ()), *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Gram.apply(t, positions_first), (f,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("n", [1, 3])
def test_gram_value_and_gradient_match_autograd_in_either_layout(memory_format, n):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(n, 5, 4, 6, generator=gen)
    weight = torch.randn(n, 5, 5, generator=gen)  # a non-symmetric upstream gradient
    f = base.clone(memory_format=memory_format).requires_grad_(True)
    ref = base.clone().requires_grad_(True)
    assert f.is_contiguous(memory_format=memory_format)
    flat = ref.reshape(n, 5, 24)
    expect = torch.bmm(flat, flat.transpose(1, 2)) / (5 * 24)
    (expect * weight).sum().backward()
    got = gram_matrix(f)
    (got * weight).sum().backward()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("n", [1, 2])
def test_bf16_gram_path_matches_converting_first(monkeypatch, memory_format, n):
    # The CUDA-only tensor-core path (bf16 in, fp32 out), run here with torch's out_dtype product
    # emulated as "convert, then multiply": checks our layouts and the backward's rounding.
    import nst.engine.losses as losses

    real_mm, real_bmm = torch.mm, torch.bmm

    def emulate(real):
        def op(a, b, *, out_dtype=None):
            return real(a.float(), b.float()) if out_dtype is not None else real(a, b)

        return op

    monkeypatch.setattr(torch, "mm", emulate(real_mm))
    monkeypatch.setattr(torch, "bmm", emulate(real_bmm))
    monkeypatch.setattr(losses, "_tensor_core_gram", lambda f: f.dtype == torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(n, 6, 5, 7, generator=gen).to(torch.bfloat16)
    weight = torch.randn(n, 6, 6, generator=gen)
    fast = base.clone(memory_format=memory_format).requires_grad_(True)
    plain = base.float().requires_grad_(True)
    g = gram_matrix(fast)
    assert g.dtype == torch.float32
    (g * weight).sum().backward()
    want = gram_matrix(plain)
    (want * weight).sum().backward()
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)  # the same exact products
    assert fast.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fast.grad.float(), plain.grad, rtol=2e-2, atol=1e-3)  # bf16 rounding


def test_gram_is_fp32_for_half_features():
    f = torch.randn(1, 8, 6, 6).to(torch.bfloat16)
    assert gram_matrix(f).dtype == torch.float32


def test_normalised_gram_is_size_invariant():
    """A texture tiled to 4x the area has the same normalised Gram: weights mean the same at any size."""
    f = torch.rand(1, 6, 8, 8)
    tiled = f.repeat(1, 1, 2, 2)  # same statistics, 4x the positions
    torch.testing.assert_close(gram_matrix(f), gram_matrix(tiled), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(gram_matrix(f, normalize=False), gram_matrix(tiled, normalize=False))
    g = gram_matrix(f)
    assert style_loss(f, g).item() == pytest.approx(0.0, abs=1e-12)
    assert style_loss(tiled, g).item() == pytest.approx(0.0, abs=1e-10)


def test_content_loss_forms():
    a, b = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    d = (a - b).numpy()
    assert content_loss(a, b).item() == pytest.approx(float((d**2).mean()), rel=1e-5)
    assert content_loss(a, b, form=LossForm.KERAS).item() == pytest.approx(float((d**2).sum()), rel=1e-5)


def test_keras_style_loss_uses_image_channels_and_pixels():
    f = torch.rand(1, 5, 4, 4)
    target = torch.rand(5, 5)[None] * 10
    pixels = 32 * 48
    expect = float(((target[0].numpy() - _np_gram(f.numpy())) ** 2).sum()) / (4 * 9 * pixels**2)
    got = style_loss(f, target, form=LossForm.KERAS, image_pixels=pixels).item()
    assert got == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="image_pixels"):
        style_loss(f, target, form=LossForm.KERAS)


def test_normalised_style_loss_is_mse_of_grams():
    f, t = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 3)
    g = _np_gram(f.numpy()) / (3 * 16)
    assert style_loss(f, t).item() == pytest.approx(float(((g - t[0].numpy()) ** 2).mean()), rel=1e-5)


def test_tv_keras_matches_loops():
    x = torch.rand(1, 3, 5, 7) * 255
    a = x.numpy()[0]
    total = 0.0
    for c in range(3):
        for i in range(4):
            for j in range(6):
                dv = (a[c, i, j] - a[c, i + 1, j]) ** 2
                dh = (a[c, i, j] - a[c, i, j + 1]) ** 2
                total += (dv + dh) ** 1.25
    assert tv_loss(x, form=LossForm.KERAS).item() == pytest.approx(total, rel=1e-4)


def test_tv_normalised_and_flat_image():
    x = torch.rand(1, 3, 6, 6)
    a = x.numpy()
    expect = float(((a[:, :, 1:] - a[:, :, :-1]) ** 2).mean() + ((a[:, :, :, 1:] - a[:, :, :, :-1]) ** 2).mean())
    assert tv_loss(x).item() == pytest.approx(expect, rel=1e-5)
    row = torch.rand(2, 3, 1, 6, requires_grad=True)  # no vertical pairs: that term is 0, not the mean of nothing (nan)
    r = row.detach().numpy()
    assert tv_loss(row).item() == pytest.approx(float(((r[:, :, :, 1:] - r[:, :, :, :-1]) ** 2).mean()), rel=1e-5)
    tv_loss(row, per_image=True).sum().backward()
    assert torch.isfinite(row.grad).all() and tv_loss(torch.rand(1, 3, 1, 1)).item() == 0
    flat = torch.full((1, 3, 6, 6), 0.5, requires_grad=True)
    tv_loss(flat, form=LossForm.KERAS).backward()  # (a+b)**1.25 at 0 must not give NaN
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("form", [LossForm.NORMALIZED, LossForm.KERAS])
def test_per_image_losses_equal_each_image_alone(form):
    """A batch's per-image losses are what each image gives by itself (the batched optimisation
    sums them, so each image's gradient is its own)."""
    g = torch.Generator().manual_seed(3)
    feats, target = torch.rand(3, 8, 6, 5, generator=g), torch.rand(3, 8, 6, 5, generator=g)
    grams = torch.rand(3, 8, 8, generator=g)
    image = torch.rand(3, 3, 12, 10, generator=g)
    c = content_loss(feats, target, form=form, per_image=True)
    s = style_loss(feats, grams, form=form, image_pixels=120, per_image=True)
    t = tv_loss(image, form=form, per_image=True)
    assert c.shape == s.shape == t.shape == (3,)
    for i in range(3):
        one = slice(i, i + 1)
        torch.testing.assert_close(c[i], content_loss(feats[one], target[one], form=form), rtol=1e-6, atol=0)
        torch.testing.assert_close(s[i], style_loss(feats[one], grams[one], form=form, image_pixels=120), rtol=1e-6, atol=0)
        torch.testing.assert_close(t[i], tv_loss(image[one], form=form), rtol=1e-6, atol=0)
