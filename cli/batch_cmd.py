"""`nst batch`: the command line over `nst.engine.jobs.run_batch`.

Every `stylize` option that decides the image or where it runs is taken here as it is declared
there (the signature is reused, not copied), so the two commands cannot drift apart. torch,
ONNX and Ray are imported inside the command, never when the CLI loads.
"""

from __future__ import annotations

import enum
import functools
import inspect
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from nst.engine import config as C
from nst.engine.jobs.joblist import DEFAULT_NAME

from .common import UserError, check_writable, console, flag_message, interrupted_code, ray_device_and_precision, spelt_as_flags, user_errors
from .stylize_cmd import CONFIG_OPTIONS, config_from_options, keyword_option, memory_request, stylize_parameters

# stylize's parameters that batch replaces with its own (files in, folder out, whole-batch report).
_REPLACED = ("content", "styles", "output", "report", "compare")  # the batch's own


def batch_command(**a: Any) -> None:
    """Stylise many images into a folder, resuming where a run stopped.

    Jobs are every CONTENT with every --style (or the rows of --jobs FILE.csv). A journal in the
    output folder records each finished job; rerunning the same command skips what is done and
    unchanged and redoes the rest. Exit code 0: every job done; 1: some failed (the closing table
    says which); 130: stopped by Ctrl-C.
    """
    with user_errors():
        _run(a)


