"""Style/content targets from an exported target module, through ONNX Runtime.

Provider choice: `auto` tries TensorRT, then CUDA, then the CPU, and records why each skipped one
did not load. A provider listed by `ort.get_available_providers()` was only built in: it may
still fail to load (no GPU, no CUDA or TensorRT libraries), and ONNX Runtime then falls back to
the CPU with a log line rather than an error. So each GPU provider is checked before a session is
made (its library must load, a GPU must be visible) and again after (`sess.get_providers()`).

On a GPU the image goes in and the targets come out through I/O binding on torch CUDA tensors,
so they reach the optimisation loop without a trip through host memory; a tiled run binds each
crop and its feature maps the same way, and sums the Grams on the device.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import onnx_meta as M
from .config import Provider
from .errors import EngineError
from .layers import feature_hw, layer_channels, layer_stride
from .targets import ImageTargets
from .tiles import tiled_targets

# Provider (config.py) -> ONNX Runtime's name for it.
PROVIDERS = {Provider.TENSORRT.value: "TensorrtExecutionProvider", Provider.CUDA.value: "CUDAExecutionProvider", Provider.CPU.value: "CPUExecutionProvider"}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
# What each GPU provider's library needs, for the one-line reason when it cannot load.
_PROVIDER_LIBS = {"cuda": "libonnxruntime_providers_cuda.so", "tensorrt": "libonnxruntime_providers_tensorrt.so"}
_NEEDS = {"cuda": "the CUDA 13 and cuDNN 9 libraries", "tensorrt": "the TensorRT 10 libraries (libnvinfer)"}


@dataclass(frozen=True)
class ShapeProfile:
    """Input sizes a TensorRT engine is built for: (H, W) at the minimum, optimum and maximum."""

    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]

    def options(self) -> dict[str, str]:
        def shape(hw: tuple[int, int]) -> str:
            return f"{M.INPUT_NAME}:1x3x{hw[0]}x{hw[1]}"

        return {"trt_profile_min_shapes": shape(self.min_hw), "trt_profile_opt_shapes": shape(self.opt_hw), "trt_profile_max_shapes": shape(self.max_hw)}


def cuda_options(*, device_id: int = 0) -> dict[str, str]:
    """CUDA provider options: the device, and strict fp32 arithmetic.

    The CUDA provider's `use_tf32` defaults to on, which rounds the inputs of fp32 convolutions
    and matrix products to TF32's 10-bit mantissa; the PyTorch targets are strict fp32
    (`device.precision_context`), and an fp32 model must mean fp32 on either side. An fp16 model's
    remaining fp32 operations get the same.
    """
    return {"device_id": str(device_id), "use_tf32": "0"}


# TensorRT turns TF32 on for the fp32 layers of every engine it builds (its TF32 builder flag is
# set by default), and the TensorRT provider of ONNX Runtime 1.31 has no option to clear it (none
# of its `trt_*` options touches TF32). So `auto` does not pick TensorRT for an fp32 model, and a
# session that asked for TensorRT by name says its fp32 arithmetic may be TF32 (`describe`).
TENSORRT_TF32 = "TensorRT runs fp32 layers in TF32 (its default, which ONNX Runtime's TensorRT provider cannot turn off); the CUDA provider keeps this fp32 model in fp32"


def tensorrt_options(*, cache_dir: Path, model_tag: str, fp16: bool, profile: ShapeProfile | None, device_id: int = 0) -> dict[str, str]:
    """TensorRT provider options: engine and timing caches per model and version, fp16, shape profile."""
    engines = Path(cache_dir) / "tensorrt" / model_tag
    engines.mkdir(parents=True, exist_ok=True)
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(Path(cache_dir) / "tensorrt"),  # shared: timings are per GPU, not per model
        "trt_fp16_enable": "True" if fp16 else "False",
    }
    if profile is not None:
        opts.update(profile.options())
    return opts


def provider_problem(provider: str) -> str | None:
    """Why `provider` cannot run here (short, names what is missing), or None if it should load."""
    import onnxruntime as ort

    ep = PROVIDERS[provider]
    if provider != "cpu" and not torch.cuda.is_available():
        # First: without a GPU, a missing CUDA library or onnxruntime-gpu is beside the point.
        return "no CUDA GPU is visible"
    if ep not in ort.get_available_providers():
        return f"this onnxruntime build has no {ep} (install onnxruntime-gpu)"
    if provider == "cpu":
        return None
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN from PyTorch's wheels, where the system has none
            ort.preload_dlls()
        except Exception:
            pass
    lib = os.path.join(os.path.dirname(ort.__file__), "capi", _PROVIDER_LIBS[provider])
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        missing = str(e).split(":")[0].strip() if ": cannot open" in str(e) else str(e).splitlines()[0]
        return f"{missing} not found: it needs {_NEEDS[provider]}"
    if provider == "tensorrt":
        for name in ("libnvinfer.so.10", "libnvinfer.so"):
            try:
                ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            return f"libnvinfer not found: it needs {_NEEDS['tensorrt']}"
    return None


def _session_options(provider: str = "cpu", *, fp16: bool = False) -> "object":
    """No CPU memory arena: the CPU's buffers go back to the allocator after each run. ONNX
    Runtime's CPU arena keeps the largest run's buffers for the session's life, which a run would
    then hold through its whole optimisation: measured on a 1024 px image in 256 px tiles (Gatys
    layers, fp32), the arena held 575 MB after the targets and peaked at 2.6x PyTorch's tiled
    pass, without it 48 MB and 1.2x, at 1.05x the time; after a whole 768 px image, 920 MB.

    On the CPU provider, graph optimisations up to "extended", not "all": the last level adds the
    CPU's blocked (NCHWc) layout, which keeps a second, re-laid copy of every convolution's
    weights for the session's life. Measured for the Gatys layers in fp32 (52 MB of weights):
    opening the session took 147 MB of resident memory at "all", 61 MB at "extended", held
    through the whole run; a pass took 1.0x as long at 256 px and 1.08x at 512 px (the two
    sessions interleaved in one process, fastest of three), and it runs once per stage. An fp16
    model keeps "all": at "extended" the CPU's fp16 kernels give a crop's features that differ
    from the whole image's by 2e-4, where at "all" they are the same numbers (and its weights are
    half the size)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    if provider == "cpu" and not fp16:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # Fatal only. Its warnings about node placement are noise here, and its errors (a failed
    # allocation, say) also come back as the exception the caller turns into one `error:` line;
    # logged too, they would print a coloured multi-line copy of it first.
    so.log_severity_level = 4
    return so


