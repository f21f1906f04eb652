"""Style and content targets: what the output's features are pulled towards.

A target source turns one processed image into the content layers' features and the style
layers' (normalised) Gram matrices. `TorchTargets` runs the PyTorch network; the ONNX Runtime
source in `onnx_targets.py` runs an exported target module. Both return tensors on the run's
device, the Grams in fp32 and the content features in the `content_dtype` asked for (fp32 by
default), and both can run an image tile by tile (`tiles.tiled_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .features import VGGFeatures
from .losses import gram_matrix
from .tiles import tiled_targets


@dataclass
class ImageTargets:
    """One image's targets: content features (1, C, h, w) and normalised Grams (1, C, C)."""

    content: dict[str, torch.Tensor]
    grams: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view for storage: `content/<layer>` and `gram/<layer>`."""
        return {**{f"content/{k}": v for k, v in self.content.items()}, **{f"gram/{k}": v for k, v in self.grams.items()}}

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "ImageTargets":
        content = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("content/")}
        grams = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("gram/")}
        return cls(content, grams)

    def to(self, device: torch.device) -> "ImageTargets":
        """The same targets on `device` (a cache hit arrives on the CPU)."""
        return ImageTargets({k: v.to(device) for k, v in self.content.items()}, {k: v.to(device) for k, v in self.grams.items()})


class TargetSource(Protocol):
    """Computes `ImageTargets` for an image; `describe()` feeds the report."""

    name: str  # "torch" | "onnxruntime"
    # What the targets depend on beyond the weights and pooling, e.g. an ONNX file's sha256;
    # part of every cache key. A source without the attribute counts as "".
    identity: str

    def compute(
        self, image: torch.Tensor, *, content_layers: tuple[str, ...], style_layers: tuple[str, ...], content_dtype: torch.dtype = torch.float32
    ) -> ImageTargets:
        """`content_dtype`: what the content features are kept in. The targets are computed in
        fp32 either way; a tiled stage asks for its loop's precision, so that a source which
        makes them piece by piece never holds an image-sized fp32 copy."""
        ...

    def describe(self) -> dict[str, object]: ...


def resident_bytes(source: TargetSource | None) -> int:
    """What `source` holds beside the loop's network for as long as it lives (a memory plan's
    `source` part): ONNX Runtime's session is its own copy of the weights; PyTorch's runs the
    loop's network (0)."""
    return int(getattr(source, "resident_bytes", 0)) if source is not None else 0


def tiled_source(source: TargetSource, tile: int) -> TargetSource | None:
    """`source` computing images larger than `tile` tile by tile (its `with_tile`, which both
    sources here have), or None for a source that cannot: its caller then uses PyTorch's."""
    if getattr(source, "tile", None) == tile:
        return source
    with_tile = getattr(source, "with_tile", None)
    return with_tile(tile) if with_tile is not None else None


class TorchTargets:
    """Targets from the PyTorch feature extractor, in fp32, without autograd; with `tile`, an image
    larger than a tile is run one tile at a time (`tiles.tiled_targets`: the same targets, less
    memory)."""

    name = "torch"
    identity = ""  # the weights' fingerprint and the pooling say it all

    def __init__(self, model: VGGFeatures, *, tile: int | None = None) -> None:
        self.model = model
        self.tile = tile

    def with_tile(self, tile: int) -> "TorchTargets":
        """This source, computing images larger than `tile` tile by tile."""
        return self if tile == self.tile else TorchTargets(self.model, tile=tile)

    @torch.no_grad()
    def compute(
        self, image: torch.Tensor, *, content_layers: tuple[str, ...], style_layers: tuple[str, ...], content_dtype: torch.dtype = torch.float32
    ) -> ImageTargets:
        """`content_dtype`: what the content features are kept in (computed in fp32, then rounded:
        a tiled stage at bf16 keeps them at the loop's precision, at half the memory)."""
        dev = next(self.model.parameters()).device
        if self.tile is not None and max(image.shape[-2:]) > self.tile:
            content, grams = tiled_targets(
                self.model, image.to(dev, torch.float32), content_layers=content_layers, style_layers=style_layers, tile=self.tile, content_dtype=content_dtype
            )
            return ImageTargets(content, grams)
        feats = self.model(image.to(dev, torch.float32))
        return ImageTargets(
            {name: feats[name].to(content_dtype) for name in content_layers},
            {name: gram_matrix(feats[name]) for name in style_layers},  # (1, C, C)
        )

    def describe(self) -> dict[str, object]:
        return {"source": "torch", "provider": str(next(self.model.parameters()).device)}
