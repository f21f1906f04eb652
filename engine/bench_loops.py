"""What one timed iteration of `nst bench` runs: the loss function of each loop, the FLOPs it
counts, and the optimiser step (plain, or captured in a CUDA graph).

Two loops:

- `fast`: what `stylize` runs. Targets computed once, the frozen network cut after the deepest
  layer in use, the image in channels-last if asked.
- `reference`: the structure of the Keras notebook the seed preset comes from. Content, style
  and output go through the whole of VGG19 as one batch of three at every step, and the targets
  (content features, style Grams) are recomputed from that batch each time. Gradients only with
  respect to the image, as the notebook's `GradientTape` asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .config import LossForm, StyleConfig, content_layer_weights, style_layer_weights
from .device import Runtime, autocast, device_context
from .features import LAYER_NAMES, VGGFeatures
from .flops import count_flops
from .lbfgs import LBFGS
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .objective import make_objective, style_grams
from .targets import TorchTargets
from .tiles import TiledObjective
from .transfer import build_model, loop_network, make_optimizer
from .weights import Weights, load_into

if TYPE_CHECKING:  # bench imports this module; the case type is only named in annotations here
    from .bench import BenchCase


def fast_loss(
    cfg: StyleConfig, weights: Weights, runtime: Runtime, content: torch.Tensor, style: torch.Tensor, *, tile: int | None = None
) -> tuple[Callable, VGGFeatures]:
    """The loop's objective and its network. `tile`: targets are computed tile by tile too, so a
    print-size case that only fits tiled does not run out of memory before its first step."""
    model = build_model(cfg, weights, runtime)
    source = TorchTargets(model, tile=tile)
    ct = source.compute(content, content_layers=cfg.content_layers, style_layers=())
    st = source.compute(style, content_layers=(), style_layers=cfg.style_layers)
    grams = style_grams(cfg, [st], [style], [1.0], device=content.device)
    return make_objective(loop_network(model, runtime), runtime, cfg, ct.content, grams, tuple(content.shape[-2:])), model


def reference_loss(cfg: StyleConfig, weights: Weights, runtime: Runtime, content: torch.Tensor, style: torch.Tensor) -> Callable:
    """The notebook's step: [content, style, output] through all of VGG19, targets recomputed."""
    taps = tuple(dict.fromkeys((*cfg.content_layers, *cfg.style_layers, LAYER_NAMES[-1])))
    model = VGGFeatures(taps, pooling=cfg.pooling)
    load_into(model.features, weights)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = loop_network(model, runtime)  # same weight handling as the fast loop
    cw = dict(zip(cfg.content_layers, content_layer_weights(cfg)))
    sw = dict(zip(cfg.style_layers, style_layer_weights(cfg)))
    form = cfg.loss_form
    pixels = content.shape[-2] * content.shape[-1]
    keras = form == LossForm.KERAS

    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = x / cfg.pixel_scale
        batch = torch.cat([content, style, img])  # (3, 3, H, W)
        if runtime.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(runtime):
            feats = model(batch)
        zero = x.new_zeros(())
        c = sum((w * content_loss(feats[k][2:3], feats[k][0:1], form=form) for k, w in cw.items()), zero)
        s = sum(
            (w * style_loss(feats[k][2:3], gram_matrix(feats[k][1:2], normalize=not keras), form=form, image_pixels=pixels) for k, w in sw.items()),
            zero,
        )
        tv = tv_loss(x if keras else img, form=form)
        terms = {"content": cfg.content_weight * c, "style": cfg.style_weight * s, "tv": cfg.tv_weight * tv}
        return terms["content"] + terms["style"] + terms["tv"], terms

    return loss_fn


def case_flops(cfg: StyleConfig, case: BenchCase) -> int:
    hw = (case.height, case.width)
    layers = (*cfg.content_layers, *cfg.style_layers)
    if case.loop == "reference":
        # Three images forward through all of VGG19 and back to the deepest tap (autograd runs the
        # input gradient for the whole batch tensor); Grams for style and output.
        fc = count_flops(hw, layers=layers, batch=3, forward_to=LAYER_NAMES[-1], pooling=cfg.pooling)
        grams = count_flops(hw, layers=layers, style_layers=cfg.style_layers, pooling=cfg.pooling)
        g = sum(layer.forward for layer in grams.layers if layer.kind == "gram")
        return fc.total + 2 * g + g  # style's and output's Gram forward, output's backward
    return count_flops(hw, layers=layers, style_layers=cfg.style_layers, pooling=cfg.pooling).total


def make_step(case: BenchCase, cfg: StyleConfig, loss_fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    """One iteration: loss, gradient with respect to the image, update. Never reads the loss."""
    if case.optimizer == "torch-lbfgs":
        # One gradient per step, as our LBFGS; tolerances off so it never stops early.
        topt = torch.optim.LBFGS([x], lr=cfg.lr, max_iter=1, history_size=cfg.lbfgs_history, tolerance_grad=-1, tolerance_change=-1)

        def closure() -> torch.Tensor:
            topt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(x)
            loss.backward()
            return loss

        return lambda: topt.step(closure) and None  # type: ignore[func-returns-value]
    # bench_config set cfg.optimizer from the case; a tiled stage runs Adam fused, as stylize does
    opt = make_optimizer(cfg, x, capturable=case.cuda_graph, fused=isinstance(loss_fn, TiledObjective))

    # An objective evaluates and back-propagates itself (a tiled one tile by tile); the reference
    # loop is a plain loss function.
    loss_and_grad = getattr(loss_fn, "loss_and_grad", None)

    def step() -> None:
        x.grad = None
        if loss_and_grad is not None:
            loss, _ = loss_and_grad(x)
        else:
            loss, _ = loss_fn(x)
            loss.backward()
        if isinstance(opt, LBFGS):
            opt.step(loss.detach())  # as stylize calls it: with the loss, to take back a step that rose
        else:
            opt.step()

    if not case.cuda_graph:
        return step
    return _graphed(x, loss_fn, opt)  # type: ignore[arg-type]


def _graphed(x: torch.Tensor, loss_fn: Callable, opt: torch.optim.Adam) -> Callable[[], None]:
    """Capture forward, backward and a capturable Adam step in one CUDA graph (static shapes).

    Capture and replay act on the current CUDA device: the graph is captured with `x`'s device
    made current, and the caller replays it with that device current (the bench runs inside
    `precision_context`, which sees to it). Warm-up takes three real steps before the capture.
    """
    with device_context(x.device):
        main = torch.cuda.current_stream(x.device)
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up on a side stream, as the CUDA-graphs docs require
                opt.zero_grad(set_to_none=False)
                loss, _ = loss_fn(x)
                loss.backward()
                opt.step()
        main.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.zero_grad(set_to_none=False)  # inside the graph: each replay starts from a zero grad
            loss, _ = loss_fn(x)
            loss.backward()
            opt.step()
    return graph.replay


__all__ = ["case_flops", "fast_loss", "make_step", "reference_loss"]
