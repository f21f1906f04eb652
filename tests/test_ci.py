"""`.ci/run` starts from a fresh virtual environment every time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parent.parent / ".ci" / "run"


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_ci_venv_is_recreated_not_reused(tmp_path: Path):
    """Run the script's own venv line twice over a folder with a stale file: the second run must
    leave an empty environment (`--clear`), not the first one's leftovers."""
    lines = [line.strip() for line in CI.read_text().splitlines() if " -m venv " in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    venv_line = lines[0] + " --without-pip"  # pip's bootstrap is beside the point and slow
    subprocess.run(["bash", "-c", venv_line], cwd=tmp_path, check=True, timeout=120)
    folder = tmp_path / ".ci-venv"
    stale = folder / "lib" / "stale-package-from-last-run"
    stale.write_text("x")
    subprocess.run(["bash", "-c", venv_line], cwd=tmp_path, check=True, timeout=120)
    assert (folder / "bin" / "python").exists() and not stale.exists()


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` ends by running the README's test command (quietly: `-q` is the only addition)."""
    import re
    import shlex

    readme = (CI.parent.parent / "README.md").read_text()
    block = re.search(r"## Test\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "the README's Test section has no bash block"
    (command,) = [line for line in block.group(1).splitlines() if line.strip()]
    last = [line for line in CI.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")][-1]
    assert [a for a in shlex.split(last) if a != "-q"] == shlex.split(command), (last, command)
