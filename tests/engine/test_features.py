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
