"""VGG19 targets to ONNX: the target module, its metadata, its verification, and the model store.

The target module takes an image and returns every target a run needs in one call: the content
layers' features and the style layers' normalised Gram matrices (computed in fp32 even when the
convolutions run in fp16: a Gram sums C*h*w products, which overflows fp16's 65504). It also
returns the style layers' features: a tiled run sums each layer's Gram over the positions each
tile owns, which a crop's whole Gram cannot give. A whole-image run does not fetch them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nst.engine import files
from nst.engine import onnx_meta as M
from nst.engine.errors import EngineError
from nst.engine.config import Pooling, StyleConfig
from nst.engine.features import IMAGENET_MEAN, IMAGENET_STD, VGGFeatures
from nst.engine.layers import min_input_size
from nst.engine.losses import gram_matrix
from nst.engine.weights import Weights, load_into

# Largest relative error (max |ort - torch| / max |torch|, worst output) an export may show
# against the fp32 PyTorch module. fp32 differences are summation order only (about 1e-6 seen);
# fp16 convolutions lose about three decimal digits per layer, compounded over 16 layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
VERIFY_SIZES: tuple[tuple[int, int], ...] = ((48, 64), (64, 40))  # (H, W), deliberately not square


class ExportError(EngineError):
    """An export that failed its verification or could not be written."""


class TargetModule(nn.Module):
    """(1, 3, H, W) fp32 image -> (content features..., normalised Grams..., style features...) in fp32."""

    def __init__(self, features: VGGFeatures, content_layers: Sequence[str], style_layers: Sequence[str], *, fp16: bool = False) -> None:
        super().__init__()
        self.features = features.half() if fp16 else features
        self.fp16 = fp16
        self.content_layers = tuple(content_layers)
        self.style_layers = tuple(style_layers)

    @property
    def output_names(self) -> list[str]:
        return (
            [M.content_output(n) for n in self.content_layers]
            + [M.gram_output(n) for n in self.style_layers]
            + [M.feature_output(n) for n in self.style_layers]
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.features(image.half() if self.fp16 else image)
        content = [feats[n].float() for n in self.content_layers]  # (1, C, H/s, W/s)
        grams = [gram_matrix(feats[n]) for n in self.style_layers]  # (1, C, C), fp32 inside
        style = [feats[n].float() for n in self.style_layers]  # (1, C, H/s, W/s): for tiled Grams
        return (*content, *grams, *style)


@dataclass(frozen=True)
class ModuleSpec:
    """What a target module computes: the content features and style Grams of these layers, with
    this pooling, in fp32 or fp16. The weights are the other half of a module's identity."""

    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    pooling: Pooling = Pooling.MAX
    fp16: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "content_layers", tuple(self.content_layers))
        object.__setattr__(self, "style_layers", tuple(self.style_layers))
        object.__setattr__(self, "pooling", Pooling(self.pooling))

    @classmethod
    def of(cls, cfg: StyleConfig, *, fp16: bool = False) -> "ModuleSpec":
        """The module a run with this configuration reads its targets from."""
        return cls(cfg.content_layers, cfg.style_layers, cfg.pooling, fp16)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


def target_module(weights: Weights, spec: ModuleSpec) -> TargetModule:
    """The frozen target module for these weights and layers, on the CPU."""
    if not spec.content_layers and not spec.style_layers:
        raise ExportError("give at least one content or style layer")
    feats = VGGFeatures(spec.content_layers + spec.style_layers, pooling=spec.pooling)
    load_into(feats.features, weights)
    return TargetModule(feats, spec.content_layers, spec.style_layers, fp16=spec.fp16).eval().requires_grad_(False)


def _versions() -> str:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        from importlib.metadata import version

        out["nst"] = version("nst")
    except Exception:  # running from a checkout
        pass
    return ",".join(f"{k}={v}" for k, v in out.items())


def model_meta(weights: Weights, spec: ModuleSpec) -> M.ModelMeta:
    return M.ModelMeta(
        content_layers=spec.content_layers,
        style_layers=spec.style_layers,
        pooling=spec.pooling.value,
        fingerprint=weights.fingerprint,
        weights_kind=weights.kind.value,
        precision=spec.precision,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        opset=M.OPSET,
        versions=_versions(),
    )


def _to_onnx(module: TargetModule, path: Path, meta: M.ModelMeta) -> None:
    """torch.export-based export with dynamic H and W, metadata attached, written to `path`."""
    lo = max(2, min_input_size(module.content_layers + module.style_layers))  # smaller: no pixels left at the deepest layer
    h, w = torch.export.Dim("height", min=lo), torch.export.Dim("width", min=lo)
    example = torch.rand(1, 3, 64, 48)
    # The exporter reports progress on stdout and warns about things that do not concern this
    # graph; a CLI's stdout must stay clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            None,
            dynamo=True,
            input_names=[M.INPUT_NAME],
            output_names=module.output_names,
            dynamic_shapes={"image": {2: h, 3: w}},
            opset_version=M.OPSET,
            verbose=False,
        )
    assert program is not None
    for k, v in meta.to_props().items():
        program.model.metadata_props[k] = v
    # external_data=None: inline below protobuf's 2 GB limit, beside the file above it.
    program.save(str(path))


@dataclass
class Verification:
    errors: dict[tuple[int, int], float]  # (H, W) -> largest relative error over the outputs
    tolerance: float

    @property
    def worst(self) -> float:
        return max(self.errors.values())


