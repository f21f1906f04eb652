"""Spatial control: guided Gram matrices, guidance at each layer, and masked runs (random weights, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine.config import LossForm, Precision, preset
from nst.engine.device import Runtime
from nst.engine.errors import ConfigError
from nst.engine.features import VGGFeatures
from nst.engine.images import ImageError, to_tensor
from nst.engine.layers import feature_hw
from nst.engine.losses import content_loss, gram_matrix, guided_gram, style_loss
from nst.engine.masks import group_styles, layer_guides, load_mask, make_guidance, mask_tensor, stage_guide
from nst.engine.transfer import build_model, stylize, target_key

FP32 = Runtime(device=torch.device("cpu"), precision=Precision.FP32)
SHALLOW = dict(style_layers=("relu1_1", "relu2_1", "relu3_1"), content_layers=("relu3_2",), style_layer_weights=())


def _halves(w: int, h: int) -> tuple[Image.Image, Image.Image]:
    left = Image.new("L", (w, h), 0)
    left.paste(255, (0, 0, w // 2, h))
    return left, Image.eval(left, lambda v: 255 - v)


def _feats(seed: int = 0, shape: tuple[int, ...] = (1, 8, 12, 10)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_a_guidance_of_ones_is_the_plain_gram():
    f = _feats()
    assert torch.equal(guided_gram(f, torch.ones(1, 1, 12, 10)), gram_matrix(f))
    cl = f.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(guided_gram(cl, torch.ones(1, 1, 12, 10)), gram_matrix(f), rtol=1e-6, atol=0)
    assert torch.equal(guided_gram(f, torch.ones(1, 1, 12, 10), normalize=False), gram_matrix(f, normalize=False))


def test_guided_gram_is_the_regions_own_average_whatever_its_size():
    """Normalised by the guidance's energy: a binary region's guided Gram is the plain Gram of its
    positions alone, so a 2-column region weighs as much as the whole image; a uniform scale of
    the guidance changes nothing."""
    f = _feats(1)
    for cols in (2, 5, 10):
        m = torch.zeros(1, 1, 12, 10)
        m[..., :cols] = 1
        assert torch.allclose(guided_gram(f, m), gram_matrix(f[..., :cols]), rtol=1e-5, atol=1e-7)
        assert torch.allclose(guided_gram(f, 0.3 * m), guided_gram(f, m), rtol=1e-5, atol=1e-7)
    soft = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(2))
    expect = torch.einsum("p,cp,dp->cd", soft.flatten() ** 2, f[0].flatten(1), f[0].flatten(1)) / (8 * soft.pow(2).sum())
    assert torch.allclose(guided_gram(f, soft)[0], expect, rtol=1e-5, atol=1e-7)
    # A region that pooling emptied gives zeros, not NaN.
    assert torch.equal(guided_gram(f, torch.zeros(1, 1, 12, 10)), torch.zeros(1, 8, 8))


def test_guided_losses_with_ones_equal_the_plain_ones():
    f, t = _feats(3), _feats(4)
    target = gram_matrix(t)
    ones = torch.ones(1, 1, 12, 10)
    assert torch.equal(style_loss(f, target, guide=ones), style_loss(f, target))
    kt = gram_matrix(t, normalize=False)
    assert torch.allclose(style_loss(f, kt, form=LossForm.KERAS, image_pixels=96, guide=ones), style_loss(f, kt, form=LossForm.KERAS, image_pixels=96), rtol=1e-6)
    assert torch.equal(content_loss(f, t, weight=ones), content_loss(f, t))
    half = torch.zeros(1, 1, 12, 10)
    half[..., :5] = 1
    assert torch.allclose(content_loss(f, t, weight=half), (f - t)[..., :5].pow(2).sum() / f.numel())


def test_layer_guides_average_the_pixels_each_position_stands_for():
    m = torch.rand(1, 1, 37, 50, generator=torch.Generator().manual_seed(5))
    guides = layer_guides(m, ["relu1_1", "relu2_1", "relu3_1", "relu5_1"])
    for name, g in guides.items():
        assert tuple(g.shape[-2:]) == feature_hw((37, 50), name)  # floors as the network does
        assert 0 <= float(g.min()) and float(g.max()) <= 1
    assert torch.equal(guides["relu1_1"], m)
    assert torch.allclose(guides["relu2_1"][0, 0, 3, 4], m[0, 0, 6:8, 8:10].mean())
    assert torch.allclose(guides["relu3_1"][0, 0, 1, 2], m[0, 0, 4:8, 8:12].mean())
    # To a stage's size: area averaging when shrinking keeps the covered share.
    left = mask_tensor(_halves(100, 60)[0])
    g = stage_guide(left, (30, 50))
    assert g.shape == (1, 1, 30, 50) and float(g.mean()) == pytest.approx(0.5) and float(g[..., :25].min()) == 1.0


def test_styles_under_identical_masks_share_one_group():
    a, b = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    b[..., 0] = 1
    assert group_styles([a, b, a.clone(), None, None]) == [([0, 2], a), ([1], b), ([3, 4], None)]


def test_mask_checks(tmp_path: Path):
    content = Image.new("RGB", (96, 64))
    styles = [[Image.new("RGB", (40, 40)), Image.new("RGB", (40, 40))]]
    left, right = _halves(96, 64)
    with pytest.raises(ConfigError, match="1 mask.*2 style"):
        make_guidance([content], styles, masks=[left], style_regions=None, content_mask=None)
    with pytest.raises(ImageError, match="all black"):
        make_guidance([content], styles, masks=[left, Image.new("L", (96, 64), 0)], style_regions=None, content_mask=None)
    with pytest.raises(ImageError, match="aspect"):
        make_guidance([content], styles, masks=[left, Image.new("L", (96, 60), 255)], style_regions=None, content_mask=None)
    with pytest.raises(ImageError, match="style image 1"):
        make_guidance([content], styles, masks=None, style_regions=[left, None], content_mask=None)
    # Within 1%: 192x127 against 96x64 (0.8%); `-` (None) everywhere.
    g = make_guidance([content], styles, masks=[Image.new("L", (192, 127), 255), None], style_regions=None, content_mask=right)
    assert g.masked and g.masks[1] is None and g.content_mask is not None


def test_a_float_mask_keeps_its_weights(tmp_path: Path):
    """A float (mode F) mask file within 0-1 is read as those weights: a uniform 0.5 is half
    weight (it was stretched from its min-max: all black, refused), 0.25-0.75 is not made 0-1."""
    flat, ramp = tmp_path / "half.tif", tmp_path / "ramp.tif"
    Image.fromarray(np.full((64, 96), 0.5, np.float32), "F").save(flat)
    Image.fromarray(np.tile(np.linspace(0.25, 0.75, 96, dtype=np.float32), (64, 1)), "F").save(ramp)
    half = mask_tensor(load_mask(str(flat), param="content_mask"))
    assert torch.allclose(half, torch.full_like(half, 128 / 255))
    weights = mask_tensor(load_mask(str(ramp), param="masks"))[0, 0, 0]
    assert abs(weights[0].item() - 0.25) < 0.005 and abs(weights[-1].item() - 0.75) < 0.005


def test_pixels_no_mask_covers_get_no_style_gradient(weights):
    """Beyond the receptive field of relu1_1 (3 px) from the mask, the style term's gradient is 0."""
    from nst.engine.objective import make_objective
    from nst.engine.masks import StyleGroup

    cfg = preset("gatys", size=32, style_layers=("relu1_1",), content_layers=("relu1_1",))
    model = build_model(cfg, weights, FP32)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    m = torch.zeros(1, 1, 32, 40)
    m[..., :10] = 1
    target = {"relu1_1": gram_matrix(model(torch.rand(1, 3, 32, 32))["relu1_1"])}
    group = StyleGroup(1.0, target, layer_guides(m, cfg.style_layers))
    obj = make_objective(model, FP32, cfg, {"relu1_1": model(x.detach())["relu1_1"]}, {}, (32, 40), style_groups=[group])
    obj.terms(x)["style"].backward()
    g = x.grad[0].abs().sum(0)  # (H, W)
    assert float(g[:, :10].sum()) > 0 and float(g[:, 12:].abs().max()) == 0.0


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + seed)), np.cos(yy / (4 + seed)), np.sin((xx + yy) / 5)], -1)
    return Image.fromarray(((base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1) * 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def pictures() -> dict[str, Image.Image]:
    """A synthetic 96x64 content (random weights move it within a few iterations in fp32) and the
    two example paintings as styles A and B."""
    root = Path(__file__).resolve().parents[2] / "examples"
    styles = {n: Image.open(root / f).convert("RGB") for n, f in (("a", "the_scream.jpg"), ("b", "starry_night.jpeg"))}
    return {"content": _pattern(96, 64, 1), **styles}


def _half_grams(model: VGGFeatures, image: torch.Tensor, layers) -> tuple[dict, dict]:
    w = image.shape[-1]
    with torch.no_grad():
        left, right = model(image[..., : w // 2]), model(image[..., w // 2 :])
    return {k: gram_matrix(left[k]) for k in layers}, {k: gram_matrix(right[k]) for k in layers}


def test_left_and_right_masks_put_each_style_on_its_half(weights, pictures):
    """The issue's test at 96 px: style A masked to the left half, B to the right. Measured with
    the same network on each half of the output: the left half's Grams (relu1_1..relu3_1) are
    nearer A's than B's, the right half's nearer B's. The content starts nearer B on both halves
    (checked), so the left half had to move. 20 iterations (the CLI's check uses 60)."""
    content, a, b = pictures["content"], pictures["a"], pictures["b"]
    cfg = preset("gatys", size=96, iterations=20, **SHALLOW)
    result = stylize(content, [a, b], cfg, weights=weights, runtime=FP32, masks=list(_halves(*content.size)))
    assert result.image.shape[-1] == 96
    model = build_model(cfg, weights, FP32)
    with torch.no_grad():
        ga, gb = ({k: gram_matrix(v) for k, v in model(to_tensor(s.resize((96, 96)))).items()} for s in (a, b))
    dist = lambda g, t: float((g - t).norm())  # noqa: E731
    c_left, _ = _half_grams(model, to_tensor(content), cfg.style_layers)
    assert all(dist(c_left[k], ga[k]) > dist(c_left[k], gb[k]) for k in cfg.style_layers)  # where it started
    left, right = _half_grams(model, result.image, cfg.style_layers)
    for k in cfg.style_layers:
        assert dist(left[k], ga[k]) < dist(left[k], gb[k]), k
        assert dist(right[k], gb[k]) < dist(right[k], ga[k]), k


def test_all_white_masks_give_the_unmasked_image(weights, pictures):
    """Two styles, both masks white (and a white content mask): the guided terms reduce to the
    plain ones, so the image matches the unmasked run within one 8-bit level."""
    content, a, b = pictures["content"], pictures["a"], pictures["b"]
    cfg = preset("gatys", size=48, iterations=8, **SHALLOW)
    white = Image.new("L", content.size, 255)
    plain = stylize(content, [a, b], cfg, weights=weights, runtime=FP32).image
    masked = stylize(content, [a, b], cfg, weights=weights, runtime=FP32, masks=[white, white], content_mask=white).image
    assert float((masked - plain).abs().max()) * 255 <= 1.0
    assert float((plain - to_tensor(content.resize((48, 32)))).abs().max()) * 255 > 8  # the run did move


def test_style_regions_and_multiscale(weights, pictures):
    """A region of ones gives the whole image's targets; a half region other ones; masks follow
    every scale; regional targets are cached under a key with the region in it."""
    content, a = pictures["content"], pictures["a"]
    cfg = preset("gatys", size=48, scales=(32, 48), iterations=2, **SHALLOW)
    whole = stylize(content, [a], cfg, weights=weights, runtime=FP32).image
    ones = stylize(content, [a], cfg, weights=weights, runtime=FP32, style_regions=[Image.new("L", a.size, 255)]).image
    assert float((ones - whole).abs().max()) * 255 <= 1.0
    left, _ = _halves(*a.size)
    half = stylize(content, [a], cfg, weights=weights, runtime=FP32, style_regions=[left], masks=[_halves(*content.size)[1]], content_mask=_halves(*content.size)[0])
    assert half.image.shape == whole.shape and float((half.image - whole).abs().max()) * 255 > 1.0
    image = torch.rand(1, 3, 8, 8)
    keys = {target_key(model="m", image=image, content_layers=(), style_layers=("relu1_1",), style_scale=1.0, region=r) for r in (None, torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))}
    assert len(keys) == 3


def test_region_targets_are_cached(weights, pictures, tmp_path: Path):
    from nst.engine.cache import TargetCache

    content, a = pictures["content"], pictures["a"]
    cfg = preset("gatys", size=32, iterations=3, **SHALLOW)
    cache = TargetCache(tmp_path / "c", namespace="torch-fp32")
    region = [_halves(*a.size)[0]]
    first = stylize(content, [a], cfg, weights=weights, runtime=FP32, cache=cache, style_regions=region)
    again = stylize(content, [a], cfg, weights=weights, runtime=FP32, cache=cache, style_regions=region)
    other = stylize(content, [a], cfg, weights=weights, runtime=FP32, cache=cache, style_regions=[_halves(*a.size)[1]])
    assert first.targets["cache"] == "miss" and again.targets["cache"] == "hit" and other.targets["cache"] == "miss"
    assert torch.equal(first.image, again.image) and not torch.equal(first.image, other.image)
    assert len(cache.entries()) == 3  # the content's, and one per region


def test_masked_batch_matches_single_runs(weights, pictures):
    """Masks through `stylize_many`: each image of a batch gets what it gets alone."""
    from nst.engine.transfer import stylize_many

    content, a, b = pictures["content"], pictures["a"], pictures["b"]
    other = content.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cfg = preset("gatys", size=32, iterations=3, **SHALLOW)
    masks = list(_halves(*content.size))
    together = stylize_many([content, other], [[a, b], [b, a]], cfg, weights=weights, runtime=FP32, masks=masks)
    for res, c, st in zip(together, (content, other), ([a, b], [b, a])):
        alone = stylize(c, st, cfg, weights=weights, runtime=FP32, masks=masks)
        assert float((res.image - alone.image).abs().max()) * 255 <= 1.0
