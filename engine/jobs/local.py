"""The in-process runner: one worker in the batch's own process, jobs one after another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .worker import BatchEvent, EventSink, JobInput, JobOutcome, Worker


class InProcessRunner:
    """Runs every job on `worker`, reporting each optimisation step (for a per-job progress bar)
    and handing `save_every` images over as they are made."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def run(self, inputs: Iterable[JobInput], emit: EventSink) -> Iterator[JobOutcome]:
        where = self.worker.describe()
        for inp in inputs:
            job = inp.job
            emit(BatchEvent("started", job, worker=where))
            yield self.worker.run(
                inp,
                on_iterate=lambda it, job=job: emit(BatchEvent("iterate", job, iterate=it)),
                on_snapshot=lambda step, image, job=job: emit(BatchEvent("snapshot", job, snapshot=(step, image))),
            )

    def describe(self) -> dict[str, object]:
        return {"runner": "in-process", "workers": [self.worker.describe()]}

    def close(self) -> None:
        pass
