"""The memory model and the tiling plan: how many bytes a stage needs, whole or tiled, and which
tile size keeps a run within a budget. A plan is data; the CLI prints it and the report keeps it.

The model counts the run's own tensors (not the interpreter and libraries, which a process has
loaded before it can plan): the network's weights, the stage's images and the image's gradient,
the targets, the optimiser's state, and the network's activations kept for the backward pass plus
the gradients in flight. Activations are counted layer by layer from `layers` (VGG19's table):
what autograd keeps for each convolution, in-place ReLU and pooling (max pooling also keeps int64
indices), at the precision the network runs in. A stage has two phases that do not overlap:
making its targets (its images are alive) and the optimiser's loop (only the targets, the image,
its gradient and the optimiser's state are); its peak is the larger. Each part is an estimate of
what the allocator holds at that peak; `tests/engine/test_plan.py` checks the sum against a
measured peak, whole and tiled.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import MIN_SIZE, Optimizer, OptimizerState, Pooling, Precision, PreserveColors, StyleConfig
from .device import autocast_dtype, format_bytes
from .errors import ConfigError
from .images import output_shape
from .layers import LAYER_INDEX, LAYER_NAMES, deepest_layer, feature_hw, layer_channels, layer_stride, tile_margins
from .lbfgs import HISTORY_CHUNK_BYTES
from .tiles import grid_shape, snap_tile, tile_grid, tile_halo, tile_step

# What the allocator holds beyond the tensors counted, as a share of them: oneDNN's scratch
# buffers, the allocator's rounding, temporaries of the loss. Measured against peak RSS on the CPU
# (tests/engine/test_plan.py).
OVERHEAD = 0.10
# The same on a CUDA device, against `torch.cuda.max_memory_allocated` once cuDNN has tuned its
# kernels: nothing. Measured on an H100 (fp32, whole image, 512 and 1024 px): the counted tensors
# alone came to 1.09x and 1.10x of the peak, so the CPU's share made 1.20x and 1.21x.
CUDA_OVERHEAD = 0.0


def allocator_overhead(device: str) -> float:
    """The overhead share a plan on `device` counts: OVERHEAD on the CPU, CUDA_OVERHEAD elsewhere."""
    return OVERHEAD if device.split(":")[0] == "cpu" else CUDA_OVERHEAD


def uncopied_taps(cfg: StyleConfig, device: str, precision: Precision) -> frozenset[str]:
    """The tapped layers whose maps the loss uses without an fp32 copy: in bf16 on a CUDA GPU the
    Grams multiply the bf16 maps into fp32 on the tensor cores (`losses._tensor_core_gram`), so a
    style layer's map is not copied. A content layer's difference is still taken in fp32, and
    masks' guided Grams weight an fp32 copy. Measured on an H200 (2026-11-26, bf16, whole image,
    1024 px): with the copies counted the estimate was 1.21x `torch.cuda.max_memory_allocated`."""
    if device.split(":")[0] != "cuda" or precision != Precision.BF16 or cfg.masks or cfg.style_regions:
        return frozenset()
    return frozenset(cfg.style_layers) - frozenset(cfg.content_layers)

# The smallest tile `auto` tries, in multiples of the deepest stride: below it the halo is most
# of every tile and the run slows for little saving.
MIN_TILE_STEPS = 4


class TileMode(str, enum.Enum):
    AUTO = "auto"  # whole when it fits, else the largest tile that does
    OFF = "off"  # always whole


class PlanError(ConfigError):
    """The budget is too small for any plan; the message names the smallest budget that works."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`6GB` -> 6e9 bytes, `800MiB` -> 800 * 2**20; a bare number is bytes. Decimal (kB, MB, GB,
    TB) and binary (KiB, MiB, GiB, TiB) suffixes; `6G` counts as `6GB`."""
    m = _SIZE.match(text or "")
    if not m:
        raise ConfigError(f"`max_memory` {text!r} not understood: use e.g. 800MB, 6GB or 4GiB", params=("max_memory",))
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    power = "bkmgt".index(unit[0]) if unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit else 1000
    n = int(value * base**power)
    if n <= 0:
        raise ConfigError(f"`max_memory` {text!r} must be more than 0 bytes", params=("max_memory",))
    return n


def _precision_bytes(precision: Precision) -> int:
    return 2 if autocast_dtype(precision) is not None else 4


def weight_bytes(layers: Sequence[str], precision: Precision) -> int:
    """The conv weights and biases of a network cut after the deepest of `layers`, fp32, plus a
    bf16/fp16 copy for the loop's network."""
    depth = LAYER_INDEX[deepest_layer(layers)] + 1
    params, in_ch = 0, 3
    for name in LAYER_NAMES[:depth]:
        if name.startswith("conv"):
            out = layer_channels(name)
            params += out * in_ch * 9 + out
            in_ch = out
    lowp = _precision_bytes(precision) if autocast_dtype(precision) is not None else 0
    return params * (4 + lowp)


# What an ONNX Runtime session of an exported target module holds for its life, as a multiple of
# the module's weights: its own copy of them and the graph. Measured on the CPU provider for the
# Gatys layers in fp32 (52 MB of weights): 61 MB resident after opening, 1.2x.
ONNX_SESSION_FACTOR = 1.2


