"""Content, style (Gram) and total variation losses, in two normalisations.

Gram matrices and loss sums are always accumulated and returned in fp32, whatever precision the
network ran in: fp16 Grams overflow (sums of squared activations pass 65504) and bf16 sums lose
the small terms. bf16 features on a CUDA GPU are multiplied as they are, into fp32 (`_Gram`).
"""

from __future__ import annotations

import functools

import torch

from .config import LossForm


class _Gram(torch.autograd.Function):
    """`F^T F` over positions, with a backward of one matrix product instead of autograd's two.

    G = F^T F gives dF = F (dG + dG^T): symmetrising the small (C, C) gradient first halves the
    big products. `positions_first`: F is (..., positions, C) (a view of a channels-last map)
    rather than (..., C, positions) (a view of an NCHW one), so neither layout is copied.

    F in bf16 (only on CUDA, see `_tensor_core_gram`): the product runs on the tensor cores with
    fp32 accumulation and an fp32 result, the same products as converting F first (a product of
    two bf16 numbers is exact in fp32). Its backward rounds dG + dG^T to bf16, as the network's
    own bf16 backward rounds every gradient.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, positions_first: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f)
        ctx.positions_first = positions_first
        a, b = (f.mT, f) if positions_first else (f, f.mT)
        if f.dtype != torch.bfloat16:
            return a @ b
        return (torch.mm if f.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, dg: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (f,) = ctx.saved_tensors
        sym = (dg + dg.mT).to(f.dtype)
        return (f @ sym if ctx.positions_first else sym @ f), None


@functools.cache
def _mm_to_fp32_runs(device: torch.device) -> bool:
    """Whether `torch.mm(bf16, bf16, out_dtype=float32)` runs on `device` (CUDA builds of recent
    torch; asked once per device, outside any CUDA-graph capture since warm-up calls it first)."""
    try:
        x = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
        return bool(torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _tensor_core_gram(features: torch.Tensor) -> bool:
    """bf16 features on a CUDA GPU that can multiply them into fp32. Not fp16: its (dG + dG^T)
    could pass 65504. Not the CPU: torch has no such product there, and converting is cheap."""
    return features.is_cuda and features.dtype == torch.bfloat16 and _mm_to_fp32_runs(features.device)


def gram_matrix(features: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, C) Gram matrix `F F^T` over positions, in fp32.

    Normalised (divided by C*H*W) its entries are averages, so they do not grow with image size
    and a style weight means the same at 256 px as at 2048 px.
    """
    n, c, h, w = features.shape
    f = features if _tensor_core_gram(features) else features.float()
    positions_first = f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
    if positions_first:
        f = f.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the NHWC memory
    else:
        f = f.reshape(n, c, h * w)
    if n == 1:  # a plain matrix product: faster than a batch of one
        g = _Gram.apply(f[0], positions_first).unsqueeze(0)
    else:
        g = _Gram.apply(f, positions_first)
    return g / (c * h * w) if normalize else g