def open_session(
    path: Path, provider: Provider | str, *, device: torch.device, cache_dir: Path | None, fp16: bool, profile: ShapeProfile | None
) -> tuple["object", str, dict[str, str]]:
    """(session, provider that loaded, {skipped provider: reason}). EngineError for an explicit one
    that cannot load."""
    import onnxruntime as ort

    try:
        provider = Provider(provider).value
    except ValueError:
        raise EngineError(f"unknown provider {provider!r}: use {', '.join(p.value for p in Provider)}") from None
    order = AUTO_ORDER if provider == "auto" else (provider,)
    device_id = (device.index or 0) if device.type == "cuda" else 0
    tag = _model_tag(path)
    fallbacks: dict[str, str] = {}
    for name in order:
        reason = provider_problem(name)  # first: "no CUDA GPU is visible" says the most on a GPU-less machine
        if reason is None and provider == "auto" and name == "tensorrt" and not fp16:
            reason = TENSORRT_TF32
        if reason is None and provider == "auto" and name != "cpu" and device.type != "cuda":
            reason = f"the run is on the {device.type}"
        if reason is None:
            chain: list[object] = []
            if name == "tensorrt":
                assert cache_dir is not None, "TensorRT needs a cache folder for its engines"
                chain.append((PROVIDERS["tensorrt"], tensorrt_options(cache_dir=cache_dir, model_tag=tag, fp16=fp16, profile=profile, device_id=device_id)))
            if name in ("tensorrt", "cuda"):  # CUDA takes what TensorRT does not
                chain.append((PROVIDERS["cuda"], cuda_options(device_id=device_id)))
            chain.append(PROVIDERS["cpu"])
            try:
                sess = ort.InferenceSession(str(path), _session_options(name, fp16=fp16), providers=chain)
            except Exception as e:  # ORT raises its own Fail/RuntimeException types
                reason = f"session failed: {str(e).strip().splitlines()[0]}"
            else:
                if sess.get_providers()[0] == PROVIDERS[name]:
                    return sess, name, fallbacks
                reason = f"onnxruntime fell back to the CPU (it needs {_NEEDS.get(name, 'nothing more')})"
        if provider != "auto":
            raise EngineError(f"ONNX Runtime's {name} provider cannot load: {reason}; use `provider` cpu, or `targets` torch", params=("provider", "targets"))
        fallbacks[name] = reason
    raise AssertionError("the CPU provider always loads")  # pragma: no cover


