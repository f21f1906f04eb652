"""ONNX Runtime targets: agreement with PyTorch, provider selection and its errors, TensorRT options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nst.engine import onnx_meta as M
from nst.engine.features import VGGFeatures
from nst.engine.layers import feature_hw
from nst.engine.onnx_targets import TENSORRT_TF32, OnnxTargets, ShapeProfile, cuda_options, open_session, provider_problem, tensorrt_options
from nst.engine.targets import TorchTargets
from nst.engine.weights import load_into

CONTENT, STYLE = ("relu2_2", "relu3_1"), ("relu1_1", "relu2_1", "relu3_1")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nst.engine.weights import random_weights
    from nst.export import ModuleSpec, export_targets

    path = tmp_path_factory.mktemp("onnx") / "targets.onnx"
    return export_targets(random_weights(seed=0), path, ModuleSpec(CONTENT, STYLE)).path


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


@pytest.fixture(scope="module")
def half_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nst.engine.weights import random_weights
    from nst.export import ModuleSpec, export_targets

    path = tmp_path_factory.mktemp("onnx") / "targets-fp16.onnx"
    return export_targets(random_weights(seed=0), path, ModuleSpec(CONTENT, STYLE, fp16=True)).path


def _worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Largest error over the targets, each relative to its reference's largest entry (as `verify`)."""
    assert got.keys() == ref.keys()
    return max(float((got[k].float() - v).abs().max() / v.abs().max()) for k, v in ref.items())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiled_onnx_targets_equal_whole_torch_targets(model_path: Path, half_model_path: Path, weights, precision: str):
    """Crops through ONNX Runtime, Grams summed over owned positions on the host, against one
    PyTorch pass over the whole image, at tiles that divide the image and tiles that do not
    (relu3_1 is both a content and a style layer here: read once per crop).

    Tolerances: against PyTorch, the export's own (`TOLERANCE`: fp32 differs by summation order,
    6e-7 seen; fp16 convolutions by 9e-4 seen), as a whole ONNX Runtime pass is held to. Against
    ONNX Runtime's whole pass, tiling changes only the order of the Grams' fp32 sums (and nothing
    for fp16, whose crops' features are the whole image's): 3e-7 seen, held to 1e-5."""
    from nst.export import TOLERANCE

    path = model_path if precision == "fp32" else half_model_path
    feats = VGGFeatures(CONTENT + STYLE)
    load_into(feats.features, weights)
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    ref = TorchTargets(feats.eval()).compute(x, content_layers=CONTENT, style_layers=STYLE).tensors()
    whole = OnnxTargets(path, provider="cpu").compute(x, content_layers=CONTENT, style_layers=STYLE).tensors()
    for tile in (16, 20, 28, 44):  # 64x80 px: 16 divides both edges, 20 one, 28 and 44 neither
        src = OnnxTargets(path, provider="cpu", tile=tile)
        got = src.compute(x, content_layers=CONTENT, style_layers=STYLE).tensors()
        assert all(got[k].shape == v.shape and got[k].dtype == torch.float32 for k, v in ref.items())
        assert _worst(got, ref) <= TOLERANCE[precision], tile
        assert _worst(got, whole) <= 1e-5, tile
    assert src.describe()["source"] == "onnxruntime" and src.describe()["precision"] == precision


