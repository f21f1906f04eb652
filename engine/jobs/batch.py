"""Running a batch: decide what to skip, hand the rest to a runner, write what comes back.

The driver (this module, in the batch's own process) is the only writer: every output image,
every `save_every` snapshot and every journal line is written here, whatever runner computed it,
so a job that a runner retries can never be written twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..errors import EngineError
from ..files import intermediate_path, remove, snapshot_over, temporaries_beside
from ..images import ImageError, output_format, save_image
from .joblist import Job
from .journal import JobRecord, Journal, file_digest, now_iso, settings_digest
from .worker import BatchEvent, EventSink, JobInput, JobOutcome


class Runner(Protocol):
    """Turns job inputs into outcomes, in any order; `close` stops whatever is still running."""

    def run(self, inputs: Iterator[JobInput], emit: EventSink) -> Iterator[JobOutcome]: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, object]: ...


@dataclass
class Finished:
    """A job this run finished: its journal line and what its worker handed back (no image)."""

    job: Job
    record: JobRecord
    outcome: JobOutcome | None  # None: it failed before reaching a worker (an unreadable file)
    snapshots: list[Path] = field(default_factory=list)  # save_every images written
    snapshots_failed: list[Path] = field(default_factory=list)  # and those that could not be


@dataclass
class BatchResult:
    jobs: list[Job]
    finished: list[Finished]  # done or failed in this run, in the order they finished
    skipped: list[tuple[Job, JobRecord]]  # done by an earlier run, unchanged since
    interrupted: bool = False  # Ctrl-C: the batch stopped early
    interrupted_jobs: list[Job] = field(default_factory=list)  # those that were running, latest images written
    seconds: float = 0.0
    swept: int = 0  # stale temporaries that killed runs had left beside outputs and the journal

    @property
    def done(self) -> list[Finished]:
        return [f for f in self.finished if f.record.status == "done"]

    @property
    def failed(self) -> list[Finished]:
        return [f for f in self.finished if f.record.status != "done"]

    @property
    def exit_code(self) -> int:
        """0: every job done (now or before); 1: some failed; 130: stopped by Ctrl-C."""
        return 130 if self.interrupted else (1 if self.failed else 0)


def check_jobs(jobs: Sequence[Job]) -> None:
    """Raise ValueError (ImageError) before any work for outputs that clash or overwrite an input."""
    inputs = {p.resolve(): p for j in jobs for p in j.inputs}
    seen: dict[Path, Job] = {}
    for j in jobs:
        output_format(j.output)
        out = j.output.resolve()
        if out in inputs:
            raise EngineError(f"job {j.key} would overwrite the input {inputs[out]}; inputs are never overwritten, choose another output folder or `name`", params=("name",))
        if out in seen:
            raise EngineError(f"jobs {seen[out].key} and {j.key} would both write {j.output}")
        if j.output.exists() and j.output.is_dir():
            raise EngineError(f"output {j.output} is a folder")
        seen[out] = j
    outputs = [j.output for j in jobs]
    for j in jobs:
        over = snapshot_over(j.output, [*inputs.values(), *outputs], j.cfg.save_every, sum(j.cfg.stage_iterations))
        if over is not None:
            what = "the input" if over.resolve() in inputs else "the output of another job,"
            raise EngineError(
                f"job {j.key}'s `save_every` snapshots ({j.output.stem}.NNNN{j.output.suffix}) would overwrite {what} {over}; choose another output folder or `name`",
                params=("save_every", "name"),
            )


def run_batch(
    jobs: Sequence[Job],
    folder: Path,
    runner: Runner,
    *,
    settings: Mapping[str, object],
    on_event: EventSink | None = None,
    group_sizes: bool = False,
) -> BatchResult:
    """Run `jobs` whose outputs lie in `folder`, skipping those its journal has done with the
    same inputs and settings. `settings`: the batch-wide things that decide an image besides
    each job's config (weights fingerprint, precision, targets), hashed into the journal.

    Ctrl-C stops the batch (the runner is closed): finished outputs and journal lines stay, and
    an in-process job's latest image is written but not journalled, so a rerun does it again.
    `group_sizes`: run the jobs in an order that puts those a runner can optimise together (same
    settings, same size at every stage) next to each other.
    """
    emit: EventSink = on_event or (lambda e: None)
    check_jobs(jobs)
    t0 = time.perf_counter()
    result = BatchResult(list(jobs), [], [])
    digests: dict[Path, str | None] = {}
    problems: dict[Path, str] = {}

    def digest(p: Path) -> str | None:
        if p not in digests:
            try:
                digests[p] = file_digest(p)
            except OSError as e:
                digests[p] = None
                problems[p] = f"{p}: {e.strerror or e}" if not isinstance(e, FileNotFoundError) else f"image not found: {p}"
        return digests[p]

    with Journal(folder) as journal:
        to_run: list[Job] = []
        for job in jobs:
            rec = journal.records.get(job.key)
            ds = [digest(p) for p in job.inputs]
            if rec is not None and rec.status == "done" and job.output.is_file() and None not in ds and _same(rec, job, ds, settings):
                result.skipped.append((job, rec))
            else:
                to_run.append(job)
        journal.forget(j.key for j in to_run)
        if group_sizes:
            to_run.sort(key=_shape_key)  # stable: the given order within a group
        # What a killed batch left half-written beside the outputs it was writing (and the journal).
        result.swept = len(remove(temporaries_beside(journal.path))) + sum(len(remove(temporaries_beside(j.output))) for j in to_run)
        emit(BatchEvent("plan", counts={"jobs": len(jobs), "to_run": len(to_run), "skipped": len(result.skipped)}))
        for job, rec in result.skipped:
            emit(BatchEvent("skipped", job, record=rec))

        def finish(job: Job, rec: JobRecord, outcome: JobOutcome | None, snaps: list[Path], snaps_failed: list[Path]) -> None:
            journal.append(rec)
            result.finished.append(Finished(job, rec, outcome, snaps, snaps_failed))
            emit(BatchEvent("finished", job, record=rec))

        def inputs() -> Iterator[JobInput]:
            for job in to_run:
                try:
                    inp = read_input(job)
                except OSError as e:
                    bad = next((p for p in job.inputs if p in problems), None)
                    reason = problems[bad] if bad else f"{getattr(e, 'filename', '') or job.content}: {e.strerror or e}"
                    shas = (digests.get(job.content) or "", tuple(digests.get(p) or "" for p in job.styles), digests.get(job.init) if job.init else None)
                    finish(job, _record(job, _with_masks(job, settings, [digest(p) for p in job.masks]), shas, reason=reason), None, [], [])
                    continue
                sent[job.key] = (inp.content_sha256, inp.styles_sha256, inp.init_sha256)
                yield inp

        by_key = {j.key: j for j in to_run}
        sent: dict[str, tuple[str, tuple[str, ...], str | None]] = {}  # the hashes of the bytes each job was given
        snapshots: dict[str, tuple[list[Path], list[Path]]] = {}  # job -> (written, failed)
        snapshot_failures = [0]

        def snapshot(job: Job, step: int, image: torch.Tensor) -> None:
            """Optional: one that cannot be written is a warning (the first time) and the job goes on."""
            written, failed = snapshots.setdefault(job.key, ([], []))
            path = intermediate_path(job.output, step)
            try:
                written.append(save_image(image, path))
            except ImageError as e:
                failed.append(path)
                snapshot_failures[0] += 1
                if snapshot_failures[0] == 1:  # the same cause would repeat at every snapshot
                    emit(BatchEvent("warning", job, message=f"{e}; the batch goes on (later snapshot failures are counted in the report)"))

        def from_runner(e: BatchEvent) -> None:
            if e.kind == "snapshot":  # written here, as it comes: the driver is the only writer
                assert e.job is not None and e.snapshot is not None
                snapshot(e.job, *e.snapshot)
            emit(e)

        try:
            for outcome in runner.run(inputs(), from_runner):
                job = by_key[outcome.key]
                t_save = time.perf_counter()
                for step, image in outcome.snapshots:  # a remote worker's, handed back with the image
                    snapshot(job, step, image)
                write_error = _write(job, outcome)
                snaps, snaps_failed = snapshots.pop(job.key, ([], []))
                outcome.seconds += time.perf_counter() - t_save
                if outcome.result is not None:  # the image is on disk; keep the numbers only
                    outcome.result = dataclasses.replace(outcome.result, image=torch.empty(0))
                    outcome.snapshots = []
                if outcome.status == "interrupted":  # the runner stops after the jobs it was running
                    result.interrupted = True
                    result.interrupted_jobs.append(job)
                    continue
                rec = _record(job, _with_masks(job, settings, [digest(p) for p in job.masks]), sent[job.key], outcome=outcome)
                if write_error:
                    rec.status, rec.reason = "failed", write_error
                finish(job, rec, outcome, snaps, snaps_failed)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            runner.close()
    result.seconds = time.perf_counter() - t0
    return result


def _shape_key(job: Job) -> tuple:
    """Jobs with equal keys can be optimised together; read from the content file's header (its
    EXIF orientation included), without decoding it. Unreadable contents go last."""
    from PIL import Image

    from ..transfer import stage_shapes

    try:
        with Image.open(job.content) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn
                w, h = h, w
    except Exception:  # noqa: BLE001 - a broken file is the worker's to report
        return (1, "", ())
    return (0, settings_digest(job.cfg, {}), stage_shapes(w, h, job.cfg))


def read_input(job: Job) -> JobInput:
    """A job's files read now: their bytes and the hashes of exactly those bytes."""

    def read(p: Path) -> tuple[bytes, str]:
        data = p.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    content, c_sha = read(job.content)
    styles = [read(p) for p in job.styles]
    init, i_sha = read(job.init) if job.init is not None else (None, None)
    return JobInput(job, content, tuple(b for b, _ in styles), c_sha, tuple(s for _, s in styles), init, i_sha)


