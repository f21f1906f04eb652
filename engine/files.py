"""Writing files so that nothing is ever half-written, and finding what killed writers left behind.

Every temporary file or folder nst makes is named `.<stem>.~<pid>-<host>.<random>...`: a hidden
name beside its target, tagged with the writing process and a short hash of the host name. A
process killed with SIGKILL cannot clean up, so its temporaries stay; `temporary_state` calls one
stale when its writer is known to be gone (same host, no such process) or when it has not been
written to for `STALE_AFTER` seconds (a writer on another host sharing the folder, or a name
without a tag). Sweeping only stale ones keeps a live writer's file safe.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import secrets
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Seconds without a write after which a temporary counts as abandoned even if its writer cannot
# be checked. The longest quiet spell of a live writer is an export's torch.export phase (about
# 10 s for the whole Gatys module on a 2-core CPU); everything else writes in milliseconds.
STALE_AFTER = 10 * 60

_TAG = re.compile(r"\.~(\d+)-([0-9a-f]{6})\.")
# The random part of a temporary's name: write_atomic's 8 hex digits, mkdtemp's 8 of [a-z0-9_].
_RANDOM = r"[a-z0-9_]{8}"


@functools.cache
def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """What `mkdir` would give a new folder: 0o777 less the umask (mkdtemp's is 0o700)."""
    return 0o777 & ~_umask()


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(stem: str) -> str:
    """`.<stem>.~<pid>-<host>.`: the start of a temporary's name, naming its writer."""
    return f".{stem}.~{os.getpid()}-{_host()}."


def in_the_way(path: Path, *, folder: bool = False) -> str | None:
    """What stops a file (or with `folder`, a folder) being made at `path`, known before any
    work: a folder (a file) already there, or a file where one of its folders would be. None
    when nothing is in the way (the path or its folders may still be missing: writers make them)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{path} is a symbolic link that leads back to itself"
    if path.exists() and path.is_dir() != folder:
        return f"{path} is a file, not a folder" if folder else f"{path} is a folder"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder"
    return None


def unwritable(path: Path, *, folder: bool = False) -> str | None:
    """Why nothing can be written at `path` (a file, or with `folder` a folder) for lack of
    permission, found before any work by making (and at once removing) a nameless temporary file
    in the first folder up the path that exists (a read-only folder or file system); None when
    it can be, or when `path` is a device or FIFO written into. Root passes `os.access` whatever
    the folder's flags, so the folder is tried, not asked."""
    path = Path(path)
    if is_special(path):
        return None
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    start = path if folder else path.parent
    where = next((p for p in (start, *start.parents) if p.is_dir()), None)
    if where is None:
        return None
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        return f"{where} is not writable ({e.strerror or e})"
    return None


_DESCRIPTOR = re.compile(r"/dev/(?:(stdout)|(stderr)|fd/(\d+))|/proc/self/fd/(\d+)")


def descriptor(path: Path) -> int | None:
    """The open file descriptor that `path` names (`/dev/stdout`, `/dev/fd/3`, `/proc/self/fd/1`),
    or None. Writing there means writing to what the descriptor is open on, wherever the shell
    sent it (a file, a pipe, a terminal)."""
    m = _DESCRIPTOR.fullmatch(os.path.abspath(path))
    if m is None:
        return None
    return 1 if m[1] else 2 if m[2] else int(m[3] or m[4])


def is_special(path: Path) -> bool:
    """Whether `path` is written into, never replaced: an open descriptor's name (`/dev/stdout`,
    whatever it is redirected to), or (through links) a device, FIFO or socket."""
    if descriptor(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_into(path: Path, write: Callable[[Path], None]) -> None:
    """`write` to a private temporary file, then its bytes into `path` as a shell's `>` would:
    through the descriptor it names (its offset shared with the process's own writes: `>> log`
    keeps what the log holds, `&> log` interleaves with stderr), or opened for writing (a device,
    a FIFO)."""
    with tempfile.TemporaryDirectory(prefix="nst-") as folder:
        tmp = Path(folder) / f"out{path.suffix}"
        write(tmp)
        data = tmp.read_bytes()
    fd = descriptor(path)
    if fd is None:
        with open(path, "wb") as f:
            f.write(data)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # what the process printed comes first
        except (OSError, ValueError):
            pass
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    A crash or Ctrl-C in the middle leaves the previous file (or none), never half a file; two
    writers of one path both succeed and the last rename wins. The file gets the permissions a
    plain write would give it (a replaced file keeps its own), not the temporary file's 0600.
    A SIGKILL leaves the temporary, named for `temporaries_beside` and `sweep` to find.
    A folder at `path`, or a file where one of its folders would be, is an OSError naming `path`.
    A device, FIFO or socket at `path` (`/dev/null`), or an open descriptor's name (`/dev/stdout`
    wherever it is redirected), is written into, as a shell's `>` would (`_write_into`): it cannot
    be replaced (as root the rename replaced `/dev/stdout` with a file, and `>> log` lost the log).
    A symbolic link is written through: the link stays and its target gets the new file.
    """
    given = path = Path(path)
    if is_special(path):
        _write_into(path, write)
        return path
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    problem = in_the_way(path)
    if problem is not None:  # named for `path`, not for a temporary or a folder mkdir tried
        raise (IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path)) if path.is_dir()
               else NotADirectoryError(errno.ENOTDIR, f"cannot make its folder: {problem}", str(path)))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists (unique by the writer's pid and host in the prefix, and 32 random
    # bits) and made inside the `try`: a Ctrl-C that Python raises as the creating system call
    # returns still finds it to remove, which mkstemp's file, made before the `try`, escaped.
    tmp = path.parent / f"{temp_prefix(path.stem)}{secrets.token_hex(4)}{path.suffix}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private while written
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return given  # the name it was asked for, a link's as given (what messages should say)


@dataclass(frozen=True)
class Temporary:
    """A temporary file or folder and whether it is safe to remove."""

    path: Path
    bytes: int
    age: float  # seconds since anything in it was last written
    writer: int | None  # the writing process's id when it ran on this host, else None
    stale: bool  # its writer is gone, or it has not been written to for STALE_AFTER seconds

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "bytes": self.bytes, "age_seconds": round(self.age, 1), "writer": self.writer, "stale": self.stale}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def writer_of(name: str) -> int | None:
    """The process id in a temporary's name when it was written on this host, else None."""
    tags = _TAG.findall(name)
    if not tags:
        return None
    pid, host = tags[-1]
    return int(pid) if host == _host() else None


def temporary_state(path: Path, *, now: float | None = None, stale_after: float = STALE_AFTER) -> Temporary | None:
    """Size, age, writer and staleness of a temporary file or folder (None if it has gone)."""
    path = Path(path)
    now = time.time() if now is None else now
    try:
        st = path.lstat()
        size, newest = st.st_size, st.st_mtime
        if stat.S_ISDIR(st.st_mode):
            size = 0
            for f in path.rglob("*"):
                fs = f.lstat()
                size += fs.st_size if not stat.S_ISDIR(fs.st_mode) else 0
                newest = max(newest, fs.st_mtime)
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return None
    age = max(0.0, now - newest)
    pid = writer_of(path.name)
    gone = pid is not None and pid != os.getpid() and not _alive(pid)
    return Temporary(path, size, age, pid, gone or age > stale_after)


def temporaries_beside(path: Path, *, stale_after: float = STALE_AFTER) -> list[Temporary]:
    """What `write_atomic` (or an export's private folder) left beside `path` or its numbered
    snapshots (`out.0500.png`): only names of exactly that form, so a user's files are never touched."""
    path = Path(path)
    stem, suffix = re.escape(path.stem), re.escape(path.suffix)
    tag = r"(?:~\d+-[0-9a-f]{6}\.)?"
    files = re.compile(rf"\.{stem}(?:\.\d{{4,}})?\.{tag}{_RANDOM}{suffix}\.tmp")
    folders = re.compile(rf"\.{stem}\.{tag}{_RANDOM}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    now = time.time()
    found = []
    for name in sorted(names):
        p = path.parent / name
        if files.fullmatch(name) and not p.is_dir() or folders.fullmatch(name) and p.is_dir() and not p.is_symlink():
            t = temporary_state(p, now=now, stale_after=stale_after)
            if t is not None:
                found.append(t)
    return found


def remove(temporaries: Iterable[Temporary]) -> list[Temporary]:
    """Delete the stale ones; returns those actually removed (a file that vanished meanwhile is not)."""
    removed = []
    for t in temporaries:
        if not t.stale:
            continue
        try:
            if t.path.is_dir() and not t.path.is_symlink():
                shutil.rmtree(t.path)
            else:
                t.path.unlink()
        except FileNotFoundError:
            continue
        except OSError:  # not ours to remove (permissions): leave it, a later sweep may
            continue
        removed.append(t)
    return removed


def intermediate_path(out: Path, step: int) -> Path:
    """`out.png` -> `out.0500.png`: where `save_every` keeps the image at iteration 500."""
    return out.with_name(f"{out.stem}.{step:04d}{out.suffix}")


def snapshot_over(out: Path, others: Iterable[Path], save_every: int, steps: int) -> Path | None:
    """The first of `others` that a `save_every` snapshot of `out` (`intermediate_path`, at
    iterations save_every, 2 * save_every, ... before the last of `steps`) would overwrite."""
    if save_every <= 0:
        return None
    name = re.compile(rf"{re.escape(out.stem)}\.(\d{{4,}}){re.escape(out.suffix)}")
    for p in others:
        m = name.fullmatch(Path(p).name)
        if m is None or f"{int(m[1]):04d}" != m[1]:
            continue
        step = int(m[1])
        if 0 < step < steps and step % save_every == 0 and same_file(Path(p).parent, out.parent):
            return Path(p)
    return None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (existing or not)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return False


def is_glob(text: str) -> bool:
    """Whether a path as typed is a pattern for `glob` (it has `*`, `?` or `[`)."""
    return any(c in "*?[" for c in text)
