"""ONNX Runtime targets: agreement with PyTorch, provider selection and its errors, TensorRT options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nst.engine import onnx_meta as M
from nst.engine.features import VGGFeatures
from nst.engine.onnx_targets import OnnxTargets, ShapeProfile, _feature_hw, open_session, provider_problem, tensorrt_options
from nst.engine.targets import TorchTargets
from nst.engine.weights import load_into

CONTENT, STYLE = ("relu2_2", "relu3_1"), ("relu1_1", "relu2_1", "relu3_1")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nst.engine.weights import random_weights
    from nst.export import export_targets

    path = tmp_path_factory.mktemp("onnx") / "targets.onnx"
    return export_targets(random_weights(seed=0), path, content_layers=CONTENT, style_layers=STYLE).path


def test_onnx_targets_agree_with_torch(model_path: Path, weights):
    feats = VGGFeatures(CONTENT + STYLE)
    load_into(feats.features, weights)
    torch_src, onnx_src = TorchTargets(feats), OnnxTargets(model_path, provider="cpu")
    for hw in ((32, 48), (45, 33)):
        x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
        a = onnx_src.compute(x, content_layers=CONTENT, style_layers=STYLE)
        b = torch_src.compute(x, content_layers=CONTENT, style_layers=STYLE)
        for name, ref in b.tensors().items():
            got = a.tensors()[name]
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name
    only = onnx_src.compute(x, content_layers=(), style_layers=("relu2_1",))
    assert not only.content and list(only.grams) == ["relu2_1"]


def test_explicit_cpu(model_path: Path):
    src = OnnxTargets(model_path, provider="cpu")
    d = src.describe()
    assert d["source"] == "onnxruntime" and d["provider"] == "cpu" and d["fallbacks"] == {} and d["precision"] == "fp32"


@no_gpu
def test_auto_falls_back_to_cpu_and_says_why(model_path: Path):
    d = OnnxTargets(model_path, provider="auto").describe()
    assert d["provider"] == "cpu"
    assert set(d["fallbacks"]) == {"tensorrt", "cuda"} and all(isinstance(r, str) and r for r in d["fallbacks"].values())


@no_gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unavailable_explicit_provider_is_one_clear_line(model_path: Path, provider: str):
    assert provider_problem(provider) is not None
    with pytest.raises(ValueError, match=f"{provider} provider cannot load") as e:
        OnnxTargets(model_path, provider=provider, device="cuda")
    assert "\n" not in str(e.value) and ("lib" in str(e.value) or "GPU" in str(e.value))


def test_unknown_provider_and_missing_layer(model_path: Path):
    with pytest.raises(ValueError, match="unknown provider"):
        open_session(model_path, "rocm", device=torch.device("cpu"), cache_dir=None, fp16=False, profile=None)
    with pytest.raises(ValueError, match="no output"):
        OnnxTargets(model_path, provider="cpu").compute(torch.rand(1, 3, 32, 32), content_layers=("relu4_2",), style_layers=())


def test_tensorrt_options(tmp_path: Path):
    prof = ShapeProfile((8, 8), (64, 64), (128, 96))
    opts = tensorrt_options(cache_dir=tmp_path, model_tag="abc", fp16=True, profile=prof, device_id=1)
    assert opts["trt_engine_cache_enable"] == "True" and Path(opts["trt_engine_cache_path"]) == tmp_path / "tensorrt" / "abc"
    assert Path(opts["trt_engine_cache_path"]).is_dir()
    assert opts["trt_timing_cache_enable"] == "True" and Path(opts["trt_timing_cache_path"]) == tmp_path / "tensorrt"
    assert opts["trt_fp16_enable"] == "True" and opts["device_id"] == "1"
    assert opts["trt_profile_min_shapes"] == f"{M.INPUT_NAME}:1x3x8x8"
    assert opts["trt_profile_opt_shapes"] == f"{M.INPUT_NAME}:1x3x64x64"
    assert opts["trt_profile_max_shapes"] == f"{M.INPUT_NAME}:1x3x128x96"
    assert tensorrt_options(cache_dir=tmp_path, model_tag="abc", fp16=False, profile=None)["trt_fp16_enable"] == "False"


def test_bound_output_shapes_match_the_network(weights):
    """The I/O-binding path preallocates outputs: their sizes must match what the network makes."""
    layers = ("relu1_1", "relu2_2", "relu3_1", "relu4_2", "relu5_1")
    feats = VGGFeatures(layers)
    with torch.no_grad():
        out = feats(torch.rand(1, 3, 53, 37))
    for name in layers:
        assert tuple(out[name].shape[-2:]) == _feature_hw((53, 37), name), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_io_binding_matches_cpu(model_path: Path):  # pragma: no cover - GPU machines only
    x = torch.rand(1, 3, 64, 48)
    ref = OnnxTargets(model_path, provider="cpu").compute(x, content_layers=CONTENT, style_layers=STYLE)
    src = OnnxTargets(model_path, provider="cuda", device="cuda")
    got = src.compute(x.cuda(), content_layers=CONTENT, style_layers=STYLE)
    for name, r in ref.tensors().items():
        g = got.tensors()[name]
        assert g.is_cuda
        assert (g.cpu() - r).abs().max() <= 1e-3 * r.abs().max(), name
