"""benchmarks/gpu_run.sh on the CPU: its syntax, its commands, and its install step for real (a
wheel with a console script of its own, carried in parts, beside nst), then a step through the
installed `nst` with the GPU parts reported as skipped."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils")


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "SITE": str(tmp_path / "site"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=900, cwd=tmp_path)


def _wheel_with_a_console_script() -> bytes:
    """A minimal pure-Python wheel whose console script makes `--target`'s bin/ before nst's."""
    files = {
        "dummy_tool.py": "def main():\n    print('dummy tool')\n",
        "dummy_tool-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: dummy-tool\nVersion: 1.0\n",
        "dummy_tool-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: nst-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "dummy_tool-1.0.dist-info/entry_points.txt": "[console_scripts]\ndummy-tool = dummy_tool:main\n",
    }
    files["dummy_tool-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in [*files, "dummy_tool-1.0.dist-info/RECORD"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


@needs_bash
def test_script_parses_and_a_dry_run_names_every_command(tmp_path: Path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("big-1.0-py3-none-any.whl.part-00", "big-1.0-py3-none-any.whl.part-01", "small-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    run = _run([str(wheels)], tmp_path, DRY_RUN="1")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    # One pip call for every wheel and nst, then PATH and PYTHONPATH on the private target.
    pip = [line for line in out.splitlines() if " -m pip install " in line]
    assert len(pip) == 1 and "--target" in pip[0] and "big-1.0-py3-none-any.whl " in pip[0] and "small-1.0-py3-none-any.whl" in pip[0]
    assert pip[0].rstrip().endswith(str(ROOT))
    assert f"export PYTHONPATH={tmp_path / 'site'} PATH={tmp_path / 'site'}/bin:$PATH" in out
    assert "-m pytest -m gpu" in out
    assert "nst bench --device cuda --weights random --sizes 512,1024,2048,4096 --precision fp32,tf32,bf16 --optimizer lbfgs,adam" in out
    assert "--cuda-graph" in out and "--iterations 1000" in out and f"--report {tmp_path / 'out'}/stylize.json" in out
    assert (tmp_path / "out" / "run.log").read_text().count("+ ") >= 6


@needs_bash
@pytest.mark.parametrize(
    ("step", "command"),
    [
        # Issue 11's print sizes, in tiles (its JSON is one more file back).
        ("large", "--sizes 8192,16384 --precision bf16 --optimizer adam --tile 2048 --iterations 2"),
        # Issue 11's overhead: whole and tiled rows of the same sizes in one bench call.
        ("tiles", "--sizes 2048,4096 --precision bf16,fp32 --optimizer adam --tile off,1024,2048 --iterations 20"),
    ],
)
def test_issue_11s_steps_bench_in_tiles(tmp_path: Path, step: str, command: str):
    run = _run(["-", step], tmp_path, DRY_RUN="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (f"nst bench --device cuda --weights random {command} --warmup 1 --no-optimizer-phase --no-targets-phase"
            f" --json {tmp_path / 'out'}/{step}.json") in run.stdout


@needs_bash
def test_unknown_step_is_one_error(tmp_path: Path):
    run = _run(["-", "benchmark"], tmp_path, DRY_RUN="1")
    assert run.returncode == 2 and "error: unknown step benchmark" in run.stdout


@needs_bash
def test_a_missing_part_stops_the_install_with_the_reason(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = _wheel_with_a_console_script()
    name = "dummy_tool-1.0-py3-none-any.whl"
    (wheels / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (wheels / f"{name}.part-00").write_bytes(data[: len(data) // 2])  # part-01 never arrived
    run = _run([str(wheels), "install"], tmp_path)
    assert run.returncode == 1
    assert "do not match" in run.stdout and "install   FAILED" in run.stdout
    assert not (tmp_path / "site").exists()


@pytest.mark.slow
@needs_bash
def test_install_keeps_every_console_script_and_nst_runs_from_the_target(tmp_path: Path):
    """The runbook's old two `pip install --target` calls dropped nst's script when another wheel
    had made bin/ first; the script's one call keeps both, and the steps run the installed nst."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = _wheel_with_a_console_script()
    name = "dummy_tool-1.0-py3-none-any.whl"
    (wheels / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    half = len(data) // 2
    (wheels / f"{name}.part-00").write_bytes(data[:half])
    (wheels / f"{name}.part-01").write_bytes(data[half:])
    # DEVICE=cpu runs the graph step's command for real (its rows are skipped on the CPU: not a
    # measurement); DEVICE=cuda without a GPU skips the step.
    # fp32 alone: bf16 without the CPU's bf16 units takes minutes even at 32 px.
    run = _run([str(wheels), "install", "graph"], tmp_path, DEVICE="cpu", GRAPH_SIZES="32", GRAPH_PRECISIONS="fp32", ITERATIONS="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "bin" / "nst").is_file() and (site / "bin" / "dummy-tool").is_file()
    assert "wheels match SHA256SUMS" in run.stdout
    assert f"nst from {site}" in run.stdout
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    help_run = subprocess.run(["nst", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert help_run.returncode == 0 and "stylize" in help_run.stdout
    assert "graph.json: " in run.stdout and "CUDA graphs need a CUDA device" in run.stdout
    # The eager twins ran on the same machine, in the same step, and the summary pairs them.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["graph-eager.json", "graph.json", "run.log"]
    assert '"cuda_graph": true' not in (tmp_path / "out" / "graph-eager.json").read_text()
    # A second run with the same wheels and sources reuses the target; DEVICE=cuda skips GPU steps.
    again = _run([str(wheels), "graph"], tmp_path, DEVICE="cuda")
    assert "not reinstalled" in again.stdout
    if "torch sees no CUDA GPU" in again.stdout:
        assert again.returncode == 0 and "graph     skipped (no GPU)" in again.stdout


@needs_bash
def test_the_lease_script_parses_and_names_its_phases(tmp_path: Path):
    """benchmarks/gpu_lease.sh, the run fitted to a 15-minute lease: its phases are start, part and
    finish; anything else is its usage and exit status 2, before it touches anything."""
    lease = ROOT / "benchmarks" / "gpu_lease.sh"
    assert subprocess.run(["bash", "-n", str(lease)]).returncode == 0
    run = subprocess.run(["bash", str(lease), "begin"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "usage:" in run.stderr and "start|part|finish" in run.stderr
    assert "gpu_run.sh" in lease.read_text()  # it drives the same steps
