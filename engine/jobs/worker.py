"""A batch worker: one network per device, kept with its targets, running one job at a time.

The same class runs in the batch's own process and inside each Ray actor. It gets the input
files' bytes (so a worker on another machine needs no shared storage) and hands back the image;
it never writes a file: the driver alone writes outputs and the journal.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..config import StyleConfig, set_threads
from ..device import Runtime, is_out_of_memory, out_of_memory_message, release_memory, resolve_device, resolve_precision
from ..features import VGGFeatures
from ..images import ImageError, decode_image
from ..plan import Plan, shared_bytes
from ..targets import ImageTargets, TargetSource, resident_bytes
from ..transfer import Iterate, MemoryRequest, RunStatus, StyleResult, TargetCacheLike, build_model, check_job, plan_for, planned_config, stage_shapes, stylize_many
from ..weights import Weights
from .joblist import Job

if TYPE_CHECKING:
    from .journal import JobRecord

# (cfg=, weights=, runtime=) -> (source or None for PyTorch's, cache or None, report info)
TargetsFactory = Callable[..., "tuple[TargetSource | None, TargetCacheLike | None, dict[str, object]]"]


@dataclass(frozen=True)
class JobInput:
    """A job with its input files' bytes and hashes, as a worker receives it."""

    job: Job
    content: bytes
    styles: tuple[bytes, ...]
    content_sha256: str
    styles_sha256: tuple[str, ...]
    init: bytes | None = None
    init_sha256: str | None = None
    attempt: int = 1


@dataclass
class JobOutcome:
    """What a worker hands back: the finished (or partial) image and how it was reached."""

    key: str
    status: str  # "done" | "failed" | "interrupted"
    reason: str = ""  # one line; also set when an image was kept despite a problem (nonfinite, oom)
    result: StyleResult | None = None  # None when nothing was computed
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, image) for save_every
    seconds: float = 0.0
    attempts: int = 1  # how many workers it took (a worker that died mid-job makes it 2 or more)
    decode_seconds: float = 0.0
    worker: dict[str, object] = field(default_factory=dict)
    targets: dict[str, object] = field(default_factory=dict)  # the source's report info
    plan: dict[str, object] | None = None  # the memory plan it ran by (`Plan.to_dict`), with the worker's `memory`
    cfg: StyleConfig | None = None  # the settings as it ran them, when its plan changed them (Adam for L-BFGS)


@dataclass
class BatchEvent:
    """What a batch reports as it goes (through its `on_event` callback)."""

    kind: str  # "plan" | "skipped" | "started" | "iterate" | "snapshot" | "retry" | "warning" | "finished"
    job: Job | None = None
    record: "JobRecord | None" = None  # skipped, finished
    iterate: Iterate | None = None  # iterate: the job's optimisation step
    worker: dict[str, object] | None = None  # started: where it runs
    message: str = ""  # retry: why; warning: what went wrong (one line)
    counts: dict[str, int] | None = None  # plan: jobs, to_run, skipped
    snapshot: tuple[int, torch.Tensor] | None = None  # snapshot: (step, image) for save_every


EventSink = Callable[[BatchEvent], None]


class MemoCache:
    """Targets kept in memory in front of the disk cache, up to `max_bytes`: a style used by many
    jobs has its targets computed (or read) once per size by each worker."""

    def __init__(self, inner: TargetCacheLike | None, *, max_bytes: int = 512 << 20) -> None:
        self.inner, self.max_bytes = inner, max_bytes
        self._memo: OrderedDict[str, ImageTargets] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    @staticmethod
    def _size(t: ImageTargets) -> int:
        return sum(v.numel() * v.element_size() for v in t.tensors().values())

    def lookup(self, key: str) -> ImageTargets | None:
        if key in self._memo:
            self._memo.move_to_end(key)
            self.hits += 1
            return self._memo[key]
        hit = self.inner.lookup(key) if self.inner is not None else None
        if hit is not None:
            self._remember(key, hit)
        return hit

    def store(self, key: str, targets: ImageTargets) -> None:
        self._remember(key, targets)
        if self.inner is not None:
            self.inner.store(key, targets)

    def _remember(self, key: str, targets: ImageTargets) -> None:
        size = self._size(targets)
        if size > self.max_bytes:
            return
        self._memo[key] = targets
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._memo.popitem(last=False)
            self._bytes -= self._size(old)


@dataclass
class _Network:
    model: VGGFeatures
    source: TargetSource | None
    cache: MemoCache
    info: dict[str, object]


