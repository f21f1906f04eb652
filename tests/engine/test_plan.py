"""The memory model and the planner: sizes with suffixes, whole or tiled under a budget, the
optimiser's fallbacks, the errors; and the model's estimate against a measured peak RSS."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from nst.engine.config import GATYS, SEED, Optimizer, Precision, preset
from nst.engine.errors import ConfigError
from nst.engine.plan import (
    ITERATIONS_TO_RESULT, ONNX_SESSION_FACTOR, OVERHEAD, PlanError, TileMode, format_size_up, iteration_cost, onnx_session_bytes, parse_size, plan_run, stage_parts, stage_phases,
    weight_bytes,
)  # fmt: skip
from nst.engine.tiles import tile_halo

ONE_STAGE = {"scales": ()}


@pytest.mark.parametrize(
    ("text", "n"),
    [("4GB", 4 * 10**9), ("4GiB", 4 * 2**30), ("800MB", 800 * 10**6), ("800 MiB", 800 * 2**20), ("1.5G", 1_500_000_000), ("2048", 2048), ("3kb", 3000)],
)
def test_sizes_take_decimal_and_binary_suffixes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "lots", "4XB", "-1GB", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_whole_when_it_fits_else_the_largest_tile_that_does():
    cfg = preset("gatys", size=1024, **ONE_STAGE)
    whole = plan_run(cfg, (1536, 1024), [(512, 512)], budget=None)
    (stage,) = whole.stages
    assert stage.mode == "whole" and stage.tiles == 1 and stage.tile is None and stage.hw == (683, 1024)
    need = stage.estimated_peak_bytes
    assert plan_run(cfg, (1536, 1024), [(512, 512)], budget=need).stages[0].mode == "whole"
    assert plan_run(cfg, (1536, 1024), [(512, 512)], budget=need * 10, tile=TileMode.OFF).stages[0].mode == "whole"
    tiled = plan_run(cfg, (1536, 1024), [(512, 512)], budget=need - 1)
    (t,) = tiled.stages
    assert t.mode == "tiled" and t.tile % 16 == 0 and t.halo == tile_halo(cfg.content_layers + cfg.style_layers) == 80
    assert t.estimated_peak_bytes <= need - 1 < stage.estimated_peak_bytes
    bigger = plan_run(cfg, (1536, 1024), [(512, 512)], tile=t.tile + 16).stages[0]
    assert bigger.estimated_peak_bytes > need - 1  # the next tile up would not have fitted
    assert t.grid == (-(-683 // t.tile), -(-1024 // t.tile)) and t.tiles == t.grid[0] * t.grid[1]
    d = tiled.to_dict()["stages"][0]
    assert {"size", "mode", "tile", "tiles", "estimated_peak_bytes"} <= set(d) and d["estimated_peak_bytes"] == sum(d["parts"].values())


def test_a_given_tile_tiles_the_stages_larger_than_it():
    cfg = preset("gatys", size=512, scales=(128, 256, 512))
    plan = plan_run(cfg, (512, 512), [(256, 256)], tile=200)
    assert [(s.mode, s.tile) for s in plan.stages] == [("whole", None), ("tiled", 192), ("tiled", 192)]
    assert plan.tile_for(0) is None and plan.tile_for(2) == 192


def test_parts_grow_with_the_image_and_shrink_with_the_tile():
    cfg = preset("gatys", size=1024, **ONE_STAGE)
    small, large = (stage_parts(cfg, hw, [hw], precision=Precision.FP32, tile=None) for hw in ((256, 256), (512, 512)))
    for part in ("images", "optimizer", "activations"):
        assert 3.5 < large[part] / small[part] < 4.5, part
    assert large["weights"] == small["weights"]
    assert large["overhead"] == int(OVERHEAD * sum(v for k, v in large.items() if k != "overhead"))
    tiled = stage_parts(cfg, (2048, 2048), [(64, 64)], precision=Precision.FP32, tile=256)
    whole = stage_parts(cfg, (2048, 2048), [(64, 64)], precision=Precision.FP32, tile=None)
    assert tiled["activations"] < whole["activations"] / 10 and tiled["optimizer"] == whole["optimizer"]
    # The network cuts a tile's halo as it goes deeper (`VGGFeatures.forward`'s `owned`): a tile's
    # maps are less than its whole crop's, more than the tile's own.
    from nst.engine.plan import activation_bytes

    layers = cfg.content_layers + cfg.style_layers
    crop = (256 + 2 * 80, 256 + 2 * 80)
    cut, uncut, own = (activation_bytes(layers, hw, precision=Precision.FP32, pooling=cfg.pooling, tile=t) for hw, t in ((crop, 256), (crop, None), ((256, 256), None)))
    assert own < cut < 0.9 * uncut, (own, cut, uncut)
    assert stage_parts(cfg, (512, 512), [], precision=Precision.BF16, tile=None)["activations"] < large["activations"]


def test_an_onnx_runtime_session_is_counted_in_every_stage():
    """A run whose targets come from ONNX Runtime holds its session (a copy of the weights) beside
    the loop's network: the part `source`, in both phases of every stage, and a budget that held
    the run whole without it tiles with it."""
    cfg = preset("gatys", size=512, scales=(256, 512), iterations=1)
    session = onnx_session_bytes(cfg.content_layers + cfg.style_layers)
    assert session == int(ONNX_SESSION_FACTOR * weight_bytes(cfg.content_layers + cfg.style_layers, Precision.FP32))
    assert onnx_session_bytes(cfg.content_layers + cfg.style_layers, "fp16") == pytest.approx(session / 2, abs=1)
    without = plan_run(cfg, (512, 512), [(256, 256)])
    with_it = plan_run(cfg, (512, 512), [(256, 256)], held={"source": session})
    for a, b in zip(without.stages, with_it.stages):
        assert "source" not in a.parts and b.parts["source"] == session
        assert b.estimated_peak_bytes - a.estimated_peak_bytes == pytest.approx(session * (1 + OVERHEAD), rel=1e-3)
    phases = stage_phases(cfg, (512, 512), [(256, 256)], precision=Precision.FP32, tile=None, held={"source": session})
    assert all(p["source"] == session for p in phases.values())
    budget = without.stages[-1].estimated_peak_bytes
    assert plan_run(cfg, (512, 512), [(256, 256)], budget=budget).stages[-1].mode == "whole"
    assert plan_run(cfg, (512, 512), [(256, 256)], budget=budget, held={"source": session}).stages[-1].mode == "tiled"


def test_lbfgs_history_is_shortened_or_adam_chosen(monkeypatch):
    cfg = preset("gatys", size=2048, **ONE_STAGE)
    assert cfg.optimizer == Optimizer.LBFGS and cfg.lbfgs_history == 20
    fits_20 = plan_run(cfg, (2048, 1365), [(64, 64)], budget=10**11)
    assert fits_20.optimizer == "lbfgs" and fits_20.lbfgs_history == 20 and fits_20.changes(cfg) == {}
    # Where a shorter history and Adam both fit, the one estimated to reach a result soonest (its
    # measured iterations to a result times its tiles' work) is taken.
    both = plan_run(cfg, (2048, 1365), [(64, 64)], budget=int(1.2e9))
    assert both.optimizer == ("adam" if ITERATIONS_TO_RESULT["adam"] <= ITERATIONS_TO_RESULT["lbfgs:5"] else "lbfgs")
    monkeypatch.setitem(ITERATIONS_TO_RESULT, "adam", 100.0)
    short = plan_run(cfg, (2048, 1365), [(64, 64)], budget=int(1.2e9))
    assert short.optimizer == "lbfgs" and short.lbfgs_history in (10, 5) and short.changes(cfg) == {"lbfgs_history": short.lbfgs_history}
    # Both shorter histories fit (10 with its content targets made per tile): each is named.
    other = 15 - short.lbfgs_history
    assert short.optimizer_note == f"L-BFGS history 20 -> {short.lbfgs_history}: sooner to a result than an L-BFGS history of {other} or Adam"
    monkeypatch.setitem(ITERATIONS_TO_RESULT, "adam", 0.01)
    fast = plan_run(cfg, (2048, 1365), [(64, 64)], budget=int(1.2e9))
    assert fast.optimizer == "adam" and "sooner to a result" in fast.optimizer_note
    # Where no history fits, Adam, whatever the measurements.
    adam = plan_run(cfg, (2048, 1365), [(64, 64)], budget=int(8e8))
    assert adam.optimizer == "adam" and adam.lbfgs_history is None and adam.changes(cfg) == {"optimizer": Optimizer.ADAM}
    assert adam.stages[0].mode == "tiled" and adam.estimated_peak_bytes <= 8e8
    assert "a history of 5 does not fit" in adam.optimizer_note
    with pytest.raises(PlanError):
        plan_run(cfg, (2048, 1365), [(64, 64)], budget=int(8e8), optimizer_fallback=False)


# L-BFGS's history in host memory. Planning for a CUDA device needs no GPU: the device is a name.
CUDA_2048 = {"content_wh": (2048, 1365), "style_whs": [(64, 64)], "device": "cuda:0"}


def test_host_history_when_asked_fits_where_the_device_history_does_not():
    cfg = preset("gatys", size=2048, **ONE_STAGE)
    budget = int(8e8)
    vec = 3 * 1365 * 2048 * 4
    # On the device no history fits this budget even in the smallest tiles: Adam.
    device = plan_run(cfg, **CUDA_2048, budget=budget, optimizer_state="device")
    assert (device.optimizer, device.optimizer_state) == ("adam", "device")
    host = plan_run(cfg, **CUDA_2048, budget=budget, optimizer_state="host", host_budget=10**11)
    assert (host.optimizer, host.lbfgs_history, host.optimizer_state) == ("lbfgs", 20, "host") and host.changes(cfg) == {}
    (stage,) = host.stages
    assert stage.mode == "tiled" and stage.estimated_peak_bytes <= budget
    assert stage.host_bytes == host.host_bytes == 2 * 20 * vec  # the history, off the device
    assert stage.parts["optimizer"] == 4 * vec + 2 * 64 * 2**20  # the rest of L-BFGS and two chunks in flight
    d = host.to_dict()
    assert d["optimizer_state"] == "host" and d["host_bytes"] == 2 * 20 * vec and d["stages"][0]["host_bytes"] == 2 * 20 * vec
    assert device.to_dict()["host_bytes"] == 0
    # More host memory than there is: one line naming both.
    with pytest.raises(PlanError, match=r"L-BFGS's history needs 1.3 GB of host memory, more than the 1.0 GB available") as e:
        plan_run(cfg, **CUDA_2048, budget=budget, optimizer_state="host", host_budget=10**9)
    assert "\n" not in str(e.value)
    # Too little device memory even with the history away: the usual error, naming what would do.
    with pytest.raises(PlanError, match="is too small for size 2048"):
        plan_run(cfg, **CUDA_2048, budget=int(5e8), optimizer_state="host")


def test_auto_weighs_the_host_history_against_the_other_fallbacks(monkeypatch):
    cfg = preset("gatys", size=2048, **ONE_STAGE)
    # Measured, Adam reaches a result in 0.17x L-BFGS's iterations: it wins whatever the bus.
    auto = plan_run(cfg, **CUDA_2048, budget=int(1e9), host_budget=10**11)
    assert auto.optimizer == "adam" and auto.optimizer_state == "device"
    assert auto.optimizer_note.startswith("Adam: sooner to a result than an L-BFGS history of 5 or L-BFGS with its history in host memory")
    assert "0.17x L-BFGS's iterations" in auto.optimizer_note and "bus transfers" in auto.optimizer_note
    # Were Adam and the shorter histories slow, the host history would be taken (same history).
    for key in ("adam", "lbfgs:10", "lbfgs:5"):
        monkeypatch.setitem(ITERATIONS_TO_RESULT, key, 100.0)
    host = plan_run(cfg, **CUDA_2048, budget=int(1e9), host_budget=10**11)
    assert (host.optimizer, host.lbfgs_history, host.optimizer_state) == ("lbfgs", 20, "host") and host.changes(cfg) == {}
    assert host.optimizer_note.startswith("L-BFGS history 20 in host memory, streamed: sooner to a result than")
    # ... unless it does not fit host memory, or the run is on the CPU, or the state is pinned to the device.
    assert plan_run(cfg, **CUDA_2048, budget=int(1e9), host_budget=10**9).optimizer_state == "device"
    assert plan_run(cfg, **{**CUDA_2048, "device": "cpu"}, budget=int(1e9)).optimizer_state == "device"
    assert plan_run(cfg, **CUDA_2048, budget=int(1e9), optimizer_state="device").optimizer_state == "device"
    # The bus's cost counts. At 2048x1365 the history (1.3 GB) crossing the bus three times an
    # iteration costs several times the network's work in the model, so a shorter history, at
    # 1.12x the iterations, wins; were the bus 1000x faster, the host history would.
    monkeypatch.setitem(ITERATIONS_TO_RESULT, "lbfgs:10", 500 / 445)
    monkeypatch.setitem(ITERATIONS_TO_RESULT, "lbfgs:5", 500 / 445)
    short = plan_run(cfg, **CUDA_2048, budget=int(1e9))
    assert short.optimizer_state == "device" and short.lbfgs_history in (10, 5)
    import nst.engine.plan as plan_module

    monkeypatch.setattr(plan_module, "HOST_BUS_BYTES_PER_S", plan_module.HOST_BUS_BYTES_PER_S * 1000)
    assert plan_run(cfg, **CUDA_2048, budget=int(1e9)).optimizer_state == "host"


def test_host_history_on_the_cpu_is_the_same_memory():
    cfg = preset("gatys", size=512, **ONE_STAGE)
    device = plan_run(cfg, (512, 341), [(64, 64)], budget=10**10)
    host = plan_run(cfg, (512, 341), [(64, 64)], budget=10**10, optimizer_state="host")
    assert host.optimizer_state == "host" and host.host_bytes == 0 and "saves none" in host.optimizer_note
    assert host.stages[0].parts == device.stages[0].parts  # the history still counts against the budget


def test_bad_optimizer_states_are_refused():
    cfg = preset("gatys", size=256, **ONE_STAGE)
    with pytest.raises(ConfigError, match="`optimizer_state` must be one of auto, device, host, got 'disk'"):
        plan_run(cfg, (256, 256), [(64, 64)], optimizer_state="disk")
    with pytest.raises(ConfigError, match="Adam has none"):
        plan_run(preset("seed", size=256, **ONE_STAGE), (256, 256), [(64, 64)], optimizer_state="host")


def test_iteration_cost_counts_the_halo_and_both_passes():
    layers = ("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    assert iteration_cost((768, 512), None, layers) == 3 * 768 * 512
    # 512 px tiles of a 768x512 image: two crops, 512 + 80 and 256 + 80 px wide, which the network
    # cuts down as it goes deeper: more work than the image, less than the whole crops twice over.
    tiled = iteration_cost((512, 768), 512, layers)
    assert 4 * 512 * 768 < tiled < 4 * 512 * (592 + 336), tiled
    assert iteration_cost((512, 768), 768, layers) == 3 * 512 * 768  # one tile: no halo, one forward (pass 2 reuses it)
    # Smaller tiles, more halo: 256 px tiles cost more than 512 px ones.
    assert iteration_cost((512, 768), 256, layers) > tiled


def test_content_targets_are_made_per_tile_only_when_held_ones_do_not_fit():
    """8192 px in fp32 (the issue's 4 GB print-size plan on a CPU without bf16): the content targets
    at relu4_2 are 1.4 GB, more than the smallest tile saves. Made again at each tile's pass, the
    loop holds the content image instead (0.5 GB), and the plan fits; it costs a forward pass a tile,
    which the time to a result counts. Where held ones fit, they are held."""
    cfg = preset("gatys", size=8192, **ONE_STAGE)
    args = (cfg, (1536, 1024), [(512, 512)])
    hw = (5461, 8192)
    (stage,) = plan_run(*args, budget=4 * 10**9).stages
    assert stage.mode == "tiled" and stage.content_targets == "per tile" and stage.estimated_peak_bytes <= 4 * 10**9
    held = stage_phases(cfg, hw, [(512, 512)], precision=Precision.FP32, tile=stage.tile)["loop"]
    assert sum(held.values()) > 4 * 10**9  # held targets at the same tile would not fit
    assert held["targets"] - stage.parts["targets"] == 512 * (hw[0] // 8) * (hw[1] // 8) * 4
    assert stage.parts["images"] - held["images"] == 3 * hw[0] * hw[1] * 4
    assert stage.to_dict()["content_targets"] == "per tile"
    roomy = plan_run(*args, budget=8 * 10**9).stages[0]
    assert roomy.mode == "tiled" and roomy.content_targets == "held"
    layers = cfg.content_layers + cfg.style_layers
    assert iteration_cost(hw, 1024, layers, content_per_tile=True) > iteration_cost(hw, 1024, layers)
    # A whole stage, or one without a content layer, holds nothing to make per tile.
    assert plan_run(*args, budget=None).stages[0].content_targets == "held"
    style_only = dataclasses.replace(cfg, content_layers=())
    assert plan_run(style_only, (1536, 1024), [(512, 512)], budget=4 * 10**9).stages[0].content_targets == "held"
    # Asked for by name: per tile at any tile, or held (then 4 GB is too small).
    asked = plan_run(*args, tile=1024, content_targets="per tile").stages[0]
    assert asked.tile == 1024 and asked.content_targets == "per tile"
    with pytest.raises(PlanError):
        plan_run(*args, budget=4 * 10**9, content_targets="held")
    with pytest.raises(ConfigError, match="`content_targets` must be auto, held or per tile"):
        plan_run(*args, content_targets="lazy")


def test_too_small_a_budget_names_one_that_works():
    cfg = preset("seed", size=4096, **ONE_STAGE)
    with pytest.raises(PlanError) as e:
        plan_run(cfg, (4096, 4096), [(64, 64)], budget=10**8)
    msg = str(e.value)
    assert "`max_memory` 100 MB is too small for size 4096" in msg and "\n" not in msg
    value, unit = re.search(r"need about ([\d.]+) (MB|GB)", msg).groups()
    named = parse_size(f"{value}{unit}")
    assert plan_run(cfg, (4096, 4096), [(64, 64)], budget=named).stages[0].mode == "tiled"  # the size named, as given back, does
    assert msg.endswith("give at least that, or a smaller `size`") and "even 64 px tiles need" in msg


def test_too_small_a_budget_suggests_only_what_would_help():
    """At the smallest size no smaller `size` exists; where ONNX Runtime's session is what tips the
    budget over, PyTorch's targets are named, and not where they would not fit either."""
    tiny = preset("gatys", size=32, **ONE_STAGE)
    with pytest.raises(PlanError) as e:
        plan_run(tiny, (48, 32), [(64, 64)], budget=6 * 10**7)
    assert "its smallest plan needs about" in str(e.value) and "smaller `size`" not in str(e.value) and "targets" not in str(e.value)
    cfg = preset("gatys", size=64, **ONE_STAGE)
    need = plan_run(cfg, (64, 43), [(64, 64)], tile=TileMode.OFF).stages[0].estimated_peak_bytes
    source = 60 * 10**6
    with pytest.raises(PlanError) as e:
        plan_run(cfg, (64, 43), [(64, 64)], budget=need + source // 2, held={"source": source})
    assert "or `targets` torch (ONNX Runtime's session is 60.0 MB of it)" in str(e.value) and e.value.params[-1] == "targets"
    with pytest.raises(PlanError) as e:
        plan_run(cfg, (64, 43), [(64, 64)], budget=need // 2, held={"source": source})
    assert "targets" not in str(e.value)


@pytest.mark.parametrize("n", [999, 3_749_999_999, 3_750_000_001, 123_456_789, 10**9, 2**40])
def test_a_size_named_as_enough_is_rounded_up(n):
    """`format_size_up`: what an error names as enough is at least that when given back as
    --max-memory, and no more than a rounding step above it (`format_size` rounds to nearest)."""
    text = format_size_up(n)
    assert n <= parse_size(text.replace(" ", "")) <= n * 1.06, text


def test_images_larger_than_the_machine_are_refused_before_any_plan():
    cfg = dataclasses.replace(GATYS, size=4096, scales=())
    with pytest.raises(PlanError, match=r"image buffers alone, more than this machine's 100 MB"):
        plan_run(cfg, (4096, 4096), [(64, 64)], host_bytes=10**8)
    assert plan_run(cfg, (4096, 4096), [(64, 64)], host_bytes=10**12).stages


# Runs one whole-image stage in a fresh process and prints the plan's estimate and the peak RSS the
# stage added (Linux: VmHWM reset through /proc/self/clear_refs just before the run). Adam's first
# step loads more of torch's Python code; that is done first, it is the library's, not the run's.
_MEASURE = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from nst.engine.config import Precision, preset
from nst.engine.device import Runtime
from nst.engine.plan import plan_run
from nst.engine.transfer import stylize
from nst.engine.weights import random_weights

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

size, tile, precision, optimizer = int(sys.argv[1]), int(sys.argv[2]) or None, Precision(sys.argv[3]), sys.argv[4]
onnx = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None  # an exported target module: its session is opened in the measured run
content_targets = sys.argv[6] if len(sys.argv) > 6 else "auto"  # tiled: "per tile", made at each tile's pass
rng = np.random.default_rng(0)
content = Image.fromarray(rng.integers(0, 256, (size * 2 // 3, size, 3), dtype=np.uint8))
style = Image.fromarray(rng.integers(0, 256, (size // 2, size // 2, 3), dtype=np.uint8))
weights = random_weights(seed=0)
# Tiled: shallow layers keep the tiles cheap, and the image-sized buffers are most of the peak.
shallow = {"content_layers": ("relu2_2",), "style_layers": ("relu1_1", "relu2_1", "relu3_1")} if tile else {}
cfg = preset("gatys", size=size, scales=(), iterations=1, optimizer=optimizer, **shallow)
held = {}
if onnx:
    import onnxruntime  # the library is loaded before the measurement, as torch is
    from nst.engine.plan import onnx_session_bytes
    from nst.engine.onnx_targets import OnnxTargets
    held = {"source": onnx_session_bytes(cfg.content_layers + cfg.style_layers)}
plan = plan_run(cfg, content.size, [style.size], precision=precision, tile=tile or "auto", held=held, content_targets=content_targets)
p = torch.zeros(4, requires_grad=True); opt = torch.optim.Adam([p]); p.sum().backward(); opt.step()
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
assert plan.stages[0].mode == ("tiled" if tile else "whole") and plan.stages[0].content_targets == ("per tile" if content_targets == "per tile" else "held")
source = OnnxTargets(onnx, provider="cpu") if onnx else None
stylize(content, [style], cfg, weights=weights, runtime=Runtime(precision=precision), plan=plan, targets=source)
print(json.dumps({"estimate": plan.stages[0].estimated_peak_bytes, "measured": status("VmHWM:") - base}))
"""


def _measured(case: tuple) -> dict:
    """One measurement of `case` in a fresh process with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, case)], capture_output=True, text=True, timeout=400, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check_measured(cases: dict, at_once: int) -> None:
    """Measure every case (a whole one three times, keeping the least peak) `at_once` at a time
    (at most two), and check each estimate against its measured peak within the case's (low,
    high) ratio."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [case for case in cases for _ in range(1 if case[1] else 3)]
    # Two at a time on two cores: 14 at once thrashed. Under pytest-xdist's `-n 2` one at a time,
    # beside the other worker's tests (two made a Ray test beside them 9x slower).
    with ThreadPoolExecutor(max_workers=min(2, at_once)) as pool:
        results = list(pool.map(_measured, runs))
    for case in cases:
        got = [r for c, r in zip(runs, results) if c == case]
        least = min(got, key=lambda g: g["measured"])
        ratio = least["estimate"] / least["measured"]
        low, high = cases[case]
        assert low <= ratio <= high, (case, got, ratio)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, worker_cores):
    """Whole-image mode, fp32 on the CPU, at three sizes: within 20%. Tiled, where the image-sized
    buffers (L-BFGS's history in fp32) are much of the peak: at most 30% over and 10% under (the
    tiles' activations are counted on the safe side: measured 1.10x to 1.24x). The processes run
    two at a time (one under `-n 2`), one torch thread each. A whole case is measured three times
    and the least peak kept: the same run in a fresh process peaked anywhere from 182 to 232 MB at
    224 px (the allocator's slack, not the run's tensors), which alone moved the ratio from 1.0 to
    0.78. One whole case takes its targets from ONNX Runtime, whose session (the part `source`)
    the run opens: within 20% as well. A tiled case that makes its content targets per tile
    (holding the content image instead): in the tiled band too (measured 1.19x, against 1.16x
    held)."""
    from nst.engine.weights import random_weights
    from nst.export import ModuleSpec, export_targets

    model = export_targets(random_weights(seed=0), tmp_path / "targets.onnx", ModuleSpec(GATYS.content_layers, GATYS.style_layers)).path
    _check_measured({(224, 0, "fp32", "lbfgs"): (0.8, 1.2), (320, 0, "fp32", "lbfgs"): (0.8, 1.2), (448, 0, "fp32", "lbfgs"): (0.8, 1.2),
                     (320, 0, "fp32", "lbfgs", model): (0.8, 1.2), (1024, 128, "fp32", "lbfgs"): (0.9, 1.3),
                     (1024, 128, "fp32", "lbfgs", "", "per tile"): (0.9, 1.3)}, worker_cores)  # fmt: skip


@pytest.mark.slow
@pytest.mark.bf16
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_tiled_bf16_estimate_is_within_30_percent_of_the_measured_peak(worker_cores):
    """Tiled in bf16 with Adam, where Adam's moments, the bf16 content targets and the
    half-precision last finite image are much of the peak: at most 30% over and 10% under, as the
    fp32 tiled case. Its own test: where bf16 is emulated it ran past 400 s (marked bf16)."""
    _check_measured({(1536, 256, "bf16", "adam"): (0.9, 1.3)}, worker_cores)


def test_a_cuda_plan_counts_no_allocator_overhead():
    """CUDA's peak is read from the caching allocator's own count of tensor bytes, which the parts
    already model (OVERHEAD is the CPU's malloc and oneDNN slack); the rest of the plan is the same."""
    from nst.engine.plan import CUDA_OVERHEAD

    cfg = preset("gatys", size=1024, scales=())
    cpu = plan_run(cfg, (1024, 683), [(512, 512)], tile=TileMode.OFF, device="cpu").stages[0]
    gpu = plan_run(cfg, (1024, 683), [(512, 512)], tile=TileMode.OFF, device="cuda:0").stages[0]
    assert CUDA_OVERHEAD < OVERHEAD
    assert gpu.parts["overhead"] == int(CUDA_OVERHEAD * sum(v for k, v in gpu.parts.items() if k != "overhead"))
    assert cpu.parts["overhead"] > 0
    assert {k: v for k, v in gpu.parts.items() if k != "overhead"} == {k: v for k, v in cpu.parts.items() if k != "overhead"}
    assert gpu.estimated_peak_bytes < cpu.estimated_peak_bytes
    # What jobs optimised together hold once carries the same share (none on CUDA).
    from nst.engine.plan import shared_bytes

    gpu_plan = plan_run(cfg, (1024, 683), [(512, 512)], tile=TileMode.OFF, device="cuda:0")
    assert shared_bytes(gpu_plan) == gpu_plan.stages[0].parts["weights"]
    cpu_plan = plan_run(cfg, (1024, 683), [(512, 512)], tile=TileMode.OFF, device="cpu")
    assert shared_bytes(cpu_plan) == int(cpu_plan.stages[0].parts["weights"] * (1 + OVERHEAD))


def test_bf16_on_cuda_counts_no_fp32_copy_of_the_style_maps():
    """On a CUDA GPU in bf16 the Grams multiply the bf16 maps into fp32 on the tensor cores, so the
    loop keeps no fp32 copy of a style layer's map (the H200's measurement: counting them put the
    1024 px estimate at 1.21x the peak). The CPU converts, fp32 has nothing to copy, masks' guided
    Grams weight an fp32 copy, and a layer that is content too keeps its copy for the difference."""
    import math

    from nst.engine.layers import feature_hw, layer_channels
    from nst.engine.plan import activation_bytes, uncopied_taps

    cfg = preset("gatys", size=1024, **ONE_STAGE)
    assert uncopied_taps(cfg, "cuda:0", Precision.BF16) == frozenset(cfg.style_layers) - frozenset(cfg.content_layers)
    assert uncopied_taps(cfg, "cpu", Precision.BF16) == frozenset()
    assert uncopied_taps(cfg, "cuda:0", Precision.FP32) == frozenset()
    assert uncopied_taps(dataclasses.replace(cfg, masks=("m.png",)), "cuda:0", Precision.BF16) == frozenset()
    both = dataclasses.replace(cfg, content_layers=("conv4_1",))
    assert "conv4_1" not in uncopied_taps(both, "cuda", Precision.BF16)

    layers = tuple(cfg.content_layers) + tuple(cfg.style_layers)
    hw = (683, 1024)
    copied = activation_bytes(layers, hw, precision=Precision.BF16, pooling=cfg.pooling)
    uncopied = uncopied_taps(cfg, "cuda", Precision.BF16)
    not_copied = activation_bytes(layers, hw, precision=Precision.BF16, pooling=cfg.pooling, uncopied=uncopied)
    assert copied - not_copied == sum(layer_channels(t) * math.prod(feature_hw(hw, t)) * 4 for t in uncopied) > 0
    # The plan's loop phase drops them where they are not made, and only there.
    loops = {d: stage_phases(cfg, hw, [(512, 512)], precision=Precision.BF16, tile=None, uncopied=uncopied_taps(cfg, d, Precision.BF16))["loop"]
             for d in ("cuda", "cpu")}
    assert loops["cpu"]["activations"] - loops["cuda"]["activations"] == copied - not_copied


def test_seed_presets_deeper_content_layer_widens_the_halo():
    assert plan_run(dataclasses.replace(SEED, size=2048), (2048, 2048), [], tile=512).stages[0].halo == 96


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_is_within_20_percent_of_cuda_max_memory_allocated(precision, weights):
    """The issue's check on a GPU: whole-image mode at three sizes, the plan's estimate against
    what `torch.cuda.max_memory_allocated` saw over the run (from the memory already allocated
    before it: the CUDA context is not a tensor and is not counted by either), once cuDNN has
    tuned its kernels for the run's shapes. The tuning itself tries kernels with workspaces as
    large as the free memory (on an H100 the first run peaked at 35 GB at 512 px and 70 GB at
    1024 px, fp32); it is a one-off per shape, and not what the run needs. First run on an H100:
    the tuned runs came to 1.20x and 1.21x of the estimate with the CPU's overhead share, hence
    CUDA_OVERHEAD. On an H200 (2026-11-26) fp32 passed at all three sizes and bf16 failed at
    1024 px, 1.21x (1686 MB estimated, 1396 MB measured), hence `plan.uncopied_taps`: the
    estimate is now 1482 MB there (1.06x, arithmetic on that measurement; not run again)."""
    import numpy as np
    import torch
    from PIL import Image

    from nst.engine.device import Runtime
    from nst.engine.transfer import MemoryRequest, plan_for, stylize

    dev = torch.device("cuda")
    runtime = Runtime(device=dev, precision=Precision(precision))
    rng = np.random.default_rng(0)
    for size in (512, 1024, 1536):
        content = Image.fromarray(rng.integers(0, 256, (size * 2 // 3, size, 3), dtype=np.uint8))
        style = Image.fromarray(rng.integers(0, 256, (size // 2, size // 2, 3), dtype=np.uint8))
        cfg = preset("gatys", size=size, scales=(), iterations=2)
        plan = plan_for(content.size, [style.size], cfg, runtime, MemoryRequest(tile=TileMode.OFF))
        assert plan.stages[0].mode == "whole"
        stylize(content, [style], cfg, weights=weights, runtime=runtime, plan=plan)  # cuDNN tunes its kernels
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        stylize(content, [style], cfg, weights=weights, runtime=runtime, plan=plan)
        torch.cuda.synchronize(dev)
        measured = torch.cuda.max_memory_allocated(dev) - base
        ratio = plan.estimated_peak_bytes / measured
        assert 0.8 <= ratio <= 1.2, (size, precision, plan.estimated_peak_bytes, measured, ratio)