def guided_gram(features: torch.Tensor, guide: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """(N, C, h, w) features and (1 or N, 1, h, w) guidance -> (N, C, C) guided Gram in fp32.

    G = sum_p t_p^2 f_p f_p^T, the Gram of the features times the guidance channel. Normalised, it
    is divided by C * sum_p t_p^2 (the guidance's energy) rather than by C*h*w: a region's Gram is
    then an average over the region, matched as strongly whether it covers a tenth of the image
    or all of it, and a guidance of ones gives exactly `gram_matrix`.
    """
    f = features.float() * guide.float()
    g = gram_matrix(f, normalize=False)
    if not normalize:
        return g
    energy = guide.float().pow(2).flatten(1).sum(1)  # (1 or N,)
    # A region that pooling emptied at a deep layer: a zero Gram with zero gradient, not a NaN.
    return g / (features.shape[1] * energy.clamp_min(torch.finfo(torch.float32).tiny)).view(-1, 1, 1)


def _reduce(t: torch.Tensor, *, mean: bool, per_image: bool) -> torch.Tensor:
    """Mean or sum over everything (0-dim), or over each image of the batch (N,)."""
    if per_image:
        t = t.flatten(1)
        return t.mean(1) if mean else t.sum(1)
    return t.mean() if mean else t.sum()


def content_loss(
    features: torch.Tensor, target: torch.Tensor, *, form: LossForm = LossForm.NORMALIZED, per_image: bool = False, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error of features: the mean (normalized) or the plain sum (keras). `per_image`:
    one value per image of an (N, ...) batch, each what the image alone would give. `weight`:
    a (1, 1, h, w) map multiplying each position's squared error (a content mask); the mean is
    still over every position, so a map of ones changes nothing."""
    diff = features.float() - target.float()
    sq = diff.pow(2) if weight is None else diff.pow(2) * weight.float()
    return _reduce(sq, mean=form == LossForm.NORMALIZED, per_image=per_image)


def style_loss(
    features: torch.Tensor,
    target_gram: torch.Tensor,
    *,
    form: LossForm = LossForm.NORMALIZED,
    image_pixels: int | None = None,
    per_image: bool = False,
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error of Gram matrices against a target Gram (already in the same form); with
    `per_image`, one value per image of the batch (targets (N, C, C), or (1, C, C) for all).
    `guide`: the output's Gram is the guided Gram under this (1, 1, h, w) guidance channel
    (`guided_gram`; in the keras form scaled back to a sum over C*h*w positions).

    keras: `sum((G_style - G_out)**2) / (4 * 3**2 * (H*W)**2)` with unnormalised Grams, where 3
    and H*W are the *image's* channels and pixel count, not the layer's. That is a quirk of the
    notebook this project began from (the paper uses the layer's N_l and M_l), kept so that its
    weights mean what they meant there.
    """
    if form == LossForm.NORMALIZED:
        g = gram_matrix(features) if guide is None else guided_gram(features, guide)
    elif guide is None:
        g = gram_matrix(features, normalize=False)
    else:
        _, c, h, w = features.shape
        g = guided_gram(features, guide) * (c * h * w)
    return gram_style_loss(g, target_gram, form=form, image_pixels=image_pixels, per_image=per_image)


def gram_style_loss(
    gram: torch.Tensor,
    target_gram: torch.Tensor,
    *,
    form: LossForm = LossForm.NORMALIZED,
    image_pixels: int | None = None,
    per_image: bool = False,
) -> torch.Tensor:
    """`style_loss` from the output's (plain or guided) Gram, already in the form's normalisation,
    rather than its features: `style_loss` ends here, and a tiled evaluation, whose Gram is summed
    over the tiles, calls it directly."""
    if form == LossForm.NORMALIZED:
        return _reduce((gram - target_gram).pow(2), mean=True, per_image=per_image)
    if image_pixels is None:
        raise ValueError("the keras style loss needs image_pixels (the image's H*W)")
    return _reduce((target_gram - gram).pow(2), mean=False, per_image=per_image) / (4.0 * 3**2 * float(image_pixels) ** 2)


def tv_loss(image: torch.Tensor, *, form: LossForm = LossForm.NORMALIZED, per_image: bool = False) -> torch.Tensor:
    """Total variation of an (N, 3, H, W) image (`per_image`: of each image, (N,)).

    normalized: mean squared neighbour difference, vertical plus horizontal.
    keras: `sum((a + b)**1.25)` with `a`, `b` the squared vertical and horizontal differences
    over the (H-1)x(W-1) top-left block, as the notebook computes it.
    """
    x = image.float()
    if form == LossForm.NORMALIZED:
        dy = x[:, :, 1:, :] - x[:, :, :-1, :]
        dx = x[:, :, :, 1:] - x[:, :, :, :-1]
        # A 1 px thin image has no pairs that way: that term is 0 (the mean of nothing was nan).
        return sum(_reduce(d.pow(2), mean=True, per_image=per_image) if d.numel() else d.sum(dim=(1, 2, 3) if per_image else None) for d in (dy, dx))
    a = (x[:, :, :-1, :-1] - x[:, :, 1:, :-1]).pow(2)
    b = (x[:, :, :-1, :-1] - x[:, :, :-1, 1:]).pow(2)
    # (a + b) is 0 on flat areas, where the gradient of t**1.25 is 0 too: no NaN to guard.
    return _reduce((a + b).pow(1.25), mean=False, per_image=per_image)
