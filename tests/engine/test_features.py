"""Layer names against torchvision's VGG19 indices, cutting, pooling, freezing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import vgg19

from nst.engine.config import Pooling
from nst.engine.features import LAYER_INDEX, LAYER_NAMES, VGGFeatures, layer_channels, layer_stride
from nst.engine.weights import load_into


@pytest.fixture(scope="module")
def tv_features():
    return vgg19(weights=None).features.eval()


def test_names_follow_torchvision_indices(tv_features):
    assert len(LAYER_NAMES) == len(tv_features) == 37
    for name, i in LAYER_INDEX.items():
        kind = type(tv_features[i]).__name__
        expect = {"conv": "Conv2d", "relu": "ReLU", "pool": "MaxPool2d"}[name[:4]]
        assert kind == expect, (name, i, kind)
    # Landmarks people look up: conv4_2 is features[21], relu5_1 is features[29].
    assert LAYER_INDEX["conv4_2"] == 21 and LAYER_INDEX["relu5_1"] == 29 and LAYER_INDEX["pool5"] == 36
    assert tv_features[LAYER_INDEX["conv5_4"]].out_channels == layer_channels("relu5_4") == 512
    assert layer_stride("relu1_1") == 1 and layer_stride("pool1") == 2 and layer_stride("relu5_1") == 16


def test_same_outputs_as_torchvision(tv_features, weights):
    load_into(tv_features, weights)
    model = VGGFeatures(["conv1_2", "relu2_1", "relu4_2"])
    load_into(model.features, weights)
    x = torch.rand(1, 3, 40, 48)
    out = model(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y = (x - mean) / std
    expected = {}
    with torch.no_grad():
        for i, layer in enumerate(tv_features):
            y = layer(y.clone())
            if i in (LAYER_INDEX["conv1_2"], LAYER_INDEX["relu2_1"], LAYER_INDEX["relu4_2"]):
                expected[LAYER_NAMES[i]] = y.clone()
    for name in out:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-5)
    # A tapped conv (pre-activation) must keep its negative values: no in-place ReLU after it.
    assert (out["conv1_2"] < 0).any()


def test_cut_after_deepest_layer_frozen_and_pooling():
    m = VGGFeatures(["relu1_1", "relu3_1"], pooling=Pooling.AVG)
    assert m.depth == LAYER_INDEX["relu3_1"] + 1
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    assert any(isinstance(l, torch.nn.AvgPool2d) for l in m.features)
    assert not any(isinstance(l, torch.nn.MaxPool2d) for l in m.features)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown layer.*relu9_9"):
        VGGFeatures(["relu9_9"])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_owned_features_are_the_whole_images_and_the_halo_shrinks_with_depth(weights, channels_last):
    """`forward(owned=...)` on a tile's crop gives each tap at the tile's own positions, the whole
    image's features there (up to rounding: a narrower input can take another kernel), and runs
    each layer on less of the halo the deeper it is: conv5_2 on the tile's own cells plus the one
    around them that it reads."""
    from nst.engine.tiles import tile_grid

    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "conv5_2"]
    model = VGGFeatures(layers)
    load_into(model.features, weights)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.rand(1, 3, 312, 296, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    with torch.no_grad():
        whole = model(image)
    seen: list[tuple[int, int]] = []
    hook = model.features[LAYER_INDEX["conv5_2"]].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    tiles = tile_grid((312, 296), 64, layers)  # the last row and column end off the 16 px grid
    interior = [t for t in tiles if t.cy0 > 0 and t.cx0 > 0 and t.cy1 < 312 and t.cx1 < 296]
    assert interior  # a tile whose halo the network cuts on every side
    for t in [tiles[0], *interior, tiles[-1]]:  # a corner, cut on two sides; cut on all four; the far corner
        crop = image[:, :, t.cy0 : t.cy1, t.cx0 : t.cx1].contiguous(memory_format=fmt)
        seen.clear()
        with torch.no_grad():
            out = model(crop, owned=(t.y0 - t.cy0, t.y1 - t.cy0, t.x0 - t.cx0, t.x1 - t.cx0))
        for name in layers:
            s = layer_stride(name)
            expect = whole[name][:, :, t.y0 // s : t.y1 // s, t.x0 // s : t.x1 // s]
            assert out[name].shape == expect.shape, (t, name)
            torch.testing.assert_close(out[name], expect, rtol=0, atol=1e-5 * float(whole[name].abs().max()))
        if t in interior:  # the whole crop would be (t.cy1 - t.cy0) // 16 = 16 cells high
            assert seen == [((t.y1 - t.y0) // 16 + 2, (t.x1 - t.x0) // 16 + 2)], (t, seen)
    hook.remove()
