"""The objective against the loss written out by hand from the loss functions."""

from __future__ import annotations

import dataclasses

import torch

from nst.engine.config import GATYS, SEED, LossForm
from nst.engine.device import Runtime
from nst.engine.features import VGGFeatures
from nst.engine.losses import content_loss, gram_matrix, style_loss, tv_loss
from nst.engine.objective import make_objective, style_grams
from nst.engine.targets import TorchTargets
from nst.engine.weights import load_into


def _net(cfg, weights):
    net = VGGFeatures(cfg.content_layers + cfg.style_layers, pooling=cfg.pooling)
    load_into(net.features, weights)
    return net


def test_terms_are_the_weighted_losses(weights):
    cfg = dataclasses.replace(GATYS, content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1"), tv_weight=0.5)
    net, gen = _net(cfg, weights), torch.Generator().manual_seed(0)
    content, style, x = (torch.rand(1, 3, 24, 32, generator=gen) for _ in range(3))
    src = TorchTargets(net)
    ct, st = src.compute(content, content_layers=cfg.content_layers, style_layers=()), src.compute(style, content_layers=(), style_layers=cfg.style_layers)
    rt = Runtime(channels_last=False)
    objective = make_objective(net, rt, cfg, ct.content, style_grams(cfg, [st], [style], [1.0], device=x.device), (24, 32))
    loss, terms = objective(x)
    f = net(x)
    want_c = content_loss(f["relu2_2"], ct.content["relu2_2"])
    want_s = sum(style_loss(f[k], gram_matrix(net(style)[k]), image_pixels=24 * 32) / 2 for k in cfg.style_layers)
    torch.testing.assert_close(terms["content"], cfg.content_weight * want_c)
    torch.testing.assert_close(terms["style"], cfg.style_weight * want_s)
    torch.testing.assert_close(terms["tv"], 0.5 * tv_loss(x))
    torch.testing.assert_close(loss, terms["content"] + terms["style"] + terms["tv"])


def test_keras_grams_are_plain_sums_blended(weights):
    """The notebook's form wants F F^T unnormalised; two styles blend by their weights."""
    cfg = dataclasses.replace(SEED, content_layers=("relu1_1",), style_layers=("relu2_1",))
    assert cfg.loss_form == LossForm.KERAS
    net, gen = _net(cfg, weights), torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 3, 20, 18, generator=gen), torch.rand(1, 3, 16, 16, generator=gen)
    src = TorchTargets(net)
    ta, tb = (src.compute(s, content_layers=(), style_layers=cfg.style_layers) for s in (a, b))
    g = style_grams(cfg, [ta, tb], [a, b], [0.25, 0.75], device=a.device)["relu2_1"]
    fa, fb = net(a)["relu2_1"].flatten(2), net(b)["relu2_1"].flatten(2)  # (1, C, h*w)
    torch.testing.assert_close(g, 0.25 * fa @ fa.transpose(1, 2) + 0.75 * fb @ fb.transpose(1, 2), rtol=1e-4, atol=1e-3)
