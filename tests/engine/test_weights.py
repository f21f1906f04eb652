"""Every weights path: random, features-only file, whole-model file, safetensors, hub cache, offline, import."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nst.engine import weights as W
from nst.engine.features import VGGFeatures


def _features_only(w: W.Weights) -> dict[str, torch.Tensor]:
    return {k[len("features."):]: v.clone() for k, v in w.state_dict.items()}


def test_random_is_seeded_and_labelled(weights):
    again = W.random_weights(seed=0)
    other = W.random_weights(seed=1)
    assert again.fingerprint == weights.fingerprint != other.fingerprint
    assert torch.equal(again.state_dict["features.0.weight"], weights.state_dict["features.0.weight"])
    assert weights.is_random and "random" in weights.description and "seed 0" in weights.description
    assert set(weights.state_dict) == set(W.expected_shapes())


def test_features_only_pth(tmp_path: Path, weights):
    p = tmp_path / "features.pth"
    torch.save(_features_only(weights), p)
    w = W.load_weights(str(p))
    assert w.kind == "file" and w.fingerprint == weights.fingerprint


def test_whole_model_state_dict_ignores_classifier(tmp_path: Path, weights):
    sd = dict(weights.state_dict)
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # a whole VGG19 carries its classifier too
    sd["classifier.0.bias"] = torch.zeros(4)
    p = tmp_path / "vgg19-whole.pth"
    torch.save(sd, p)
    w = W.load_weights(str(p))
    assert w.fingerprint == weights.fingerprint and not any(k.startswith("classifier") for k in w.state_dict)


def test_safetensors_file(tmp_path: Path, weights):
    p = tmp_path / "w.safetensors"
    save_file(weights.state_dict, str(p))
    assert W.load_weights(str(p)).fingerprint == weights.fingerprint


def test_wrong_shape_names_the_tensor(tmp_path: Path, weights):
    sd = _features_only(weights)
    sd["2.weight"] = torch.zeros(64, 64, 5, 5)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(W.WeightsError, match=r"features\.2\.weight.*\(64, 64, 5, 5\).*\(64, 64, 3, 3\)"):
        W.load_weights(str(p))


def test_missing_tensor_and_damaged_file(tmp_path: Path, weights):
    sd = _features_only(weights)
    del sd["34.bias"]
    p = tmp_path / "short.pth"
    torch.save(sd, p)
    with pytest.raises(W.WeightsError, match=r"missing tensor 'features\.34\.bias'"):
        W.load_weights(str(p))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(W.WeightsError, match="cannot read weights file"):
        W.load_weights(str(broken))
    with pytest.raises(W.WeightsError, match="not imagenet, random, or an existing file"):
        W.load_weights(str(tmp_path / "nope.pth"))


def test_pickled_code_is_refused(tmp_path: Path):
    """weights_only=True: a checkpoint that would run code on load is an error, not an exploit."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p)
    with pytest.raises(W.WeightsError, match="cannot read weights file"):
        W.load_weights(str(p))


def test_hub_cache_path_then_imported_copy(tmp_path: Path, weights):
    """torchvision's file found in $TORCH_HOME/hub/checkpoints is used, and a conv-only copy kept."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / W.IMAGENET_FILENAME
    hub.parent.mkdir(parents=True)
    torch.save(dict(weights.state_dict), hub)
    cache = tmp_path / "cache"
    w = W.load_weights("imagenet", cache_dir=cache, download=False)
    assert w.kind == "imagenet" and w.fingerprint == weights.fingerprint
    assert W.imported_path(cache).is_file()
    hub.unlink()  # later loads come from the small imported copy
    assert W.load_weights("imagenet", cache_dir=cache, download=False).fingerprint == weights.fingerprint
    st = W.weights_status(cache_dir=cache)
    assert st["imported_present"] and st["imagenet_available"] and not st["hub_file_present"]


def test_offline_error_names_file_place_and_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(W.WeightsError) as e:
        W.load_weights("imagenet", cache_dir=tmp_path)
    msg = str(e.value)
    assert "vgg19-dcbb9e9d.pth" in msg and str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert "nst weights import FILE" in msg and "--weights random" in msg and "URLError" in msg
    with pytest.raises(W.WeightsError, match="downloads are turned off"):
        W.load_weights("imagenet", cache_dir=tmp_path, download=False)


def test_import_keeps_conv_weights_only(tmp_path: Path, weights):
    sd = dict(weights.state_dict)
    sd["classifier.6.weight"] = torch.zeros(10, 4)
    src = tmp_path / "downloaded-elsewhere.pth"
    torch.save(sd, src)
    cache = tmp_path / "cache"
    w, verified = W.import_weights(src, cache_dir=cache)
    assert not verified  # not torchvision's file byte for byte
    from safetensors.torch import load_file

    kept = load_file(str(W.imported_path(cache)))
    assert set(kept) == set(W.expected_shapes())
    assert W.weights_status(cache_dir=cache)["imported_fingerprint"] == weights.fingerprint


def test_load_into_cut_model(weights):
    m = VGGFeatures(["relu2_1"])
    W.load_into(m.features, weights)
    torch.testing.assert_close(m.features[0].weight, weights.state_dict["features.0.weight"])