def test_tiled_onnx_targets_run_crop_by_crop(model_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Tiled: one session call per crop, each fetching features (never a whole image's pass); an
    image no larger than the tile runs whole, in one call."""
    src = OnnxTargets(model_path, provider="cpu", tile=20)
    calls: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    run = src.session.run

    def spy(names, feeds):
        calls.append((feeds[M.INPUT_NAME].shape, tuple(names)))
        return run(names, feeds)

    monkeypatch.setattr(src, "session", type("S", (), {"run": staticmethod(spy)})())
    src.compute(torch.rand(1, 3, 40, 60), content_layers=(), style_layers=STYLE)
    assert len(calls) == 2 * 3  # 20 px tiles over 40x60
    assert all(names == tuple(M.feature_output(n) for n in STYLE) for _, names in calls)
    assert all(shape[2] < 40 or shape[3] < 60 for shape, _ in calls)  # crops, not the image
    calls.clear()
    src.compute(torch.rand(1, 3, 20, 20), content_layers=CONTENT, style_layers=STYLE)
    assert calls == [((1, 3, 20, 20), tuple(M.content_output(n) for n in CONTENT) + tuple(M.gram_output(n) for n in STYLE))]


def test_with_tile_gives_one_tiled_source_per_edge_and_stylize_uses_it(model_path: Path, weights):
    """A whole-image source made to tile (`with_tile`): made once per edge, on the same session
    (no second copy of the weights), the same targets within the fp32 sums' rounding. `stylize` with a tiled plan
    makes a given source tile at the plan's edge (a video's or a batch's source is made before
    their plans), so its crops are what the session sees."""
    import dataclasses

    from nst.engine.config import GATYS
    from nst.engine.device import Runtime
    from nst.engine.targets import tiled_source
    from nst.engine.transfer import MemoryRequest, plan_for, stylize

    src = OnnxTargets(model_path, provider="cpu")
    tiled = src.with_tile(20)
    assert tiled.tile == 20 and src.tile is None and src.with_tile(20) is tiled and tiled.with_tile(20) is tiled
    assert tiled_source(src, 20) is tiled
    assert tiled.session is src.session and src.with_tile(28).session is src.session and src.with_tile(28) is not tiled
    x = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(3))
    assert _worst(tiled.compute(x, content_layers=CONTENT, style_layers=STYLE).tensors(), src.compute(x, content_layers=CONTENT, style_layers=STYLE).tensors()) <= 1e-5
    feats = VGGFeatures(CONTENT + STYLE)
    torch_src = TorchTargets(feats)
    assert torch_src.with_tile(20).tile == 20 and torch_src.with_tile(20).model is torch_src.model
    assert tiled_source(type("Whole", (), {"compute": None})(), 20) is None  # a source that cannot tile: PyTorch's instead

    from PIL import Image

    cfg = dataclasses.replace(GATYS, size=96, scales=(96,), iterations=1, content_layers=CONTENT, style_layers=STYLE)
    content, style = Image.new("RGB", (96, 96), (200, 90, 40)), Image.new("RGB", (40, 40), (20, 60, 200))
    plan = plan_for(content.size, [style.size], cfg, Runtime(), MemoryRequest(tile=16))
    assert plan.target_tile() < 96
    shapes: list[tuple[int, ...]] = []
    crop_tiled = src.with_tile(plan.target_tile())
    run = crop_tiled.session.run
    crop_tiled.session = type("S", (), {"run": staticmethod(lambda names, feeds: shapes.append(feeds[M.INPUT_NAME].shape) or run(names, feeds))})()
    r = stylize(content, [style], cfg, weights=weights, targets=src, plan=plan)
    assert r.targets["source"] == "onnxruntime" and shapes and all(max(sh[2:]) < 96 for sh in shapes)


def test_sessions_keep_no_memory_arena(model_path: Path):
    """ONNX Runtime's CPU arena would hold the largest pass's buffers through the whole optimisation
    (575 MB for 256 px tiles of a 1024 px image; 920 MB after a whole 768 px image): off, whole or tiled."""
    assert OnnxTargets(model_path, provider="cpu", tile=20).session.get_session_options().enable_cpu_mem_arena is False
    assert OnnxTargets(model_path, provider="cpu").session.get_session_options().enable_cpu_mem_arena is False


def test_cpu_sessions_keep_one_copy_of_the_weights(model_path: Path):
    """On the CPU provider, graph optimisations stop at "extended": "all" adds a blocked-layout copy
    of every convolution's weights, held for the session's life (Gatys layers, fp32: 147 MB
    resident against 61 MB). The targets are the same either way."""
    import onnxruntime as ort

    src = OnnxTargets(model_path, provider="cpu")
    assert src.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    full = OnnxTargets(model_path, provider="cpu")
    full.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 40, 44, generator=torch.Generator().manual_seed(4))
    assert _worst(src.compute(x, content_layers=CONTENT, style_layers=STYLE).tensors(), full.compute(x, content_layers=CONTENT, style_layers=STYLE).tensors()) <= 1e-5


@pytest.mark.parametrize("tile", [None, 20])
def test_content_targets_in_the_dtype_asked_for(model_path: Path, tile: int | None):
    """A tiled bf16 stage keeps its content targets in bf16 (rounded crop by crop); Grams stay fp32."""
    src = OnnxTargets(model_path, provider="cpu", tile=tile)
    x = torch.rand(1, 3, 40, 44, generator=torch.Generator().manual_seed(2))
    full = OnnxTargets(model_path, provider="cpu").compute(x, content_layers=CONTENT, style_layers=STYLE)
    got = src.compute(x, content_layers=CONTENT, style_layers=STYLE, content_dtype=torch.bfloat16)
    for k, v in full.content.items():
        assert got.content[k].dtype == torch.bfloat16
        torch.testing.assert_close(got.content[k], v.to(torch.bfloat16), rtol=1e-2, atol=1e-2 * float(v.abs().max()))
    assert all(g.dtype == torch.float32 for g in got.grams.values())


def test_an_export_of_an_older_format_is_one_clear_line(model_path: Path, tmp_path: Path, as_format_1):
    """A model from before the style features were outputs: refused, saying why and what to do."""
    old = as_format_1(model_path, tmp_path / "old.onnx")
    with pytest.raises(ValueError) as e:
        OnnxTargets(old, provider="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "format 1" in msg and f"reads {M.FORMAT_VERSION}" in msg
    assert "tiled runs" in msg and "export it again" in msg


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


class _FakeSession:
    """Stands in for `onnxruntime.InferenceSession`: records the provider chain it was given and
    reports its first entry as loaded, as ONNX Runtime does on a machine where it loads."""

    chains: list[list[object]] = []

    def __init__(self, path: str, options: object, *, providers: list[object]) -> None:
        _FakeSession.chains.append(list(providers))
        self._first = providers[0] if isinstance(providers[0], str) else providers[0][0]

    def get_providers(self) -> list[str]:
        return [self._first, "CPUExecutionProvider"]


@pytest.fixture
def fake_gpu_session(monkeypatch: pytest.MonkeyPatch) -> list[list[object]]:
    """Every provider loads (as on a GPU machine with its libraries); sessions are `_FakeSession`s."""
    import onnxruntime as ort

    import nst.engine.onnx_targets as onnx_targets

    monkeypatch.setattr(onnx_targets, "provider_problem", lambda provider: None)
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    _FakeSession.chains = []
    return _FakeSession.chains


def test_cuda_provider_options_turn_tf32_off():
    assert cuda_options(device_id=1) == {"device_id": "1", "use_tf32": "0"}
    assert cuda_options()["use_tf32"] == "0" and cuda_options()["device_id"] == "0"


def test_cuda_sessions_are_opened_with_tf32_off(model_path: Path, fake_gpu_session, tmp_path: Path):
    """What the CUDA provider is actually given, for an explicit CUDA session on cuda:1 and for the
    CUDA provider behind TensorRT."""
    sess, name, fallbacks = open_session(model_path, "cuda", device=torch.device("cuda:1"), cache_dir=None, fp16=False, profile=None)
    assert name == "cuda" and fallbacks == {}
    assert fake_gpu_session[-1] == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}), "CPUExecutionProvider"]
    open_session(model_path, "tensorrt", device=torch.device("cuda:0"), cache_dir=tmp_path, fp16=True, profile=None)
    trt, cuda, cpu = fake_gpu_session[-1]
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["trt_fp16_enable"] == "True"
    assert cuda == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"}) and cpu == "CPUExecutionProvider"


def test_auto_does_not_pick_tensorrt_for_an_fp32_model(model_path: Path, fake_gpu_session, tmp_path: Path):
    """TensorRT would run an fp32 model's layers in TF32 and ONNX Runtime cannot turn that off:
    `auto` takes the CUDA provider for fp32 and says why; an fp16 model still gets TensorRT."""
    _, name, fallbacks = open_session(model_path, "auto", device=torch.device("cuda"), cache_dir=tmp_path, fp16=False, profile=None)
    assert name == "cuda" and fallbacks == {"tensorrt": TENSORRT_TF32} and "TF32" in TENSORRT_TF32
    assert [entry[0] for entry in fake_gpu_session[-1][:-1]] == ["CUDAExecutionProvider"]
    _, name, fallbacks = open_session(model_path, "auto", device=torch.device("cuda"), cache_dir=tmp_path, fp16=True, profile=None)
    assert name == "tensorrt" and fallbacks == {}


def test_describe_says_whether_fp32_may_have_run_as_tf32(model_path: Path):
    assert OnnxTargets(model_path, provider="cpu").describe()["tf32"] is False


def test_bound_output_shapes_match_the_network(weights):
    """The I/O-binding path preallocates outputs: their sizes must match what the network makes."""
    layers = ("relu1_1", "relu2_2", "relu3_1", "relu4_2", "relu5_1")
    feats = VGGFeatures(layers)
    with torch.no_grad():
        out = feats(torch.rand(1, 3, 53, 37))
    for name in layers:
        assert tuple(out[name].shape[-2:]) == feature_hw((53, 37), name), name


@pytest.mark.gpu
def test_cuda_io_binding_matches_cpu(model_path: Path):  # pragma: no cover - GPU machines only
    """I/O-bound CUDA targets equal the CPU provider's within the fp32 tolerance (TF32 would miss it)."""
    x = torch.rand(1, 3, 64, 48)
    ref = OnnxTargets(model_path, provider="cpu").compute(x, content_layers=CONTENT, style_layers=STYLE)
    src = OnnxTargets(model_path, provider="cuda", device="cuda")
    assert src.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    got = src.compute(x.cuda(), content_layers=CONTENT, style_layers=STYLE)
    assert src.describe()["tf32"] is False
    for name, r in ref.tensors().items():
        g = got.tensors()[name]
        assert g.is_cuda
        assert (g.cpu() - r).abs().max() <= 1e-4 * r.abs().max(), name


@pytest.mark.gpu
def test_cuda_io_binding_of_tiled_crops_matches_cpu(model_path: Path):  # pragma: no cover - GPU machines only
    """Each crop's features bound to torch CUDA tensors (a crop is copied contiguous first): the
    tiled targets equal the CPU provider's whole-image ones within the fp32 tolerance."""
    x = torch.rand(1, 3, 64, 80)
    ref = OnnxTargets(model_path, provider="cpu").compute(x, content_layers=CONTENT, style_layers=STYLE)
    src = OnnxTargets(model_path, provider="cuda", device="cuda", tile=28)
    got = src.compute(x.cuda(), content_layers=CONTENT, style_layers=STYLE)
    for name, r in ref.tensors().items():
        g = got.tensors()[name]
        assert g.is_cuda
        assert (g.cpu() - r).abs().max() <= 1e-4 * r.abs().max(), name


def test_providers_are_the_config_enum():
    """One list of providers: the CLI's choices are config.Provider, and each maps to ONNX Runtime's name."""
    from nst.engine.config import Provider
    from nst.engine.onnx_targets import PROVIDERS

    assert {p.value for p in Provider} == {"auto", *PROVIDERS}
    with pytest.raises(ValueError, match="unknown provider 'rocm': use auto, tensorrt, cuda, cpu"):
        open_session(Path("x.onnx"), "rocm", device=torch.device("cpu"), cache_dir=None, fp16=False, profile=None)
