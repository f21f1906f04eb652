"""Many images: the job list, the journal, and the runners that compute a batch.

`run_batch(jobs, folder, runner, settings=...)` is the one call, with the in-process runner
(`InProcessRunner(Worker(...))`) or the Ray runner (`nst.engine.jobs.ray_runner.RayRunner`).
Names load on first use: `joblist` and `journal` need neither torch nor ray, and `ray` is
imported only by the Ray runner, so `import nst.engine` never pays for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "batch": ("BatchResult", "Finished", "Runner", "check_jobs", "read_input", "run_batch"),
    "joblist": ("DEFAULT_NAME", "Job", "JobListError", "JobSpec", "expand_images", "job_grid", "read_jobs_csv", "style_sets", "unique_stems"),
    "journal": ("JOURNAL_NAME", "JobRecord", "Journal", "JournalBusy", "file_digest", "read_journal", "settings_digest"),
    "local": ("InProcessRunner",),
    "worker": ("BatchEvent", "JobInput", "JobOutcome", "MemoCache", "TargetsFactory", "Worker"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
