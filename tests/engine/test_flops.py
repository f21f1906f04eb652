"""FLOP counts against a hand count, PyTorch's own counter, and VGG19's MAC totals."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nst.engine.features import VGGFeatures
from nst.engine.flops import count_flops
from nst.engine.losses import gram_matrix


def test_hand_count_to_relu1_2_at_8x8():
    fc = count_flops((8, 8), layers=["relu1_2"], style_layers=["relu1_1"])
    conv1_1 = 2 * 3 * 64 * 9 * 8 * 8  # 221,184
    conv1_2 = 2 * 64 * 64 * 9 * 8 * 8  # 4,718,592
    relu = 64 * 8 * 8
    gram = 2 * 64 * 64 * 64
    assert fc.conv_forward == conv1_1 + conv1_2
    assert fc.conv_input_grad == conv1_1 + conv1_2  # conv1_1's input gradient is d loss / d image
    assert [layer.name for layer in fc.layers] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "gram:relu1_1"]
    assert fc.other == 2 * relu * 2 + 2 * gram  # the Gram: forward, and one product back
    assert fc.total == 2 * (conv1_1 + conv1_2) + 4 * relu + 2 * gram


def test_pools_floor_and_odd_sizes():
    fc = count_flops((9, 7), layers=["conv2_1"])
    pool = next(layer for layer in fc.layers if layer.name == "pool1")
    assert pool.shape == (64, 4, 3)
    conv2_1 = next(layer for layer in fc.layers if layer.name == "conv2_1")
    assert conv2_1.forward == 2 * 64 * 128 * 9 * 4 * 3


@pytest.mark.parametrize("hw", [(40, 36), (33, 50)])
def test_matches_torch_flop_counter(hw):
    layers = ("relu1_1", "relu2_1", "relu3_1")
    model = VGGFeatures(layers)
    x = torch.rand(1, 3, *hw, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        feats = model(x)
        sum(gram_matrix(feats[name]).sum() for name in layers).backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    fc = count_flops(hw, layers=layers, style_layers=layers)
    assert counts["aten.convolution"] == fc.conv_forward
    assert counts["aten.convolution_backward"] == fc.conv_input_grad  # frozen: no weight gradients
    assert counts["aten.mm"] == sum(layer.forward + layer.input_grad for layer in fc.layers if layer.kind == "gram")


def test_vgg19_mac_totals():
    # VGG19 MACs at 512x512 to relu5_1 94.7 G, all 16 convs 101.9 G.
    assert count_flops((512, 512), layers=["relu5_1"]).conv_forward / 2 / 1e9 == pytest.approx(94.7, abs=0.05)
    assert count_flops((512, 512), layers=["relu5_4"]).conv_forward / 2 / 1e9 == pytest.approx(101.9, abs=0.05)
    assert count_flops((1024, 1024), layers=["relu5_1"]).total == 4 * count_flops((512, 512), layers=["relu5_1"]).total


def test_forward_deeper_than_gradient_and_batch():
    fc = count_flops((32, 32), layers=["relu2_1"], batch=3, forward_to="pool5")
    single = count_flops((32, 32), layers=["relu2_1"])
    assert fc.layers[-1].name == "pool5"
    assert all(layer.input_grad == 0 for layer in fc.layers[len(single.layers):])
    assert fc.conv_input_grad == 3 * single.conv_input_grad


def test_bad_layers():
    with pytest.raises(ValueError, match="unknown layer"):
        count_flops((8, 8), layers=["relu9_9"])
    with pytest.raises(ValueError, match="at least one"):
        count_flops((8, 8), layers=[])
