"""The work folder that makes a video run resumable: finished frames and a journal of them.

`<folder>/frames/000001.png...` hold the finished outputs (written atomically); `journal.jsonl`
holds a header line naming the run (input, styles, settings) and one line per finished frame,
appended and flushed to disk after the frame's file is in place. A run killed at any point
leaves at most an unjournalled frame file and a torn last line, both ignored on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..files import remove, temporary_state, write_atomic
from ..images import save_image

JOURNAL = "journal.jsonl"
FRAMES = "frames"
VERSION = 1


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)


class FrameJournal:
    """Finished frames of one run. `open()` returns how many are already done."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = json.loads(_canonical(identity))  # as it will read back from the file
        self.entries: list[dict[str, Any]] = []
        self.restarted = ""  # why earlier work was discarded, if it was

    @property
    def path(self) -> Path:
        return self.folder / JOURNAL

    def frame_path(self, index: int) -> Path:
        """Output frame `index` (from 0) as `frames/000001.png`."""
        return self.folder / FRAMES / f"{index + 1:06d}.png"

    def frame_paths(self) -> list[Path]:
        return [self.frame_path(e["index"]) for e in self.entries]

    def _read(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        try:
            lines = self.path.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return None, []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line: the frame it was recording is redone
        if not records or records[0].get("version") != VERSION:
            return None, []
        return records[0], records[1:]

    def open(self) -> int:
        """Read what an earlier run finished (when it was this same run), else start afresh."""
        header, entries = self._read()
        done: list[dict[str, Any]] = []
        if header is not None and header.get("identity") == self.identity:
            for e in entries:  # the finished prefix: frames 0, 1, 2... with their files present
                if e.get("index") != len(done) or not self.frame_path(len(done)).is_file():
                    break
                done.append(e)
        elif header is not None:
            self.restarted = f"{self.folder} held frames of a run with other inputs or settings; started again"
        if header is None or header.get("identity") != self.identity:
            shutil.rmtree(self.folder / FRAMES, ignore_errors=True)
        self.entries = done
        (self.folder / FRAMES).mkdir(parents=True, exist_ok=True)
        # A frame being saved when the run was killed left its temporary (named by write_atomic).
        remove(t for f in (self.folder / FRAMES).iterdir() if f.name.startswith(".") and (t := temporary_state(f)) is not None)
        # Rewrite the journal with only what counts, so later appends follow a whole line.
        text = "".join(_canonical(r) + "\n" for r in [{"version": VERSION, "identity": self.identity}, *done])
        write_atomic(self.path, lambda tmp: tmp.write_text(text))
        return len(done)

    def record(self, index: int, image: torch.Tensor, info: dict[str, Any]) -> Path:
        """Save output frame `index` and journal it (the file first, so a journalled frame exists)."""
        if index != len(self.entries):
            raise ValueError(f"frame {index} recorded after {len(self.entries)} finished frames; frames are journalled in order")
        path = save_image(image, self.frame_path(index))
        entry = {"index": index, **info}
        with open(self.path, "a") as f:
            f.write(_canonical(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(json.loads(_canonical(entry)))
        return path

    def remove(self) -> None:
        """Delete the work folder (once the output is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
