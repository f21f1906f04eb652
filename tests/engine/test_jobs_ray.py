"""The Ray runner on a real local cluster of two CPU workers (one cluster for the module):
byte-identical to the in-process run, a worker killed mid-job, a driver killed and resumed, a bad
image, and a journal that never holds a job twice."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine.config import GATYS
from nst.engine.jobs import JOURNAL_NAME, InProcessRunner, Job, Worker, job_grid, read_journal, run_batch
from nst.engine.jobs.ray_runner import RayRunner

pytestmark = pytest.mark.slow
runner = CliRunner()
FAST = ["--weights", "random", "--size", "32", "--iterations", "3", "--targets", "torch", "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_2", "--threads", "1"]


@pytest.fixture
def files(tmp_path: Path, noise_png) -> dict[str, Path]:
    d = tmp_path / "photos"
    d.mkdir()
    for i, (w, h) in enumerate([(48, 32), (32, 48), (40, 40)]):
        noise_png(d / f"p{i}.png", w, h, i)
    return {"dir": d, "style": noise_png(tmp_path / "style.png", 40, 40, 9), "tmp": tmp_path}


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / JOURNAL_NAME).read_text().splitlines()]


def _images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png")) if not p.name.startswith(".")}


def test_ray_batch_is_byte_identical_to_in_process_and_records_a_bad_image(cluster, files):
    (files["dir"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    local, remote = files["tmp"] / "local", files["tmp"] / "ray"
    args = ["batch", str(files["dir"]), "--style", str(files["style"]), *FAST]
    r1 = runner.invoke(app, [*args, "-o", str(local), "-q"])
    r2 = runner.invoke(app, [*args, "-o", str(remote), "--ray", "--report", str(files["tmp"] / "r.json"), "-q"])
    for r in (r1, r2):
        assert r.exit_code == 1, r.output
        assert "1 of 4 job(s) failed" in r.output
    a, b = _images(local), _images(remote)
    assert sorted(a) == ["p0--style.png", "p1--style.png", "p2--style.png"]
    assert a == b  # the same bytes from the cluster's workers as from this process
    recs = _lines(remote)
    assert len(recs) == 4 and len({x["job"] for x in recs}) == 4
    bad = [x for x in recs if x["status"] == "failed"]
    assert [x["job"] for x in bad] == ["broken--style.png"] and "not an image Pillow can read" in bad[0]["reason"]
    assert all(x["worker"]["pid"] != os.getpid() and x["worker"]["threads"] == 1 for x in recs if x["status"] == "done")
    rep = json.loads((files["tmp"] / "r.json").read_text())
    assert rep["runner"]["runner"] == "ray" and rep["runner"]["per_worker"] == {"num_cpus": 1} and len(rep["runner"]["workers"]) == 2


def test_a_worker_killed_mid_job_is_retried_on_another_and_written_once(cluster, files, weights):
    out = files["tmp"] / "out"
    # About 3.7 s a job on one thread here: the kill, 1 s after the driver hears "started", lands
    # mid-job. At 250 iterations (1.7 s) a job could end before it, and the kill hit an idle worker.
    # Every iteration run (no lbfgs_patience): this small problem stops improving long before 1000.
    cfg = dataclasses.replace(GATYS, size=32, iterations=1000, style_layers=("relu1_1",), content_layers=("relu1_2",), lbfgs_patience=0)
    contents = sorted(files["dir"].glob("*.png"))
    jobs = [Job(s.name, s.content, s.styles, out / s.name, cfg) for s in job_grid(contents, [(files["style"],)])]
    killed: list[int] = []
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "started" and not killed:
            killed.append(int(e.worker["pid"]))
            threading.Timer(1.0, os.kill, (killed[0], signal.SIGKILL)).start()

    rr = RayRunner(weights=weights, device="cpu", precision="fp32", threads=1)
    res = run_batch(jobs, out, rr, settings={"w": 1}, on_event=on_event)
    assert res.exit_code == 0, [f.record.reason for f in res.failed]
    retries = [e for e in events if e.kind == "retry"]
    assert len(retries) == 1 and "died" in retries[0].message
    victim = retries[0].job.key
    recs = read_journal(out / JOURNAL_NAME)
    assert sorted(recs) == sorted(j.key for j in jobs)
    assert recs[victim].attempts == 2 and recs[victim].worker["pid"] != killed[0] and recs[victim].steps == cfg.iterations
    assert all(r.attempts == 1 for k, r in recs.items() if k != victim)
    lines = _lines(out)
    assert len(lines) == 3 and len({x["job"] for x in lines}) == 3  # written once
    # the retried job's image is the one this process computes for it
    job = next(j for j in jobs if j.key == victim)
    mine = files["tmp"] / "mine"
    here = run_batch([dataclasses.replace(job, output=mine / job.key)], mine, InProcessRunner(Worker(weights, device="cpu", precision="fp32", threads=1)), settings={"w": 1})
    assert here.exit_code == 0 and (mine / job.key).read_bytes() == job.output.read_bytes()


def test_a_killed_driver_is_resumed_by_running_the_same_command(cluster, files):
    out = files["tmp"] / "out"
    args = ["batch", str(files["dir"]), "--style", str(files["style"]), "-o", str(out), *FAST, "--iterations", "150", "-q"]
    cmd = [sys.executable, "-c", "from nst.cli.app import main; main()", *args, "--ray-address", cluster]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    journal = out / JOURNAL_NAME
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not (journal.exists() and journal.read_text().count("\n") >= 1):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1]
    p.kill()  # SIGKILL: no cleanup of any kind
    p.communicate(timeout=60)
    before = _lines(out)
    assert 1 <= len(before) < 3 and all(x["status"] == "done" for x in before)

    r = runner.invoke(app, [*args, "--ray-address", cluster])  # the same command again
    assert r.exit_code == 0, r.output
    after = _lines(out)
    assert sorted(x["job"] for x in after) == ["p0--style.png", "p1--style.png", "p2--style.png"]
    assert after[: len(before)] == before  # the finished jobs were skipped, their lines untouched
    assert len(_images(out)) == 3


def test_ray_workers_optimise_batches_too(noise_png, cluster, files):
    """--batch-size 2 on the cluster: the same bytes as --batch-size 2 in this process."""
    noise_png(files["dir"] / "p3.png", 48, 32, 3)  # p0 and p3 have the same size
    local, remote = files["tmp"] / "local", files["tmp"] / "ray"
    args = ["batch", str(files["dir"]), "--style", str(files["style"]), *FAST, "--batch-size", "2", "-q"]
    assert runner.invoke(app, [*args, "-o", str(local)]).exit_code == 0
    r = runner.invoke(app, [*args, "-o", str(remote), "--ray"])
    assert r.exit_code == 0, r.output
    assert _images(local) == _images(remote) and len(_images(remote)) == 4
    recs = {x["job"]: x for x in _lines(remote)}
    assert len(recs) == 4 and any(x["worker"].get("batch") == 2 for x in recs.values())


def test_batch_and_video_workers_are_sized_alike(cluster, weights):
    """One rule for both runners: more --threads than the cluster's CPUs is one warning and one
    worker of all its CPUs; fewer divides the CPUs among workers."""
    from nst.engine.jobs.ray_runner import ray_capacity
    from nst.engine.video.ray_runner import ClipRayRunner

    said: list[str] = []
    assert ray_capacity("cpu", 8, on_warning=said.append) == (1, {"num_cpus": 2}, 2)
    assert said == ["--threads 8 is more than the Ray cluster's 2 CPUs; using one worker of 2 threads"]
    assert ray_capacity("auto", 1, on_warning=said.append) == (2, {"num_cpus": 1}, 1) and len(said) == 1
    clips = ClipRayRunner(weights=weights, device="cpu", threads=8, address=cluster, on_warning=said.append)
    assert (clips.workers, clips.ask, clips.threads) == (1, {"num_cpus": 2}, 2) and len(said) == 2
    batch = RayRunner(weights=weights, device="cpu", threads=1, address=cluster)
    assert batch.describe()["max_workers"] == 2 and batch.describe()["per_worker"] == {"num_cpus": 1}
