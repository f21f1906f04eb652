"""What every command shares: the cache folder, the console, and turning user errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from nst.engine.device import DeviceError, is_out_of_memory, out_of_memory_message
from nst.engine.images import ImageError
from nst.engine.weights import WeightsError

# stderr for messages and progress, so stdout stays clean for what a script may pipe.
console = Console(stderr=True, highlight=False, soft_wrap=True)

CACHE_ENV = "NST_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder: `$NST_CACHE_DIR`, else the platform's user cache directory for nst."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nst", appauthor=False))


class UserError(Exception):
    """A mistake the user can fix; shown as one line, exit code 2."""


# Expected failures: the user's input or this machine's limits. Anything else is a bug and keeps
# its traceback.
EXPECTED = (UserError, ValueError, FileNotFoundError, PermissionError, ImageError, WeightsError, DeviceError)


def fail(message: str, code: int = 2) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code=code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected errors into `error: <one line>` and exit code 2 (1 for out of memory)."""
    try:
        yield
    except typer.Exit:
        raise
    except EXPECTED as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(msg) from None
    except OSError as e:  # disk full, read-only folder...
        raise fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise fail(f"{out_of_memory_message(e)}: try a smaller size", code=1) from None
        raise


def parse_list(text: str | None, *, cast: type = str, what: str = "value") -> tuple:
    """`a,b,c` -> (a, b, c) with each item cast; a clear error for a bad item."""
    if text is None or text.strip() == "":
        return ()
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(cast(item))
        except ValueError:
            raise UserError(f"bad {what} {item!r} in {text!r}") from None
    return tuple(out)


def is_tty() -> bool:
    return sys.stderr.isatty()
