"""What every command shares: the cache folder, the console, and turning user errors into one line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import typing
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import typer.core
from rich.console import Console

# Only torch-free engine modules at the top of any `nst.cli` module: `nst --help`, `nst --version`,
# `nst cache info` and `nst weights status` never import torch, onnx or onnxruntime
# (tests/cli/test_startup.py checks it). The commands that compute import them inside.
from nst.engine.weights import WeightsUnavailable

if TYPE_CHECKING:
    from nst.engine.weights import Weights
from nst.engine.errors import EngineError

# stderr for messages and progress, so stdout stays clean for what a script may pipe. Rich takes
# its width from the terminal (or $COLUMNS). In a terminal a long message wraps between words;
# into a pipe or a file every message stays on one line (soft wrap), so `grep error:` finds it whole.
console = Console(stderr=True, highlight=False)
console.soft_wrap = not console.is_terminal

CACHE_ENV = "NST_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder: `$NST_CACHE_DIR`, else the platform's user cache directory for nst."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nst", appauthor=False))


def usable_cache_dir() -> Path:
    """`cache_dir()` for a command that needs it (`nst cache`, `nst export` into the store): one
    error line when a file stands there or where one of its folders would be. (`stylize` and the
    others go on without a cache then, with a warning.)"""
    from nst.engine.files import in_the_way

    d = cache_dir()
    problem = in_the_way(d, folder=True)
    if problem is not None:
        raise UserError(f"the cache folder {d} cannot be used: {problem}; set {CACHE_ENV} to a folder")
    return d


def torch_hub_dir() -> Path:
    """torch.hub's folder, found by `torch.hub.get_dir()`'s rule without importing torch:
    `$TORCH_HOME/hub`, else `$XDG_CACHE_HOME/torch/hub`, else `~/.cache/torch/hub`."""
    home = os.environ.get("TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.join(os.path.expanduser(home), "hub"))


# Exit codes (the README lists them): 0 done; 1 the run could not finish (out of memory, a loss
# that is no longer finite); 2 a mistake in the input (click's usage errors use 2 as well);
# 3 something the run needs is not on this machine; 130 interrupted by Ctrl-C.
EXIT_FAILED, EXIT_INPUT, EXIT_MISSING, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended
_terminated = False


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, `docker stop`, a job scheduler) stops a run as Ctrl-C does, keeping its
    latest image, instead of ending the process on the spot with nothing saved."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def warnings_as_lines() -> None:
    """The engine's warnings (`EngineWarning`: damaged metadata in an image file, a cache entry
    that could not be written) as one `warning:` line each; Python's other warnings as it prints them."""
    import warnings

    from nst.engine.errors import EngineWarning

    shown = warnings.showwarning
    if getattr(shown, "nst_lines", False):
        return

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: typing.Any = None, line: str | None = None) -> None:
        if issubclass(category, EngineWarning):
            from rich.markup import escape

            console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)  # a file name may hold [brackets]
        else:
            shown(message, category, filename, lineno, file, line)

    show.nst_lines = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def interrupted_code() -> int:
    """The exit code of a stopped run: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED


class UserError(Exception):
    """A mistake the user can fix; shown as one line, exit code 2."""


class ResourceMissing(UserError):
    """Something the run needs is not on this machine (not a mistake in the input); exit code 3."""


def flag_message(e: BaseException) -> str:
    """The error's first line, with the engine's parameter names spelt as this CLI's flags
    (`style_blend` -> `--style-blend`)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return spelt_as_flags(msg, getattr(e, "params", ()))


def spelt_as_flags(text: str, names: Collection[str]) -> str:
    """`text` with the backquoted engine parameter names that are among `names` (a command's
    options) spelt as flags: a batch job's failure reason, kept as the engine wrote it in the journal."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in names else m[0], text)


# Expected failures: the user's input or this machine's limits: the engine's errors (DeviceError,
# ImageError, WeightsError, ExportError...) all derive from EngineError. Anything else, a bare
# ValueError included, is a bug and keeps its traceback.
EXPECTED = (UserError, EngineError, FileNotFoundError, PermissionError)
MISSING = (ResourceMissing, WeightsUnavailable)


def ray_device_and_precision(device: object, precision: object) -> tuple[str, str]:
    """`--device` and `--precision` for Ray workers, checked on the driver: a device kind (each
    worker is given its own GPU) and a precision name (each worker checks it on its own device)."""
    from nst.engine.config import Precision

    dev = str(device).strip().lower()
    if dev not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device} with Ray: use auto, cpu or cuda (Ray gives each worker its GPU)")
    prec = str(precision).strip().lower()
    if prec != "auto" and prec not in {p.value for p in Precision}:
        raise UserError(f"unknown precision {prec!r}: use auto, {', '.join(p.value for p in Precision)}")
    return dev, prec


def fail(message: str, code: int = EXIT_INPUT) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected errors into `error: <one line>` and exit code 2 (3 for a missing resource,
    1 for out of memory)."""
    try:
        yield
    except typer.Exit:
        raise
    except EXPECTED as e:
        raise fail(flag_message(e), code=EXIT_MISSING if isinstance(e, MISSING) else EXIT_INPUT) from None
    except OSError as e:  # disk full, read-only folder...
        raise fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
    except (RuntimeError, MemoryError) as e:
        from nst.engine.device import is_out_of_memory, out_of_memory_message

        if is_out_of_memory(e):
            raise fail(f"{out_of_memory_message(e)}: try a smaller size", code=EXIT_FAILED) from None
        raise