def onnx_session_bytes(layers: Sequence[str], model_precision: str = "fp32") -> int:
    """The memory an ONNX Runtime session of a target module cut after the deepest of `layers`
    holds beside the loop's network (`model_precision`: the export's, fp32 or fp16)."""
    fp32 = weight_bytes(layers, Precision.FP32)
    return int(ONNX_SESSION_FACTOR * (fp32 if model_precision == "fp32" else fp32 // 2))


def activation_bytes(
    layers: Sequence[str],
    hw: tuple[int, int],
    *,
    precision: Precision,
    pooling: Pooling,
    grad: bool = True,
    n: int = 1,
    tile: int | None = None,
    uncopied: Collection[str] = (),
) -> int:
    """Bytes the network's pass over an (H, W) input holds at its peak.

    With `grad`: everything autograd keeps for the backward pass (each conv's input, each ReLU's
    output, which is the same tensor when it runs in place, each max pooling's int64 indices) plus
    the two largest gradients in flight, and the loss's fp32 copies of the tapped features. Without:
    the largest two consecutive maps (a no-grad forward frees each map after the next) and the
    tapped maps, which the pass returns, each with an fp32 copy for its Gram or target.

    `tile`: (H, W) is the crop of a tile of `tile` px with its halo, which the network cuts down
    as it goes (`VGGFeatures.forward`'s `owned`): each layer's map covers the tile and that layer's
    margin (`tile_margins`), the taps the tile alone. `uncopied`: taps without the fp32 copy
    (`uncopied_taps`)."""
    e = _precision_bytes(precision)
    h, w = hw
    depth = LAYER_INDEX[deepest_layer(layers)] + 1
    taps = set(layers)
    margins = tile_margins(layers)

    def map_hw(name: str, margin: int | None = None) -> tuple[int, int]:
        if tile is None:
            return feature_hw(hw, name)
        m = margins[name] if margin is None else margin
        return feature_hw((min(h, tile + 2 * m), min(w, tile + 2 * m)), name)

    kept = _image_bytes(h * w) * 3  # the image scaled, in channels-last and normalised (fp32)
    if e == 2:
        kept += 3 * h * w * e  # autocast's copy of the first conv's input
    largest = prev = _image_bytes(h * w)
    pair = 0
    for name in LAYER_NAMES[:depth]:
        c = layer_channels(name)
        fh, fw = map_hw(name)
        size = c * fh * fw * e
        if name.startswith("conv"):
            kept += size
            if name in taps:
                kept += size  # its ReLU cannot run in place: a second map
        elif name.startswith("pool"):
            kept += size
            if pooling == Pooling.MAX:
                kept += c * fh * fw * 8
        else:
            continue
        largest = max(largest, size)
        pair = max(pair, prev + size)
        prev = size
    tapped = 0
    for t in taps:
        fh, fw = map_hw(t, 0)
        tapped += layer_channels(t) * fh * fw * e
        # an fp32 map per tapped layer: the content loss's difference, or in bf16 the Gram's input
        if t not in uncopied:
            kept += layer_channels(t) * fh * fw * 4
    if not grad:
        return n * (pair + tapped + max(layer_channels(t) * math.prod(map_hw(t, 0)) * 4 for t in taps))
    return n * (kept + 2 * largest)


def optimizer_bytes(cfg: StyleConfig, pixels: int, n: int = 1, *, state: str = "device") -> int:
    """The optimiser's bytes on the device. L-BFGS: 2 x history image-sized fp32 vectors, and the
    previous gradient, step and point; with its history in host memory (`state` "host"), two of
    its chunks in flight instead of the history. Adam: its two moments."""
    vec = 3 * pixels * 4 * n
    if cfg.optimizer == Optimizer.ADAM:
        return 2 * vec
    if state == OptimizerState.HOST.value:
        return 4 * vec + 2 * min(HISTORY_CHUNK_BYTES, history_bytes(cfg, pixels, n))
    return 4 * vec + history_bytes(cfg, pixels, n)


def history_bytes(cfg: StyleConfig, pixels: int, n: int = 1) -> int:
    """L-BFGS's history: 2 x history image-sized fp32 vectors (0 for Adam)."""
    return 0 if cfg.optimizer == Optimizer.ADAM else 2 * cfg.lbfgs_history * 3 * pixels * 4 * n


# How a tiled stage has its content targets (`StagePlan.content_targets`): held, or made again at
# each tile's pass. `plan_run` also takes "auto": held where a tile fits with them, else per tile.
CONTENT_TARGETS = ("held", "per tile")


@dataclass(frozen=True)
class StagePlan:
    """One stage: its size, whole or tiled, and the estimated peak by part (bytes)."""

    size: int  # the stage's `size` (along cfg.size_edge)
    hw: tuple[int, int]  # (H, W) of the output at this stage
    mode: str  # "whole" or "tiled"
    tile: int | None  # tile edge in output pixels (a multiple of the deepest stride), None when whole
    grid: tuple[int, int]  # (rows, columns) of tiles; (1, 1) when whole
    halo: int  # pixels of context around each tile (0 when whole)
    parts: dict[str, int] = field(default_factory=dict)
    # Tile edge for the targets' no-grad pass, which holds far less per pixel than the loop's
    # forward and backward: the largest whose pass needs no more than the loop's tile.
    target_tile: int | None = None
    phase: str = "loop"  # the phase `parts` describe, the one that needs more: "targets" or "loop"
    host_bytes: int = 0  # L-BFGS's history in host memory (optimiser state "host"), not in `parts`
    # One of CONTENT_TARGETS. "held": the content targets are made once and held, image-sized
    # (1/64 of the image's pixels times 512 channels at relu4_2: 1.4 GB in fp32 at 8192x5449).
    # "per tile": made again from the content image at every tile's pass, when held ones do not
    # fit even the smallest tile (or when asked for by name).
    content_targets: str = "held"

    @property
    def tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def estimated_peak_bytes(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size, "hw": list(self.hw), "mode": self.mode, "tile": self.tile, "tiles": self.tiles, "grid": list(self.grid),
            "halo": self.halo, "target_tile": self.target_tile, "estimated_peak_bytes": self.estimated_peak_bytes, "peak_phase": self.phase,
            "parts": dict(self.parts), "host_bytes": self.host_bytes, "content_targets": self.content_targets,
        }  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Every stage's plan, the budget it was made for, and where the optimiser's state lives."""

    stages: tuple[StagePlan, ...]
    budget_bytes: int | None  # None: no budget was given (a plan for the record only)
    device: str
    precision: str
    # Where L-BFGS's history lives: "device" (with the image) or "host" (host memory, streamed
    # through the device; on the CPU the same memory). Everything else stays with the image.
    optimizer_state: str = "device"
    optimizer: str = "lbfgs"  # the optimiser the plan fits: the configuration's, or Adam
    lbfgs_history: int | None = None  # L-BFGS's history the plan fits (None for Adam)
    optimizer_note: str = ""  # why the optimiser or its history differs from the configuration's
    # A video clip's plan: what its encoder holds while it writes the clip, after the last frame
    # (`video.pipeline.encoder_bytes`); 0 for a folder of frames or a still image.
    write_bytes: int = 0

    @property
    def estimated_peak_bytes(self) -> int:
        return max(s.estimated_peak_bytes for s in self.stages)

    @property
    def host_bytes(self) -> int:
        """The most host memory a stage's L-BFGS history takes (0 unless the state is "host" off the CPU)."""
        return max(s.host_bytes for s in self.stages)

    def target_tile(self) -> int | None:
        """The tile edge for computing targets: the smallest any tiled stage allows (None: whole)."""
        return min((s.target_tile for s in self.stages if s.mode == "tiled" and s.target_tile is not None), default=None)

    def tile_for(self, index: int) -> int | None:
        """The tile edge of stage `index`, or None when it runs whole."""
        s = self.stages[index]
        return s.tile if s.mode == "tiled" else None

    def tile_at(self, hw: tuple[int, int]) -> int | None:
        """The tile edge of the stage whose output is (H, W), or None when it runs whole; a
        ConfigError for a size the plan was not made for."""
        s = self.stage_at(hw)
        return s.tile if s.mode == "tiled" else None

    def stage_at(self, hw: tuple[int, int]) -> StagePlan:
        """The stage whose output is (H, W); a ConfigError for a size the plan was not made for."""
        for s in self.stages:
            if tuple(s.hw) == tuple(hw):
                return s
        raise ConfigError(f"the plan has no stage of {hw[1]}x{hw[0]}: make it from this run's configuration and images")

    def changes(self, cfg: StyleConfig) -> dict[str, Any]:
        """The configuration fields this plan changes (`optimizer`, `lbfgs_history`): empty when
        the configuration fits as it is."""
        if self.optimizer != Optimizer(cfg.optimizer).value:
            return {"optimizer": Optimizer(self.optimizer)}
        if self.lbfgs_history is not None and self.lbfgs_history != cfg.lbfgs_history:
            return {"lbfgs_history": self.lbfgs_history}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes, "device": self.device, "precision": self.precision,
            "optimizer_state": self.optimizer_state, "optimizer": self.optimizer, "lbfgs_history": self.lbfgs_history,
            "optimizer_note": self.optimizer_note, "estimated_peak_bytes": self.estimated_peak_bytes, "host_bytes": self.host_bytes,
            "write_bytes": self.write_bytes, "stages": [s.to_dict() for s in self.stages],
        }  # fmt: skip


def shared_bytes(plan: Plan) -> int:
    """Of a plan's peak, what jobs optimised together as one tensor hold once, not once each: the
    network's weights and the target source's session (parts `weights` and `source`, with their
    share of the overhead on the plan's device), at the stage and phase of the peak."""
    stage = max(plan.stages, key=lambda s: s.estimated_peak_bytes)
    return int((stage.parts.get("weights", 0) + stage.parts.get("source", 0)) * (1 + allocator_overhead(plan.device)))


def _image_bytes(pixels: int) -> int:
    return 3 * pixels * 4


def stage_phases(
    cfg: StyleConfig,
    hw: tuple[int, int],
    style_hws: Sequence[tuple[int, int]],
    *,
    precision: Precision,
    tile: int | None,
    prev_hw: tuple[int, int] | None = None,
    optimizer_state: str = "device",
    held: Mapping[str, int] | None = None,
    overhead: float = OVERHEAD,
    uncopied: Collection[str] = (),
    content_targets: str = "held",
) -> dict[str, dict[str, int]]:
    """The estimated bytes by part of a stage's two phases, which do not overlap: `targets` (the
    stage's images and the targets' no-grad pass) and `loop` (the optimiser's iterations, which
    keep only the targets, the image, its gradient and the optimiser's state; see `Stage.for_loop`).
    `prev_hw`: the previous stage's output size, whose result (and Adam's moments, when they are
    carried over) the stage holds while it runs. `optimizer_state` "host": L-BFGS's history is not
    on the device (`optimizer_bytes`). `held`: parts held beside the stage through both phases, by
    name: `source`, what the targets' source holds beside the loop's network (ONNX Runtime's
    session, `onnx_session_bytes`); `video`, what a clip's loop keeps beside each frame's run.
    `uncopied`: `uncopied_taps` for the device. `content_targets` "per tile" (tiled only): no
    content targets are held; the loop keeps the content image instead (`StagePlan.content_targets`)."""
    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    pixels = hw[0] * hw[1]
    image = _image_bytes(pixels)
    luminance = cfg.preserve_colors == PreserveColors.LUMINANCE
    carried = _image_bytes(prev_hw[0] * prev_hw[1]) if prev_hw is not None else 0  # the previous stage's result
    if prev_hw is not None and cfg.optimizer == Optimizer.ADAM and cfg.carry_adam_moments:
        carried += optimizer_bytes(cfg, prev_hw[0] * prev_hw[1])
    grams = sum(layer_channels(k) ** 2 * 4 * (len(style_hws) + 2) for k in cfg.style_layers)
    content_fp32 = sum(layer_channels(k) * math.prod(feature_hw(hw, k)) * 4 for k in cfg.content_layers)
    # A tiled stage keeps its content targets at the network's precision, made so (`stylize_many`).
    lowp = tile is not None and autocast_dtype(precision) is not None
    content_loop = content_fp32 // 2 if lowp else content_fp32
    per_tile = tile is not None and content_targets == "per tile"
    if per_tile:  # made at each tile's pass, one tile's at a time (counted with its activations)
        content_loop = 0
    weights = weight_bytes(layers, precision)

    # Targets: the content (and its luminance) and each style (the tensor, and a quarter for the
    # 8-bit image it came from; twice, as histogram matching makes a new one), while the targets'
    # pass runs or, after it, the start image is made from them.
    per_style = 2.0 if cfg.preserve_colors == PreserveColors.HISTOGRAM else 1.25
    t_images = (1 + luminance) * image + sum(int(per_style * _image_bytes(h * w)) for h, w in style_hws) + carried
    if tile is None:
        t_net = max(activation_bytes(layers, s, precision=Precision.FP32, pooling=cfg.pooling, grad=False) for s in [hw, *style_hws])
    else:  # the targets' tile is chosen to need no more than the loop's (`_target_tile`)
        t_net = activation_bytes(layers, _crop(hw, tile, layers), precision=precision, pooling=cfg.pooling, tile=tile, uncopied=uncopied)
    targets_phase = {"weights": weights, "images": t_images, "targets": content_loop + grams, "activations": max(t_net, image)}

    # Loop: the image, its gradient, the last finite copy (half precision when tiled), the
    # content's colours under `luminance`, the previous stage's result.
    l_images = 2 * image + (image // 2 if tile is not None else image) + (image if luminance else 0) + carried
    net = activation_bytes(layers, hw if tile is None else _crop(hw, tile, layers), precision=precision, pooling=cfg.pooling, tile=tile, uncopied=uncopied)
    if per_tile:  # the content image, as the network sees it; a tile's targets beside its pass
        l_images += image
        crop = _crop(hw, tile, layers)  # type: ignore[arg-type]
        net += sum(layer_channels(k) * math.prod(feature_hw(crop, k)) * 4 for k in cfg.content_layers)
    optimizer = optimizer_bytes(cfg, pixels, state=optimizer_state)
    # Adam's step makes two image-sized temporaries (none when fused, as a tiled stage runs it);
    # they do not overlap the network's pass.
    step_temps = 2 * image if cfg.optimizer == Optimizer.ADAM and tile is None else 0
    loop_phase = {"weights": weights, "images": l_images, "targets": content_loop + grams, "optimizer": optimizer, "activations": max(net, step_temps)}
    phases = {"targets": targets_phase, "loop": loop_phase}
    for parts in phases.values():
        parts.update({k: v for k, v in (held or {}).items() if v})
        parts["overhead"] = int(overhead * sum(parts.values()))
    return phases


def stage_parts(
    cfg: StyleConfig,
    hw: tuple[int, int],
    style_hws: Sequence[tuple[int, int]],
    *,
    precision: Precision,
    tile: int | None,
    prev_hw: tuple[int, int] | None = None,
) -> dict[str, int]:
    """The estimated bytes by part of a stage, whole (`tile` None) or tiled: those of whichever
    of its phases (`stage_phases`) needs more."""
    phases = stage_phases(cfg, hw, style_hws, precision=precision, tile=tile, prev_hw=prev_hw)
    return phases[peak_phase(phases)]


def peak_phase(phases: dict[str, dict[str, int]]) -> str:
    """The name of the phase (`stage_phases`) whose parts add up to the most."""
    return max(phases, key=lambda k: sum(phases[k].values()))


def style_shape(style_wh: tuple[int, int], out_hw: tuple[int, int], cfg: StyleConfig) -> tuple[int, int]:
    """(H, W) a style image of `style_wh` (W, H) is resized to at a stage whose output is `out_hw`."""
    if cfg.style_match_output:
        return out_hw
    longest = max(1, round(cfg.style_scale * max(out_hw)))
    return output_shape(style_wh[0], style_wh[1], longest)


def _crop(hw: tuple[int, int], tile: int, layers: Sequence[str]) -> tuple[int, int]:
    halo = tile_halo(layers)
    return min(hw[0], tile + 2 * halo), min(hw[1], tile + 2 * halo)


def _target_tile(
    cfg: StyleConfig, hw: tuple[int, int], style_hws: Sequence[tuple[int, int]], tile: int, precision: Precision, uncopied: Collection[str] = ()
) -> int:
    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    allowed = activation_bytes(layers, _crop(hw, tile, layers), precision=precision, pooling=cfg.pooling, tile=tile, uncopied=uncopied)
    largest = max([max(hw), *(max(s) for s in style_hws)])
    best = tile
    for t in range(tile, snap_tile(largest, layers) + tile_step(layers), tile_step(layers)):
        if any(activation_bytes(layers, _crop(s, t, layers), precision=Precision.FP32, pooling=cfg.pooling, grad=False) > allowed for s in [hw, *style_hws]):
            break
        best = t
    return best


def _tile_candidates(hw: tuple[int, int], layers: Sequence[str]) -> list[int]:
    """Tile edges from the largest that still splits the image down to MIN_TILE_STEPS strides."""
    step = tile_step(layers)
    top = snap_tile(max(hw) - 1, layers) if max(hw) > step else step
    return list(range(top, step * MIN_TILE_STEPS - 1, -step)) or [step * MIN_TILE_STEPS]


def _plan_stages(
    cfg: StyleConfig,
    content_wh: tuple[int, int],
    style_whs: Sequence[tuple[int, int]],
    *,
    precision: Precision,
    budget: int | None,
    tile: TileMode | int,
    state: str = "device",
    held: Mapping[str, int] | None = None,
    overhead: float = OVERHEAD,
    uncopied: Collection[str] = (),
    content_targets: str = "auto",
) -> tuple[StagePlan, ...]:
    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    stages = []
    # How a tiled stage has its content targets: held where a tile fits with them, else per tile.
    contents = CONTENT_TARGETS if content_targets == "auto" else (content_targets,)
    if not cfg.content_layers:
        contents = ("held",)
    worst: _TooSmall | None = None  # the stage whose smallest tile needs the most
    prev_hw: tuple[int, int] | None = None
    for size in cfg.sizes:
        hw = output_shape(content_wh[0], content_wh[1], size, cfg.size_edge)
        s_hws = [style_shape(wh, hw, cfg) for wh in style_whs]
        prev, prev_hw = prev_hw, hw  # the previous stage's output, which this one holds

        def make(t: int | None, content: str = "held") -> StagePlan:
            phases = stage_phases(cfg, hw, s_hws, precision=precision, tile=None if t is None else snap_tile(t, layers), prev_hw=prev, optimizer_state=state,
                                  held=held, overhead=overhead, uncopied=uncopied, content_targets=content)  # fmt: skip
            phase = peak_phase(phases)
            host = history_bytes(cfg, hw[0] * hw[1]) if state == OptimizerState.HOST.value else 0
            if t is None:
                return StagePlan(size, hw, "whole", None, (1, 1), 0, phases[phase], phase=phase, host_bytes=host)
            t = snap_tile(t, layers)
            return StagePlan(size, hw, "tiled", t, grid_shape(hw, t, layers), tile_halo(layers), phases[phase], phase=phase, host_bytes=host, content_targets=content)

        def with_target_tile(p: StagePlan) -> StagePlan:  # only for the chosen plan: it searches too
            return p if p.tile is None else dataclasses.replace(p, target_tile=_target_tile(cfg, hw, s_hws, p.tile, precision, uncopied))

        if isinstance(tile, int):
            fits_one = snap_tile(tile, layers) >= max(hw)
            stages.append(with_target_tile(make(None if fits_one else tile, contents[0])))
            continue
        whole = make(None)
        if TileMode(tile) == TileMode.OFF or budget is None or whole.estimated_peak_bytes <= budget:
            stages.append(whole)
            continue
        # The estimate grows with the tile: bisect for the largest that fits (candidates descend).
        # Held content targets first; made again at every tile's pass when no tile fits with them
        # (one more forward pass per tile, much less than a smaller budget's tiles would cost).
        candidates = _tile_candidates(hw, layers)
        chosen = None
        for content in contents:
            lo, hi = 0, len(candidates)
            while lo < hi:
                mid = (lo + hi) // 2
                if make(candidates[mid], content).estimated_peak_bytes <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            if lo < len(candidates):
                chosen = make(candidates[lo], content)
                break
        if chosen is None:  # the last choice tried needs the least
            smallest = make(candidates[-1], contents[-1])
            if worst is None or smallest.estimated_peak_bytes > worst.smallest.estimated_peak_bytes:
                worst = _TooSmall(size, smallest)
            continue
        stages.append(with_target_tile(chosen))
    if worst is not None:
        raise worst
    return tuple(stages)


class _TooSmall(Exception):
    def __init__(self, size: int, smallest: StagePlan) -> None:
        self.size, self.smallest = size, smallest


# L-BFGS histories the planner tries when the configured one does not fit.
SHORTER_HISTORIES = (10, 5)
# Iterations to a result relative to L-BFGS with a history of 20, for the fallbacks: measured
# with `nst bench --to-result --optimizer lbfgs,lbfgs:10,lbfgs:5,adam --result-scales single`
# (256 px, fp32, random weights, this project's CPU; benchmarks/README.md, "Memory fallbacks"):
# L-BFGS 20 reached the result in 445 iterations, Adam in 77; histories of 10 and 5 had not in
# 500 (1.036x and 1.041x the reference), so theirs are lower bounds. With the tiles' cost per
# iteration (`iteration_cost`) they decide which fallback the plan takes.
ITERATIONS_TO_RESULT = {"lbfgs:20": 1.0, "lbfgs:10": 500 / 445, "lbfgs:5": 500 / 445, "adam": 77 / 445}


def iteration_cost(hw: tuple[int, int], tile: int | None, layers: Sequence[str], *, content_per_tile: bool = False) -> int:
    """The relative work of one iteration over an (H, W) image: pixels through the network, a
    forward counted 1 and a backward 2. Whole: 3 per pixel. Tiled: each tile's crop forward without
    gradients (the Grams' pass), then forward and backward: 4 per pixel of the crop as the network
    runs it, which cuts the halo down as it goes deeper (`VGGFeatures.forward`'s `owned`): each
    convolution's share of the work (its multiply-adds a pixel) over the part of the crop it runs on.
    The last tile's forward is run once (`TiledObjective`: pass 2 starts from pass 1's graph of it).
    `content_per_tile`: each tile's content targets are made again, one more forward of its crop
    (counted as deep as the style layers go: an upper bound)."""
    if tile is None:
        return 3 * hw[0] * hw[1]
    margins = tile_margins(layers)
    chain = LAYER_NAMES[: LAYER_INDEX[deepest_layer(layers)] + 1]
    convs = []  # (its multiply-adds a pixel of the input image, the margin of the map it runs on)
    for i, name in enumerate(chain):
        if name.startswith("conv"):
            cin = 3 if i == 0 else layer_channels(chain[i - 1])
            convs.append((cin * layer_channels(name) / layer_stride(name) ** 2, None if i == 0 else margins[chain[i - 1]]))
    total = sum(w for w, _ in convs)
    areas = []
    for t in tile_grid(hw, tile, layers):
        area = 0.0
        for w, m in convs:
            if m is None:  # the first conv runs on the whole crop
                rows, cols = t.cy1 - t.cy0, t.cx1 - t.cx0
            else:
                rows = min(t.cy1, t.y1 + m) - max(t.cy0, t.y0 - m)
                cols = min(t.cx1, t.x1 + m) - max(t.cx0, t.x0 - m)
            area += w / total * rows * cols
        areas.append(area)
    return round((5 if content_per_tile else 4) * sum(areas) - areas[-1])


# L-BFGS with its history in host memory takes L-BFGS's iterations to a result (it is the same
# algorithm; its iterates differ by rounding) and, at each of them, streams the history through
# the device: in and back out in the first pass (the pair's slot is known only on the device, so
# whole chunks return), in again in the second; the copies share one stream, so three crossings.
# The bus: PCIe 4.0 x16 moves 32 GB/s each way before protocol overhead, about 25 GB/s in pinned
# copies (PCIe 5.0 x16, as on H100 hosts, about twice that). The bus was not measured (the one
# GPU run, on an H100, had no time for it), so the cost model assumes the slower.
HOST_BUS_BYTES_PER_S = 25e9
HOST_HISTORY_CROSSINGS = 3
# The device's rate in `iteration_cost` units (pixels through the network, a backward counted
# twice) a second, to put the transfers in the same units as the network's work: a 512 px
# iteration in TF32 on an H100, about 2 ms as planned (its arithmetic alone is 0.77 ms), is
# 3 x 512^2 units in 2 ms: 393M units/s. Set before any GPU run; measured since on an H100
# (benchmarks/h100-bench-adam.json), where the network is the limit: bf16 at 2048 px 28.1 ms an
# iteration, 449M units/s; fp32 204 ms, 62M. (At 512 px the step waits on the host.)
DEVICE_WORK_PER_S = 3 * 512 * 512 / 2e-3


def _fallback_key(cfg: StyleConfig) -> str:
    return "adam" if cfg.optimizer == Optimizer.ADAM else f"lbfgs:{cfg.lbfgs_history}"


def _time_to_result(cfg: StyleConfig, stages: Sequence[StagePlan], state: str = "device") -> float:
    """Relative time for a plan's fallback to reach a result: its iterations (relative to
    L-BFGS's 20) times the work of each stage's iterations, plus, for a history in host memory,
    its transfers over the bus at every iteration, in the same units."""
    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    per_byte = HOST_HISTORY_CROSSINGS * DEVICE_WORK_PER_S / HOST_BUS_BYTES_PER_S if state == OptimizerState.HOST.value else 0.0
    work = sum(n * (iteration_cost(s.hw, s.tile, layers, content_per_tile=s.content_targets == "per tile") + per_byte * s.host_bytes)
               for s, n in zip(stages, cfg.stage_iterations))  # fmt: skip
    return ITERATIONS_TO_RESULT.get(_fallback_key(cfg), 1.0) * work


def _label(cfg: StyleConfig, state: str) -> str:
    if cfg.optimizer == Optimizer.ADAM:
        return "Adam"
    return "L-BFGS with its history in host memory" if state == OptimizerState.HOST.value else f"an L-BFGS history of {cfg.lbfgs_history}"


def plan_run(
    cfg: StyleConfig,
    content_wh: tuple[int, int],
    style_whs: Sequence[tuple[int, int]],
    *,
    precision: Precision = Precision.FP32,
    device: str = "cpu",
    budget: int | None = None,
    tile: TileMode | int = TileMode.AUTO,
    host_bytes: int | None = None,
    optimizer_fallback: bool = True,
    optimizer_state: OptimizerState | str = OptimizerState.AUTO,
    host_budget: int | None = None,
    held: Mapping[str, int] | None = None,
    content_targets: str = "auto",
) -> Plan:
    """The plan for a run: per stage, whole when it fits `budget` (or when `tile` is off), else the
    largest tile that fits; an integer `tile` tiles every stage larger than it with that edge.

    When L-BFGS's history does not fit even with the smallest tiles (`optimizer_fallback`), the
    plan takes whichever of a shorter history (SHORTER_HISTORIES), Adam (two image-sized moments)
    or, off the CPU with `optimizer_state` auto, the whole history in host memory (`host_budget`
    bytes of it; None: unlimited) fits and is estimated to reach a result soonest: measured
    iterations to a result (ITERATIONS_TO_RESULT) times the work of its tiles (`iteration_cost`),
    plus the host history's transfers; `Plan.optimizer` and `Plan.optimizer_state` say which, and
    `Plan.changes` what it changes in the configuration. `optimizer_state` "host" keeps the
    history in host memory whatever fits (on the CPU that is the same memory: the plan counts it
    as the device's); "device" never does.
    Raises PlanError when even the smallest tile does not fit, naming the budget that would, when
    a stage's image buffers alone (content, image, gradient, styles) exceed `host_bytes`, the
    machine's memory (tiling cannot help those), and when a history asked to live in host memory
    exceeds `host_budget`. `held`: bytes held beside the run by part (`stage_phases`), counted
    in every stage. `content_targets` (tiled stages): "auto" holds them where a tile fits with
    them and else makes them again at each tile's pass; "held" or "per tile" always."""
    if content_targets not in ("auto", *CONTENT_TARGETS):
        raise ConfigError(f"`content_targets` must be auto, held or per tile, got {content_targets!r}", params=("content_targets",))
    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    state = _optimizer_state(optimizer_state, cfg)
    on_cpu = device.split(":")[0] == "cpu"
    overhead = allocator_overhead(device)
    uncopied = uncopied_taps(cfg, device, precision)
    if host_bytes is not None:
        for size in cfg.sizes:
            hw = output_shape(content_wh[0], content_wh[1], size, cfg.size_edge)
            phases = stage_phases(cfg, hw, [style_shape(wh, hw, cfg) for wh in style_whs], precision=precision, tile=snap_tile(1, layers))
            images = min(p["images"] for p in phases.values())  # what no tiling can shrink
            if images > host_bytes:
                raise PlanError(
                    f"size {size} ({hw[1]}x{hw[0]}) needs {format_size(images)} for its image buffers alone, more than this "
                    f"machine's {format_size(host_bytes)} of memory; use a smaller `size`",
                    params=("size",),
                )
    failure: _TooSmall | None = None
    if state == OptimizerState.HOST:
        # On the CPU the host's memory is the device's: the history streams through it in chunks
        # (the GPU's code path) and counts against the same budget.
        model_state = "device" if on_cpu else "host"
        try:
            stages = _plan_stages(cfg, content_wh, style_whs, precision=precision, budget=budget, tile=tile, state=model_state, held=held, overhead=overhead, uncopied=uncopied,
                                  content_targets=content_targets)
        except _TooSmall as e:
            raise _too_small(e, budget) from None
        if not on_cpu:
            _check_host_budget(stages, host_budget)
        note = "on the CPU host memory is the device's: the history streams through it in chunks and saves none" if on_cpu else ""
        return _plan(cfg, stages, budget, device, precision, note, state="host")
    try:
        stages = _plan_stages(cfg, content_wh, style_whs, precision=precision, budget=budget, tile=tile, held=held, overhead=overhead, uncopied=uncopied,
                              content_targets=content_targets)
        return _plan(cfg, stages, budget, device, precision, "")
    except _TooSmall as e:
        failure = e
    candidates: list[tuple[StyleConfig, str]] = []
    if optimizer_fallback and cfg.optimizer == Optimizer.LBFGS and budget is not None and isinstance(tile, str):
        candidates = [(dataclasses.replace(cfg, lbfgs_history=m), "device") for m in SHORTER_HISTORIES if m < cfg.lbfgs_history]
        if state == OptimizerState.AUTO and not on_cpu:
            candidates.append((cfg, "host"))
        candidates.append((dataclasses.replace(cfg, optimizer=Optimizer.ADAM), "device"))
    fits: list[tuple[float, StyleConfig, str, tuple[StagePlan, ...]]] = []
    for c, where in candidates:
        try:
            stages = _plan_stages(c, content_wh, style_whs, precision=precision, budget=budget, tile=tile, state=where, held=held, overhead=overhead, uncopied=uncopied,
                                  content_targets=content_targets)
        except _TooSmall as e:
            failure = e if where == "device" else failure  # a budget that would fit names a device-side plan
            continue
        if where == "host" and host_budget is not None and max(s.host_bytes for s in stages) > host_budget:
            continue
        fits.append((_time_to_result(c, stages, where), c, where, stages))
    if fits:
        _, c, where, stages = min(fits, key=lambda f: f[0])
        others = list(dict.fromkeys(_label(f[1], f[2]) for f in fits if f[1] is not c))
        return _plan(c, stages, budget, device, precision, _fallback_note(cfg, c, where, others), state=where)
    assert failure is not None
    raise _too_small(failure, budget)


def _optimizer_state(value: OptimizerState | str, cfg: StyleConfig) -> OptimizerState:
    try:
        state = OptimizerState(value)
    except ValueError:
        choices = ", ".join(m.value for m in OptimizerState)
        raise ConfigError(f"`optimizer_state` must be one of {choices}, got {value!r}", params=("optimizer_state",)) from None
    if state == OptimizerState.HOST and cfg.optimizer != Optimizer.LBFGS:
        raise ConfigError("`optimizer_state` host keeps L-BFGS's history in host memory, and Adam has none: use auto or device", params=("optimizer_state",))
    return state


def _check_host_budget(stages: Sequence[StagePlan], host_budget: int | None) -> None:
    need = max(s.host_bytes for s in stages)
    if host_budget is not None and need > host_budget:
        raise PlanError(
            f"L-BFGS's history needs {format_size(need)} of host memory, more than the {format_size(host_budget)} available; "
            "use a smaller `size`, or `optimizer_state` auto (a shorter history or Adam)",
            params=("optimizer_state", "size"),
        )


def _too_small(failure: _TooSmall, budget: int | None) -> PlanError:
    """The budget that would do, and what else would: a smaller size where there is one, and
    PyTorch's targets where ONNX Runtime's session is a share of the need."""
    assert budget is not None
    smallest = failure.smallest
    how = f"even {smallest.tile} px tiles need" if smallest.tiles > 1 else "its smallest plan needs"
    other = []
    fixed = smallest.parts.get("weights", 0) + smallest.parts.get("source", 0)  # what no size makes smaller
    if failure.size > MIN_SIZE and fixed < budget:
        other.append("a smaller `size`")
    if smallest.parts.get("source") and smallest.estimated_peak_bytes - smallest.parts["source"] <= budget:
        other.append(f"`targets` torch (ONNX Runtime's session is {format_size_up(smallest.parts['source'])} of it)")
    return PlanError(
        f"`max_memory` {format_size(budget)} is too small for size {failure.size}: {how} about "
        f"{format_size_up(smallest.estimated_peak_bytes)}; give at least that" + "".join(f", or {o}" for o in other),
        params=("max_memory", "size", "targets"),
    )


def _fallback_note(cfg: StyleConfig, c: StyleConfig, where: str, others: list[str]) -> str:
    """Why the plan's optimiser differs from the configuration's, in one line."""
    than = " or ".join(others)
    if c.optimizer == Optimizer.ADAM:
        if not others:
            return f"Adam instead of L-BFGS: a history of {min(SHORTER_HISTORIES)} does not fit"
        ratio = ITERATIONS_TO_RESULT["adam"] / ITERATIONS_TO_RESULT.get(_fallback_key(cfg), 1.0)
        measured = f"measured, Adam takes {ratio:.2f}x L-BFGS's iterations to a result"
        if _label(cfg, OptimizerState.HOST.value) in others:  # whatever the bus: it only adds to each of L-BFGS's
            measured += "; a host history adds bus transfers to each of those"
        return f"Adam: sooner to a result than {than} ({measured})"
    if where == OptimizerState.HOST.value:
        why = f"sooner to a result than {than}" if others else "nothing else fits"
        return f"L-BFGS history {cfg.lbfgs_history} in host memory, streamed: {why}"
    if "Adam" in others:
        return f"L-BFGS history {cfg.lbfgs_history} -> {c.lbfgs_history}: sooner to a result than {than}"
    return f"L-BFGS history shortened from {cfg.lbfgs_history} to {c.lbfgs_history} to fit"


def _plan(cfg: StyleConfig, stages: tuple[StagePlan, ...], budget: int | None, device: str, precision: Precision, note: str, *, state: str = "device") -> Plan:
    history = cfg.lbfgs_history if cfg.optimizer == Optimizer.LBFGS else None
    return Plan(
        stages, budget, device, precision.value, optimizer_state=state, optimizer=Optimizer(cfg.optimizer).value, lbfgs_history=history, optimizer_note=note
    )


def format_size(n: float) -> str:
    """Decimal units, as `--max-memory` reads them: `1.3 GB`, `800 MB`."""
    return format_bytes(n, decimal=True)


def format_size_up(n: int) -> str:
    """`format_size` rounded up: a size that, given back as `--max-memory`, is at least `n` bytes."""
    shown = n
    while parse_size(format_size(shown).replace(" ", "")) < n:
        shown = math.ceil(shown * 1.001) + 1
    return format_size(shown)


__all__ = [
    "CONTENT_TARGETS", "CUDA_OVERHEAD", "ONNX_SESSION_FACTOR", "OVERHEAD", "OptimizerState", "Plan", "PlanError", "StagePlan", "TileMode", "activation_bytes", "format_size", "format_size_up", "history_bytes", "optimizer_bytes",
    "parse_size", "allocator_overhead", "shared_bytes", "DEVICE_WORK_PER_S", "HOST_BUS_BYTES_PER_S", "ITERATIONS_TO_RESULT", "SHORTER_HISTORIES", "iteration_cost", "onnx_session_bytes", "peak_phase", "plan_run", "stage_parts", "stage_phases", "style_shape", "weight_bytes",
]  # fmt: skip
