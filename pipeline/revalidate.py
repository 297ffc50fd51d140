"""`okedit validate DATASET`: re-run the BalancEdit scope check on a published folder."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_dataset

from pipeline.config import ValidateSettings
from pipeline.publish import publish_local
from pipeline.stages import scope_filter
from schemas.features import OKEDIT_FEATURES, from_hf_row
from schemas.record import OkeditRecord, Rejection


def read_folder(folder: Path) -> tuple[list[OkeditRecord], list[Rejection], dict]:
    """Records, rejections and manifest of a published folder."""
    shards = sorted((folder / "data").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no data/*.parquet: is it an okedit dataset folder?")
    dataset = load_dataset(
        "parquet", data_files=[str(p) for p in shards], split="train", features=OKEDIT_FEATURES
    )
    dataset = dataset.cast_column("image", OKEDIT_FEATURES["image"])
    records = [from_hf_row(row) for row in dataset.with_format(None)]
    rejected_path = folder / "rejected.jsonl"
    rejected = (
        [Rejection.model_validate_json(line) for line in rejected_path.read_text().splitlines()]
        if rejected_path.exists()
        else []
    )
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return records, rejected, manifest


def revalidate_folder(
    folder: Path,
    out: Path,
    model: str | None,
    device: str,
    filter_scope: bool,
    editor: dict | None = None,
) -> dict:
    from pipeline.validate import validate_records

    records, rejected, manifest = read_folder(folder)
    settings = ValidateSettings(
        device=device, editor=editor or {}, **({"model": model} if model else {})
    )
    records = validate_records(records, settings.editor_settings(), settings.model_settings())
    records, dropped = scope_filter(records, filter_scope)
    rejected += dropped
    counts = {
        "in": len(records) + len(rejected),
        "published": len(records),
        "rejected": len(rejected),
    }
    manifest = {**manifest, "counts": counts}
    manifest.setdefault("config", {"source": {"name": "unknown", "split": "-"}, "images": {}})
    paths = publish_local(records, rejected, out, manifest)
    stages = {"validate": {"ok": len(records), "rejected": len(dropped)}}
    return {"counts": counts, "stages": stages, "paths": {k: str(v) for k, v in paths.items()}}
