"""`nst info`: devices, precisions, providers and layers, as a table and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine.device import resolve_precision

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_info_reports_devices_and_layers(tmp_path: Path):
    r = run("info", "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert "cpu" in info["devices"] and "fp32" in info["devices"]["cpu"]["precisions"]
    assert info["devices"]["cpu"]["auto_precision"] == resolve_precision(torch.device("cpu"), "auto").value
    assert "CPUExecutionProvider" in info["onnxruntime_providers"] and "relu4_2" in info["layers"]
    r = run("weights", "status", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["imagenet_available"] is False
    r = run("info")
    assert r.exit_code == 0 and "precisions" in r.output
