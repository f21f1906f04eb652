"""Several clips on a Ray cluster: one clip per worker, its frames in order there.

The style images, the weights and the settings are sent from the driver (the weights put in
the object store once); each worker opens its clip, writes its work folder and its output
itself, so a clip's paths must mean the same on the worker's machine (this machine, or storage
every machine shares). A worker that dies mid-clip has its clip run again by Ray on another
worker, which resumes from the frames the work folder already holds. The driver never writes.

This module imports `ray`; nothing else in the engine imports this module.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence

import ray
from PIL import Image
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from ..config import StyleConfig
from ..errors import ConfigError
from ..jobs.ray_runner import join_cluster, leave_cluster, ray_capacity
from ..transfer import MemoryRequest
from ..weights import Weights
from .config import FlowMethod, VideoConfig
from .pipeline import ClipJob, ClipOutcome, run_clip

# (cfg=, weights=, runtime=) -> (target source or None for PyTorch's, cache or None, report info)
TargetsFactory = Callable[..., tuple]


def _run_on_worker(
    job: ClipJob, styles: Sequence[Image.Image], cfg: StyleConfig, vcfg: VideoConfig, weights: Weights, *,
    device: str, precision: str, threads: int | None, targets: TargetsFactory | None, identity: dict[str, object],
    init_image: Image.Image | None, raft_file: str | None, memory: MemoryRequest | None = None,
) -> tuple[ClipOutcome, dict[str, object]]:  # fmt: skip
    """One clip, start to end, in a Ray worker process."""
    import torch

    from ..config import set_threads
    from ..device import Runtime, resolve_device, resolve_precision
    from .flow import RaftFlow

    set_threads(threads or None)
    dev = resolve_device(device)
    runtime = Runtime(device=dev, precision=resolve_precision(dev, precision))
    source, cache, info = targets(cfg=cfg, weights=weights, runtime=runtime) if targets is not None else (None, None, {})
    raft = RaftFlow(raft_file, device=dev) if vcfg.flow == FlowMethod.RAFT and raft_file else None
    out = run_clip(job, styles, cfg, vcfg, weights=weights, identity=identity, runtime=runtime, targets=source, cache=cache, raft=raft, init_image=init_image,
                   memory=memory)  # fmt: skip
    out.worker = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(dev), "precision": runtime.precision.value, "threads": torch.get_num_threads()}
    return out, info


class ClipRayRunner:
    """Runs clips as Ray tasks: `address` None starts a local cluster (or joins the one Ray's
    RAY_ADDRESS names); "host:port" or "auto" joins. One task per clip, each asking for a GPU
    where the cluster has them (unless `device` is cpu), else `threads` CPUs."""

    def __init__(
        self, *, weights: Weights, device: str = "auto", precision: str = "auto", threads: int | None = None,
        targets: TargetsFactory | None = None, address: str | None = None, max_retries: int = 2,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {device!r} with Ray: use auto, cpu or cuda (Ray gives each worker its GPU)")
        self.device, self.precision, self.targets, self.max_retries = device, precision, targets, max_retries
        self._joined_here = join_cluster(address)
        # As a batch's workers: a GPU each, else `threads` CPUs (the driver's count unless told).
        self.workers, self.ask, self.threads = ray_capacity(device, threads, on_warning=on_warning or (lambda m: None))
        self._weights = ray.put(weights)
        self._refs: list[object] = []

    def describe(self) -> dict[str, object]:
        return {"runner": "ray", "address": ray.get_runtime_context().gcs_address, "max_workers": self.workers, "per_worker": self.ask}

    def run(
        self, jobs: Sequence[ClipJob], styles: Sequence[Image.Image], cfg: StyleConfig, vcfg: VideoConfig, *,
        identity: dict[str, object], init_image: Image.Image | None = None, raft_file: str | None = None, memory: MemoryRequest | None = None,
    ) -> Iterator[tuple[ClipJob, ClipOutcome | None, dict[str, object], BaseException | None]]:  # fmt: skip
        """(job, outcome, target info, error) for each clip as it finishes; `error` is what a
        clip raised (a broken input, a worker lost `max_retries` + 1 times) and its outcome None.
        `memory`: each clip's memory plan is made on its worker, for its device (without a budget,
        that device's free memory less a margin)."""
        task = ray.remote(max_retries=self.max_retries, retry_exceptions=False, **self.ask)(_run_on_worker)
        styles_ref = ray.put(list(styles))
        pending = {}
        for job in jobs:
            ref = task.remote(job, styles_ref, cfg, vcfg, self._weights, device=self.device, precision=self.precision, threads=self.threads,
                              targets=self.targets, identity=identity, init_image=init_image, raft_file=raft_file, memory=memory)  # fmt: skip
            pending[ref] = job
        self._refs = list(pending)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                outcome, info = ray.get(done[0])
            except RayTaskError as e:  # what the clip raised on the worker, as it was raised
                cause = getattr(e, "cause", None)
                yield job, None, {}, cause if isinstance(cause, BaseException) else e.as_instanceof_cause()
                continue
            except (RayActorError, WorkerCrashedError) as e:
                yield job, None, {}, RuntimeError(f"the worker running {job.source} died ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})")
                continue
            yield job, outcome, info, None

    def close(self) -> None:
        """Cancel the clips still running (their work folders keep the finished frames): only those
        not finished, and without force, which Ray delivers as Ctrl-C in the task. Force-cancelling
        every task, finished ones included, once aborted the calling process itself: Ray 2.60's
        driver failed its check "Tried to complete task that was not pending" when a cancelled
        task's reply came in, and took the CI's pytest down with it (logged in
        /tmp/ray/session_latest/logs/python-core-driver-*.log)."""
        refs, self._refs = self._refs, []
        if refs:
            try:
                _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
            except Exception:  # the cluster is gone: nothing left to cancel
                running = []
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:  # finished or gone meanwhile
                    pass
        leave_cluster(self._joined_here)
