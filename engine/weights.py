"""VGG19 conv weights: torchvision's ImageNet file, a local file, or seeded random values.

Weights travel as a state_dict under torchvision's `features.N.weight|bias` keys, conv layers
only (the classifier is never needed). Every set has a fingerprint, a hash of its tensors, that
keys the model store and the target cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .features import CONV_INDICES, VGG19_CFG, build_features
from .files import write_atomic

# torchvision's VGG19_Weights.IMAGENET1K_V1: its URL names the file; the 8 hex digits in the name
# are the start of the file's SHA-256, which torch.hub checks on download.
IMAGENET_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
IMAGENET_FILENAME = IMAGENET_URL.rsplit("/", 1)[1]
IMAGENET_HASH_PREFIX = "dcbb9e9d"
IMPORTED_FILENAME = "vgg19-imagenet-convs.safetensors"  # in `<cache>/weights/`


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit VGG19; the message says what to do."""


@dataclass(frozen=True)
class Weights:
    """Conv weights ready for `VGGFeatures`, with where they came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    kind: str  # "imagenet" | "random" | "file"
    description: str  # for reports: a path, or "random (seed 0)"
    fingerprint: str  # 16 hex digits over the tensors' names, shapes and bytes

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.description, "fingerprint": self.fingerprint}


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """`features.N.weight|bias` -> shape for all 16 convs of VGG19."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 3
    convs = [v for v in VGG19_CFG if v != "M"]
    for idx, out_ch in zip(CONV_INDICES, convs):
        shapes[f"features.{idx}.weight"] = (int(out_ch), in_ch, 3, 3)
        shapes[f"features.{idx}.bias"] = (int(out_ch),)
        in_ch = int(out_ch)
    return shapes


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of the conv tensors (names, shapes, fp32 bytes)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def random_weights(*, seed: int = 0) -> Weights:
    """Seeded random weights, initialised as torchvision initialises VGG (Kaiming, fan-out)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes().items():
        if key.endswith("weight"):
            fan_out = shape[0] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=gen) * (2.0 / fan_out) ** 0.5
        else:
            sd[key] = torch.zeros(shape)
    return Weights(sd, "random", f"random (seed {seed})", fingerprint(sd))


def conv_state_dict(raw: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Pick VGG19's conv tensors out of a full or features-only state_dict, checking every shape."""
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{source}: not a state_dict of tensors")
    # A features-only state_dict has keys "0.weight"...; a whole VGG19 has "features.0.weight"...
    if not any(k.startswith("features.") for k in raw):
        raw = {f"features.{k}": v for k, v in raw.items()}
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes().items():
        if key not in raw:
            raise WeightsError(f"{source}: missing tensor {key!r}; expected a torchvision VGG19 state_dict (whole model or `features`)")
        t = raw[key]
        if tuple(t.shape) != shape:
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} (is this VGG19?)")
        if not t.is_floating_point():
            raise WeightsError(f"{source}: tensor {key!r} has dtype {t.dtype}, expected floating point")
        out[key] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, or a `.pth`/`.pt` file with `weights_only=True` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def load_file_weights(path: Path, *, kind: str = "file") -> Weights:
    """Weights from a local file, checked against VGG19's shapes."""
    sd = conv_state_dict(read_state_dict(path), source=str(path))
    return Weights(sd, kind, str(path), fingerprint(sd))


def imported_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "weights" / IMPORTED_FILENAME


