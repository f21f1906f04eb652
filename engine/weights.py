"""VGG19 conv weights: torchvision's ImageNet file, a local file, or seeded random values.

Weights travel as a state_dict under torchvision's `features.N.weight|bias` keys, conv layers
only (the classifier is never needed). Every set has a fingerprint, a hash of its tensors, that
keys the model store and the target cache.

torch is imported inside the functions that need it: the paths, the status and the file checks
run without it (`nst weights status` answers at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import EngineError, EngineWarning
from .files import write_atomic

if TYPE_CHECKING:
    import torch

# torchvision's VGG19_Weights.IMAGENET1K_V1: its URL names the file; the 8 hex digits in the name
# are the start of the file's SHA-256. torch.hub checks them only when it downloads, so a file
# found in its folder is checked here before it is trusted.
IMAGENET_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
IMAGENET_FILENAME = IMAGENET_URL.rsplit("/", 1)[1]
IMAGENET_HASH_PREFIX = "dcbb9e9d"
IMPORTED_FILENAME = "vgg19-imagenet-convs.safetensors"  # in `<cache>/weights/`


class WeightsError(EngineError):
    """Weights that cannot be found or do not fit VGG19; the message says what to do."""


class WeightsCacheWarning(EngineWarning):
    """The conv-only copy of the ImageNet weights could not be kept; the run goes on without it."""


class WeightsUnavailable(WeightsError):
    """The ImageNet weights are neither on this machine nor downloadable: a missing resource,
    not a mistake in the input."""


class WeightsKind(str, enum.Enum):
    """Where a set of weights came from."""

    IMAGENET = "imagenet"  # torchvision's ImageNet file (from the hub folder or imported)
    RANDOM = "random"  # seeded, for trials and tests
    FILE = "file"  # a user's .pth/.safetensors file


@dataclass(frozen=True)
class Weights:
    """Conv weights ready for `VGGFeatures`, with where they came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    kind: WeightsKind
    description: str  # for reports: a path, or "random (seed 0)"
    fingerprint: str  # 16 hex digits over the tensors' names, shapes and bytes
    reason: str | None = None  # why these are not what was asked for (a hub file that failed its hash)

    @property
    def is_random(self) -> bool:
        return self.kind == WeightsKind.RANDOM

    def to_dict(self) -> dict[str, str]:
        out = {"kind": self.kind.value, "source": self.description, "fingerprint": self.fingerprint}
        if self.reason:
            out["reason"] = self.reason
        return out


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """`features.N.weight|bias` -> shape for all 16 convs of VGG19."""
    from .layers import CONV_INDICES, VGG19_CFG

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
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def random_weights(*, seed: int = 0) -> Weights:
    """Seeded random weights, initialised as torchvision initialises VGG (Kaiming, fan-out)."""
    import torch

    from .config import check_seed

    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes().items():
        if key.endswith("weight"):
            fan_out = shape[0] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=gen) * (2.0 / fan_out) ** 0.5
        else:
            sd[key] = torch.zeros(shape)
    return Weights(sd, WeightsKind.RANDOM, f"random (seed {seed})", fingerprint(sd))


