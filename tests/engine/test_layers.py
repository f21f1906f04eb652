"""VGG19's geometry against the network itself: the sizes the layers table predicts are the sizes
the convolutions and poolings produce."""

from __future__ import annotations

import pytest
import torch

from nst.engine.features import VGGFeatures
from nst.engine.layers import LAYER_NAMES, deepest_layer, feature_hw, layer_channels, layer_stride, min_input_size


@pytest.mark.parametrize("hw", [(32, 48), (37, 53), (32, 32)])
def test_feature_sizes_and_channels_match_the_network(hw, weights):
    net = VGGFeatures(LAYER_NAMES).eval()
    with torch.no_grad():
        feats = net(torch.rand(1, 3, *hw))
    for name in LAYER_NAMES:
        assert tuple(feats[name].shape[1:]) == (layer_channels(name), *feature_hw(hw, name)), name


def test_strides_deepest_and_smallest_input():
    assert [layer_stride(n) for n in ("relu1_1", "pool1", "relu2_1", "relu5_1", "pool5")] == [1, 2, 2, 16, 32]
    assert deepest_layer(["relu4_2", "relu1_1", "relu5_1", "relu3_1"]) == "relu5_1"
    assert min_input_size(["relu1_1", "relu4_2"]) == 8 and min_input_size(["conv1_1"]) == 1
    # the smallest input leaves one pixel at the deepest layer, one less leaves none
    assert feature_hw((8, 8), "relu4_2") == (1, 1) and feature_hw((7, 8), "relu4_2") == (0, 1)


def test_receptive_fields_are_vgg19s():
    from nst.engine.layers import receptive_field, receptive_reach

    assert [receptive_field(n) for n in ("conv1_1", "relu1_2", "pool1", "relu4_4", "relu5_1", "relu5_2")] == [3, 5, 6, 116, 156, 188]
    assert receptive_reach("relu5_1") == 70


def test_receptive_reach_is_where_a_change_stops_reaching():
    """A pixel changed `reach + stride` px away from an output cell leaves it alone; one nearer moves it."""
    from nst.engine.layers import receptive_reach

    net = VGGFeatures(["relu3_1"]).eval()
    reach, stride = receptive_reach("relu3_1"), layer_stride("relu3_1")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net(x)["relu3_1"][0, :, :, 4]  # column 4: input columns 16..19
        far, near = x.clone(), x.clone()
        far[..., 4 * stride + stride + reach] += 1.0
        near[..., 4 * stride + stride + reach - 1] += 1.0
        assert torch.equal(net(far)["relu3_1"][0, :, :, 4], base)
        assert not torch.equal(net(near)["relu3_1"][0, :, :, 4], base)


def test_tile_margins_shrink_from_the_halo_to_nothing_on_the_pooling_grid():
    """What a tile's crop keeps at each layer (`VGGFeatures.forward`'s `owned`): the halo at the
    first layer, the reach still to come after it, on 16 px steps while a pooling is to come."""
    from nst.engine.layers import receptive_reach, tile_margins
    from nst.engine.tiles import tile_halo

    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "relu4_2"]
    m = tile_margins(layers)
    assert list(m) == list(LAYER_NAMES[: LAYER_NAMES.index("relu5_1") + 1])
    assert m["conv1_1"] == tile_halo(layers) == 80 and m["relu5_1"] == 0 and m["conv5_1"] == 0
    assert m["pool4"] == 16 and m["conv4_4"] == 16 and m["conv4_1"] == 48 and m["conv3_1"] == 64
    assert all(a >= b for a, b in zip(m.values(), list(m.values())[1:]))  # never grows with depth
    for name, margin in m.items():
        reach_left = receptive_reach("relu5_1") - receptive_reach(name)
        assert margin >= reach_left and (margin % 16 == 0 or layer_stride(name) == 16), name