def _model_tag(path: Path) -> str:
    """Identifies a model file and the ORT version, so cached TensorRT engines never go stale."""
    import onnxruntime as ort

    st = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{ort.__version__}".encode()).hexdigest()[:16]


class OnnxTargets:
    """A `TargetSource` running an exported target module through ONNX Runtime; with `tile`, an
    image larger than a tile is run one crop at a time (`tiles.tiled_targets`, fed by the module's
    feature outputs: the same targets, less memory)."""

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        provider: str = "auto",
        device: torch.device | str = "cpu",
        cache_dir: Path | None = None,
        profile: ShapeProfile | None = None,
        meta: M.ModelMeta | None = None,
        sha256: str | None = None,
        tile: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.meta = meta or M.read_meta(self.path)
        # The file's checksum keys the cached targets, so one model file's targets are never
        # served for another's (a damaged copy, a re-export). Pass it when just checked; else a
        # model with an export's checksum record beside it (the store's) is checked against it.
        if sha256 is None:
            recorded = M.recorded_sha256(self.path)
            sha256 = M.file_sha256(self.path) if recorded is None else M.check_sha256(self.path, recorded)
        self.sha256 = sha256
        # Tiled and whole targets are the same numbers up to rounding, as for `TorchTargets`: the
        # tile is not part of the identity.
        self.identity = f"onnx-sha256-{self.sha256}"
        self.device = torch.device(device)
        self.tile = tile
        self._tiled: dict[int, OnnxTargets] = {}
        # No CPU arena (`_session_options`): what it held through the optimisation no plan counts.
        self.session, self.provider, self.fallbacks = open_session(
            self.path, provider, device=self.device, cache_dir=cache_dir, fp16=self.meta.precision == "fp16", profile=profile
        )
        self._outputs = {o.name for o in self.session.get_outputs()}  # type: ignore[attr-defined]

    @property
    def resident_bytes(self) -> int:
        """What the session holds beside the loop's network, as a memory plan counts it
        (`plan.onnx_session_bytes`); its tiled forms share it."""
        from .plan import onnx_session_bytes

        return onnx_session_bytes(self.meta.layers, self.meta.precision)

    def with_tile(self, tile: int) -> "OnnxTargets":
        """This model on the provider that loaded, computing images larger than `tile` crop by crop:
        the same session, called on crops (a session is a copy of the weights, and tiling changes
        only what is fed to it and fetched), made once per tile edge and kept (a video's frames or
        a batch's jobs ask again and again)."""
        if tile == self.tile:
            return self
        if tile not in self._tiled:
            tiled = copy.copy(self)
            tiled.tile, tiled._tiled, tiled.fallbacks = tile, {}, dict(self.fallbacks)
            self._tiled[tile] = tiled
        return self._tiled[tile]

    def _outputs_for(self, hw: Sequence[int], content_layers: Sequence[str], style_layers: Sequence[str], *, tiled: bool) -> list[tuple[str, tuple[int, ...]]]:
        """(output name, shape) of what one call fetches: the content layers' features, then the
        style layers' Grams (whole) or their features (tiled; a style layer that is also asked for
        as content is read once, from its content output)."""
        def features(layer: str) -> tuple[int, ...]:
            return (1, layer_channels(layer), *feature_hw(hw, layer))

        outs = [(M.content_output(n), features(n)) for n in content_layers]
        if tiled:
            outs += [(M.feature_output(n), features(n)) for n in style_layers if n not in content_layers]
        else:
            outs += [(M.gram_output(n), (1, layer_channels(n), layer_channels(n))) for n in style_layers]
        lacking = [name for name, _ in outs if name not in self._outputs]
        if lacking:
            raise EngineError(f"{self.path} has no output(s) {', '.join(lacking)}: export it with this run's layers")
        return outs

    def _run(self, x: torch.Tensor, outputs: Sequence[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
        """The session on a contiguous (1, 3, H, W) fp32 image: the named outputs, on `self.device`."""
        if self.provider != "cpu" and x.is_cuda:
            return self._run_bound(x, outputs)
        arrays = self.session.run([name for name, _ in outputs], {M.INPUT_NAME: x.cpu().numpy()})  # type: ignore[attr-defined]
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    def _crop_features(self, content_layers: Sequence[str], style_layers: Sequence[str]) -> Callable[[torch.Tensor, tuple[int, int, int, int]], dict[str, torch.Tensor]]:
        """What `tiled_targets` runs on each crop: its layers' features through the session (the
        whole crop: the graph is fixed), at the positions the tile owns."""
        layers = tuple(content_layers) + tuple(n for n in style_layers if n not in content_layers)

        def features(crop: torch.Tensor, owned: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
            x = crop.contiguous()  # a crop is a strided view of the image
            y0, y1, x0, x1 = owned
            maps = self._run(x, self._outputs_for(x.shape[-2:], content_layers, style_layers, tiled=True))
            owned_maps = {}
            for k, f in zip(layers, maps):
                s = layer_stride(k)
                owned_maps[k] = f[:, :, y0 // s : y1 // s, x0 // s : x1 // s]
            return owned_maps

        return features

    @torch.no_grad()
    def compute(
        self, image: torch.Tensor, *, content_layers: tuple[str, ...], style_layers: tuple[str, ...], content_dtype: torch.dtype = torch.float32
    ) -> ImageTargets:
        """`content_dtype`: what the content features are kept in (fp32 out of the module, then
        rounded; a tiled image's are rounded crop by crop, so a full fp32 copy is never held)."""
        x = image.detach().to(torch.float32)  # (1, 3, H, W)
        if self.tile is not None and max(x.shape[-2:]) > self.tile:
            self._outputs_for(x.shape[-2:], content_layers, style_layers, tiled=True)  # a missing output: before any work
            content, grams = tiled_targets(
                self._crop_features(content_layers, style_layers), x.to(self.device),
                content_layers=content_layers, style_layers=style_layers, tile=self.tile, content_dtype=content_dtype,
            )  # fmt: skip
            return ImageTargets(content, grams)
        x = x.contiguous()
        outs = self._run(x, self._outputs_for(x.shape[-2:], content_layers, style_layers, tiled=False))
        k = len(content_layers)
        return ImageTargets({n: o.to(content_dtype) for n, o in zip(content_layers, outs[:k])}, dict(zip(style_layers, outs[k:])))

    def _run_bound(self, x: torch.Tensor, outputs: Sequence[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
        """I/O binding on torch CUDA tensors: no host copies. ORT runs on its own stream, hence the syncs.

        Only the bound outputs are fetched (a whole image's Grams, or a crop's features): ORT
        computes the others into buffers of its own."""
        import numpy as np

        dev_id = x.device.index or 0
        io = self.session.io_binding()  # type: ignore[attr-defined]
        io.bind_input(M.INPUT_NAME, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        outs: list[torch.Tensor] = []
        for name, shape in outputs:
            out = torch.empty(shape, dtype=torch.float32, device=x.device)
            io.bind_output(name, "cuda", dev_id, np.float32, tuple(out.shape), out.data_ptr())
            outs.append(out)
        torch.cuda.synchronize(x.device)  # the image (a crop's copy too) must be written before ORT's stream reads it
        io.synchronize_inputs()
        self.session.run_with_iobinding(io)  # type: ignore[attr-defined]
        io.synchronize_outputs()
        return [o if o.device == self.device else o.to(self.device) for o in outs]

    def describe(self) -> dict[str, object]:
        return {
            "source": "onnxruntime",
            "provider": self.provider,
            "fallbacks": dict(self.fallbacks),
            "model": str(self.path),
            "model_sha256": self.sha256,
            "precision": self.meta.precision,
            # Whether the model's fp32 arithmetic may have run in TF32 (TensorRT's default).
            "tf32": self.provider == "tensorrt",
        }
