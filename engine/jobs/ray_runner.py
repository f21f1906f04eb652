"""The Ray runner: one actor per GPU (or per `threads` CPUs), each a `Worker` that loads the
weights once and keeps its networks and targets; jobs go to whichever actor is free.

Only the driver writes: an actor hands its image back and the driver (`run_batch`) writes it and
the journal line. An actor whose process dies mid-job (killed, out of host memory, its node
lost) is replaced by a new one wherever the cluster has room; its job goes back to the front of
the queue and runs on the first actor that is free, so it is done once and written once. A job whose worker dies `max_attempts`
times is recorded as failed. If the driver dies its actors go with it, and rerunning the same
command resumes from the journal.

This module imports `ray`; in the engine only the video Ray runner imports it (to join a cluster).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from ..errors import ConfigError, EngineError
from ..transfer import MemoryRequest
from ..weights import Weights
from .worker import BatchEvent, EventSink, JobInput, JobOutcome, TargetsFactory, Worker

# A worker process that died (or whose node did): the job is run again elsewhere.
_WORKER_LOST = (RayActorError, WorkerCrashedError, ObjectLostError)


class _BatchActor:
    """The actor: a Worker, and the input bytes turned back into a JobInput."""

    def __init__(self, weights: Weights, device: str, precision: str, threads: int | None, targets: TargetsFactory | None, memory: MemoryRequest | None = None) -> None:
        self.worker = Worker(weights, device=device, precision=precision, threads=threads, targets=targets, memory=memory)

    def ready(self) -> dict[str, object]:
        return self.worker.describe()

    def run_many(self, packed: list[tuple[JobInput, bytes, object, list[object]]]) -> list[JobOutcome]:
        """Jobs as (input without bytes, content bytes, init, styles), init and styles either bytes
        or object-store references (each put there once by the driver, fetched here)."""

        def get(v: object) -> object:
            return ray.get(v) if isinstance(v, ray.ObjectRef) else v

        inputs = [dataclasses.replace(inp, content=content, init=get(init), styles=tuple(get(s) for s in styles)) for inp, content, init, styles in packed]  # type: ignore[arg-type]
        return self.worker.run_many(inputs)


def ray_capacity(device: str, threads: int | None, *, on_warning: Callable[[str], None]) -> tuple[int, dict[str, float], int | None]:
    """How many workers the joined cluster holds, what each asks Ray for, and a CPU worker's
    thread count (None for a GPU worker): one GPU each where the cluster has GPUs (unless `device`
    is cpu), else `threads` CPUs each, by default the driver's own thread count (the same
    arithmetic as an in-process run, hence the same bytes: CPU sums are ordered by thread)."""
    import torch

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise ConfigError("`device` cuda: the Ray cluster has no GPUs; use `device` auto or cpu", params=("device",))
    if device != "cpu" and gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}, None
    threads = threads or torch.get_num_threads()
    cpus = int(res.get("CPU", 1))
    if threads > cpus:
        on_warning(f"--threads {threads} is more than the Ray cluster's {cpus} CPUs; using one worker of {cpus} threads")
        threads = cpus
    return max(1, cpus // threads), {"num_cpus": threads}, threads


class RayRunner:
    """Runs a batch's jobs on a Ray cluster: `address` None starts a local one (or joins the one
    Ray's own RAY_ADDRESS names); "host:port" or "auto" joins. The cluster is left as found."""

    def __init__(
        self,
        *,
        weights: Weights,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        targets: TargetsFactory | None = None,
        address: str | None = None,
        max_attempts: int = 3,
        max_workers: int | None = None,
        batch_size: int = 1,
        on_warning: Callable[[str], None] | None = None,
        memory: MemoryRequest | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"device {device!r} with Ray: use auto, cpu or cuda (Ray gives each worker its GPU)")
        self.device, self.precision, self.threads, self.targets = device, precision, threads, targets
        self.memory = memory  # each actor plans its jobs' memory for its own device
        self.max_attempts, self.max_workers = max_attempts, max_workers
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
        self.batch_size = batch_size  # jobs a worker optimises together
        self.on_warning = on_warning or (lambda m: None)
        self._joined_here = join_cluster(address)
        self._address = ray.get_runtime_context().gcs_address
        self._weights = ray.put(weights)
        self._actors: list[object] = []
        self._info: dict[int, dict[str, object]] = {}  # each actor's host, pid, device... (latest start)
        self._plan = self._capacity()

    def _capacity(self) -> tuple[int, dict[str, float]]:
        """How many actors the cluster holds, and what each asks for."""
        n, ask, threads = ray_capacity(self.device, self.threads, on_warning=self.on_warning)
        if threads is not None:
            self.threads = threads
        if self.max_workers is not None:
            n = min(n, self.max_workers)
        return n, ask

    def describe(self) -> dict[str, object]:
        n, ask = self._plan
        return {"runner": "ray", "address": self._address, "max_workers": n, "per_worker": ask, "batch_size": self.batch_size, "workers": list(self._info.values())}

    def _new_actor(self) -> object:
        n, ask = self._plan
        # No restarts by Ray: a dead actor is replaced by a new one, placed wherever the cluster has
        # room, and its job given to the first free actor.
        cls = ray.remote(max_restarts=0, max_task_retries=0, **ask)(_BatchActor)
        threads = self.threads if "num_gpus" not in ask else None
        return cls.remote(self._weights, self.device, self.precision, threads, self.targets, self.memory)  # type: ignore[attr-defined]

    def run(self, inputs: Iterable[JobInput], emit: EventSink) -> Iterator[JobOutcome]:
        limit = self._plan[0]
        source = iter(inputs)
        pending: deque[JobInput] = deque()  # read ahead by at most one batch per worker
        inflight: dict[object, tuple[list[JobInput], int]] = {}  # a run_many() call -> (its jobs, actor)
        starting: dict[object, int] = {}  # an actor's ready() call -> actor
        idle: list[int] = []
        dead: set[int] = set()
        info = self._info
        shared: dict[str, object] = {}  # style (and init) bytes, put in the object store once
        exhausted = False
        failed_starts = 0

        def pull() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < limit * self.batch_size:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append(nxt)

        def put(digest: str | None, data: bytes | None) -> object:
            if data is None or digest is None:
                return data
            if digest not in shared:
                shared[digest] = ray.put(data)
            return shared[digest]

        while True:
            pull()
            while pending and idle:
                a = idle.pop(0)
                chunk = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                packed = [
                    (dataclasses.replace(inp, content=b"", init=None, styles=()), inp.content, put(inp.init_sha256, inp.init), [put(d, b) for d, b in zip(inp.styles_sha256, inp.styles)])
                    for inp in chunk
                ]  # fmt: skip
                inflight[self._actors[a].run_many.remote(packed)] = (chunk, a)  # type: ignore[attr-defined]
                for inp in chunk:
                    emit(BatchEvent("started", inp.job, worker=info.get(a)))
                pull()
            # Start as many workers as there are batches waiting, up to the cluster's room.
            while -(-len(pending) // self.batch_size) > len(starting) and len(self._actors) - len(dead) < limit:
                self._actors.append(self._new_actor())
                starting[self._actors[-1].ready.remote()] = len(self._actors) - 1  # type: ignore[attr-defined]
            if not inflight and not starting:
                if not pending:
                    return
                raise RuntimeError("no Ray worker is left to run the batch's jobs")
            ref = ray.wait([*inflight, *starting], num_returns=1)[0][0]
            if ref in starting:
                a = starting.pop(ref)
                try:
                    info[a] = ray.get(ref)
                except RayActorError as e:
                    dead.add(a)
                    cause = _init_error(e)
                    if cause is not None:  # its constructor failed (a precision the device lacks): every worker would
                        raise cause from None
                    failed_starts += 1
                    if failed_starts > self.max_attempts:
                        raise RuntimeError(f"Ray workers keep dying as they start ({_first_line(e)})") from None
                    self.on_warning(f"a Ray worker could not start ({_first_line(e)}); starting another")
                    continue
                idle.append(a)
                continue
            chunk, a = inflight.pop(ref)
            try:
                outcomes: list[JobOutcome] = ray.get(ref)
            except _WORKER_LOST as e:
                for inp in reversed(chunk):
                    why = f"the worker running {inp.job.key} died ({_first_line(e)})"
                    if inp.attempt >= self.max_attempts:
                        yield JobOutcome(inp.job.key, "failed", reason=f"{why}, {inp.attempt} times; not tried again", worker=info.get(a, {}), attempts=inp.attempt)
                    else:
                        pending.appendleft(dataclasses.replace(inp, attempt=inp.attempt + 1))
                        emit(BatchEvent("retry", inp.job, worker=info.get(a), message=f"{why}; running it again on another worker"))
                dead.add(a)
                continue
            except RayTaskError as e:  # an error the worker did not expect: a bug, shown as such
                raise e.as_instanceof_cause() from None
            idle.append(a)
            yield from outcomes

    def close(self) -> None:
        """Stop this batch's actors (running jobs are lost; the journal has the finished ones)."""
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self._actors = []
        leave_cluster(self._joined_here)


def join_cluster(address: str | None) -> bool:
    """Connect this process to Ray: `address` None starts a local cluster (or joins the one
    RAY_ADDRESS names), "host:port" or "auto" joins. True when this call connected, so the caller
    leaves again when done (`leave_cluster`); False when this process was connected already."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level="warning")
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS'}: {str(e).splitlines()[0]}") from None
    return True


def leave_cluster(joined_here: bool) -> None:
    """Shut Ray down in this process if `join_cluster` connected it."""
    if joined_here and ray.is_initialized():
        ray.shutdown()


def _init_error(e: RayActorError) -> BaseException | None:
    """The exception an actor's constructor raised, when that is why it died: a ValueError
    (DeviceError, WeightsError...) as it is, anything else as a RuntimeError naming it."""
    if not getattr(e, "actor_init_failed", False):
        return None
    task = next((x for x in e.args if isinstance(x, RayTaskError)), None)
    cause = getattr(task, "cause", None)
    if isinstance(cause, ValueError):
        return cause
    return RuntimeError(f"a Ray worker failed to start: {_first_line(cause) if cause is not None else _first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
