"""`nst cache info` and `nst cache clear`: the target cache and the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nst.engine.cache import TargetCache
from nst.engine.files import STALE_AFTER

from .common import console, usable_cache_dir, user_errors

cache_app = typer.Typer(help="The target cache and the exported models in the cache folder.", no_args_is_help=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _why(t: dict) -> str:
    """Why a temporary is stale, or who is writing it."""
    age = float(t["age_seconds"])
    if t["stale"]:
        return f"untouched for {age / 60:.0f} min" if age > STALE_AFTER else f"its writer, process {t['writer']}, is gone"
    return f"being written by process {t['writer']}" if t["writer"] is not None else f"written {age:.0f} s ago"


@cache_app.command("info")
def cache_info_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False) -> None:
    """Cached targets, exported models and leftover temporaries.

    Shows the target entries and their size, the exported models, and the temporaries that killed
    runs left (with whether each is stale).
    """
    with user_errors():
        info = TargetCache(usable_cache_dir()).info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title="nst cache", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # a path is folded onto the next line, never cut
    table.add_row("folder", str(info["folder"]))
    table.add_row("target entries", f"{info['entries']} ({_mb(int(info['bytes']))})")  # type: ignore[call-overload]
    models = info["models"]
    table.add_row("models", f"{len(models)} ({_mb(int(info['model_bytes']))})")  # type: ignore[arg-type, call-overload]
    for m in models:  # type: ignore[attr-defined]
        table.add_row("", f"{m['name']} ({_mb(int(m['bytes']))})")
    temps = info["temporaries"]
    stale = sum(1 for t in temps if t["stale"])  # type: ignore[attr-defined, index]
    line = f"{len(temps)} ({_mb(int(info['temporary_bytes']))})"  # type: ignore[arg-type, call-overload]
    if temps:
        line += f", {stale} stale: the next run or `nst cache clear` removes them" if stale else ", all being written now"
    table.add_row("temporaries", line)
    for t in temps:  # type: ignore[attr-defined]
        where = Path(t["path"]).relative_to(str(info["folder"]))  # type: ignore[index]
        table.add_row("", f"{where} ({_mb(int(t['bytes']))}, {_why(t)})")  # type: ignore[index]
    console.print(table)


@cache_app.command("clear")
def cache_clear_command() -> None:
    """Delete cached targets, models and TensorRT engines.

    Also the time-to-result references and stale temporaries. Imported weights stay.
    """
    with user_errors():
        folder = usable_cache_dir()
        removed = TargetCache(folder).clear()
    temps = f", {removed['temporaries']} temporaries" if removed["temporaries"] else ""
    console.print(f"removed {removed['entries']} target entries and {removed['models']} models{temps} ({_mb(removed['bytes'])}) from {folder}")