class Worker:
    """Runs jobs on one device. The weights are loaded into a network once per layer set and
    pooling; each network keeps its target source and a memory of targets."""

    def __init__(
        self, weights: Weights, *, device: str = "auto", precision: str = "auto", threads: int | None = None, targets: TargetsFactory | None = None,
        memory: MemoryRequest | None = None,
    ) -> None:
        # CPU results depend on the thread count (the order of parallel sums): a batch fixes it
        # so that every worker computes the same bytes.
        set_threads(threads)
        self.weights = weights
        dev = resolve_device(device)
        self.runtime = Runtime(device=dev, precision=resolve_precision(dev, precision))
        self.targets_factory = targets
        self.memory = memory  # with it, each job runs by its memory plan (made here, for this device)
        self._networks: dict[tuple, _Network] = {}
        self._styles: OrderedDict[str, Image.Image] = OrderedDict()  # decoded style images by hash

    def describe(self) -> dict[str, object]:
        """Where this worker runs: host, pid, device (with the GPU's name), precision, threads."""
        dev = self.runtime.device
        name = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": f"{dev}{name}", "precision": self.runtime.precision.value, "threads": torch.get_num_threads()}

    def _network(self, cfg: StyleConfig) -> _Network:
        key = (cfg.pooling, cfg.content_layers, cfg.style_layers)
        if key not in self._networks:
            model = build_model(cfg, self.weights, self.runtime)
            source, cache, info = (None, None, {})
            if self.targets_factory is not None:
                source, cache, info = self.targets_factory(cfg=cfg, weights=self.weights, runtime=self.runtime)
            self._networks[key] = _Network(model, source, MemoCache(cache), dict(info))
        return self._networks[key]

    def _style(self, digest: str, data: bytes, name: str) -> Image.Image:
        if digest not in self._styles:
            self._styles[digest] = decode_image(data, name)
            while len(self._styles) > 32:
                self._styles.popitem(last=False)
        return self._styles[digest]

    def run(
        self, inp: JobInput, *, on_iterate: Callable[[Iterate], None] | None = None, on_snapshot: Callable[[int, torch.Tensor], None] | None = None
    ) -> JobOutcome:
        """Run one job: `run_many` of one."""
        return self.run_many(
            [inp],
            on_iterate=None if on_iterate is None else (lambda _job, it: on_iterate(it)),
            on_snapshot=None if on_snapshot is None else (lambda _job, step, image: on_snapshot(step, image)),
        )[0]

    def run_many(
        self,
        inputs: Sequence[JobInput],
        *,
        on_iterate: Callable[[Job, Iterate], None] | None = None,
        on_snapshot: Callable[[Job, int, torch.Tensor], None] | None = None,
    ) -> list[JobOutcome]:
        """Run jobs, those with the same settings and the same size at every stage optimised
        together (one tensor, one forward and backward per iteration), in input order.

        Bad images, impossible sizes and running out of memory are failed outcomes with a one-line
        reason; Ctrl-C inside the optimisation makes interrupted ones with the latest images.
        `save_every` images go to `on_snapshot` as they are made, or without it into the outcomes.
        """
        t0 = time.perf_counter()
        where = self.describe()
        outs = [JobOutcome(inp.job.key, "failed", worker=where, attempts=inp.attempt) for inp in inputs]
        groups: dict[tuple, list[tuple[int, Image.Image, list[Image.Image], Image.Image | None]]] = {}
        plans: dict[int, Plan] = {}
        for i, inp in enumerate(inputs):
            job = inp.job
            ti = time.perf_counter()
            try:
                content = decode_image(inp.content, job.content)
                styles = [self._style(d, b, str(p)) for d, b, p in zip(inp.styles_sha256, inp.styles, job.styles)]
                init = decode_image(inp.init, job.init or "init") if inp.init is not None else None
                check_job(content, styles, job.cfg, job.output)
                cfg = job.cfg
                if self.memory is not None:
                    # The plan counts the target source's own memory (ONNX Runtime's session).
                    memory = dataclasses.replace(self.memory, source_bytes=resident_bytes(self._network(cfg).source))
                    plans[i] = plan_for(content.size, [s.size for s in styles], cfg, self.runtime, memory)
                    cfg = planned_config(cfg, plans[i])
                    outs[i].plan = plans[i].to_dict()
                    outs[i].cfg = cfg if cfg != job.cfg else None
            except (ImageError, ValueError, OSError) as e:  # PlanError (a budget too small) is a ValueError
                outs[i].reason = _one_line(e)
                continue
            outs[i].decode_seconds = time.perf_counter() - ti
            # A plan that tiles or keeps L-BFGS's history in host memory runs its job alone (a group
            # runs whole, its history on the device); whole ones share a group as far as the budget holds.
            alone = i if i in plans and (plans[i].optimizer_state == "host" or any(st.mode == "tiled" for st in plans[i].stages)) else None
            groups.setdefault((cfg, stage_shapes(content.width, content.height, cfg), alone), []).append((i, content, styles, init))
        for (cfg, _, _), group in groups.items():
            for members in self._fitting(group, plans):
                self._run_members(cfg, inputs, members, outs, plans, where, on_iterate, on_snapshot)
        for o in outs:
            o.seconds = o.seconds or time.perf_counter() - t0
        return outs

    def _fitting(self, group: list, plans: dict[int, Plan]) -> list[list]:
        """`group` cut into runs whose whole-image estimates fit the plan's budget together (one
        job at least): a group optimised as one tensor needs each member's images, targets,
        optimiser state and activations at once, and the network's weights and the target
        source's session once (`shared_bytes`)."""
        if not plans or self.memory is None:
            return [group]
        runs: list[list] = [[]]
        used = 0
        for m in group:
            plan = plans[m[0]]
            need, shared = plan.estimated_peak_bytes, shared_bytes(plan)
            if runs[-1] and plan.budget_bytes is not None and used + need - shared > plan.budget_bytes:
                runs.append([])
                used = 0
            used += need - shared if runs[-1] else need
            runs[-1].append(m)
        return runs

    def _run_members(self, cfg: StyleConfig, inputs: Sequence[JobInput], members: list, outs: list[JobOutcome], plans: dict[int, Plan], where: dict, on_iterate, on_snapshot) -> None:  # noqa: ANN001
        """Run one group of jobs (one tensor) and time it."""
        if any(o.status == "interrupted" for o in outs):  # Ctrl-C: the rest are not started
            for i, *_ in members:
                outs[i].status, outs[i].reason = "interrupted", "not started"
            return
        tg = time.perf_counter()
        plan = plans.get(members[0][0]) if len(members) == 1 else None  # a group's members all run whole
        self._run_group(cfg, [inputs[i].job for i, *_ in members], members, [outs[i] for i, *_ in members], on_iterate, on_snapshot, plan=plan)
        for i, *_ in members:
            outs[i].seconds = time.perf_counter() - tg + outs[i].decode_seconds
            if len(members) > 1:
                outs[i].worker = {**where, "batch": len(members)}

    def _run_group(self, cfg: StyleConfig, jobs: list[Job], members: list, outs: list[JobOutcome], on_iterate, on_snapshot, *, plan: Plan | None = None) -> None:  # noqa: ANN001
        def callback(k: int, it: Iterate) -> None:
            job = jobs[k]
            if cfg.save_every and it.step % cfg.save_every == 0 and it.step != it.total_steps:
                if on_snapshot is not None:
                    on_snapshot(job, it.step, it.snapshot())
                else:
                    outs[k].snapshots.append((it.step, it.snapshot()))
            if on_iterate is not None:
                on_iterate(job, it)

        try:
            net = self._network(cfg)
            for o in outs:
                o.targets = dict(net.info)
            # A tiled plan makes the source tile (`stylize_many`: the same source at the plan's tile edge).
            results = stylize_many(
                [m[1] for m in members], [m[2] for m in members], cfg, weights=self.weights, runtime=self.runtime, targets=net.source,
                cache=net.cache, init_images=[m[3] for m in members], callback=callback, model=net.model, plan=plan,
            )  # fmt: skip
        except (ImageError, ValueError, OSError) as e:
            for o in outs:
                o.reason = _one_line(e)
            return
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            release_memory(self.runtime.device)
            together = f" with {len(outs)} images together (try a smaller --batch-size)" if len(outs) > 1 else ""
            for o in outs:
                o.reason = f"{out_of_memory_message(e, self.runtime.device)} at size {cfg.sizes[0]}{together}"
            return
        for o, result in zip(outs, results):
            o.result = result
            o.status = {RunStatus.DONE: "done", RunStatus.INTERRUPTED: "interrupted"}.get(result.status, "failed")
            o.reason = result.message if result.status != RunStatus.DONE else ""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
