"""The CLI's top level: help that answers without importing torch, `-h`, `--version`, whole summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from nst.cli.app import app

runner = CliRunner()
HEAVY = ("torch", "onnx", "onnxruntime")

# Run in a fresh interpreter: this test process has imported torch long ago.
_STARTUP = r"""
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from nst.cli.app import app

runner = CliRunner()

def walk(cmd, path):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from walk(sub, path + [name])

codes = {}
for path in walk(get_command(app), []):
    for flag in ("--help", "-h"):
        codes[" ".join(path + [flag])] = runner.invoke(app, path + [flag]).exit_code
for args in (["--version"], ["cache", "info"], ["cache", "info", "--json"], ["weights", "status"], ["weights", "status", "--json"]):
    r = runner.invoke(app, args)
    codes[" ".join(args)] = r.exit_code
    if r.exit_code:
        print(r.output, file=sys.stderr)
print(json.dumps({"codes": codes, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_help_version_cache_info_and_weights_status_do_not_import_torch(tmp_path: Path):
    """Structural: importing the app and answering these leaves torch, onnx and onnxruntime unloaded
    (`import torch` alone takes about a second). A torch hub file is present, so status hashes it."""
    from nst.cli.common import torch_hub_dir

    hub_file = torch_hub_dir() / "checkpoints" / "vgg19-dcbb9e9d.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"not torchvision's file")
    p = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"imported at the CLI's top level: {out['loaded']}"
    assert set(out["codes"].values()) == {0}, out["codes"]
    assert {"--help", "-h", "stylize -h", "weights status --help", "cache clear -h", "bench --help"} <= set(out["codes"])


def test_engine_names_load_on_first_use():
    code = (
        "import sys, nst.engine as E\n"
        "from nst.engine import config, preset\n"
        "assert preset('seed').optimizer.value == 'adam'\n"
        "assert 'torch' not in sys.modules, 'config imported torch'\n"
        "from nst.engine import stylize, random_weights, WeightsError\n"
        "assert callable(stylize) and random_weights(seed=0).kind == 'random' and 'torch' in sys.modules\n"
        "assert set(E.__all__) <= set(dir(E))\n"
        "try:\n    E.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def _commands(cmd, path=()):
    for name, sub in getattr(cmd, "commands", {}).items():
        yield cmd, path, name, sub
        yield from _commands(sub, (*path, name))


def test_help_summaries_are_whole_sentences_at_80_columns():
    """`nst --help` shows each command's first line whole, never cut mid-parenthesis with '...'."""
    for group, path, name, cmd in _commands(get_command(app)):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0
        summary = " ".join((cmd.help or "").split("\n\n")[0].split())
        rows = [line.split(None, 1) for line in r.output.splitlines() if line.startswith(f"  {name} ")]
        assert rows and rows[0][1].strip() == summary, (path, name, rows, summary)
        assert not summary.endswith("...") and summary.count("(") == summary.count(")")
        assert all(len(line) <= 80 for line in r.output.splitlines()), r.output


def test_dash_h_is_help_everywhere():
    for _, path, name, _ in [(None, (), None, None), *_commands(get_command(app))]:
        args = [*path, name] if name else []
        long, short = runner.invoke(app, [*args, "--help"]), runner.invoke(app, [*args, "-h"])
        assert short.exit_code == 0 and short.output == long.output and "-h, --help" in short.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"nst {version('nst')}\n"
    assert "--version" in runner.invoke(app, ["--help"]).output


def test_stylize_help_shows_a_clean_metavar_for_the_styles():
    r = runner.invoke(app, ["stylize", "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0
    assert "list[" not in r.output and "STYLE..." not in r.output
    assert "Usage: nst stylize [OPTIONS] {CONTENT} {STYLE}..." in r.output
    assert "STYLE <path>...  One or more style images." in r.output
    r = runner.invoke(app, ["stylize", "a.png"])
    assert r.exit_code == 2 and r.output == "error: missing argument 'STYLE' (help: nst stylize -h)\n"


@pytest.mark.parametrize("env", [
    {"TORCH_HOME": "/tmp/somewhere/torch"},
    {"TORCH_HOME": "~/th"},
    {"XDG_CACHE_HOME": "/tmp/xdg"},
    {},
])  # fmt: skip
def test_torch_hub_dir_is_torchs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The CLI finds torch hub's folder without importing torch, by torch.hub.get_dir()'s rule."""
    import torch.hub

    from nst.cli.common import torch_hub_dir

    for k in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert torch_hub_dir() == Path(torch.hub.get_dir())


def test_variadic_arguments_are_labelled_with_old_and_new_typer():
    """`STYLE <path>...` from the annotation (typer's `type_descriptor`) or, on an older typer
    built on click (the GPU machine's), from click's parameter type: an older typer once broke
    `nst --help` there."""
    import types
    from pathlib import Path

    import click

    from nst.cli.common import _element_label

    assert _element_label(types.SimpleNamespace(type_descriptor=types.SimpleNamespace(annotation=list[Path]))) == "path"
    assert _element_label(types.SimpleNamespace(type_descriptor=types.SimpleNamespace(annotation=list[int]))) == "int"
    assert _element_label(types.SimpleNamespace(type=click.Path())) == "path"
    assert _element_label(types.SimpleNamespace(type=click.INT)) == "integer"
    assert _element_label(types.SimpleNamespace()) == "value"