def _same(rec: JobRecord, job: Job, ds: list[str | None], settings: Mapping[str, object]) -> bool:
    n = len(job.styles)
    init = ds[1 + n] if job.init is not None else None
    masks = ds[len(ds) - len(job.masks) :] if job.masks else []  # `Job.inputs` ends with them
    settings = _with_masks(job, settings, masks)
    return rec.content_sha256 == ds[0] and list(rec.styles_sha256) == ds[1 : 1 + n] and rec.init_sha256 == init and rec.settings == settings_digest(job.cfg, settings)


def _with_masks(job: Job, settings: Mapping[str, object], mask_sha256: list[str | None]) -> Mapping[str, object]:
    """The settings a job's journal line hashes: for a job with masks, their files' hashes too,
    so a mask edited in place makes its jobs run again. Unchanged for a job without masks."""
    return {**settings, "mask_sha256": mask_sha256} if job.masks else settings


def _write(job: Job, outcome: JobOutcome) -> str:
    """Write the outcome's image; a one-line error, or '' when written (or nothing to write)."""
    if outcome.result is None:
        return ""
    try:
        save_image(outcome.result.image, job.output)
    except (ImageError, OSError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ""


def _record(
    job: Job, settings: Mapping[str, object], shas: tuple[str, tuple[str, ...], str | None], *, outcome: JobOutcome | None = None, reason: str = ""
) -> JobRecord:
    """The journal line of a finished job (`outcome` None: it failed before reaching a worker)."""
    res = outcome.result if outcome is not None else None
    hist = res.loss_history if res is not None else []
    final = hist[-1] if hist else None
    return JobRecord(
        job=job.key,
        status=outcome.status if outcome is not None else "failed",
        output=str(job.output),
        content=str(job.content),
        content_sha256=shas[0],
        styles=[str(p) for p in job.styles],
        styles_sha256=list(shas[1]),
        init_sha256=shas[2],
        settings=settings_digest(job.cfg, settings),
        reason=reason or (outcome.reason if outcome is not None else ""),
        seconds=round(outcome.seconds, 3) if outcome is not None else 0.0,
        loss=final if final is not None and math.isfinite(final) else None,
        steps=res.steps if res is not None else 0,
        attempts=outcome.attempts if outcome is not None else 0,
        worker=dict(outcome.worker) if outcome is not None else {},
        finished=now_iso(),
    )
