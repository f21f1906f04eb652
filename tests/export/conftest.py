"""One export per session for the export tests: random weights, the Gatys preset's layers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gatys_export(tmp_path_factory: pytest.TempPathFactory):
    from nst.engine.config import GATYS
    from nst.engine.weights import random_weights
    from nst.export import ModuleSpec, export_targets

    path = Path(tmp_path_factory.mktemp("export")) / "targets.onnx"
    return export_targets(random_weights(seed=0), path, ModuleSpec.of(GATYS))
