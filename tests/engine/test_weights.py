"""Every weights path: random, features-only file, whole-model file, safetensors, hub cache, offline, import."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
import warnings
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


def test_non_finite_weights_are_refused_by_load_and_import(tmp_path: Path, weights):
    """A file holding nan or inf (damaged, or saved from a diverged training) passed every check
    and made every loss nan; `nst weights import` took it as the ImageNet weights."""
    sd = _features_only(weights)
    sd["0.weight"] = sd["0.weight"].clone()
    sd["0.weight"][0, 0, 0, 0] = float("nan")
    sd["34.bias"] = sd["34.bias"].clone()
    sd["34.bias"][:2] = float("inf")
    p = tmp_path / "nan.pth"
    torch.save(sd, p)
    with pytest.raises(W.WeightsError, match=r"tensor 'features\.0\.weight' has 1 non-finite value\(s\) \(nan or inf\)"):
        W.load_weights(str(p))
    cache = tmp_path / "cache"
    with pytest.raises(W.WeightsError, match="non-finite"):
        W.import_weights(p, cache_dir=cache)
    assert not (cache.exists() and any(q.is_file() for q in cache.rglob("*")))  # nothing imported


def test_missing_tensor_and_damaged_file(tmp_path: Path, weights):
    sd = _features_only(weights)
    del sd["34.bias"]
    p = tmp_path / "short.pth"
    torch.save(sd, p)
    with pytest.raises(W.WeightsError, match=r"missing tensor 'features\.34\.bias'"):
        W.load_weights(str(p))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(p.read_bytes()[:4096])  # a zip archive cut short
    with pytest.raises(W.WeightsError, match="cannot read weights file"):
        W.load_weights(str(truncated))
    with pytest.raises(W.WeightsError, match="not imagenet, random, or an existing file"):
        W.load_weights(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize(("content", "described"), [
    (b"not a checkpoint", "it is text"),
    ("r\u00e9sum\u00e9 of the weights\n".encode() * 4, "it is text"),  # a character cut at the 64th byte is still text
    (b"", "it is empty"),
    (bytes(range(256)), "it is neither a zip archive, a pickle nor safetensors"),
])  # fmt: skip
def test_a_file_that_is_no_weights_file_says_what_was_expected(tmp_path: Path, content: bytes, described: str):
    """Not torch's `IndexError: pop from empty list` (or `KeyError: 101`): what the file is, and what it should be."""
    p = tmp_path / "notes.pth"
    p.write_bytes(content)
    with pytest.raises(W.WeightsError) as e:
        W.load_weights(str(p))
    assert str(e.value) == f"{p} is not a weights file ({described}): expected a VGG19 state_dict saved by torch.save (.pth, .pt) or a .safetensors file"


def test_safetensors_content_is_recognised_whatever_the_suffix(tmp_path: Path, weights):
    p = tmp_path / "w.pth"
    save_file(weights.state_dict, str(p))
    assert W.load_weights(str(p)).fingerprint == weights.fingerprint


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("saved", ["torch.save with code", "plain pickle protocol 4", "a whole nn.Module"])
def test_pickled_objects_are_refused_in_one_line_without_torchs_advice(tmp_path: Path, saved: str):
    """weights_only=True: a checkpoint that would run code on load is an error, not an exploit, and
    neither torch's UserWarnings nor its advice to set weights_only=False reach the user."""
    p = tmp_path / "evil.pth"
    if saved == "torch.save with code":
        torch.save({"x": Evil()}, p)
    elif saved == "plain pickle protocol 4":  # torch warns "Detected pickle protocol 4" for this one
        p.write_bytes(pickle.dumps({"features.0.weight": [1.0]}, protocol=4))
    else:
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(W.WeightsError) as e:
            W.load_weights(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p} is not a plain state_dict") and "was not loaded, for safety" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not caught, [str(w.message) for w in caught]


def _fake_hub_file(state_dict: dict[str, torch.Tensor]) -> tuple[Path, str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / W.IMAGENET_FILENAME
    hub.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), hub)
    return hub, hashlib.sha256(hub.read_bytes()).hexdigest()