def check_writable(path: Path | None, what: str, *, folder: bool = False, example: str | None = None) -> None:
    """Refuse, before any work, a path that nothing can be written at: a folder where a file goes
    (suggesting `example` inside it), a file where a folder goes, or a file where one of its
    folders would be, or a folder this process may not write in. Otherwise the run would do its
    work and fail only when writing it."""
    from nst.engine.files import in_the_way, unwritable

    problem = None if path is None else in_the_way(path, folder=folder) or unwritable(path, folder=folder)
    if problem is not None:
        hint = f"; give a file name such as {Path(path) / example}" if example and Path(path).is_dir() else ""  # type: ignore[arg-type]
        raise UserError(f"cannot write {what} {path}: {problem}{hint}")


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def warn_if_weights_missing(spec: str) -> None:
    """For a dry run, which plans without loading the weights: one warning where `--weights
    imagenet` is not on this machine, so the run itself would stop."""
    if spec.strip().lower() != "imagenet":
        return
    from nst.engine.weights import weights_status

    if not weights_status(cache_dir=cache_dir(), hub_dir=torch_hub_dir())["imagenet_available"]:
        warn("no ImageNet weights here: the run would stop (nst weights import FILE)")


def load_weights_for(spec: str, seed: int) -> Weights:
    """`--weights` as every command reads it: the cache folder, torch hub's folder, `NST_OFFLINE`;
    weights that are not what was asked for (a hub file failing its hash check) are one warning."""
    from nst.engine.weights import load_weights

    w = load_weights(spec, seed=seed, cache_dir=cache_dir(), hub_dir=torch_hub_dir(), download=os.environ.get("NST_OFFLINE", "") not in ("1", "true"), on_warning=warn)
    if w.reason:
        warn(w.reason)
    return w


def _element_label(p: object) -> str:
    """`path` for a list of paths, else the element type's name: from the annotation where typer
    keeps it (`type_descriptor`, typer >= 0.24 or so), else from click's parameter type (older
    typer, built on click)."""
    descriptor = getattr(p, "type_descriptor", None)
    if descriptor is not None:
        (element,) = typing.get_args(descriptor.annotation) or (str,)
        return "path" if isinstance(element, type) and issubclass(element, os.PathLike) else getattr(element, "__name__", "value").lower()
    kind = getattr(p, "type", None)
    if kind is None:
        return "value"
    return "path" if type(kind).__name__ == "Path" else str(getattr(kind, "name", "value") or "value").lower()


class Command(typer.core.TyperCommand):
    """A command whose variadic arguments show their element type in the help (`STYLE <path>...`)
    where typer would show the Python annotation (`<list[Path]>`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        for p in self.params:
            if isinstance(p, typer.core.TyperArgument) and p.nargs != 1:
                label = _element_label(p)
                p.display_type_rich = lambda ctx, label=label: f"<{label}>..."  # type: ignore[method-assign]


# Click's exceptions as typer raises them: typer >= 0.29 carries its own copy of click
# (`typer._click`), older ones use the click package.
_UsageError: type = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_HELP_ASKED: tuple[type, ...] = tuple(c for c in [getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", None)] if c)  # click >= 8.2


class OneLineUsageError(_UsageError):  # type: ignore[misc, valid-type]
    """A mistake on the command line as one `error:` line (click prints a usage line, a hint, a
    blank line and a capitalised `Error:`), with where to look for help."""

    def __init__(self, error: typing.Any) -> None:
        message = error.format_message().replace("Value error, ", "").rstrip(".")
        message = re.sub(r"(^|': )([A-Z])(?=[a-z ])", lambda m: m[1] + m[2].lower(), message)  # "Invalid value for '--x': Input ..."
        super().__init__(message, error.ctx)

    def show(self, file: typing.IO[str] | None = None) -> None:
        where = f" (help: {self.ctx.command_path} -h)" if self.ctx is not None else ""
        typer.echo(f"error: {self.format_message()}{where}", file=file, err=file is None)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except (*_HELP_ASKED, OneLineUsageError):  # `nst` or `nst cache` alone: the help, as asked
        raise
    except _UsageError as e:
        raise OneLineUsageError(e) from None


class Group(typer.core.TyperGroup):
    """The `nst` group: a mistake in its own options, a command's or a subcommand's (an unknown
    option or command, a bad or missing value) is one `error:` line and exit code 2."""

    def make_context(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typing.Any) -> typing.Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


def parse_list(text: str | None, *, cast: type = str, what: str = "value", option: str | None = None) -> tuple:
    """`a,b,c` -> (a, b, c) with each item cast; a clear error for a bad item.

    With `option` (its flag, e.g. `--style-layers`), a value given but holding no item (`""`,
    `,`) is an error naming the flag, rather than silently meaning "the default".
    """
    if text is None:
        return ()
    if option is not None and not [i for i in text.split(",") if i.strip()]:
        raise UserError(f"{option} {text!r} names no {what}: give at least one, e.g. {option} {_EXAMPLES.get(option, 'a,b')}")
    if text.strip() == "":
        return ()
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(cast(item))
        except ValueError:
            raise UserError(f"{option} {text!r}: bad {what} {item!r}" if option else f"bad {what} {item!r} in {text!r}") from None
    return tuple(out)


_EXAMPLES = {
    "--style-layers": "relu1_1,relu2_1,relu3_1",
    "--content-layers": "relu4_2 (or --content-weight 0 for no content loss)",
    "--style-layer-weights": "1,1,1,2,4",
    "--style-blend": "3,7",
    "--scales": "256,512",
}
