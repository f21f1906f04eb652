"""The exported target module's contract: tensor names, metadata keys, and where the store keeps it.

`nst.export` writes these names and keys; `onnx_targets.py` reads them. Both import them from
here, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .files import write_atomic

FORMAT_VERSION = "2"  # bump when names, keys or the module's semantics change (and say why in FORMAT_CHANGES)
# What each format added, for the message that asks for a new export of an older one.
FORMAT_CHANGES = {"2": "the style layers' features, which tiled runs sum their Grams from"}
OPSET = 18  # the torch.export-based exporter's floor; TensorRT 10 parses it

INPUT_NAME = "image"  # (1, 3, H, W) fp32 sRGB in [0, 1]; normalisation is inside the graph
TARGETS_FILE = "targets.onnx"  # file name of a target module in the model store
CHECKSUM_FILE = "targets.onnx.sha256"  # beside it in the store: `<sha256>  targets.onnx`, as sha256sum writes
MODELS_DIR = "models"  # the model store, under the cache folder


def gram_output(layer: str) -> str:
    """Output name of a style layer's normalised Gram matrix, (1, C, C) fp32."""
    return f"gram_{layer}"


def content_output(layer: str) -> str:
    """Output name of a content layer's features, (1, C, H / stride, W / stride) fp32."""
    return f"content_{layer}"


def feature_output(layer: str) -> str:
    """Output name of a style layer's features, (1, C, H / stride, W / stride) fp32.

    A tiled run needs them: it sums each layer's Gram over the positions each tile owns
    (`tiles.Tile.owned`), which a crop's whole Gram cannot give."""
    return f"features_{layer}"


# metadata_props keys. Values are strings; lists are comma-separated.
K_FORMAT = "nst.format"
K_KIND = "nst.kind"  # "targets"
K_CONTENT_LAYERS = "nst.content_layers"
K_STYLE_LAYERS = "nst.style_layers"
K_LAYERS = "nst.layers"  # every layer the module reads (content then style, unique)
K_POOLING = "nst.pooling"
K_MEAN = "nst.normalize_mean"
K_STD = "nst.normalize_std"
K_FINGERPRINT = "nst.weights_fingerprint"
K_WEIGHTS_KIND = "nst.weights_kind"
K_PRECISION = "nst.precision"  # "fp32" | "fp16": the convolutions' dtype; inputs and outputs are fp32
K_OPSET = "nst.opset"
K_VERSIONS = "nst.versions"  # "torch=2.x,onnx=1.y,nst=0.z"


@dataclass(frozen=True)
class ModelMeta:
    """What an exported target module computes, as recorded in its metadata_props."""

    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    pooling: str
    fingerprint: str  # the weights' fingerprint (nst.engine.weights.fingerprint)
    weights_kind: str
    precision: str = "fp32"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    opset: int = OPSET
    versions: str = ""
    kind: str = "targets"
    format: str = FORMAT_VERSION

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))

    def to_props(self) -> dict[str, str]:
        """The metadata_props entries, all strings."""
        return {
            K_FORMAT: self.format,
            K_KIND: self.kind,
            K_CONTENT_LAYERS: ",".join(self.content_layers),
            K_STYLE_LAYERS: ",".join(self.style_layers),
            K_LAYERS: ",".join(self.layers),
            K_POOLING: self.pooling,
            K_MEAN: ",".join(repr(v) for v in self.mean),
            K_STD: ",".join(repr(v) for v in self.std),
            K_FINGERPRINT: self.fingerprint,
            K_WEIGHTS_KIND: self.weights_kind,
            K_PRECISION: self.precision,
            K_OPSET: str(self.opset),
            K_VERSIONS: self.versions,
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, where: str = "the model") -> "ModelMeta":
        """Parse metadata_props; EngineError if it was not written by `nst export`."""
        missing = [k for k in (K_FORMAT, K_CONTENT_LAYERS, K_STYLE_LAYERS, K_POOLING, K_FINGERPRINT) if k not in props]
        if missing:
            raise EngineError(f"{where} has no nst metadata ({', '.join(missing)}): export it with `nst export`")
        if props[K_FORMAT] != FORMAT_VERSION:
            have = props[K_FORMAT]
            added = [f"format {v} adds {FORMAT_CHANGES[v]}" for v in sorted(FORMAT_CHANGES, key=int) if have.isdigit() and int(have) < int(v)]
            why = f" ({'; '.join(added)})" if added else ""
            raise EngineError(f"{where} is nst export format {have}, this nst reads {FORMAT_VERSION}{why}: export it again with `nst export`")

        def names(key: str) -> tuple[str, ...]:
            return tuple(n for n in props.get(key, "").split(",") if n)

        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(v) for v in props.get(key, "").split(",") if v)

        return cls(
            content_layers=names(K_CONTENT_LAYERS),
            style_layers=names(K_STYLE_LAYERS),
            pooling=props[K_POOLING],
            fingerprint=props[K_FINGERPRINT],
            weights_kind=props.get(K_WEIGHTS_KIND, ""),
            precision=props.get(K_PRECISION, "fp32"),
            mean=floats(K_MEAN),
            std=floats(K_STD),
            opset=int(props.get(K_OPSET, OPSET)),
            versions=props.get(K_VERSIONS, ""),
            kind=props.get(K_KIND, "targets"),
            format=props[K_FORMAT],
        )

    def check_matches(self, *, fingerprint: str, pooling: str, content_layers: Sequence[str], style_layers: Sequence[str], where: str = "the model") -> None:
        """EngineError (one line) unless this module serves a run with these weights, pooling and layers."""
        if self.fingerprint != fingerprint:
            raise EngineError(f"{where} was exported from weights {self.fingerprint}, this run uses {fingerprint}: export it with the same `weights`", params=("weights",))
        if self.pooling != pooling:
            raise EngineError(f"{where} uses {self.pooling} pooling, this run uses {pooling}: export it with `pooling` {pooling}", params=("pooling",))
        lacking = [f"content {n}" for n in content_layers if n not in self.content_layers]
        lacking += [f"style {n}" for n in style_layers if n not in self.style_layers]
        if lacking:
            raise EngineError(f"{where} lacks the run's layers ({', '.join(lacking)}): export it with this run's `content_layers`/`style_layers`", params=("content_layers", "style_layers"))


