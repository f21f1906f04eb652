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
