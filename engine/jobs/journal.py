"""The batch journal: one JSON line per finished job, in the batch folder, from one writer.

A line says what was computed (the inputs' content hashes and a hash of the settings), where it
went, and how it ended (done or failed, with a one-line reason). A rerun skips a job whose line
says done, whose output still exists and whose inputs and settings hash the same; every other
job of the batch loses its old line before it runs again, so the journal holds each job once.

Lines are appended and flushed to disk one at a time: a crash loses at most the line being
written, and a torn last line is ignored on reading. A lock file keeps a second writer out while
a batch runs (the lock goes with the process, so a killed batch never leaves it held).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..config import StyleConfig
from ..files import write_atomic

JOURNAL_NAME = "nst-journal.jsonl"
LOCK_NAME = ".nst-journal.lock"
# Fields of the config that do not change the output image.
_NOT_SETTINGS = ("save_every",)


class JournalBusy(RuntimeError):
    """Another batch is writing this folder's journal."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_digest(cfg: StyleConfig, extra: Mapping[str, object]) -> str:
    """A hash of everything that decides a job's image apart from its input files: the style
    config and the batch-wide settings in `extra` (weights fingerprint, precision, targets)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_SETTINGS}
    text = json.dumps({"config": data, **{k: extra[k] for k in sorted(extra)}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class JobRecord:
    """One journal line."""

    job: str  # the job's key: its output path relative to the batch folder
    status: str  # "done" | "failed"
    output: str  # the output file's path as the batch wrote it
    content: str
    content_sha256: str
    styles: list[str]
    styles_sha256: list[str]
    settings: str  # settings_digest
    init_sha256: str | None = None
    reason: str = ""  # one line, for a failure (or a kept image with a problem)
    seconds: float = 0.0  # from the job's start on its worker to its output written
    loss: float | None = None  # final total loss
    steps: int = 0
    attempts: int = 1  # 2 or more: a worker died running it and it was run again
    worker: dict[str, object] = field(default_factory=dict)  # host, pid, device, precision, threads
    finished: str = ""  # ISO 8601 UTC

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "JobRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})  # type: ignore[arg-type]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Journal:
    """The journal of one batch folder, held for writing while the batch runs (a context manager)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_NAME
        self._lock = FileLock(str(self.folder / LOCK_NAME))
        self.records: dict[str, JobRecord] = {}

    def __enter__(self) -> "Journal":
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise JournalBusy(f"another nst batch is writing {self.path}; wait for it or use another output folder") from None
        self.records = read_journal(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the lines of jobs about to run again (and any torn or repeated line), rewriting
        the file atomically."""
        drop = set(keys)
        if not self.path.exists():
            self.records = {}
            return
        self.records = {k: r for k, r in self.records.items() if k not in drop}
        text = "".join(r.to_json() + "\n" for r in self.records.values())
        write_atomic(self.path, lambda tmp: tmp.write_text(text))

    def append(self, record: JobRecord) -> None:
        """Add one finished job, flushed to the disk before returning."""
        assert record.job not in self.records, f"job {record.job} is already in the journal"
        line = (record.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[record.job] = record


def read_journal(path: Path) -> dict[str, JobRecord]:
    """The journal's records by job (the last line of a job wins; unreadable lines are skipped)."""
    out: dict[str, JobRecord] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            d = json.loads(line)
            rec = JobRecord.from_dict(d) if isinstance(d, dict) else None
        except (ValueError, TypeError):
            continue  # a line torn by a crash
        if rec is None or not isinstance(rec.job, str):
            continue  # JSON, but not a record (a file written over the journal)
        out.pop(rec.job, None)
        out[rec.job] = rec
    return out
