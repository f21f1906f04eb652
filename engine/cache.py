"""The target cache: content-addressed safetensors files that a run never has to trust blindly.

One file per key under `<root>/targets/<key[:2]>/<key>.safetensors`. Each carries a sha256 over
its tensors' names, dtypes, shapes and bytes; a file that cannot be read or fails the check is
deleted and reported as a miss, never used and never a crash. Writes go to a unique temporary
file in the same folder and are renamed into place, so concurrent writers of one key both
succeed and a reader sees a whole file or none. The cache is an optimisation: a write that fails
(disk full, read-only folder) is one warning and the run goes on without it.

Temporaries that killed writers left in the cache folder (`.*.tmp` files, the model store's
private export folders) are swept when a cache is first used, once their writer is gone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import files, onnx_meta
from .errors import EngineWarning
from .files import Temporary, write_atomic

if TYPE_CHECKING:  # torch is imported where tensors are handled: `nst cache info` runs without it
    import torch

    from .targets import ImageTargets

CACHE_FORMAT = "1"
TARGETS_DIR = "targets"
REFERENCES_DIR = "references"  # `nst bench --to-result`'s reference losses (bench_result)
_CLEARABLE = (TARGETS_DIR, onnx_meta.MODELS_DIR, "tensorrt", REFERENCES_DIR)  # never the imported weights


class TargetCacheWarning(EngineWarning):
    """A cache entry was damaged and has been discarded."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    import torch

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
        self._swept = False
        self._write_failed = False  # a write failure is reported once per cache, not once per entry

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
        from .targets import ImageTargets

        self._sweep_once()
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
        """Write atomically; a failure to write (disk full, read-only) is one warning, then silence."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        self._sweep_once()
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in targets.tensors().items()}
        meta = {"nst.cache_format": CACHE_FORMAT, "nst.key": self._file_key(key), "nst.sha256": checksum(tensors), "nst.namespace": self.namespace}
        path = self.path(key)
        try:
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
            if not self._write_failed:
                self._write_failed = True
                # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
                reason = e.strerror if isinstance(e, OSError) and e.strerror else re.sub(r" \(os error \d+\)$", "", str(e).split("I/O error: ")[-1].strip())
                self._warn(f"cannot write to the target cache in {path.parent} ({reason}); going on without caching")

    def entries(self) -> list[Path]:
        d = self.root / TARGETS_DIR
        return sorted(d.glob("*/*.safetensors")) if d.is_dir() else []

    def temporaries(self) -> list[Temporary]:
        """What writers left in the cache folder: `.*.tmp` files and the model store's `.`-folders."""
        if not self.root.is_dir():
            return []
        now = time.time()
        store = self.root / onnx_meta.MODELS_DIR
        found = []
        # os.walk, not Path.rglob: it shrugs off folders that other processes rename meanwhile.
        for folder, dirs, names in os.walk(self.root):
            here = Path(folder)
            if here == store:  # an export's private folder: counted whole, not walked into
                found += [here / d for d in dirs if d.startswith(".")]
                dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [here / n for n in names if n.startswith(".") and n.endswith(".tmp")]
        states = [files.temporary_state(p, now=now) for p in sorted(found)]
        return [t for t in states if t is not None]

    def sweep(self) -> list[Temporary]:
        """Delete stale temporaries (their writer is gone, or long quiet); returns what was removed."""
        self._swept = True
        return files.remove(self.temporaries())

    def _sweep_once(self) -> None:
        if not self._swept:
            self.sweep()

    def info(self) -> dict[str, object]:
        """Entries, their total size, the exported models in the store, and leftover temporaries."""
        entries = self.entries()
        models = []
        for p in onnx_meta.stored_models(self.root):
            size = sum(f.stat().st_size for f in p.parent.iterdir() if f.is_file())
            models.append({"name": p.parent.name, "path": str(p), "bytes": size})
        temps = self.temporaries()
        return {
            "folder": str(self.root),
            "entries": len(entries),
            "bytes": sum(f.stat().st_size for f in entries),
            "models": models,
            "model_bytes": sum(int(m["bytes"]) for m in models),
            "temporaries": [t.to_dict() for t in temps],
            "temporary_bytes": sum(t.bytes for t in temps),
        }

    def clear(self) -> dict[str, int]:
        """Delete the cached targets, the exported models, TensorRT's engines and stale temporaries
        (imported weights stay; so does a live writer's temporary outside those folders)."""
        before = self.info()
        clearable = [self.root / name for name in _CLEARABLE]
        temps = self.temporaries()
        for d in clearable:
            shutil.rmtree(d, ignore_errors=True)
        inside = [t for t in temps if any(d in t.path.parents for d in clearable)]
        swept = files.remove(t for t in temps if t not in inside)  # e.g. a killed weights import's
        gone = inside + swept
        total = int(before["bytes"]) + int(before["model_bytes"]) + sum(t.bytes for t in gone)  # type: ignore[call-overload]
        return {"entries": int(before["entries"]), "models": len(before["models"]), "temporaries": len(gone), "bytes": total}  # type: ignore[arg-type, call-overload]
