"""The batch job layer: job lists, the journal, and run_batch with the in-process runner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine.config import GATYS
from nst.engine.jobs import (
    JOURNAL_NAME,
    InProcessRunner,
    Job,
    JobListError,
    JobRecord,
    Journal,
    JournalBusy,
    MemoCache,
    Worker,
    expand_images,
    job_grid,
    read_jobs_csv,
    read_journal,
    run_batch,
    settings_digest,
    style_sets,
    unique_stems,
)
from nst.engine.targets import TorchTargets

TINY = dataclasses.replace(GATYS, size=32, iterations=2, style_layers=("relu1_1", "relu2_1"), content_layers=("relu2_2",))
SETTINGS = {"weights": "w", "precision": "fp32", "targets": "torch"}


@pytest.fixture
def folder(tmp_path: Path, noise_png) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    s = tmp_path / "styles"
    s.mkdir()
    files = {
        "a": noise_png(d / "a.png", 48, 32, 1),
        "b": noise_png(d / "b.jpg", 32, 40, 2),
        "s1": noise_png(s / "s1.png", 40, 40, 3),
        "s2": noise_png(s / "s2.png", 36, 36, 4),
    }
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"")
    return {**files, "dir": d, "styles": s}


# --- job lists ---------------------------------------------------------------------------------


def test_expand_files_folders_and_globs(folder, tmp_path):
    d = folder["dir"]
    assert expand_images([d]) == [d / "a.png", d / "b.jpg"]  # sorted, images only, no hidden files
    assert expand_images([str(d / "*.jpg")]) == [d / "b.jpg"]
    assert expand_images([d / "b.jpg", d]) == [d / "b.jpg", d / "a.png"]  # duplicates keep their first place
    with pytest.raises(JobListError, match="no such file or folder"):
        expand_images([tmp_path / "nope.png"])
    with pytest.raises(JobListError, match="matches no image"):
        expand_images([str(d / "*.gif")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JobListError, match="has no images"):
        expand_images([empty])
    # the batch folder's own results are not inputs when it is the content folder
    with pytest.raises(JobListError):
        expand_images([d], exclude=d)


def test_unique_stems_number_collisions_without_landing_on_another_stem(tmp_path):
    paths = [tmp_path / "x" / "cat.png", tmp_path / "y" / "cat.jpg", tmp_path / "cat-2.png", tmp_path / "z" / "cat.png"]
    stems = unique_stems(paths)
    assert [stems[p] for p in paths] == ["cat", "cat-3", "cat-2", "cat-4"]
    assert len(set(stems.values())) == len(paths)


def test_grid_names_blends_and_collisions(folder, tmp_path):
    sets = style_sets([str(folder["styles"]), f"{folder['s1']},{folder['s2']}"])
    assert sets == [(folder["s1"],), (folder["s2"],), (folder["s1"], folder["s2"])]
    specs = job_grid(expand_images([folder["dir"]]), sets)
    assert [s.name for s in specs] == [
        "a--s1.png", "a--s2.png", "a--s1+s2.png", "b--s1.jpg", "b--s2.jpg", "b--s1+s2.jpg",
    ]  # fmt: skip
    assert job_grid([folder["a"]], [(folder["s1"],)], name="{style}/{content}.webp")[0].name == "s1/a.webp"
    with pytest.raises(JobListError, match="both write"):
        job_grid([folder["a"], folder["b"]], [(folder["s1"],)], name="{style}.png")
    with pytest.raises(JobListError, match="unknown field"):
        job_grid([folder["a"]], [(folder["s1"],)], name="{contnet}.png")
    with pytest.raises(JobListError, match="inside the output folder"):
        job_grid([folder["a"]], [(folder["s1"],)], name="../{content}.png")
    with pytest.raises(JobListError, match="takes image files"):
        style_sets([f"{folder['styles']},{folder['s1']}"])


def test_jobs_csv_rows_overrides_and_errors(folder, tmp_path):
    csv = tmp_path / "jobs.csv"
    csv.write_text(
        "content,style,output,Size,--style-weight\n"
        "in/a.png,styles/s1.png,one.png,40,\n"
        'in/b.jpg,"styles/s1.png,styles/s2.png",,,1e3\n'
        "\n"
    )
    rows = read_jobs_csv(csv)
    assert [r.name for r in rows] == ["one.png", "b--s1+s2.jpg"]
    assert rows[0].content == tmp_path / "in" / "a.png" and rows[1].styles == (folder["s1"], folder["s2"])
    assert rows[0].overrides == {"size": "40"} and rows[1].overrides == {"style_weight": "1e3"}
    assert rows[0].line == 2 and rows[1].line == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("content,output\na.png,x.png\n")
    with pytest.raises(JobListError, match="no style column"):
        read_jobs_csv(bad)
    bad.write_text("content,style\nin/a.png,styles/none.png\n")
    with pytest.raises(JobListError, match="line 2: style styles/none.png: no such file"):
        read_jobs_csv(bad)
    bad.write_text("content,style,output\nin/a.png,styles/s1.png,same.png\nin/b.jpg,styles/s1.png,same.png\n")
    with pytest.raises(JobListError, match="lines 2 and 3"):
        read_jobs_csv(bad)


# --- the journal ---------------------------------------------------------------------------------


def _rec(job: str, status: str = "done") -> JobRecord:
    return JobRecord(job=job, status=status, output=job, content="c", content_sha256="1", styles=["s"], styles_sha256=["2"], settings="x")


def test_journal_appends_forgets_and_survives_a_torn_line(tmp_path):
    with Journal(tmp_path) as j:
        j.append(_rec("a"))
        j.append(_rec("b", "failed"))
        with pytest.raises(AssertionError):
            j.append(_rec("a"))  # a job is never written twice
    path = tmp_path / JOURNAL_NAME
    with path.open("a") as f:
        f.write('{"job": "c", "stat')  # a crash in the middle of a line
    assert list(read_journal(path)) == ["a", "b"]
    with path.open("a") as f:  # JSON that is not a record (a report once overwrote a journal): skipped too
        f.write('\nnull\n[1, 2]\n"text"\n3.5\n{"job": [1], "status": "done", "output": "", "content": "", "content_sha256": "", "styles": [], "styles_sha256": [], "settings": ""}\n')
    assert list(read_journal(path)) == ["a", "b"]
    with Journal(tmp_path) as j:
        j.forget(["b"])
        assert list(j.records) == ["a"]
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["job"] == "a"


def test_journal_has_one_writer(tmp_path):
    with Journal(tmp_path):
        with pytest.raises(JournalBusy, match="another nst batch"):
            Journal(tmp_path).__enter__()
    with Journal(tmp_path):  # released when the first one finished
        pass


def test_settings_digest_ignores_save_every_only():
    base = settings_digest(TINY, SETTINGS)
    assert settings_digest(dataclasses.replace(TINY, save_every=1), SETTINGS) == base
    assert settings_digest(dataclasses.replace(TINY, style_weight=1.0), SETTINGS) != base
    assert settings_digest(TINY, {**SETTINGS, "precision": "bf16"}) != base


# --- running ---------------------------------------------------------------------------------------


class CountingTargets:
    """A real PyTorch target source that counts the images it was asked about."""

    name = "torch"

    def __init__(self, model):
        self.inner, self.calls = TorchTargets(model), []

    def compute(self, image, *, content_layers, style_layers):
        self.calls.append(("content" if content_layers else "style", tuple(image.shape[-2:])))
        return self.inner.compute(image, content_layers=content_layers, style_layers=style_layers)

    def describe(self):
        return self.inner.describe()


def _worker(weights, sources: list):
    from nst.engine.transfer import build_model

    def factory(*, cfg, weights, runtime):
        src = CountingTargets(build_model(cfg, weights, runtime))
        sources.append(src)
        return src, None, {"source": "counting"}

    return Worker(weights, device="cpu", precision="fp32", targets=factory)


def _jobs(folder, out: Path, cfg=TINY) -> list[Job]:
    specs = job_grid([folder["a"], folder["b"]], [(folder["s1"],), (folder["s2"],)])
    return [Job(s.name, s.content, s.styles, out / s.name, cfg) for s in specs]


def test_one_network_and_targets_once_per_style_then_rerun_skips(noise_png, folder, tmp_path, weights):
    out = tmp_path / "out"
    sources: list = []
    worker = _worker(weights, sources)
    jobs = _jobs(folder, out)
    events = []
    res = run_batch(jobs, out, InProcessRunner(worker), settings=SETTINGS, on_event=events.append)
    assert res.exit_code == 0 and len(res.done) == 4 and not res.skipped
    assert all(j.output.is_file() for j in jobs)
    # one network (one target source) for the batch; each style's targets once, each content's once
    assert len(sources) == 1
    calls = sources[0].calls
    assert sorted(k for k, _ in calls) == ["content", "content", "style", "style"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "plan" and kinds.count("started") == 4 and kinds.count("finished") == 4 and kinds.count("iterate") == 8
    recs = read_journal(out / JOURNAL_NAME)
    assert sorted(recs) == sorted(j.key for j in jobs) and all(r.status == "done" and r.steps == 2 for r in recs.values())
    r = recs["a--s1.png"]
    assert r.loss is not None and r.seconds > 0 and r.worker["device"] == "cpu" and len(r.content_sha256) == 64

    # rerun: nothing computed again
    before = {j.key: j.output.stat().st_mtime_ns for j in jobs}
    res2 = run_batch(jobs, out, InProcessRunner(worker), settings=SETTINGS)
    assert res2.exit_code == 0 and len(res2.skipped) == 4 and not res2.finished
    assert {j.key: j.output.stat().st_mtime_ns for j in jobs} == before and len(calls) == 4

    # a changed content, a deleted output and a changed setting each bring their jobs back
    noise_png(folder["a"], 48, 32, 99)
    (out / "b--s1.jpg").unlink()
    res3 = run_batch(jobs, out, InProcessRunner(worker), settings=SETTINGS)
    assert sorted(f.job.key for f in res3.finished) == ["a--s1.png", "a--s2.png", "b--s1.jpg"]
    res4 = run_batch(jobs, out, InProcessRunner(worker), settings={**SETTINGS, "precision": "bf16"})
    assert len(res4.finished) == 4
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    assert sorted(json.loads(x)["job"] for x in lines) == sorted(j.key for j in jobs)  # each job once


def test_failures_are_recorded_and_the_batch_goes_on(noise_png, folder, tmp_path, weights):
    out = tmp_path / "out"
    broken = folder["dir"] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thin = noise_png(folder["dir"] / "thin.png", 300, 4, 5)
    specs = job_grid([folder["a"], broken, thin], [(folder["s1"],)])
    jobs = [Job(s.name, s.content, s.styles, out / s.name, TINY) for s in specs]
    res = run_batch(jobs, out, InProcessRunner(_worker(weights, [])), settings=SETTINGS)
    assert res.exit_code == 1 and [f.job.key for f in res.done] == ["a--s1.png"]
    reasons = {f.job.key: f.record.reason for f in res.failed}
    assert "not an image Pillow can read" in reasons["broken--s1.png"]
    assert "too small for layer" in reasons["thin--s1.png"]
    assert all("\n" not in r for r in reasons.values())
    assert not (out / "broken--s1.png").exists()
    # a content removed after planning: a failure with its reason, not a crash
    folder["b"].unlink()
    jobs2 = [Job("gone.png", folder["b"], (folder["s1"],), out / "gone.png", TINY)]
    res2 = run_batch(jobs2, out, InProcessRunner(_worker(weights, [])), settings=SETTINGS)
    assert res2.exit_code == 1 and "image not found" in res2.failed[0].record.reason


def test_outputs_never_overwrite_inputs(folder, tmp_path):
    job = Job("a.png", folder["a"], (folder["s1"],), folder["a"], TINY)
    with pytest.raises(ValueError, match="never overwritten"):
        run_batch([job], folder["dir"], InProcessRunner(None), settings=SETTINGS)  # type: ignore[arg-type]


def test_memo_cache_keeps_targets_in_front_of_the_disk_cache():
    class Disk:
        def __init__(self):
            self.data, self.lookups = {}, 0

        def lookup(self, key):
            self.lookups += 1
            return self.data.get(key)

        def store(self, key, t):
            self.data[key] = t

    from nst.engine.targets import ImageTargets

    disk = Disk()
    memo = MemoCache(disk, max_bytes=2 * 4 * 16)
    t = ImageTargets({"x": torch.zeros(16)}, {})
    memo.store("k1", t)
    assert memo.lookup("k1") is t and disk.lookups == 0
    memo.store("k2", t)
    memo.store("k3", t)  # over the budget: the oldest goes, the disk still has it
    assert memo.lookup("k1") is t and disk.lookups == 1


def test_decode_image_from_bytes_matches_load_image(folder):
    from nst.engine.images import ImageError, decode_image, load_image

    a = decode_image(folder["b"].read_bytes(), folder["b"])
    assert np.array_equal(np.asarray(a), np.asarray(load_image(folder["b"])))
    with pytest.raises(ImageError, match="x.png: not an image"):
        decode_image(b"garbage", "x.png")


def test_ray_is_imported_only_by_the_ray_runner():
    import subprocess
    import sys

    code = (
        "import sys, nst.engine, nst.engine.jobs, nst.cli.app\n"
        "from nst.engine.jobs import run_batch, Worker, InProcessRunner\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "import nst.engine.jobs.ray_runner\n"
        "assert 'ray' in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_batch_example_runs(tmp_path, monkeypatch):
    import re

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    code = re.search(r"## Many images: `nst batch`.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("size=256, iterations=200", "size=48, iterations=2").replace('Path("out")', f"Path({str(tmp_path / 'out')!r})")
    monkeypatch.chdir(root)
    ns: dict = {}
    exec(compile(code, "README", "exec"), ns)
    assert ns["result"].exit_code == 0 and (tmp_path / "out" / "chelsea--the_scream.png").is_file()


def test_a_snapshot_that_cannot_be_written_is_one_warning_and_the_job_goes_on(folder, tmp_path, weights):
    out = tmp_path / "out"
    cfg = dataclasses.replace(TINY, iterations=3, save_every=1)
    specs = job_grid([folder["a"], folder["b"]], [(folder["s1"],)])
    jobs = [Job(s.name, s.content, s.styles, out / s.name, cfg) for s in specs]
    out.mkdir()
    for j in jobs:  # a folder where each job's first snapshot would go
        (out / f"{j.output.stem}.0001{j.output.suffix}").mkdir()
    events = []
    res = run_batch(jobs, out, InProcessRunner(_worker(weights, [])), settings=SETTINGS, on_event=events.append)
    assert res.exit_code == 0 and len(res.done) == 2
    warnings = [e for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "a--s1.0001.png" in warnings[0].message
    for f in res.finished:
        assert [p.name for p in f.snapshots_failed] == [f"{f.job.output.stem}.0001{f.job.output.suffix}"]
        assert [p.name for p in f.snapshots] == [f"{f.job.output.stem}.0002{f.job.output.suffix}"]


def test_a_killed_batchs_temporaries_are_swept_by_the_rerun(folder, tmp_path, weights, killed_writer):
    out = tmp_path / "out"
    jobs = _jobs(folder, out)[:1]
    out.mkdir()
    killed_writer(jobs[0].output, out / JOURNAL_NAME)  # as a kill -9 of a batch writing both leaves them
    assert len([p for p in out.iterdir() if p.name.endswith(".tmp")]) == 2
    res = run_batch(jobs, out, InProcessRunner(_worker(weights, [])), settings=SETTINGS)
    assert res.exit_code == 0 and res.swept == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_batch_size_optimises_same_size_jobs_together_with_the_same_results(noise_png, folder, tmp_path, weights):
    """--batch-size 2: jobs are ordered so that same-size contents meet; each pair runs as one
    tensor; the images are those of one job at a time, within rounding."""
    twin = noise_png(folder["dir"] / "twin.png", 48, 32, 7)  # the same size as a.png; b.jpg is not
    specs = job_grid([folder["a"], folder["b"], twin], [(folder["s1"],)])
    cfg = dataclasses.replace(TINY, iterations=3)
    results = {}
    for size in (1, 2):
        out = tmp_path / f"out{size}"
        jobs = [Job(s.name, s.content, s.styles, out / s.name, cfg) for s in specs]
        worker = Worker(weights, device="cpu", precision="fp32")
        events = []
        res = run_batch(jobs, out, InProcessRunner(worker, batch_size=size), settings=SETTINGS, on_event=events.append, group_sizes=size > 1)
        assert res.exit_code == 0 and len(res.done) == 3
        results[size] = {j.key: np.asarray(Image.open(j.output), dtype=np.int16) for j in jobs}
        if size == 2:
            recs = read_journal(out / JOURNAL_NAME)
            assert recs["a--s1.png"].worker["batch"] == 2 and recs["twin--s1.png"].worker["batch"] == 2
            assert "batch" not in recs["b--s1.jpg"].worker
            started = [e.job.key for e in events if e.kind == "started"]
            assert started[:2] == ["a--s1.png", "twin--s1.png"]  # the same-size pair first
    for key in results[1]:
        assert np.abs(results[1][key] - results[2][key]).max() <= 1, key


def test_batch_size_must_be_positive(weights):
    with pytest.raises(ValueError, match="batch_size must be 1 or more"):
        InProcessRunner(Worker(weights, device="cpu", precision="fp32"), batch_size=0)


def test_stopping_a_batched_run_keeps_latest_images_and_starts_nothing_more(noise_png, folder, weights):
    """StopRun (what Ctrl-C does) in the first group: its jobs are interrupted with their latest
    images; a second group (another size) is not started."""
    from nst.engine.jobs import read_input
    from nst.engine.transfer import StopRun

    twin = noise_png(folder["dir"] / "twin.png", 48, 32, 7)
    cfg = dataclasses.replace(TINY, iterations=50)
    jobs = [Job(f"{p.stem}.png", p, (folder["s1"],), p, cfg) for p in (folder["a"], twin, folder["b"])]

    def stop(job, it):
        if it.step == 2:
            raise StopRun

    outs = Worker(weights, device="cpu", precision="fp32").run_many([read_input(j) for j in jobs], on_iterate=stop)
    assert [o.status for o in outs] == ["interrupted", "interrupted", "interrupted"]
    assert [o.result.steps for o in outs[:2]] == [2, 2] and outs[0].result.image.shape == (1, 3, 21, 32)
    assert outs[2].result is None and outs[2].reason == "not started"


def test_a_memory_plan_runs_tiled_jobs_alone_and_groups_only_what_fits_together(noise_png, folder, weights):
    """With `memory`, each job runs by its own plan, made on the worker: a tiled job runs alone
    (tile by tile, the whole image's result within rounding), same-size whole jobs share a tensor
    only as far as their estimates added up fit the budget, and a budget too small for any tile
    is the job's one-line reason."""
    from nst.engine.device import Runtime
    from nst.engine.jobs import read_input
    from nst.engine.plan import OVERHEAD, TileMode
    from nst.engine.transfer import MemoryRequest, plan_for

    twin = noise_png(folder["dir"] / "twin.png", 48, 32, 7)  # a.png's size
    cfg = dataclasses.replace(TINY, size=48, scales=(48,), iterations=3)
    jobs = [Job(f"{p.stem}.png", p, (folder["s1"],), p, cfg) for p in (folder["a"], twin)]
    inputs = [read_input(j) for j in jobs]
    style = Image.open(folder["s1"]).size
    whole = plan_for((48, 32), [style], cfg, Runtime(device=torch.device("cpu")), MemoryRequest(tile=TileMode.OFF)).estimated_peak_bytes

    def run(memory):
        return Worker(weights, device="cpu", precision="fp32", memory=memory).run_many(inputs)

    free = run(None)
    assert all(o.status == "done" and o.worker["batch"] == 2 and o.plan is None for o in free)
    tiled = run(MemoryRequest(tile=16))
    for o, ref in zip(tiled, free):
        assert o.status == "done" and "batch" not in o.worker, o.reason
        assert o.plan["stages"][-1]["mode"] == "tiled" and o.plan["stages"][-1]["tiles"] > 1
        assert (o.result.image - ref.result.image).abs().max() * 255 <= 1
    one = run(MemoryRequest(budget=int(1.5 * whole), tile=TileMode.OFF))
    assert all(o.status == "done" and "batch" not in o.worker and o.plan["stages"][-1]["mode"] == "whole" for o in one)
    two = run(MemoryRequest(budget=int(2.5 * whole), tile=TileMode.OFF))
    assert all(o.status == "done" and o.worker["batch"] == 2 for o in two)
    # Together they hold the network's weights (and a target session) once: two fit in twice the
    # estimate less that share, not in a byte less.
    need = one[0].plan["estimated_peak_bytes"]
    peak = max(one[0].plan["stages"], key=lambda st: st["estimated_peak_bytes"])
    shared = int((peak["parts"]["weights"] + peak["parts"].get("source", 0)) * (1 + OVERHEAD))
    assert 0 < shared < need
    fits = run(MemoryRequest(budget=2 * need - shared, tile=TileMode.OFF))
    assert all(o.status == "done" and o.worker["batch"] == 2 for o in fits)
    apart = run(MemoryRequest(budget=2 * need - shared - 1, tile=TileMode.OFF))
    assert all(o.status == "done" and "batch" not in o.worker for o in apart)
    small = run(MemoryRequest(budget=1000))
    assert all(o.status == "failed" and "`max_memory` 1.0 kB is too small" in o.reason and o.result is None for o in small)
