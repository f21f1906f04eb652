"""`nst export`: the target module to ONNX, verified against PyTorch, into the model store or a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nst.engine import config as C
from nst.engine.onnx_meta import OPSET

from .common import UserError, check_writable, console, load_weights_for, parse_list, usable_cache_dir, user_errors


def export_command(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of the model store in the cache folder.", show_default=False)] = None,
    weights: Annotated[str, typer.Option(help="imagenet, random, or a .pth/.safetensors file.")] = "imagenet",
    seed: Annotated[Optional[int], typer.Option(help="Seed for --weights random [the preset's].", show_default=False)] = None,
    preset: Annotated[C.Preset, typer.Option(help="Where the default layers and pooling come from.")] = C.Preset.GATYS,
    content_layers: Annotated[Optional[str], typer.Option(help="Comma-separated content layers [the preset's].", show_default=False)] = None,
    style_layers: Annotated[Optional[str], typer.Option(help="Comma-separated style layers [the preset's].", show_default=False)] = None,
    pooling: Annotated[Optional[C.Pooling], typer.Option(help="max or avg [the preset's].", show_default=False)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Convolutions in fp16 (inputs, Grams and outputs stay fp32).")] = False,
) -> None:
    """Export VGG19's target module to ONNX and verify it.

    The module computes the content features and style Gram matrices; the export is checked
    against PyTorch before it is kept.
    """
    with user_errors():
        overrides = dict(
            content_layers=parse_list(content_layers, what="layer", option="--content-layers") or None,
            style_layers=parse_list(style_layers, what="layer", option="--style-layers") or None,
            pooling=pooling,
            seed=seed,
        )
        cfg = C.preset(preset, **{k: v for k, v in overrides.items() if v is not None})
        if output is not None and output.suffix.lower() != ".onnx":
            raise UserError(f"the output {output} should end in .onnx")
        check_writable(output, "-o", example="targets.onnx")
        store = usable_cache_dir() if output is None else None  # before the export's work
        from nst.export import TOLERANCE, ModuleSpec, export_targets, export_to_store

        w = load_weights_for(weights, cfg.seed)
        spec = ModuleSpec.of(cfg, fp16=fp16)
        console.print(f"exporting VGG19 targets (opset {OPSET}, {'fp16' if fp16 else 'fp32'}) for weights {w.fingerprint} ({w.description})")
        if output is not None:
            res = export_targets(w, output, spec)
        else:
            res = export_to_store(store, w, spec)
    for note in res.notes:
        console.print(f"[yellow]warning:[/] {note}")
    if res.verification is None:
        console.print(f"already in the model store (verified when it was written): {res.path}")
    else:
        for (h, wd), err in res.verification.errors.items():
            console.print(f"verified {wd}x{h}: ONNX Runtime vs PyTorch, largest relative error {err:.2e} (tolerance {TOLERANCE[res.meta.precision]:.0e})")
        console.print(f"wrote {res.path} in {res.seconds:.1f} s")
    print(res.path)
