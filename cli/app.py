"""The `nst` command: one Typer app, each command in its own module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from nst.engine.layers import LAYER_NAMES
from nst.engine.weights import import_weights, weights_status

from .common import Command, Group, cache_dir, console, stop_on_sigterm, torch_hub_dir, user_errors, warnings_as_lines
from .report import versions
from .stylize_cmd import stylize_command

# Each command's first docstring line is its summary in `nst --help`: one short sentence with no
# abbreviation ending in a period (click cuts the summary at the first "word.").
app = typer.Typer(
    name="nst",
    help="Neural style transfer (Gatys, Ecker and Bethge, 2015): stylise, export VGG19 to ONNX, profile the GPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # no boxes
    cls=Group,  # a usage error is one `error:` line
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
)
app.command("stylize", cls=Command)(stylize_command)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("nst")
        except PackageNotFoundError:  # running from a checkout that is not installed
            v = "unknown (not installed)"
        print(f"nst {v}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", is_eager=True, callback=_print_version, help="Print nst's version and exit.")] = None,
) -> None:
    stop_on_sigterm()  # the app's help is the Typer's; this callback carries --version, and runs before every command
    warnings_as_lines()


weights_app = typer.Typer(help="The VGG19 weights: what is available, and importing a file.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
from .export_cmd import export_command  # noqa: E402
from .cache_cmd import cache_app  # noqa: E402

app.command("export")(export_command)
app.add_typer(cache_app, name="cache")
from .bench_cmd import bench_command  # noqa: E402

app.command("bench")(bench_command)
from .batch_cmd import batch_command  # noqa: E402

app.command("batch", cls=Command)(batch_command)
from .video_cmd import video_command  # noqa: E402

app.command("video", cls=Command)(video_command)


@weights_app.command("status")
def weights_status_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False) -> None:
    """Show which ImageNet weights are available without a download."""
    with user_errors():
        st = weights_status(cache_dir=cache_dir(), hub_dir=torch_hub_dir())
    if as_json:
        print(json.dumps(st, indent=2))
        return
    # No table: each path goes on a line of its own, whole (an 80-column table cut them), to copy.
    hub = "present" if st["hub_file_present"] else "absent"
    if st["hub_file_verified"] is not None:
        hub += ", sha256 " + ("matches torchvision's" if st["hub_file_verified"] else "does not match torchvision's: used as a plain file")
    imported = "present" if st["imported_present"] else "absent"
    if st.get("imported_error"):
        imported += f", {st['imported_error']}"
    elif st["imported_present"]:
        imported += f", fingerprint {st['imported_fingerprint']}, made from {st['imported_from'] or 'an unrecorded file'}, " + (
            "verified as torchvision's file (sha256)" if st["imported_verified"] else "not verified: not torchvision's file byte for byte"
        )
    if st["imagenet_available"]:
        ready = "ready"
    elif st["hub_file_verified"] is False:
        ready = "not available: the torch hub file is not torchvision's; delete it to download the real one, or `nst weights import FILE`"
    else:
        ready = "needs a download or `nst weights import FILE`"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row("--weights imagenet", ready)
    grid.add_row("--weights random", "always available (seeded, not pretrained)")
    console.print("[bold]VGG19 weights[/]")
    console.print(grid)
    for what, state, path in (("torch hub file", hub, st["hub_file"]), ("imported copy", imported, st["imported_file"])):
        console.print(f"{what}: {state}", markup=False)
        console.print(f"  {path}", markup=False, soft_wrap=True)


@weights_app.command("import")
def weights_import_command(file: Annotated[Path, typer.Argument(help="A VGG19 state_dict: whole model or `features`, .pth or .safetensors.")]) -> None:
    """Keep a VGG19 file's conv weights as `--weights imagenet`.

    The file is checked (every tensor's shape) and compared with torchvision's file (sha256).
    """
    with user_errors():
        w, verified = import_weights(file, cache_dir=cache_dir())
    console.print(f"imported {file} as the imagenet weights (fingerprint {w.fingerprint})")
    if not verified:
        console.print("[yellow]note:[/] this is not torchvision's vgg19-dcbb9e9d.pth byte for byte; it is used as given")


@app.command("info")
def info_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False) -> None:
    """Devices, precisions, providers, weights and versions.

    Lists each device with the precisions it runs, ONNX Runtime's providers, the weights' status,
    the cache folder, the layer names and the versions of the libraries.
    """
    import torch

    from nst.engine.device import resolve_precision, supported_precisions

    devices = [torch.device("cpu")] + [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    usable, unusable = _ort_provider_check()
    info: dict[str, object] = {
        "gpus": [torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"],
        "devices": {
            str(d): {
                "name": torch.cuda.get_device_name(d) if d.type == "cuda" else "CPU",
                "precisions": [p.value for p in supported_precisions(d)],
                "auto_precision": resolve_precision(d, "auto").value,
            }
            for d in devices
        },
        "cpu_threads": torch.get_num_threads(),
        "onnxruntime_providers": _ort_providers(),  # built in; the two below: usable here, and why not
        "onnxruntime_providers_usable": usable,
        "onnxruntime_providers_unusable": unusable,
        "weights": weights_status(cache_dir=cache_dir(), hub_dir=torch_hub_dir()),
        "cache_dir": str(cache_dir()),
        "layers": list(LAYER_NAMES),
        "versions": versions(),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title="nst info", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # a long path folds; it is never cut short
    gpus = info["gpus"]
    table.add_row("GPU", ", ".join(gpus) if gpus else f"no GPU: torch {torch.__version__} sees no CUDA device, everything runs on the CPU")  # type: ignore[arg-type]
    for dev, d in info["devices"].items():  # type: ignore[union-attr]
        table.add_row(f"device {dev}", f"{d['name']}; precisions {', '.join(d['precisions'])}; --precision auto runs {d['auto_precision']}")
    table.add_row("cpu threads", str(info["cpu_threads"]))
    if not info["onnxruntime_providers"]:
        table.add_row("onnxruntime", "not installed")
    else:
        short = lambda ep: {"TensorrtExecutionProvider": "TensorRT"}.get(ep, ep.removesuffix("ExecutionProvider"))  # noqa: E731
        table.add_row("onnxruntime providers", ", ".join(map(short, usable)) or "none usable")
        for why in dict.fromkeys(unusable.values()):  # grouped by reason: one line for "no GPU"
            names = [short(ep) for ep, w in unusable.items() if w == why]
            table.add_row("", f"{', '.join(names)}: built in, not usable here ({why})", style="dim")
    w = info["weights"]
    table.add_row("imagenet weights", "ready" if w["imagenet_available"] else "not available (see `nst weights status`)")  # type: ignore[index]
    table.add_row("cache folder", str(info["cache_dir"]))
    table.add_row("layers", " ".join(LAYER_NAMES))
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items()))  # type: ignore[union-attr]
    console.print(table)


def _ort_provider_check() -> tuple[list[str], dict[str, str]]:
    """(providers that can run here, {built-in provider that cannot: why}), e.g. no GPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [], {}
    from nst.engine.onnx_targets import PROVIDERS, provider_problem

    usable, unusable = [], {}
    for short, ep in PROVIDERS.items():
        if ep in ort.get_available_providers():
            why = provider_problem(short)
            if why is None:
                usable.append(ep)
            else:
                unusable[ep] = why
    return usable, unusable


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
