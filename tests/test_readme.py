"""The README's Python example runs as written (at a smaller size)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs(tmp_path: Path):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("size=256, iterations=200", "size=48, iterations=2")
    cwd = os.getcwd()
    os.chdir(README.parent)
    try:
        ns: dict = {}
        exec(compile(code.replace('"out.png"', repr(str(tmp_path / "out.png"))), "README", "exec"), ns)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "out.png").is_file() and ns["result"].status == "done"


def test_readme_documents_every_stylize_option():
    from typer.main import get_command

    from nst.cli.app import app

    text = README.read_text()
    cmd = get_command(app).commands["stylize"]  # type: ignore[attr-defined]
    missing = [o for p in cmd.params for o in p.opts if o.startswith("--") and o not in text and o != "--help"]
    assert not missing, f"options not in the README: {missing}"


def test_readme_layout_names_every_module():
    """The README's layout section names each module of the three packages, and no module that is gone."""
    import re

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    on_disk = {p.name for pkg in ("engine", "export", "cli") for p in (root / pkg).glob("*.py") if p.name != "__init__.py"}
    on_disk |= {p.name + "/" for pkg in ("engine",) for p in (root / pkg).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    named = set(re.findall(r"`([a-z_]+\.py|[a-z_]+/)`", layout)) - {"tests/"}
    assert on_disk - named == set(), f"modules the layout does not name: {sorted(on_disk - named)}"
    assert named - on_disk == set(), f"the layout names modules that are gone: {sorted(named - on_disk)}"
