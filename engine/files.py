"""Writing files so that nothing is ever half-written: a temporary file beside, then a rename."""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


@functools.cache
def _new_file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0o666 less the umask (read once)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    A crash or Ctrl-C in the middle leaves the previous file (or none), never half a file; two
    writers of one path both succeed and the last rename wins. The file gets the permissions a
    plain write would give it (a replaced file keeps its own), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
