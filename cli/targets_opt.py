"""`--targets`, `--onnx`, `--provider`: choosing where a run's style/content targets come from."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING

from nst.engine import onnx_meta
from nst.engine.cache import TargetCache
from nst.engine.config import MAX_SIZE, Provider, SizeEdge, StyleConfig
from nst.engine.layers import min_input_size

from .common import ResourceMissing, UserError, cache_dir, console, flag_message

if TYPE_CHECKING:
    from nst.engine.device import Runtime
    from nst.engine.targets import TargetSource
    from nst.engine.transfer import TargetCacheLike
    from nst.engine.weights import Weights


class TargetsMode(str, enum.Enum):
    AUTO = "auto"
    ONNX = "onnx"
    TORCH = "torch"


def check_targets_options(targets: TargetsMode | str, onnx: Path | None, provider: Provider | str) -> None:
    """`--onnx` and `--provider` are ONNX Runtime's: refused with `--targets torch` before any
    work (a batch found the --onnx clash only once its first job started)."""
    if TargetsMode(targets) != TargetsMode.TORCH:
        return
    if onnx is not None:
        raise UserError("--onnx needs --targets onnx or auto, not torch")
    if Provider(provider) != Provider.AUTO:
        raise UserError(f"--provider {Provider(provider).value} chooses ONNX Runtime's provider: give it with --targets onnx or auto, not torch")


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def shape_profile(cfg: StyleConfig):  # -> ShapeProfile (imported lazily with onnxruntime)
    """TensorRT's input range for this run: every stage's output and style image fits inside it.

    The images' aspect ratios are not known here, so the range runs from the smallest input the
    deepest layer accepts to the largest edge any stage can produce (4:1 allowed when `size`
    measures the height).
    """
    from nst.engine.onnx_targets import ShapeProfile

    lo = min_input_size(cfg.content_layers + cfg.style_layers)
    top = max(cfg.sizes)
    hi = math.ceil(top * max(1.0, cfg.style_scale)) if not cfg.style_match_output else top
    if cfg.size_edge == SizeEdge.HEIGHT:
        hi *= 4
    hi = min(MAX_SIZE, hi)
    return ShapeProfile((lo, lo), (top, top), (hi, hi))


def _onnx_missing() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install onnx onnxruntime-gpu)"
    return None


def planned_source_bytes(mode: TargetsMode | str, *, cfg: StyleConfig, onnx_path: Path | None) -> int:
    """What the run's target source will hold beside the loop's network, for its memory plan made
    before the source opens: an ONNX Runtime session (a copy of the weights) where the targets
    come from one (`--targets onnx`, `--onnx`, or `auto` where ONNX Runtime is installed), else 0.
    Looks without importing ONNX Runtime; a model file that cannot be read counts as fp32 (the
    run then says what is wrong with it)."""
    import importlib.util

    from nst.engine.plan import onnx_session_bytes

    mode = TargetsMode(mode)
    if mode == TargetsMode.TORCH:
        return 0
    if mode == TargetsMode.AUTO and onnx_path is None and any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
        return 0
    precision = "fp32"
    if onnx_path is not None:
        try:
            precision = onnx_meta.read_meta(Path(onnx_path)).precision
        except (ValueError, OSError, ImportError):
            pass
    return onnx_session_bytes(tuple(cfg.content_layers) + tuple(cfg.style_layers), precision)


def _model_for(cfg: StyleConfig, weights: Weights, root: Path, *, quiet: bool) -> tuple[Path, str, dict[str, object]]:
    """The store's target module for this run and its checked sha256, exported (and verified) the first time."""
    from nst.export import ModuleSpec, export_to_store

    key = dict(fingerprint=weights.fingerprint, pooling=cfg.pooling.value, content_layers=cfg.content_layers, style_layers=cfg.style_layers)
    if not onnx_meta.store_path(root, **key).is_file() and not quiet:
        console.print("exporting the target module to ONNX once (later runs find it in the model store)")
    res = export_to_store(root, weights, ModuleSpec.of(cfg))
    for note in res.notes:
        _warn(note)
    info: dict[str, object] = {"model": str(res.path), "exported": res.created}
    if res.verification is not None:
        info["export_seconds"] = round(res.seconds, 3)
        info["export_max_rel_error"] = res.verification.worst
    return res.path, res.sha256, info


def _sweep(root: Path, *, quiet: bool) -> None:
    """Remove what killed runs left in the cache folder (once their writer is gone), and say so."""
    removed = TargetCache(root).sweep()
    if removed and not quiet:
        size = sum(t.bytes for t in removed) / 1e6
        console.print(f"removed {len(removed)} stale temporaries ({size:.1f} MB) that killed runs left in {root}")


def choose_targets(
    mode: TargetsMode, *, cfg: StyleConfig, weights: Weights, runtime: Runtime, onnx_path: Path | None, provider: Provider, quiet: bool, tile: int | None = None
) -> tuple[TargetSource | None, TargetCacheLike | None, dict[str, object]]:
    """(source, cache, report info); a None source means PyTorch targets. `tile`: the edge a
    tiled plan computes its targets in (`Plan.target_tile`); None, whole images.

    The cache is shared by every run but split by source: ONNX Runtime's entries (per model
    precision) and PyTorch's (per precision) never stand in for each other, although they agree
    within the tolerances the README states.
    """
    mode, provider = TargetsMode(mode), Provider(provider)
    root = cache_dir()
    _sweep(root, quiet=quiet)
    if mode == TargetsMode.TORCH:
        if onnx_path is not None:
            raise UserError("--onnx needs --targets onnx or auto, not torch")
        return None, TargetCache(root, namespace=f"torch-{runtime.precision.value}", on_warning=_warn), {}

    info: dict[str, object] = {}
    missing = _onnx_missing()
    if missing is not None:
        if mode == TargetsMode.ONNX or onnx_path is not None:
            raise ResourceMissing(f"--targets onnx needs ONNX Runtime: {missing}")
        info["fallback"] = f"torch: {missing}"
        return None, TargetCache(root, namespace=f"torch-{runtime.precision.value}", on_warning=_warn), info

    from nst.engine.onnx_targets import OnnxTargets

    sha256 = None
    if onnx_path is not None:
        path = Path(onnx_path)
        meta = onnx_meta.read_meta(path)
        meta.check_matches(fingerprint=weights.fingerprint, pooling=cfg.pooling.value, content_layers=cfg.content_layers, style_layers=cfg.style_layers, where=str(path))
        info["model"] = str(path)
    else:
        try:
            path, sha256, export_info = _model_for(cfg, weights, root, quiet=quiet)
        except (ValueError, OSError) as e:
            if mode == TargetsMode.ONNX:
                raise
            # auto: a model that cannot be made is no reason to stop the run
            reason = flag_message(e)
            info["fallback"] = f"torch: the export failed ({reason})"
            _warn(f"the ONNX export failed ({reason}); using PyTorch targets")
            return None, TargetCache(root, namespace=f"torch-{runtime.precision.value}", on_warning=_warn), info
        info.update(export_info)
        meta = onnx_meta.read_meta(path)
    source = OnnxTargets(path, provider=provider.value, device=runtime.device, cache_dir=root, profile=shape_profile(cfg), meta=meta, sha256=sha256, tile=tile)
    return source, TargetCache(root, namespace=f"onnxruntime-{meta.precision}", on_warning=_warn), info