def _batch_parameters() -> list[inspect.Parameter]:
    opt = keyword_option
    return [
        opt("contents", Annotated[Optional[list[str]], typer.Argument(help="Content images: files, folders (their images) or quoted globs ('photos/*.jpg').", show_default=False, metavar="CONTENT...")], None),
        opt("style", Annotated[Optional[list[str]], typer.Option("--style", metavar="<str>", help="A style image, folder or quoted glob; repeat for more styles. a.jpg,b.jpg is one blend of both.", show_default=False)], None),
        opt("output", Annotated[Path, typer.Option("--output", "-o", help="Output folder (created); its journal makes a rerun resume.", show_default=False)]),
        opt("jobs", Annotated[Optional[Path], typer.Option("--jobs", help="CSV with columns content,style,output (paths relative to the file); other columns (size, style_weight, ...) override options for that row.", show_default=False)], None),
        opt("name", Annotated[str, typer.Option("--name", help="Output name in the folder: {content} and {style} are file stems (made unique), {ext} the content's extension.")], DEFAULT_NAME),
        opt("ray", Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster: the one RAY_ADDRESS names, else a local one started for the batch.")], False),
        opt("ray_address", Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (host:port, or auto).", show_default=False)], None),
        opt("threads", Annotated[Optional[int], typer.Option("--threads", help="CPU threads per worker [torch's default here; with Ray the same number, one worker per that many CPUs]. Results on a CPU depend on it.", show_default=False)], None),
        opt("batch_size", Annotated[int, typer.Option("--batch-size", help="Optimise up to N same-size images together on a worker (one forward and backward for all), as many as the memory budget holds together.")], 1),
        opt("report", Annotated[Optional[Path], typer.Option(help="Write a JSON report of the whole batch here.", show_default=False)], None),
        opt("compare", Annotated[Optional[Path], typer.Option(help="Write each job's content | style | result sheet into this folder.", show_default=False)], None),
    ]


def _signature() -> inspect.Signature:
    return inspect.Signature([*_batch_parameters(), *stylize_parameters(without=_REPLACED)], return_annotation=None)


batch_command.__signature__ = _signature()  # type: ignore[attr-defined]


def _value_type(annotation: Any) -> Any:
    """`Annotated[Optional[X], ...]` -> X."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [t for t in typing.get_args(annotation) if t is not type(None)]
    return args[0] if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else annotation


def row_options(overrides: Mapping[str, str], *, where: str) -> dict[str, object]:
    """A --jobs row's extra columns as option values, converted as the command line converts them."""
    params = batch_command.__signature__.parameters  # type: ignore[attr-defined]
    out: dict[str, object] = {}
    for col, text in overrides.items():
        if col not in params or col in ("contents", "style", "output", "jobs", "name"):
            raise UserError(f"{where}: unknown column {col!r}; option columns are {', '.join(CONFIG_OPTIONS)}")
        if col not in CONFIG_OPTIONS:
            raise UserError(f"{where}: column {col!r} cannot change per row (it is one setting for the whole batch); give it as --{col.replace('_', '-')}")
        kind = _value_type(params[col].annotation)
        try:
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                out[col] = kind(text.strip().lower())
            elif kind in (int, float):
                out[col] = kind(text)
            else:
                out[col] = text
        except ValueError:
            choices = f" (use {', '.join(str(m.value) for m in kind)})" if isinstance(kind, type) and issubclass(kind, enum.Enum) else ""
            raise UserError(f"{where}: bad {col} {text!r}{choices}") from None
    return out


def _run(a: dict[str, Any]) -> None:  # noqa: C901 - a linear script of the batch's phases
    from nst.engine.jobs import Job, check_jobs, expand_images, job_grid, read_jobs_csv, run_batch, style_sets

    from .common import load_weights_for
    from .targets_opt import check_targets_options

    quiet = bool(a["quiet"])
    check_targets_options(a["targets"], a["onnx"], a["provider"])
    out_dir = Path(a["output"])
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is a file; nst batch writes into a folder")
    check_writable(out_dir, "-o", folder=True)  # a file where one of its folders would be
    if a["jobs"] is not None:
        if a["contents"] or a["style"]:
            raise UserError("--jobs FILE.csv lists the jobs: give it instead of CONTENT... and --style, not with them")
        specs = read_jobs_csv(Path(a["jobs"]), name=a["name"])
    else:
        if not a["contents"]:
            raise UserError("give CONTENT images (files, folders or quoted globs), or --jobs FILE.csv")
        if not a["style"]:
            raise UserError("give at least one --style image")
        specs = job_grid(expand_images(a["contents"], exclude=out_dir), style_sets(a["style"], exclude=out_dir), name=a["name"])
    C.check_threads(a["threads"])
    if a["batch_size"] < 1:
        raise UserError(f"--batch-size must be 1 or more, got {a['batch_size']}")

    base = {k: a[k] for k in CONFIG_OPTIONS}
    configs: dict[tuple, object] = {}
    jobs = []
    for spec in specs:
        where = f"--jobs {a['jobs']}, line {spec.line}" if spec.line else ""
        opts = {**base, **row_options(spec.overrides, where=where)} if spec.overrides else base
        key = tuple(sorted((k, str(v)) for k, v in opts.items()))
        if key not in configs:
            try:
                configs[key] = config_from_options(opts)
            except (UserError, ValueError) as e:
                raise UserError(f"{where}: {flag_message(e)}" if where else flag_message(e)) from None
        cfg = configs[key]
        if cfg.style_blend and len(cfg.style_blend) != len(spec.styles):  # type: ignore[attr-defined]
            raise UserError(f"{where or spec.name}: --style-blend has {len(cfg.style_blend)} weights for {len(spec.styles)} style images")  # type: ignore[attr-defined]
        for flag, paths in (("--masks", cfg.masks), ("--style-regions", cfg.style_regions)):  # type: ignore[attr-defined]
            if paths and len(paths) != len(spec.styles):
                raise UserError(f"{where or spec.name}: {flag} has {len(paths)} mask(s) for {len(spec.styles)} style image(s); give one per style, in their order (- for everywhere)")
        jobs.append(Job(spec.name, spec.content, spec.styles, out_dir / spec.name, cfg))  # type: ignore[arg-type]
    check_jobs(jobs)
    _check_masks({id(c): c for c in configs.values()}.values())
    _check_extras(jobs, out_dir, a["report"], a["compare"])
    check_writable(a["compare"], "--compare", folder=True)
    check_writable(a["report"], "--report", example="report.json")

    a["memory"] = memory_request(a["max_memory"], a["tile"], a["optimizer_state"])  # a bad --tile or --max-memory fails before the weights load
    if a["dry_run"]:
        _dry_run(a, jobs)
    seed = config_from_options(base).seed
    w = load_weights_for(str(a["weights"]), seed)
    if w.is_random and not quiet:
        console.print(f"[yellow]weights: {w.description}, not pretrained: the results show the method at work, not paintings[/]")
    settings = {"weights": w.fingerprint, "precision": str(a["precision"]).strip().lower(), "targets": a["targets"].value, "onnx": str(a["onnx"]) if a["onnx"] else None,
                "max_memory": a["max_memory"], "tile": str(a["tile"]).strip().lower()}  # a plan may choose Adam: it decides the images too
    runner = _runner(a, w, quiet=quiet)

    view = _BatchView(quiet=quiet, per_job=a["ray"] is False and a["ray_address"] is None)
    try:
        view.start()
        result = run_batch(jobs, out_dir, runner, settings=settings, on_event=lambda e: view.event(e, compare=a["compare"]), group_sizes=a["batch_size"] > 1)
    finally:
        view.stop()
    if result.swept and not quiet:
        console.print(f"removed {result.swept} stale temporaries that killed runs left in {out_dir}")
    if a["report"] is not None:
        from .report import write_json

        write_json(Path(a["report"]), batch_report(result, w, runner.describe(), settings))
    if not quiet:
        console.print(closing_table(result))
    _summary(result, out_dir, quiet=quiet)
    if result.exit_code:
        raise typer.Exit(interrupted_code() if result.exit_code == 130 else result.exit_code)


def _dry_run(a: Mapping[str, Any], jobs: Sequence[Any]) -> None:
    """Each job's memory plan as its worker would make it on this machine's device (the target
    source's session counted as it would open), or why the job cannot run (its images, --init,
    sizes, output format, masks, the --onnx model's layers); nothing is written but `--report`,
    and the exit code is 0. The weights are not loaded: whether --onnx was made from them is
    the run's to find."""
    import dataclasses

    from nst.engine.device import Runtime, resolve_device, resolve_precision
    from nst.engine.images import ImageError, load_image, load_named
    from nst.engine.onnx_meta import read_meta
    from nst.engine.transfer import check_job, plan_for, planned_config, resolve_guidance

    from .common import warn_if_weights_missing
    from .stylize_cmd import plan_lines
    from .targets_opt import planned_source_bytes

    if a["ray"] or a["ray_address"] is not None:
        raise UserError("--dry-run plans on this machine's device; with --ray each job is planned on its worker: leave out --ray to see it")
    dev = resolve_device(str(a["device"]))
    runtime = Runtime(device=dev, precision=resolve_precision(dev, str(a["precision"])))
    with user_errors():
        model = read_meta(Path(a["onnx"])) if a["onnx"] is not None else None  # one for every job: an error for the batch
    style = functools.cache(load_image)  # styles recur from job to job; contents do not, and are let go
    # What the target source holds, once per configuration (with --onnx it reads the model's file).
    source_bytes = functools.cache(lambda cfg: planned_source_bytes(a["targets"], cfg=cfg, onnx_path=a["onnx"]))

    plans = []
    for job in jobs:
        console.print(f"{job.key}:", highlight=False)
        try:  # what the job's worker checks before its work, in its order
            content, styles = load_image(job.content), [style(p) for p in job.styles]
            if job.cfg.init not in C.INIT_CHOICES:
                load_named(job.cfg.init, "init")
            check_job(content, styles, job.cfg, job.output)
            resolve_guidance(job.cfg, [content], [styles])  # the masks' shapes against this content
            if model is not None:
                model.check_matches(fingerprint=model.fingerprint, pooling=job.cfg.pooling.value, content_layers=job.cfg.content_layers,
                                    style_layers=job.cfg.style_layers, where=str(a["onnx"]))  # fmt: skip
            memory = dataclasses.replace(a["memory"], source_bytes=source_bytes(job.cfg))
            plan = plan_for(content.size, [s.size for s in styles], job.cfg, runtime, memory)
        except (ImageError, ValueError) as e:  # PlanError (a budget too small) is a ValueError
            reason = _reason(flag_message(e))
            console.print(f"[red]cannot run:[/] {reason}", highlight=False)
            plans.append({"job": job.key, "content": str(job.content), "reason": reason})
            continue
        if plan.optimizer_note:
            console.print(f"[yellow]warning:[/] memory plan: {plan.optimizer_note}", highlight=False)
        for line in plan_lines(plan):
            console.print(line, highlight=False)
        plans.append({"job": job.key, "content": str(job.content), "plan": plan.to_dict(), "config": planned_config(job.cfg, plan).to_dict()})
    warn_if_weights_missing(str(a["weights"]))
    if a["report"] is not None:
        from .report import write_json

        write_json(Path(a["report"]), {"status": "dry-run", "plans": plans, "device": str(runtime.device), "precision": runtime.precision.value})
        if not a["quiet"]:
            console.print(f"wrote {a['report']} (report)")
    raise typer.Exit(0)


def _runner(a: Mapping[str, Any], w: object, *, quiet: bool) -> Any:
    """The in-process or Ray runner for these options."""
    from .targets_opt import choose_targets

    targets = functools.partial(choose_targets, a["targets"], onnx_path=a["onnx"], provider=a["provider"])
    memory = a["memory"]
    if a["ray"] or a["ray_address"] is not None:
        dev, prec = ray_device_and_precision(a["device"], a["precision"])
        try:
            from nst.engine.jobs.ray_runner import RayRunner
        except ImportError as e:
            raise UserError(f"--ray needs Ray ({e.name or e} is not installed): pip install 'nst[ray]'") from None

        runner = RayRunner(
            weights=w, device=dev, precision=str(a["precision"]), threads=a["threads"], targets=functools.partial(targets, quiet=True),
            address=a["ray_address"], on_warning=lambda m: console.print(f"[yellow]warning:[/] {m}"), batch_size=a["batch_size"], memory=memory,
        )
        return runner
    from nst.engine.device import resolve_device, resolve_precision
    from nst.engine.jobs import InProcessRunner, Worker

    dev = resolve_device(str(a["device"]))
    prec = resolve_precision(dev, str(a["precision"]))
    worker = Worker(w, device=str(dev), precision=prec.value, threads=a["threads"], targets=functools.partial(targets, quiet=quiet), memory=memory)  # type: ignore[arg-type]
    return InProcessRunner(worker, batch_size=a["batch_size"])


class _BatchView:
    """The jobs bar (done, failed, skipped, jobs/min, ETA) above the running job's bar."""

    def __init__(self, *, quiet: bool, per_job: bool) -> None:
        self.quiet, self.per_job = quiet, per_job
        self.progress: Progress | None = None
        self.jobs_task: Any = None
        self.job_task: Any = None
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.started = time.perf_counter()
        self.last_read = 0.0
        self.retries = 0

    def start(self) -> None:
        if self.quiet:
            return
        self.progress = Progress(
            # A long job name is cut ("…"): the closing table names each job whole.
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=26)),
            BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self.progress.start()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _jobs_info(self) -> str:
        """`done 4, failed 1, 12 jobs/min`: failed and skipped only when there are any, so the
        line with its bar and times fits 80 columns."""
        n = self.counts["done"] + self.counts["failed"]
        mins = (time.perf_counter() - self.started) / 60
        counts = [f"{k} {v}" for k, v in self.counts.items() if v or k == "done"]
        if n and mins > 0:
            counts.append(f"{n / mins:.{0 if n / mins >= 10 else 1}f} jobs/min")
        return ", ".join(counts)

    def event(self, e: Any, *, compare: Path | None) -> None:
        if e.kind == "finished":
            self.counts["done" if e.record.status == "done" else "failed"] += 1
            if compare is not None and e.record.status == "done":
                _sheet(e.job, Path(compare))
        elif e.kind == "skipped":
            self.counts["skipped"] += 1
        elif e.kind in ("retry", "warning"):
            self.retries += e.kind == "retry"
            console.print(f"[yellow]warning:[/] {e.message}")
        p = self.progress
        if p is None:
            return
        if e.kind == "plan":
            self.started = time.perf_counter()
            self.jobs_task = p.add_task("[bold]batch[/]", total=e.counts["to_run"], info=self._jobs_info())
        elif e.kind == "started" and self.per_job:
            total = sum(e.job.cfg.stage_iterations)
            if self.job_task is None:
                self.job_task = p.add_task("", total=total, info="")
            p.reset(self.job_task, total=total, description=f"  {e.job.key}", info="")
        elif e.kind == "iterate" and self.job_task is not None:
            now = time.perf_counter()
            fields = {}
            it = e.iterate
            if now - self.last_read > 0.25 or it.step == it.total_steps:  # reading the loss syncs a GPU
                self.last_read = now
                fields["info"] = f"loss {float(it.loss):.4g} at {it.size[1]}x{it.size[0]}"
            p.update(self.job_task, completed=it.step, **fields)
        elif e.kind in ("finished", "skipped") and self.jobs_task is not None:
            if e.kind == "finished":
                p.advance(self.jobs_task)
            p.update(self.jobs_task, info=self._jobs_info())


def _check_masks(configs: Any) -> None:
    """Every mask the settings name can be read and is not all black, before any job runs (each
    job checks the shapes against its own images)."""
    from nst.engine.masks import check_not_black, load_mask, load_masks

    for cfg in configs:
        for param in ("masks", "style_regions"):
            for i, m in enumerate(load_masks(getattr(cfg, param), param=param)):
                if m is not None:
                    check_not_black(m, param=param, index=i)
        if cfg.content_mask and cfg.content_mask.strip() != "-":
            check_not_black(load_mask(cfg.content_mask, param="content_mask"), param="content_mask")


def _check_extras(jobs: Sequence[Any], out_dir: Path, report: Path | None, compare: Path | None) -> None:
    """Refuse a --report or a --compare sheet that would land on an input, an output or the
    journal (the sheets are named as the outputs: --compare at the -o or a content folder wrote
    over those), and a --report that is the -o folder, before any work."""
    from nst.engine.jobs import JOURNAL_NAME

    taken = {p.resolve(): "an input" for j in jobs for p in j.inputs}
    taken |= {j.output.resolve(): "an output" for j in jobs} | {(out_dir / JOURNAL_NAME).resolve(): "the batch's journal"}
    if report is not None:
        where = Path(report).resolve()
        if where == out_dir.resolve():
            raise UserError(f"cannot write --report {report}: it is the -o folder; give a file name such as {Path(report) / 'report.json'}")
        if where in taken:
            raise UserError(f"--report {report} would overwrite {taken[where]}; give another file name")
    if compare is not None:
        if Path(compare).is_file():
            raise UserError(f"--compare {compare} is a file; give a folder for the sheets")
        for j in jobs:
            sheet = (Path(compare) / j.key).resolve()
            if sheet in taken:
                raise UserError(f"--compare {compare} would write job {j.key}'s sheet over {taken[sheet]} ({Path(compare) / j.key}); give a folder of its own for the sheets")


def _sheet(job: Any, folder: Path) -> None:
    """The content | style(s) | mask(s) | result sheet of a finished job, named as its output."""
    from nst.engine.images import load_image, save_image, to_tensor

    from .report import comparison_sheet
    from .stylize_cmd import load_mask_options

    try:
        content, styles = load_image(job.content), [load_image(p) for p in job.styles]
        shown = load_mask_options(job.cfg, content, styles)[3]
        sheet = comparison_sheet(content, styles, to_tensor(load_image(job.output)), masks=shown)
        save_image(sheet, folder / job.key)
    except (ValueError, OSError) as e:
        console.print(f"[yellow]warning:[/] no comparison sheet for {job.key}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _reason(text: str) -> str:
    """A job's failure reason with the engine's parameter names spelt as this command's flags."""
    return spelt_as_flags(text, batch_command.__signature__.parameters)  # type: ignore[attr-defined]


def closing_table(result: Any) -> Table:
    """One row per job this run finished (done or failed, with the reason); skipped ones counted."""
    table = Table(title="batch", header_style="bold")
    # A job's name is kept whole on its line (up to 34 characters: the table fits 80 columns) where the reason can wrap.
    longest = max((len(f.record.job) for f in result.finished), default=3)
    for col, just in (("job", "left"), ("status", "left"), ("seconds", "right"), ("loss", "right"), ("reason", "left")):
        table.add_column(col, justify=just, overflow="fold", min_width=min(longest, 34) if col == "job" else None)  # type: ignore[arg-type]
    for f in result.finished:
        r = f.record
        style = None if r.status == "done" else "red"
        table.add_row(r.job, r.status, f"{r.seconds:.1f}", f"{r.loss:.4g}" if r.loss is not None else "-", _reason(r.reason), style=style)
    for job in result.interrupted_jobs:
        table.add_row(job.key, "interrupted", "", "", "latest image kept; a rerun does it again", style="yellow")
    if result.skipped:
        table.caption = f"{len(result.skipped)} job(s) skipped: done by an earlier run with the same inputs and settings"
    return table


def _summary(result: Any, out_dir: Path, *, quiet: bool) -> None:
    """One closing line; with --quiet only when something failed or was interrupted."""
    from nst.engine.jobs import JOURNAL_NAME

    done, failed, skipped = len(result.done), len(result.failed), len(result.skipped)
    mins = result.seconds / 60
    rate = f" ({(done + failed) / mins:.1f} jobs/min)" if done + failed and mins > 0 else ""
    line = f"{done} done, {failed} failed, {skipped} skipped in {result.seconds:.1f} s{rate}; journal {out_dir / JOURNAL_NAME}"
    if result.interrupted:
        left = len(result.jobs) - done - failed - skipped
        console.print(f"[yellow]interrupted:[/] {line}; {left} job(s) not finished: rerun the same command to resume")
    elif failed:
        console.print(f"[bold red]error:[/] {failed} of {len(result.jobs)} job(s) failed; {line}")
    elif not quiet:
        console.print(line)


def batch_report(result: Any, w: Any, where: Mapping[str, object], settings: Mapping[str, object]) -> dict[str, object]:
    """Per job the keys of `stylize --report` (plus job, attempts, worker, reason), and totals."""
    from nst.engine.device import Runtime

    from .report import seconds_per_iteration, versions
    from .stylize_cmd import run_report

    entries = []
    for f in result.finished:
        r, o = f.record, f.outcome
        base = {"job": r.job, "status": r.status, "reason": _reason(r.reason), "seconds": r.seconds, "attempts": r.attempts, "worker": r.worker}
        if o is None or o.result is None:
            entries.append({"output": r.output, **base})
            continue
        res = o.result
        phases = {"images": o.decode_seconds, "targets": res.phases.get("targets", 0.0), "optimisation": res.phases.get("optimisation", 0.0)}
        entry = run_report(res, o.cfg or f.job.cfg, Runtime(), w, phases, seconds_per_iteration(res.iteration_seconds), {**res.targets, **o.targets}, f.job.output, f.snapshots, f.snapshots_failed)
        entry.update(base, status=r.status, device=r.worker.get("device"), precision=r.worker.get("precision"), plan=o.plan)
        entry.pop("versions", None)
        entries.append(entry)
    for job, r in result.skipped:
        entries.append({"job": r.job, "output": r.output, "status": "skipped", "finished": r.finished})
    n = len(result.done) + len(result.failed)
    return {
        "jobs": entries,
        "totals": {
            "jobs": len(result.jobs), "done": len(result.done), "failed": len(result.failed), "skipped": len(result.skipped),
            "interrupted": result.interrupted, "seconds": result.seconds,
            "jobs_per_minute": n / (result.seconds / 60) if n and result.seconds > 0 else None,
        },
        "settings": dict(settings),
        "runner": dict(where),
        "weights": w.to_dict(),
        "versions": versions(),
    }  # fmt: skip