def test_hub_file_whose_sha256_matches_is_imagenet_and_its_copy_records_where_from(tmp_path: Path, weights, monkeypatch: pytest.MonkeyPatch):
    """A file at torch hub's path is trusted once its SHA-256 starts with the expected prefix (patched
    here to this small fake file's own); the conv-only copy records its source and the check."""
    hub, sha = _fake_hub_file(weights.state_dict)
    monkeypatch.setattr(W, "IMAGENET_HASH_PREFIX", sha[:8])
    cache = tmp_path / "cache"
    st = W.weights_status(cache_dir=cache)
    assert st["hub_file_verified"] is True and st["imagenet_available"]
    w = W.load_weights("imagenet", cache_dir=cache, download=False)
    assert w.kind == "imagenet" and w.fingerprint == weights.fingerprint and w.reason is None
    assert "reason" not in w.to_dict()
    assert W.imported_path(cache).is_file()
    st = W.weights_status(cache_dir=cache)
    assert st["imported_present"] and st["imported_verified"] is True
    assert st["imported_from"] == str(hub) and st["imported_sha256"] == sha
    hub.unlink()  # later loads come from the small imported copy
    assert W.load_weights("imagenet", cache_dir=cache, download=False).fingerprint == weights.fingerprint
    st = W.weights_status(cache_dir=cache)
    assert st["imported_present"] and st["imagenet_available"] and not st["hub_file_present"]


def test_hub_file_whose_sha256_differs_is_a_plain_file_and_no_copy_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A random VGG19 state_dict named vgg19-dcbb9e9d.pth is not the ImageNet weights."""
    hub, sha = _fake_hub_file(W.random_weights(seed=3).state_dict)
    assert not sha.startswith(W.IMAGENET_HASH_PREFIX)
    read = []
    monkeypatch.setattr(W, "file_sha256", lambda p, real=W.file_sha256: read.append(p) or real(p))
    cache = tmp_path / "cache"
    w = W.load_weights("imagenet", cache_dir=cache, download=False)
    assert read == [hub]  # hashed once, before anything was trusted
    assert w.kind == "file" and w.description == str(hub)
    assert str(hub) in w.reason and sha[:8] in w.reason and "delete it" in w.reason and "nst weights import FILE" in w.reason
    assert w.to_dict()["reason"] == w.reason and w.to_dict()["kind"] == "file"
    assert not W.imported_path(cache).exists() and not (cache / "weights").exists()
    st = W.weights_status(cache_dir=cache)
    assert st["hub_file_present"] and st["hub_file_verified"] is False and not st["imagenet_available"]


def test_offline_error_names_file_place_and_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(W.WeightsUnavailable) as e:
        W.load_weights("imagenet", cache_dir=tmp_path)
    msg = str(e.value)
    assert "vgg19-dcbb9e9d.pth" in msg and str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert "nst weights import FILE" in msg and "--weights random" in msg and "URLError" in msg
    with pytest.raises(W.WeightsUnavailable, match="downloads are turned off"):
        W.load_weights("imagenet", cache_dir=tmp_path, download=False)
    assert issubclass(W.WeightsUnavailable, W.WeightsError)


def test_a_failed_download_leaves_no_empty_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The folders made for the download go again; one that was there before stays."""
    seen = []

    def no_network(url, dst, hash_prefix, progress=True):
        seen.append((url, hash_prefix, Path(dst).parent.is_dir()))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    home = Path(torch.hub.get_dir()).parent  # $TORCH_HOME, not there yet
    assert not home.exists()
    with pytest.raises(W.WeightsUnavailable):
        W.load_weights("imagenet", cache_dir=tmp_path)
    assert seen == [(W.IMAGENET_URL, W.IMAGENET_HASH_PREFIX, True)]  # torch checks the hash as it downloads
    assert not home.exists()
    home.mkdir()
    with pytest.raises(W.WeightsUnavailable):
        W.load_weights("imagenet", cache_dir=tmp_path)
    assert home.is_dir() and list(home.iterdir()) == []


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


def test_a_conv_only_copy_that_cannot_be_written_is_a_warning(weights, full_disk: Path, monkeypatch: pytest.MonkeyPatch):
    """The conv-only copy is a shortcut: a full disk under the cache costs one warning, never the run."""
    _, sha = _fake_hub_file(weights.state_dict)
    monkeypatch.setattr(W, "IMAGENET_HASH_PREFIX", sha[:8])
    said: list[str] = []
    w = W.load_weights("imagenet", cache_dir=full_disk, download=False, on_warning=said.append)
    assert w.kind == "imagenet" and w.fingerprint == weights.fingerprint
    assert len(said) == 1 and "conv-only copy" in said[0] and str(full_disk / "weights") in said[0]
    assert not W.imported_path(full_disk).exists()
    with pytest.warns(W.WeightsCacheWarning, match="conv-only copy"):  # without a callback: a Python warning
        W.load_weights("imagenet", cache_dir=full_disk, download=False)


def test_kind_is_an_enum_and_reports_its_value():
    w = W.random_weights(seed=0)
    assert w.kind is W.WeightsKind.RANDOM and w.is_random
    assert w.to_dict()["kind"] == "random" and type(w.to_dict()["kind"]) is str