def read_meta(path: Path) -> ModelMeta:
    """The metadata of an exported target module, without loading its weights."""
    import onnx  # local: only the ONNX paths need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    if path.stat().st_size == 0:  # protobuf reads 0 bytes as an empty model: "has no nst metadata"
        raise EngineError(f"{path} is empty (0 bytes), not an ONNX model: export it again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise EngineError(f"{path} is not a readable ONNX model ({type(e).__name__}): export it again") from None
    return ModelMeta.from_props({p.key: p.value for p in model.metadata_props}, where=str(path))


def store_key(*, fingerprint: str, pooling: str, content_layers: Sequence[str], style_layers: Sequence[str], precision: str = "fp32") -> str:
    """A model store entry's folder name: weights fingerprint, pooling, a hash of the layers, precision."""
    layers = hashlib.sha256(f"{','.join(content_layers)};{','.join(style_layers)};{FORMAT_VERSION}".encode()).hexdigest()[:10]
    return f"{fingerprint}-{pooling}-{layers}" + ("-fp16" if precision == "fp16" else "")


def store_path(cache_root: Path, **key: object) -> Path:
    """Where the model store keeps the target module for `store_key(**key)`."""
    return Path(cache_root) / MODELS_DIR / store_key(**key) / TARGETS_FILE  # type: ignore[arg-type]


def stored_models(cache_root: Path) -> list[Path]:
    """Every target module in the store."""
    root = Path(cache_root) / MODELS_DIR
    return sorted(root.glob(f"*/{TARGETS_FILE}")) if root.is_dir() else []


class ModelChecksumError(EngineError):
    """A stored model whose bytes are not the ones its export wrote."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (tens of ms for the 52 MB Gatys module)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksum(model: Path) -> str:
    """Record `model`'s sha256 beside it (`CHECKSUM_FILE`), as the store's export does; returns it."""
    model = Path(model)
    digest = file_sha256(model)
    write_atomic(model.parent / CHECKSUM_FILE, lambda tmp: tmp.write_text(f"{digest}  {model.name}\n"))
    return digest


def recorded_sha256(model: Path) -> str | None:
    """The sha256 recorded beside `model` at export (`CHECKSUM_FILE`), or None if there is no record.

    ModelChecksumError if the record is there but does not name `model` or is not a sha256.
    """
    model = Path(model)
    try:
        fields = (model.parent / CHECKSUM_FILE).read_text().split()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ModelChecksumError(f"{model}'s checksum record cannot be read ({e.strerror or e})") from None
    if len(fields) != 2 or fields[1].lstrip("*") != model.name or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise ModelChecksumError(f"{model}'s checksum record is damaged")
    return fields[0]


def check_sha256(model: Path, recorded: str) -> str:
    """`model`'s sha256, or ModelChecksumError (one line) if it is not `recorded`."""
    actual = file_sha256(model)
    if actual != recorded:
        raise ModelChecksumError(f"{model} fails its checksum, so it is damaged (sha256 {actual[:12]}..., recorded {recorded[:12]}...)")
    return actual


def check_stored(model: Path) -> str:
    """The stored model's sha256 after checking it against the one recorded at export.

    ModelChecksumError (one line) when the record is missing or unreadable, or the bytes differ:
    the caller discards the model and exports it again.
    """
    recorded = recorded_sha256(model)
    if recorded is None:
        raise ModelChecksumError(f"{model} has no checksum record (exported by an older nst, or damaged)")
    return check_sha256(model, recorded)