def hub_path(hub_dir: Path | None = None) -> Path:
    """Where torch.hub keeps torchvision's file: `$TORCH_HOME/hub/checkpoints/` by default."""
    return Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILENAME


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_conv_weights(weights: Weights, path: Path, *, extra: dict[str, str] | None = None) -> Path:
    """Write the conv tensors as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": weights.fingerprint, "source": weights.description, **(extra or {})}
    return write_atomic(path, lambda tmp: save_file(weights.state_dict, str(tmp), metadata=meta))


def import_weights(path: Path, *, cache_dir: Path) -> tuple[Weights, bool]:
    """Check a VGG19 file and keep its conv weights in the cache as the `imagenet` weights.

    Returns the weights and whether the file is torchvision's ImageNet file byte for byte
    (its SHA-256 starts with the hash in torchvision's file name).
    """
    weights = load_file_weights(path, kind="imagenet")
    verified = Path(path).suffix != ".safetensors" and file_sha256(Path(path)).startswith(IMAGENET_HASH_PREFIX)
    save_conv_weights(weights, imported_path(cache_dir), extra={"verified": str(verified).lower(), "imported_from": str(path)})
    return weights, verified


def offline_message(hub_file: Path, reason: str) -> str:
    return (
        f"ImageNet VGG19 weights not available: {IMAGENET_FILENAME} is not in {hub_file.parent} "
        f"and could not be downloaded ({reason}). Either fetch {IMAGENET_URL} elsewhere and run "
        f"`nst weights import FILE`, or use `--weights random` for an offline trial"
    )


def load_imagenet(*, cache_dir: Path | None = None, hub_dir: Path | None = None, download: bool = True, progress: bool = False) -> Weights:
    """torchvision's ImageNet VGG19: the imported copy, else the torch hub cache, else a download.

    A file found only in the hub cache is also kept, conv weights only, in `cache_dir`, so later
    loads read 80 MB instead of 548 MB.
    """
    if cache_dir is not None and imported_path(cache_dir).is_file():
        w = load_file_weights(imported_path(cache_dir), kind="imagenet")
        return w
    hub_file = hub_path(hub_dir)
    if not hub_file.is_file():
        if not download:
            raise WeightsError(offline_message(hub_file, "downloads are turned off"))
        try:
            torch.hub.load_state_dict_from_url(
                IMAGENET_URL, model_dir=str(hub_file.parent), map_location="cpu", progress=progress, check_hash=True
            )
        except Exception as e:  # URLError, socket errors, hash mismatch: all mean "not here"
            raise WeightsError(offline_message(hub_file, f"{type(e).__name__}: {e}".splitlines()[0][:200])) from None
    w = load_file_weights(hub_file, kind="imagenet")
    if cache_dir is not None:
        save_conv_weights(w, imported_path(cache_dir), extra={"verified": "true", "imported_from": str(hub_file)})
    return w


WEIGHTS_CHOICES = ("imagenet", "random")  # or a path


def load_weights(spec: str, *, seed: int = 0, cache_dir: Path | None = None, hub_dir: Path | None = None, download: bool = True) -> Weights:
    """`imagenet`, `random` (seeded with `seed`), or the path of a `.pth`/`.safetensors` file."""
    if spec == "random":
        return random_weights(seed=seed)
    if spec == "imagenet":
        return load_imagenet(cache_dir=cache_dir, hub_dir=hub_dir, download=download)
    p = Path(spec)
    if not p.exists():
        raise WeightsError(f"--weights {spec!r}: not imagenet, random, or an existing file")
    return load_file_weights(p)


def weights_status(*, cache_dir: Path | None = None, hub_dir: Path | None = None) -> dict[str, object]:
    """What is available without a download: the imported copy and the hub file."""
    hub_file = hub_path(hub_dir)
    status: dict[str, object] = {
        "hub_file": str(hub_file),
        "hub_file_present": hub_file.is_file(),
        "imported_file": str(imported_path(cache_dir)) if cache_dir is not None else None,
        "imported_present": bool(cache_dir is not None and imported_path(cache_dir).is_file()),
    }
    if status["imported_present"]:
        from safetensors import safe_open

        with safe_open(str(imported_path(cache_dir)), "pt") as f:  # type: ignore[arg-type]
            meta = f.metadata() or {}
        status["imported_fingerprint"] = meta.get("fingerprint")
        status["imported_verified"] = meta.get("verified") == "true"
        status["imported_from"] = meta.get("imported_from")
    status["imagenet_available"] = bool(status["hub_file_present"] or status["imported_present"])
    return status


def load_into(module: torch.nn.Module, weights: Weights) -> None:
    """Load the conv weights a (possibly cut) `features` Sequential has room for."""
    own = module.state_dict()
    sd = {k[len("features."):]: v for k, v in weights.state_dict.items() if k[len("features."):] in own}
    module.load_state_dict(sd, strict=True)


__all__ = [
    "Weights",
    "WeightsError",
    "build_features",
    "fingerprint",
    "import_weights",
    "load_file_weights",
    "load_imagenet",
    "load_weights",
    "random_weights",
    "weights_status",
]
