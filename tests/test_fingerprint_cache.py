"""The backbone's digests from peftkit's cache (fingerprint.cached_backbone_digests): equal to hashing
afresh, keyed by the files and the load, never believed when they do not describe the weights."""

from __future__ import annotations

import json
import os
import time

import torch

from peftkit.fingerprint import backbone_digests, cached_backbone_digests


def _load(path: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _cache_files(cache) -> list[str]:
    folder = os.path.join(cache, "fingerprints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_second_load_reads_the_digests_it_hashed(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir("bert")
    model = _load(model_dir)
    first = cached_backbone_digests(model, model_dir, seed=0)
    assert first == backbone_digests(model)
    [entry] = _cache_files(tmp_path / "cache")
    # a hit: no hashing beyond the one small tensor that checks it
    calls = []
    import peftkit.fingerprint as fp

    real = fp.tensor_digest
    monkeypatch.setattr(fp, "tensor_digest", lambda t: calls.append(t.numel()) or real(t))
    assert cached_backbone_digests(_load(model_dir), model_dir, seed=0) == first
    assert len(calls) == 1
    # another seed, or another load of the same files, is another entry
    cached_backbone_digests(model, model_dir, seed=1)
    assert len(_cache_files(tmp_path / "cache")) == 2 and entry in _cache_files(tmp_path / "cache")


def test_changed_weights_or_a_wrong_cache_are_hashed_again(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from transformers import AutoModel

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    model_dir = str(tmp_path / "model")
    AutoModel.from_pretrained(tiny_model_dir("bert")).save_pretrained(model_dir)
    for name in os.listdir(tiny_model_dir("bert")):
        if name.startswith("tokenizer") or name.endswith(".txt"):
            with (
                open(os.path.join(tiny_model_dir("bert"), name), "rb") as src,
                open(os.path.join(model_dir, name), "wb") as dst,
            ):
                dst.write(src.read())
    before = cached_backbone_digests(_load(model_dir), model_dir, seed=0)
    # the same file names, other weights: the files' sizes or times differ, so the key does
    changed = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(1.0)
    time.sleep(0.01)
    changed.save_pretrained(model_dir)
    model = _load(model_dir)
    after = cached_backbone_digests(model, model_dir, seed=0)
    assert after == backbone_digests(model) and after != before
    # a cache entry that does not describe the weights (edited by hand) is not believed
    for name in _cache_files(tmp_path / "cache"):
        full = os.path.join(tmp_path / "cache", "fingerprints", name)
        with open(full) as fh:
            data = json.load(fh)
        with open(full, "w") as fh:
            json.dump({k: "0" * 64 for k in data}, fh)
    assert cached_backbone_digests(model, model_dir, seed=0) == backbone_digests(model)
