"""The target cache: content-addressed safetensors files that a run never has to trust blindly.

One file per key under `<root>/targets/<key[:2]>/<key>.safetensors`. Each carries a sha256 over
its tensors' names, dtypes, shapes and bytes; a file that cannot be read or fails the check is
deleted and reported as a miss, never used and never a crash. Writes go to a unique temporary
file in the same folder and are renamed into place, so concurrent writers of one key both
succeed and a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import onnx_meta
from .files import write_atomic
from .targets import ImageTargets

CACHE_FORMAT = "1"
TARGETS_DIR = "targets"
_CLEARABLE = (TARGETS_DIR, onnx_meta.MODELS_DIR, "tensorrt")  # never the imported weights


class TargetCacheWarning(UserWarning):
    """A cache entry was damaged and has been discarded."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TargetCache:
    """`TargetCacheLike` on disk. `namespace` separates target sources (e.g. "onnxruntime-fp32")."""

    def __init__(self, root: Path, *, namespace: str = "", on_warning: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.namespace = namespace
        # Where a discarded entry is reported: a callback (the CLI prints one line) or warnings.warn.
        self.on_warning = on_warning

    def _file_key(self, key: str) -> str:
        if not self.namespace:
            return key
        return hashlib.sha256(f"{self.namespace}\0{key}".encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        k = self._file_key(key)
        return self.root / TARGETS_DIR / k[:2] / f"{k}.safetensors"

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, TargetCacheWarning, stacklevel=3)

    def lookup(self, key: str) -> ImageTargets | None:
        """The stored targets, or None (absent, or damaged and now deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            problem = None
            if meta.get("nst.cache_format") != CACHE_FORMAT:
                problem = f"format {meta.get('nst.cache_format')!r}, expected {CACHE_FORMAT}"
            elif meta.get("nst.key") != self._file_key(key):
                problem = "it is stored under the wrong key"
            elif meta.get("nst.sha256") != checksum(tensors):
                problem = "its checksum does not match"
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            problem = f"unreadable ({type(e).__name__})"
        if problem is not None:
            path.unlink(missing_ok=True)
            self._warn(f"discarded a damaged target cache entry {path.name}: {problem}; recomputing")
            return None
        return ImageTargets.from_tensors(tensors)

    def store(self, key: str, targets: ImageTargets) -> None:
        """Write atomically; a failure to write (disk full, read-only) only costs a later miss."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in targets.tensors().items()}
        meta = {"nst.cache_format": CACHE_FORMAT, "nst.key": self._file_key(key), "nst.sha256": checksum(tensors), "nst.namespace": self.namespace}
        path = self.path(key)
        try:
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as e:
            self._warn(f"could not write the target cache entry {path.name}: {e.strerror or e}")

    def entries(self) -> list[Path]:
        d = self.root / TARGETS_DIR
        return sorted(d.glob("*/*.safetensors")) if d.is_dir() else []

    def info(self) -> dict[str, object]:
        """Entries, their total size, and the exported models in the store."""
        files = self.entries()
        models = []
        for p in onnx_meta.stored_models(self.root):
            size = sum(f.stat().st_size for f in p.parent.iterdir() if f.is_file())
            models.append({"name": p.parent.name, "path": str(p), "bytes": size})
        return {
            "folder": str(self.root),
            "entries": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "models": models,
            "model_bytes": sum(int(m["bytes"]) for m in models),
        }

    def clear(self) -> dict[str, int]:
        """Delete the cached targets, the exported models and TensorRT's engines (imported weights stay)."""
        before = self.info()
        for name in _CLEARABLE:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return {"entries": int(before["entries"]), "models": len(before["models"]), "bytes": int(before["bytes"]) + int(before["model_bytes"])}  # type: ignore[arg-type]
