"""`--weights imagenet` through the CLI: a torch hub file is checked before it is trusted, a missing
resource exits with 3, and `nst weights status` says where the conv-only copy came from."""

from __future__ import annotations

import hashlib
import os
import json
import urllib.error
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nst.cli.app import app
from nst.engine import weights as W

runner = CliRunner()
FAST = ["--size", "48", "--iterations", "2", "--targets", "torch", "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_2", "-q"]


def _hub_file(state_dict: dict[str, torch.Tensor]) -> tuple[Path, str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / W.IMAGENET_FILENAME
    hub.parent.mkdir(parents=True)
    torch.save(dict(state_dict), hub)
    return hub, hashlib.sha256(hub.read_bytes()).hexdigest()


def _status_text() -> str:
    """`nst weights status` as one line of words (wide, so that no path is wrapped)."""
    r = runner.invoke(app, ["weights", "status"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.replace("\u2502", " ").split())


def _stylize(images: dict[str, Path], tmp_path: Path, *extra: str):
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "o.png"), *FAST, "--report", str(rep), *extra])
    return r, (json.loads(rep.read_text()) if rep.is_file() else None)


def test_random_state_dict_at_the_hub_path_runs_as_a_plain_file(images, tmp_path: Path, _private_cache: Path):
    hub, sha = _hub_file(W.random_weights(seed=5).state_dict)
    r, report = _stylize(images, tmp_path)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(hub) in " ".join(r.output.split()) and "delete it" in r.output, r.output
    w = report["weights"]
    assert w["kind"] == "file" and w["source"] == str(hub) and sha[:8] in w["reason"] and "not as the ImageNet weights" in w["reason"]
    assert not (_private_cache / "weights").exists()  # no conv-only copy made from it
    st = json.loads(runner.invoke(app, ["weights", "status", "--json"]).stdout)
    assert st["hub_file_verified"] is False and st["imagenet_available"] is False and not st["imported_present"]
    table = _status_text()
    assert "does not match torchvision's" in table and "delete it to download the real one" in table


def test_hub_file_with_the_expected_sha256_is_imagenet_and_status_shows_the_copys_origin(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hub, sha = _hub_file(W.random_weights(seed=5).state_dict)
    monkeypatch.setattr(W, "IMAGENET_HASH_PREFIX", sha[:8])  # this small fake file stands in for torchvision's
    r, report = _stylize(images, tmp_path)
    assert r.exit_code == 0 and "warning:" not in r.output, r.output
    assert report["weights"]["kind"] == "imagenet" and "reason" not in report["weights"]
    st = json.loads(runner.invoke(app, ["weights", "status", "--json"]).stdout)
    assert st["imported_present"] and st["imported_verified"] is True and st["imported_from"] == str(hub) and st["imported_sha256"] == sha
    table = _status_text()
    assert f"made from {hub}, verified as torchvision's file (sha256)" in table and "--weights imagenet ready" in table


def test_missing_imagenet_weights_exit_3_and_leave_no_empty_folder(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv("NST_OFFLINE")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    home = Path(torch.hub.get_dir()).parent
    r, report = _stylize(images, tmp_path)
    assert r.exit_code == 3 and report is None
    assert r.output.startswith("error: ImageNet VGG19 weights not available") and "URLError" in r.output
    assert not home.exists()  # no empty $TORCH_HOME/hub/checkpoints left behind
    r = runner.invoke(app, ["export"])
    assert r.exit_code == 3 and "nst weights import FILE" in r.output


def test_targets_onnx_without_onnx_runtime_exits_3(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nst.cli.targets_opt as T

    monkeypatch.setattr(T, "_onnx_missing", lambda: "onnxruntime is not installed (pip install onnx onnxruntime-gpu)")
    r, _ = _stylize(images, tmp_path, "--weights", "random", "--targets", "onnx")
    assert r.exit_code == 3 and "error: --targets onnx needs ONNX Runtime: onnxruntime is not installed" in r.output


def test_weights_import_then_imagenet_works(weights, images, tmp_path: Path):
    src = tmp_path / "vgg19.pth"
    torch.save(dict(weights.state_dict), src)
    r = runner.invoke(app, ["weights", "import", str(src)])
    assert r.exit_code == 0, r.output
    assert weights.fingerprint in r.output and "not torchvision's" in r.output
    status = json.loads(runner.invoke(app, ["weights", "status", "--json"]).stdout)
    assert status["imported_present"] and status["imagenet_available"]
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["stylize", str(images["content"]), str(images["style"]), "-o", str(tmp_path / "o.png"), *FAST, "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["weights"] == {"kind": "imagenet", "source": str(Path(os.environ["NST_CACHE_DIR"]) / "weights" / "vgg19-imagenet-convs.safetensors"), "fingerprint": weights.fingerprint}
