"""Shared fixtures: tiny images written per test, seeded random weights, a private cache folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`), each worker gets its share of the cores as its thread count,
    set before torch loads so that the processes a test starts inherit it: N workers with every
    core each would oversubscribe the CPU. Tests here are small images, which one thread runs
    almost as fast as two."""
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(_worker_cores())


def _worker_cores() -> int:
    """The cores this test process may keep busy: all of them, or its share under pytest-xdist."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


@pytest.fixture(scope="session")
def worker_cores() -> int:
    """How many processes a test may run at once without crowding another worker's tests."""
    return _worker_cores()


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`-n N` alone (xdist's `load`) hands out whole test files, as `--dist loadfile` does: the
    module-scoped fixtures here (an export per module, a Ray cluster) are then made once, not once
    per worker. Any other `--dist` is xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `gpu` is skipped where no CUDA GPU is visible. The mark is the only switch,
    so `pytest -m gpu` selects every CUDA-only test; a CUDA test without it fails here, loudly.
    A test marked `bf16` (it runs bf16 on the CPU by name, for minutes) is skipped where the CPU
    has no bf16 units: there torch emulates bf16, over ten times slower than fp32 (a 3x3
    convolution's forward and backward measured 13x on an AVX2 EPYC), and those tests alone took
    13 of the suite's 24 minutes. bf16's numerics are the same either way; these tests run on a
    CPU with AVX512-BF16 or AMX, and `pytest -m gpu` checks bf16 on a GPU."""
    import torch

    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
        for item in gpu:
            item.add_marker(skip)
    bf16 = [item for item in items if item.get_closest_marker("bf16") is not None]
    if bf16:
        from nst.engine.config import Precision
        from nst.engine.device import is_emulated

        if is_emulated(torch.device("cpu"), Precision.BF16):
            skip = pytest.mark.skip(reason="bf16 is emulated on this CPU (no AVX512-BF16 or AMX): minutes per test (marked bf16)")
            for item in bf16:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder and no downloads: nothing leaks into ~/.cache."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NST_CACHE_DIR", str(d))
    monkeypatch.setenv("NST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(d / "torch-home"))
    return d


@pytest.fixture(scope="session")
def weights():
    from nst.engine.weights import random_weights

    return random_weights(seed=0)


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + seed)) , np.cos(yy / (4 + seed)), np.sin((xx + yy) / 5)], -1)
    a = (base * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1)
    return Image.fromarray((a * 255).astype(np.uint8), "RGB")


@pytest.fixture
def noise_png():
    """Writes a w x h image of seeded uniform noise to a path (its format by the extension) and
    returns the path: inputs whose sizes a test chooses."""

    def write(path: Path, w: int, h: int, seed: int) -> Path:
        rng = np.random.default_rng(seed)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        return path

    return write


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """A 96x64 content and two 64x64 style images as PNG/JPEG files."""
    paths = {"content": tmp_path / "content.png", "style": tmp_path / "style.jpg", "style2": tmp_path / "style2.png"}
    _pattern(96, 64, 1).save(paths["content"])
    _pattern(64, 64, 2).save(paths["style"], quality=95)
    _pattern(64, 64, 3).save(paths["style2"])
    return paths


@pytest.fixture(scope="module")
def exported_store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A cache folder whose model store holds the random weights' export for the test module's
    `LAYERS` (CLI flags), made by `nst export` once per module."""
    from typer.testing import CliRunner

    from nst.cli.app import app

    d = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.setenv("NST_CACHE_DIR", str(d))
    try:
        r = CliRunner().invoke(app, ["export", "--weights", "random", *request.module.LAYERS])
        assert r.exit_code == 0, r.output
    finally:
        mp.undo()
    return d


@pytest.fixture
def models_cache(exported_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder (NST_CACHE_DIR) per test holding a copy of `exported_store`'s models:
    no second export."""
    import shutil

    d = tmp_path / "cache"
    shutil.copytree(exported_store / "models", d / "models")
    monkeypatch.setenv("NST_CACHE_DIR", str(d))
    return d


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


def _mount_full_tmpfs(where: Path) -> bool:
    """A tiny tmpfs at `where`, filled to the last byte; False where mounting is not allowed (not root)."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(where)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    if r.returncode != 0:
        return False
    try:
        with open(where / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:  # ENOSPC: full
        pass
    return True


@pytest.fixture
def full_disk(tmp_path: Path):
    """A real full filesystem (a 64 KiB tmpfs with no byte free): writes there fail with ENOSPC.

    Needs the right to mount (root); skipped elsewhere.
    """
    import subprocess

    where = tmp_path / "full"
    if not _mount_full_tmpfs(where):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


# A process that dies inside write_atomic (SIGKILL while it writes each path in argv) after it
# starts an export into the model store of the cache folder in $NST_CACHE_DIR, if argv[1] is
# "export" (relu1_1 only: a model no test stores).
_KILLED_WRITER = r"""
import os, sys, threading, time
from pathlib import Path
from nst.engine.files import write_atomic

def block(tmp):
    tmp.write_bytes(b"x" * 1000)
    ready.release()
    time.sleep(600)

ready = threading.Semaphore(0)
paths = [Path(p) for p in sys.argv[2:]]
for p in paths:
    threading.Thread(target=write_atomic, args=(p, block), daemon=True).start()
for _ in paths:
    ready.acquire()
print("writing", flush=True)
if sys.argv[1] == "export":
    from nst.engine.weights import random_weights
    from nst.export import ModuleSpec, export_to_store
    export_to_store(Path(os.environ["NST_CACHE_DIR"]), random_weights(seed=0), ModuleSpec(("relu1_1",), ("relu1_1",)))
time.sleep(600)
"""


@pytest.fixture
def killed_writer():
    """`kill(*paths, export=False, until=None)`: run a real process that writes `paths` through
    write_atomic (and, with export, exports into the store), SIGKILL it once `until()` is true,
    and reap it; returns its pid. Its temporaries stay behind, as a kill -9 leaves them."""
    import subprocess
    import sys
    import time

    def kill(*paths: Path, export: bool = False, until=None) -> int:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, "export" if export else "-", *map(str, paths)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
            deadline = time.monotonic() + 120
            while until is not None and not until():
                assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it could be killed"
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait()  # reaped: its pid no longer names a process
        return proc.pid

    return kill


class DeviceContexts:
    """Stands in for `nst.engine.device.device_context`: records each device it is entered for and
    which one is current, so that CPU tests can check code runs under the right CUDA device."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.entered: list[object] = []
        self.current: object = None

    @contextlib.contextmanager
    def _context(self, device: object) -> Iterator[None]:
        self.entered.append(device)
        outer, self.current = self.current, device
        try:
            yield
        finally:
            self.current = outer

    def patch(self, *modules: object) -> None:
        """Replace `device_context` in each module (each imported it by name)."""
        for m in modules:
            self._monkeypatch.setattr(m, "device_context", self._context)


@pytest.fixture
def device_contexts(monkeypatch: pytest.MonkeyPatch) -> DeviceContexts:
    return DeviceContexts(monkeypatch)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local Ray cluster of two CPUs, one per test module; its address. Its workers inherit
    the environment it starts with, so it gets a private cache folder and no downloads."""
    ray = pytest.importorskip("ray")
    from filelock import FileLock

    # One cluster at a time: under pytest-xdist another worker's module may want one too, and two
    # clusters on two cores starve each other (a 27 s test took 120 s). The lock is in the folder
    # that every worker's temporary folder is in; the kernel drops it if this process dies.
    lock = FileLock(str(tmp_path_factory.getbasetemp().parent / "nst-ray-cluster.lock"))
    with lock:
        cache = tmp_path_factory.mktemp("ray-cache")
        env = {"NST_CACHE_DIR": str(cache), "NST_OFFLINE": "1", "TORCH_HOME": str(cache / "torch-home")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()


@pytest.fixture
def interrupted_stylize(images: dict[str, Path], tmp_path: Path):
    """`run(*options, env=...)`: `nst stylize` on the test images in a subprocess, 48 px, saving
    every iteration, sent SIGINT (or `sig`) once the first snapshot is on disk; (exit code, stderr, output)."""

    def run(*options: str, env: dict[str, str] | None = None, sig: int = signal.SIGINT) -> tuple[int, str, Path]:
        out = tmp_path / "int.png"
        cmd = [sys.executable, "-c", "from nst.cli.app import main; main()", "stylize", str(images["content"]), str(images["style"]),
               "-o", str(out), "--weights", "random", "--size", "48", "--iterations", "100000", "--targets", "torch", "--save-every", "1", *options]  # fmt: skip
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env if env is not None else os.environ.copy())
        deadline = time.time() + 120
        while not (tmp_path / "int.0001.png").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        return p.returncode, err, out

    return run


def _as_format_1(model: Path, out: Path) -> Path:
    """What an nst of export format 1 wrote for the same layers: no style-feature outputs, format
    "1" in its metadata (the graph otherwise the same). Written to `out`."""
    import onnx

    from nst.engine import onnx_meta as M

    m = onnx.load(str(model))
    kept = [o for o in m.graph.output if not o.name.startswith(M.feature_output(""))]
    del m.graph.output[:]
    m.graph.output.extend(kept)
    for p in m.metadata_props:
        if p.key == M.K_FORMAT:
            p.value = "1"
    onnx.save(m, str(out))
    return out


@pytest.fixture
def as_format_1():
    """`as_format_1(model, out)`: a copy of an exported model as export format 1 wrote it."""
    return _as_format_1