def verify(path: Path, reference: TargetModule, *, tolerance: float, sizes: Sequence[tuple[int, int]] = VERIFY_SIZES, seed: int = 0) -> Verification:
    """onnx.checker, then ONNX Runtime (CPU) against the fp32 PyTorch module at each size."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB
    except Exception as e:
        raise ExportError(f"{path} fails onnx.checker: {str(e).splitlines()[0]}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    errors: dict[tuple[int, int], float] = {}
    for hw in sizes:
        x = torch.rand(1, 3, *hw, generator=gen)
        with torch.no_grad():
            ref = dict(zip(reference.output_names, reference(x)))
        got = dict(zip(names, sess.run(names, {M.INPUT_NAME: x.numpy()})))
        worst = 0.0
        for name, r in ref.items():
            r_np = r.numpy()
            scale = float(np.abs(r_np).max()) or 1.0
            err = float(np.abs(got[name] - r_np).max()) / scale
            if not math.isfinite(err):  # nan or inf (an overflow): max() would drop a nan, so it fails here
                worst = err
                break
            worst = max(worst, err)
        errors[tuple(hw)] = worst  # type: ignore[index]
        if not worst <= tolerance:
            raise ExportError(f"ONNX Runtime differs from PyTorch at {hw[1]}x{hw[0]}: largest relative error {worst:.2e} > tolerance {tolerance:.0e}")
    return Verification(errors, tolerance)


@dataclass
class ExportResult:
    path: Path
    meta: M.ModelMeta
    verification: Verification | None  # None when the store already had it
    seconds: float
    created: bool = True
    notes: list[str] = field(default_factory=list)
    sha256: str = ""  # the file's checksum (checked against the store's record when found there)


def _cannot_write(path: Path, e: OSError, module: nn.Module | None = None) -> ExportError:
    """One line naming the file the user will look for (and, for a disk full, what the model needs)."""
    need = ""
    if module is not None:
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        need = f" (the model needs about {size / 1e6:.1f} MB)"
    return ExportError(f"cannot write {path}: {e.strerror or e}{need}")


def export_targets(weights: Weights, path: Path, spec: ModuleSpec, *, shown_as: Path | None = None) -> ExportResult:
    """Export and verify the target module to `path` (written atomically: a failed export leaves nothing).

    A write that fails (disk full, read-only folder) is an ExportError naming `shown_as` (default
    `path`). Stale private folders that killed exports left beside `path` are removed first.
    """
    t0 = time.perf_counter()
    path = Path(path)
    meta = model_meta(weights, spec)
    module = target_module(weights, spec)
    reference = module if not spec.fp16 else target_module(weights, dataclasses.replace(spec, fp16=False))
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.remove(files.temporaries_beside(path))
        # A private folder beside the target, so external data files (if any) travel with the model.
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=files.temp_prefix(path.stem)))
        tmp_model = tmp / path.name
        _to_onnx(module, tmp_model, meta)
        check = verify(tmp_model, reference, tolerance=TOLERANCE[meta.precision])
        for f in sorted(tmp.iterdir()):  # the model last, so a reader never sees it without its data
            if f != tmp_model:
                os.replace(f, path.parent / f.name)
        os.replace(tmp_model, path)
    except OSError as e:
        raise _cannot_write(shown_as or path, e, module) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(path, meta, check, time.perf_counter() - t0)


def export_to_store(cache_root: Path, weights: Weights, spec: ModuleSpec) -> ExportResult:
    """The store's target module for these weights and layers, exported and verified once.

    Concurrent exporters each build a private folder and rename it into place; the first rename
    wins and the others discard theirs, so a reader never sees a half-written model. The folder
    holds the model and its sha256 (`M.CHECKSUM_FILE`); a stored model is checked against it on
    every call (tens of ms for the 52 MB Gatys module), and one that fails is discarded and exported
    again with a note. Stale private folders of killed exports are removed first.
    """
    t0 = time.perf_counter()
    key = dict(fingerprint=weights.fingerprint, pooling=spec.pooling.value, content_layers=spec.content_layers, style_layers=spec.style_layers, precision=spec.precision)
    final = M.store_path(cache_root, **key)
    store = final.parent.parent
    if store.is_dir():  # killed exports' private folders
        leftovers = [p for p in store.glob(".*") if p.is_dir() or p.name.endswith(".tmp")]
        files.remove(t for t in map(files.temporary_state, leftovers) if t is not None)
    note = ""
    if final.is_file():
        try:
            digest = M.check_stored(final)
            meta = M.read_meta(final)
            meta.check_matches(fingerprint=weights.fingerprint, pooling=spec.pooling.value, content_layers=spec.content_layers, style_layers=spec.style_layers)
            return ExportResult(final, meta, None, time.perf_counter() - t0, created=False, sha256=digest)
        except ValueError as e:  # damaged or foreign: replace it
            shutil.rmtree(final.parent, ignore_errors=True)
            reason = str(e).replace(str(final), "it").strip()
            note = f"discarded the stored model {final.parent.name}: {reason}; exporting it again"
    staging: Path | None = None
    try:
        store.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=store, prefix=files.temp_prefix(final.parent.name)))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the store from other users of the cache
        result = export_targets(weights, staging / M.TARGETS_FILE, spec, shown_as=final)
        try:
            result.sha256 = M.write_checksum(staging / M.TARGETS_FILE)
        except OSError as e:
            raise _cannot_write(final.parent / M.CHECKSUM_FILE, e) from None
        try:
            os.rename(staging, final.parent)  # atomic; fails if another exporter got there first
        except OSError:
            if not final.is_file():
                raise
            result.created = False
            result.sha256 = M.check_stored(final)
        result.path = final
    except OSError as e:
        raise _cannot_write(final, e) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    if note:
        result.notes.append(note)
    return result