def conv_state_dict(raw: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Pick VGG19's conv tensors out of a full or features-only state_dict, checking every shape."""
    import torch

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
        bad = int((~torch.isfinite(out[key])).sum())
        if bad:  # a damaged or diverged file: every loss would be nan
            raise WeightsError(f"{source}: tensor {key!r} has {bad} non-finite value(s) (nan or inf); these are not usable weights")
    return out


EXPECTED_FILE = "a VGG19 state_dict saved by torch.save (.pth, .pt) or a .safetensors file"


def file_format(head: bytes, size: int) -> str | None:
    """"zip" (torch.save), "pickle" (torch.save's legacy format), "safetensors", or None, from the
    first bytes of a file."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    # safetensors: the JSON header's length as a little-endian u64, then the header itself
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    return None


def _describe(head: bytes) -> str:
    if not head:
        return "it is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the sample is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else "\0"
    return "it is text" if "\0" not in text else "it is neither a zip archive, a pickle nor safetensors"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, or a `.pth`/`.pt` file with `weights_only=True` (no pickled code).

    A file that is neither, or a pickle that holds more than tensors, is an error that says so;
    torch's advice to load it with `weights_only=False` is never passed on.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} is a folder, not a weights file" if path.is_dir() else f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = file_format(head, path.stat().st_size)
    if kind is None:
        raise WeightsError(f"{path} is not a weights file ({_describe(head)}): expected {EXPECTED_FILE}")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{path} is not a plain state_dict (it holds pickled Python objects besides tensors) and was not loaded, for safety: "
            f"a pickle can run code. Save `model.state_dict()` instead, or convert it to .safetensors"
        ) from None
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def load_file_weights(path: Path, *, kind: WeightsKind = WeightsKind.FILE) -> Weights:
    """Weights from a local file, checked against VGG19's shapes."""
    sd = conv_state_dict(read_state_dict(path), source=str(path))
    return Weights(sd, WeightsKind(kind), str(path), fingerprint(sd))


def imported_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "weights" / IMPORTED_FILENAME


def hub_path(hub_dir: Path | None = None) -> Path:
    """Where torch.hub keeps torchvision's file: `<hub_dir>/checkpoints/`, by default under
    `torch.hub.get_dir()` (`$TORCH_HOME/hub`)."""
    if hub_dir is None:
        import torch.hub

        hub_dir = Path(torch.hub.get_dir())
    return Path(hub_dir) / "checkpoints" / IMAGENET_FILENAME


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_torchvision_file(sha256: str) -> bool:
    """Whether a file's SHA-256 starts with the prefix in torchvision's file name."""
    return sha256.startswith(IMAGENET_HASH_PREFIX)


def save_conv_weights(weights: Weights, path: Path, *, extra: dict[str, str] | None = None) -> Path:
    """Write the conv tensors as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": weights.fingerprint, "source": weights.description, **(extra or {})}
    return write_atomic(path, lambda tmp: save_file(weights.state_dict, str(tmp), metadata=meta))


def _provenance(source: Path, sha256: str, verified: bool) -> dict[str, str]:
    """What the conv-only copy records about the file it was made from (`nst weights status` shows it)."""
    return {"imported_from": str(source), "sha256": sha256, "verified": str(verified).lower()}


def import_weights(path: Path, *, cache_dir: Path) -> tuple[Weights, bool]:
    """Check a VGG19 file and keep its conv weights in the cache as the `imagenet` weights.

    Returns the weights and whether the file is torchvision's ImageNet file byte for byte
    (its SHA-256 starts with the hash in torchvision's file name).
    """
    weights = load_file_weights(path, kind=WeightsKind.IMAGENET)
    digest = file_sha256(Path(path))
    verified = Path(path).suffix != ".safetensors" and is_torchvision_file(digest)
    save_conv_weights(weights, imported_path(cache_dir), extra=_provenance(Path(path), digest, verified))
    return weights, verified


def offline_message(hub_file: Path, reason: str) -> str:
    return (
        f"ImageNet VGG19 weights not available: {IMAGENET_FILENAME} is not in {hub_file.parent} "
        f"and could not be downloaded ({reason}). Either fetch {IMAGENET_URL} elsewhere and run "
        f"`nst weights import FILE`, or use `--weights random` for an offline trial"
    )


def mismatch_message(hub_file: Path, sha256: str) -> str:
    return (
        f"{hub_file} is not torchvision's {IMAGENET_FILENAME} (its sha256 starts with {sha256[:8]}, "
        f"not {IMAGENET_HASH_PREFIX}), so it is used as a plain weights file, not as the ImageNet weights; "
        f"delete it to download the real file, or `nst weights import FILE` a file you trust"
    )


def _download(hub_file: Path, *, progress: bool) -> None:
    """torchvision's file into torch hub's folder, hash-checked; on failure the folders made for
    it are removed again (an empty `checkpoints/` helps no one)."""
    import torch.hub

    made = [d for d in (hub_file.parent, *hub_file.parent.parents) if not d.exists()]  # deepest first
    try:
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(IMAGENET_URL, str(hub_file), IMAGENET_HASH_PREFIX, progress=progress)
    except Exception as e:  # URLError, socket errors, a hash mismatch, a read-only folder: all mean "not here"
        for d in made:
            with contextlib.suppress(OSError):  # not empty: someone else is using it
                d.rmdir()
        raise WeightsUnavailable(offline_message(hub_file, f"{type(e).__name__}: {e}".splitlines()[0][:200])) from None


def load_imagenet(
    *,
    cache_dir: Path | None = None,
    hub_dir: Path | None = None,
    download: bool = True,
    progress: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> Weights:
    """torchvision's ImageNet VGG19: the imported copy, else the torch hub cache, else a download.

    A file in torch hub's folder is trusted only if its SHA-256 starts with the prefix in its
    name; then its conv weights are also kept in `cache_dir`, so later loads read 80 MB instead
    of 548 MB. A file that fails the check is loaded as a plain file (`kind` "file", `reason`
    saying why) and no copy is made. The copy is only a shortcut: failing to write it (a full
    disk, a read-only cache) goes to `on_warning` (else `warnings.warn`) and the run goes on.
    """
    if cache_dir is not None and imported_path(cache_dir).is_file():
        return load_file_weights(imported_path(cache_dir), kind=WeightsKind.IMAGENET)
    hub_file = hub_path(hub_dir)
    if not hub_file.is_file():
        if not download:
            raise WeightsUnavailable(offline_message(hub_file, "downloads are turned off"))
        _download(hub_file, progress=progress)
    digest = file_sha256(hub_file)
    if not is_torchvision_file(digest):
        return dataclasses.replace(load_file_weights(hub_file), reason=mismatch_message(hub_file, digest))
    w = load_file_weights(hub_file, kind=WeightsKind.IMAGENET)
    if cache_dir is not None:
        from safetensors import SafetensorError

        try:
            save_conv_weights(w, imported_path(cache_dir), extra=_provenance(hub_file, digest, True))
        except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
            message = f"cannot keep the conv-only copy in {imported_path(cache_dir).parent} ({e}); later runs read {hub_file} again"
            if on_warning is not None:
                on_warning(message)
            else:
                warnings.warn(message, WeightsCacheWarning, stacklevel=2)
    return w


def load_weights(
    spec: str,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    hub_dir: Path | None = None,
    download: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> Weights:
    """`imagenet`, `random` (seeded with `seed`), or the path of a `.pth`/`.safetensors` file."""
    if spec == "random":
        return random_weights(seed=seed)
    if spec == "imagenet":
        return load_imagenet(cache_dir=cache_dir, hub_dir=hub_dir, download=download, on_warning=on_warning)
    p = Path(spec)
    if not p.exists():
        raise WeightsError(f"`weights` {spec!r}: not imagenet, random, or an existing file", params=("weights",))
    return load_file_weights(p)


def imported_metadata(path: Path) -> dict[str, str]:
    """The metadata the conv-only copy was written with (read without torch)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def weights_status(*, cache_dir: Path | None = None, hub_dir: Path | None = None) -> dict[str, object]:
    """What is available without a download: the imported copy and the hub file.

    The hub file is hashed (about a second) only while there is no imported copy, since only
    then would `--weights imagenet` read it.
    """
    hub_file = hub_path(hub_dir)
    imported = imported_path(cache_dir) if cache_dir is not None else None
    status: dict[str, object] = {
        "hub_file": str(hub_file),
        "hub_file_present": hub_file.is_file(),
        "hub_file_verified": None,
        "imported_file": str(imported) if imported is not None else None,
        "imported_present": bool(imported is not None and imported.is_file()),
    }
    if status["imported_present"]:
        try:
            meta = imported_metadata(imported)  # type: ignore[arg-type]
        except Exception as e:  # safetensors raises its own types for a damaged file
            meta = {}
            status["imported_error"] = f"unreadable ({type(e).__name__}): `nst weights import FILE` again"
        status["imported_fingerprint"] = meta.get("fingerprint")
        status["imported_verified"] = meta.get("verified") == "true"
        status["imported_from"] = meta.get("imported_from")
        status["imported_sha256"] = meta.get("sha256")
    elif status["hub_file_present"]:
        status["hub_file_verified"] = is_torchvision_file(file_sha256(hub_file))
    status["imagenet_available"] = bool((status["imported_present"] and "imported_error" not in status) or status["hub_file_verified"])
    return status


def load_into(module: torch.nn.Module, weights: Weights) -> None:
    """Load the conv weights a (possibly cut) `features` Sequential has room for."""
    own = module.state_dict()
    sd = {k[len("features."):]: v for k, v in weights.state_dict.items() if k[len("features."):] in own}
    module.load_state_dict(sd, strict=True)


__all__ = [
    "Weights",
    "WeightsError",
    "WeightsUnavailable",
    "fingerprint",
    "import_weights",
    "load_file_weights",
    "load_imagenet",
    "load_weights",
    "random_weights",
    "weights_status",
]
