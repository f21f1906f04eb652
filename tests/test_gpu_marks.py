"""`pytest -m gpu` selects every CUDA-only test: the GPU run's first step relies on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# What the GPU run must exercise (benchmarks/README.md): ONNX Runtime's I/O binding, the
# CUDA-graph step, the sync-free L-BFGS step (its history on the device, and streamed from host
# memory), the bf16 Gram on the tensor cores, strict fp32.
EXPECTED = (
    "tests/engine/test_onnx_targets.py::test_cuda_io_binding_matches_cpu",
    "tests/engine/test_gpu.py::test_replayed_cuda_graph_adam_step_equals_the_eager_step[fp32]",
    "tests/engine/test_gpu.py::test_replayed_cuda_graph_adam_step_equals_the_eager_step[bf16]",
    "tests/engine/test_gpu.py::test_lbfgs_step_never_synchronises_with_the_host",
    "tests/engine/test_gpu.py::test_bf16_gram_runs_on_the_tensor_cores_and_matches_fp32",
    "tests/engine/test_gpu.py::test_fp32_means_fp32_on_the_gpu",
    "tests/engine/test_gpu.py::test_host_history_saves_its_size_on_the_gpu_and_matches_the_device_history",
    "tests/engine/test_gpu.py::test_host_history_step_never_synchronises_with_the_host",
)


def test_pytest_m_gpu_collects_the_cuda_tests():
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(
        # -P: keep the repository root off sys.path, as a plain `pytest` does (Python 3.11+)
        [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    listed = set(run.stdout.split())
    missing = [t for t in EXPECTED if t not in listed]
    assert not missing, f"not selected by -m gpu: {missing}\n{run.stdout[-2000:]}"


def test_cuda_only_tests_skip_through_the_gpu_mark_alone():
    """A `skipif(not torch.cuda.is_available())` hides a CUDA test from `-m gpu`: use the mark."""
    pattern = re.compile(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)")
    offenders = [str(p.relative_to(ROOT)) for p in TESTS.rglob("*.py") if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert offenders == []
