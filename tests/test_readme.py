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


def _anchors(text: str) -> set[str]:
    """GitHub's anchors: each heading's slug (lower case, punctuation but `-` and `_` dropped,
    spaces as `-`, a repeated one numbered) and every `<a id="...">`."""
    seen: dict[str, int] = {}
    out = set(re.findall(r'<a id="([^"]+)"', text))
    body = re.sub(r"```.*?```", "", text, flags=re.S)  # a `#` comment in a code block is no heading
    for title in re.findall(r"^#{1,6} +(.+?) *$", body, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_link_to_a_section_finds_it():
    """`[below](#x)` in the README, and links between it and benchmarks/README.md, name a heading
    or an `<a id>` that is there (two pointed at bold paragraphs, which have no anchor)."""
    bench = README.parent / "benchmarks" / "README.md"
    texts = {README: README.read_text(), bench: bench.read_text()}
    targets = {README: {"": README, "README.md": README, "../README.md": README, "benchmarks/README.md": bench},
               bench: {"": bench, "README.md": bench, "../README.md": README}}  # fmt: skip
    broken = []
    for path, text in texts.items():
        for file, anchor in re.findall(r"\]\(((?:\.\./)?(?:benchmarks/)?(?:README\.md)?)#([^)\s]+)\)", text):
            target = targets[path].get(file)
            if target is not None and anchor not in _anchors(texts[target]):
                broken.append(f"{path.name if path == README else 'benchmarks/README.md'}: {file}#{anchor}")
    assert broken == []
