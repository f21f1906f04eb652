"""The exported target module: checker, ONNX Runtime against PyTorch at two sizes, metadata, store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nst.engine import onnx_meta as M
from nst.engine.config import GATYS
from nst.engine.features import VGGFeatures
from nst.engine.weights import load_into, random_weights
from nst.export import TOLERANCE, ExportError, ModuleSpec, export_targets, export_to_store, target_module, verify


def test_export_passes_checker_and_agrees_at_two_sizes(gatys_export):
    onnx.checker.check_model(str(gatys_export.path), full_check=True)
    v = gatys_export.verification
    assert set(v.errors) == {(48, 64), (64, 40)}
    assert 0 < v.worst <= TOLERANCE["fp32"]


def test_dynamic_height_and_width_and_named_outputs(gatys_export):
    sess = ort.InferenceSession(str(gatys_export.path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == M.INPUT_NAME and inp.shape[:2] == [1, 3] and all(isinstance(d, str) for d in inp.shape[2:])
    names = [o.name for o in sess.get_outputs()]
    grams, features = [M.gram_output(n) for n in GATYS.style_layers], [M.feature_output(n) for n in GATYS.style_layers]
    assert names == [M.content_output(n) for n in GATYS.content_layers] + grams + features
    out = sess.run(None, {M.INPUT_NAME: np.random.default_rng(0).random((1, 3, 37, 53), dtype=np.float32)})
    assert out[0].shape == (1, 512, 37 // 8, 53 // 8)  # relu4_2: three floored halvings
    assert [o.shape for o in out[1:6]] == [(1, c, c) for c in (64, 128, 256, 512, 512)]
    # the style layers' features, for tiled Grams: floored halvings too
    assert [o.shape for o in out[6:]] == [(1, c, 37 // s, 53 // s) for c, s in ((64, 1), (128, 2), (256, 4), (512, 8), (512, 16))]
    assert all(o.dtype == np.float32 for o in out)


def test_verify_covers_the_style_features(gatys_export):
    """A module whose Grams and content agree but whose style features do not fails verification."""
    from nst.export.onnx_export import TargetModule

    class WrongFeatures(TargetModule):
        def forward(self, image):
            out = super().forward(image)
            k = len(self.content_layers) + len(self.style_layers)
            return (*out[:k], *(2 * f for f in out[k:]))

    good = target_module(random_weights(seed=0), ModuleSpec.of(GATYS))
    verify(gatys_export.path, good, tolerance=TOLERANCE["fp32"], sizes=((40, 40),))
    bad = WrongFeatures(good.features, good.content_layers, good.style_layers).eval()
    with pytest.raises(ExportError, match="largest relative error"):
        verify(gatys_export.path, bad, tolerance=TOLERANCE["fp16"], sizes=((40, 40),))


def test_metadata_round_trip(gatys_export):
    meta = M.read_meta(gatys_export.path)
    assert meta == gatys_export.meta
    assert meta.content_layers == GATYS.content_layers and meta.style_layers == GATYS.style_layers
    assert meta.fingerprint == random_weights(seed=0).fingerprint and meta.weights_kind == "random"
    assert meta.pooling == "max" and meta.precision == "fp32" and meta.opset == M.OPSET
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert "torch=" in meta.versions and "onnx=" in meta.versions
    props = {p.key: p.value for p in onnx.load(str(gatys_export.path), load_external_data=False).metadata_props}
    assert props[M.K_LAYERS] == "relu4_2,relu1_1,relu2_1,relu3_1,relu4_1,relu5_1"
    model = onnx.load(str(gatys_export.path), load_external_data=False)
    assert any(o.domain in ("", "ai.onnx") and o.version == M.OPSET for o in model.opset_import)


def test_target_module_matches_plain_gram_formula(gatys_export):
    """The ONNX Grams against F F^T / (C H W) written out by hand on PyTorch's features."""
    w = random_weights(seed=0)
    feats = VGGFeatures(GATYS.style_layers)
    load_into(feats.features, w)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(gatys_export.path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {M.INPUT_NAME: x.numpy()})))
    with torch.no_grad():
        f = feats(x)
    for layer in GATYS.style_layers:
        _, c, h, wd = f[layer].shape
        flat = f[layer].reshape(c, h * wd).double()
        ref = (flat @ flat.T / (c * h * wd)).numpy()[None]
        err = np.abs(got[M.gram_output(layer)] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, layer


def test_verify_fails_above_tolerance(gatys_export):
    ref = target_module(random_weights(seed=0), ModuleSpec.of(GATYS))
    with pytest.raises(ExportError, match="largest relative error"):
        verify(gatys_export.path, ref, tolerance=0.0)
    other = target_module(random_weights(seed=1), ModuleSpec.of(GATYS))
    with pytest.raises(ExportError):  # different weights: far outside any tolerance
        verify(gatys_export.path, other, tolerance=TOLERANCE["fp16"])


def test_fp16_export_within_its_tolerance(tmp_path: Path):
    res = export_targets(random_weights(seed=0), tmp_path / "half.onnx", ModuleSpec(("relu2_2",), ("relu1_1", "relu2_1"), fp16=True))
    assert res.meta.precision == "fp16" and M.read_meta(res.path).precision == "fp16"
    assert res.verification.worst <= TOLERANCE["fp16"]
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)" and all(o.type == "tensor(float)" for o in sess.get_outputs())


