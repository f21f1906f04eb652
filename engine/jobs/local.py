"""The in-process runner: one worker in the batch's own process, jobs one after another."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from .worker import BatchEvent, EventSink, JobInput, JobOutcome, Worker


class InProcessRunner:
    """Runs every job on `worker`, up to `batch_size` same-size jobs optimised together, reporting
    each optimisation step (for a per-job progress bar) and handing `save_every` images over as
    they are made."""

    def __init__(self, worker: Worker, *, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
        self.worker, self.batch_size = worker, batch_size

    def run(self, inputs: Iterable[JobInput], emit: EventSink) -> Iterator[JobOutcome]:
        where = self.worker.describe()
        source = iter(inputs)
        while chunk := list(itertools.islice(source, self.batch_size)):
            for inp in chunk:
                emit(BatchEvent("started", inp.job, worker=where))
            outcomes = self.worker.run_many(
                chunk,
                on_iterate=lambda job, it: emit(BatchEvent("iterate", job, iterate=it)),
                on_snapshot=lambda job, step, image: emit(BatchEvent("snapshot", job, snapshot=(step, image))),
            )
            yield from outcomes
            if any(o.status == "interrupted" for o in outcomes):  # Ctrl-C: no further jobs
                return

    def describe(self) -> dict[str, object]:
        return {"runner": "in-process", "workers": [self.worker.describe()]}

    def close(self) -> None:
        pass
