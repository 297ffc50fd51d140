"""New weights under the same model name are a new build (a retrained tiny VLM must not
resume the validations of the old one)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.tiny_model import default_model_dir


def test_new_weights_under_the_same_path_change_the_fingerprint(tmp_path: Path) -> None:
    model = tmp_path / "tiny-flagworld-copy"
    shutil.copytree(default_model_dir(), model)
    cfg = BuildConfig(validation={"model": str(model)})
    before = cfg.fingerprint()
    assert BuildConfig(validation={"model": str(model)}).fingerprint() == before
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert cfg.fingerprint() != before


def test_a_missing_model_still_has_a_fingerprint(tmp_path: Path) -> None:
    cfg = BuildConfig(validation={"model": str(tmp_path / "nowhere")})
    assert len(cfg.fingerprint()) == 16