def test_store_exports_once_and_finds_it_later(tmp_path: Path):
    w = random_weights(seed=0)
    layers = ModuleSpec(("relu2_2",), ("relu1_1",))
    first = export_to_store(tmp_path, w, layers)
    assert first.created and first.verification is not None
    assert first.path == M.store_path(tmp_path, fingerprint=w.fingerprint, pooling="max", content_layers=layers.content_layers, style_layers=layers.style_layers)
    again = export_to_store(tmp_path, w, layers)
    assert not again.created and again.verification is None and again.path == first.path
    assert M.stored_models(tmp_path) == [first.path]
    assert not [p for p in first.path.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left
    # a damaged stored model is replaced, not trusted
    first.path.write_bytes(b"not a model")
    fixed = export_to_store(tmp_path, w, layers)
    assert fixed.created and fixed.notes and M.read_meta(fixed.path).fingerprint == w.fingerprint


def test_metadata_mismatches_are_one_line_errors(gatys_export):
    meta = gatys_export.meta
    ok = dict(fingerprint=meta.fingerprint, pooling="max", content_layers=("relu4_2",), style_layers=("relu1_1",))
    meta.check_matches(**ok)
    for change, msg in ((dict(fingerprint="0" * 16), "weights"), (dict(pooling="avg"), "pooling"), (dict(content_layers=("relu1_2",)), "lacks")):
        with pytest.raises(ValueError, match=msg) as e:
            meta.check_matches(**{**ok, **change})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no nst metadata"):
        M.ModelMeta.from_props({})


def _flip_64_bytes(path: Path) -> None:
    """Damage a model the way a bad disk or copy does: 64 bytes inverted mid-file (the weights), same size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


def test_store_checks_a_checksum_and_re_exports_a_damaged_model(tmp_path: Path):
    from nst.engine.onnx_targets import OnnxTargets
    from nst.engine.targets import TorchTargets

    w = random_weights(seed=0)
    layers = ModuleSpec(("relu1_2",), ("relu1_1",))
    first = export_to_store(tmp_path, w, layers)
    record = first.path.parent / M.CHECKSUM_FILE
    assert record.read_text() == f"{M.file_sha256(first.path)}  {M.TARGETS_FILE}\n" and first.sha256 == M.file_sha256(first.path)
    assert export_to_store(tmp_path, w, layers).sha256 == first.sha256  # found and checked
    size = first.path.stat().st_size
    _flip_64_bytes(first.path)
    assert first.path.stat().st_size == size
    M.read_meta(first.path)  # still a readable model with the right metadata: only the checksum can tell
    with pytest.raises(M.ModelChecksumError, match="fails its checksum"):
        M.check_stored(first.path)
    with pytest.raises(M.ModelChecksumError, match="fails its checksum"):  # opened directly (--onnx)
        OnnxTargets(first.path)
    fixed = export_to_store(tmp_path, w, layers)
    assert fixed.created and len(fixed.notes) == 1 and "checksum" in fixed.notes[0] and "\n" not in fixed.notes[0]
    assert M.check_stored(fixed.path) == fixed.sha256
    # and its targets are right again: ONNX Runtime against PyTorch on the same image
    feats = VGGFeatures(("relu1_2", "relu1_1"))
    load_into(feats.features, w)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    got = OnnxTargets(fixed.path).compute(x, content_layers=("relu1_2",), style_layers=("relu1_1",))
    ref = TorchTargets(feats.eval()).compute(x, content_layers=("relu1_2",), style_layers=("relu1_1",))
    for k, v in {**ref.tensors()}.items():
        assert torch.allclose(got.tensors()[k], v, rtol=1e-4, atol=1e-4 * float(v.abs().max())), k
    # a model stored by an older nst, with no checksum record, is exported again too
    record.unlink()
    again = export_to_store(tmp_path, w, layers)
    assert again.created and "no checksum record" in again.notes[0] and record.is_file()


def test_the_store_never_serves_an_older_export_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_format_1):
    """Format 2 added the style features that tiled runs need. The format is part of the store's
    key, so a model an older nst stored is not found (exported anew beside it); and one that turns
    up under the current key anyway is discarded and exported again, with a note."""
    w = random_weights(seed=0)
    spec = ModuleSpec(("relu1_2",), ("relu1_1",))
    key = dict(fingerprint=w.fingerprint, pooling="max", content_layers=spec.content_layers, style_layers=spec.style_layers)
    current = export_to_store(tmp_path, w, spec).path
    with monkeypatch.context() as m:
        m.setattr(M, "FORMAT_VERSION", "1")
        old = M.store_path(tmp_path, **key)
    assert old != current
    old.parent.mkdir(parents=True)
    as_format_1(current, old)
    M.write_checksum(old)
    shutil.rmtree(current.parent)
    res = export_to_store(tmp_path, w, spec)
    assert res.created and res.path == current and not res.notes
    assert M.feature_output("relu1_1") in {o.name for o in ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"]).get_outputs()}
    # an old model under the current key (copied in by hand, say): discarded, not trusted
    as_format_1(res.path, tmp_path / "old.onnx")
    os.replace(tmp_path / "old.onnx", current)
    M.write_checksum(current)
    again = export_to_store(tmp_path, w, spec)
    assert again.created and len(again.notes) == 1 and "format 1" in again.notes[0] and M.read_meta(again.path).format == M.FORMAT_VERSION


def test_a_full_disk_is_one_error_naming_the_path(full_disk: Path):
    w = random_weights(seed=0)
    layers = ModuleSpec(("relu1_2",), ("relu1_1",))
    with pytest.raises(ExportError) as e:
        export_to_store(full_disk, w, layers)
    final = M.store_path(full_disk, fingerprint=w.fingerprint, pooling="max", content_layers=layers.content_layers, style_layers=layers.style_layers)
    assert str(e.value).startswith(f"cannot write {final}: No space left on device") and "\n" not in str(e.value)
    assert not list((full_disk / M.MODELS_DIR).iterdir())  # no staging folder left
    with pytest.raises(ExportError, match=f"cannot write {full_disk / 'x.onnx'}: No space left on device"):
        export_targets(w, full_disk / "x.onnx", layers)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", M.MODELS_DIR]
