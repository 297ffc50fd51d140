"""`okedit validate DATASET`: re-run the validate stage (the item check and the editor) on a
published folder and publish it again."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pipeline.check import FilterMode, filter_by_check
from pipeline.config import ResolvedValidation, ValidateSettings, resolve_validation
from pipeline.publish import publish_local
from schemas.features import read_parquet_records
from schemas.record import OkeditRecord, Rejection

# what the card needs of a build, for a folder that has no manifest
_UNKNOWN_BUILD = {
    "name": "OKEDIT",
    "fingerprint": "-",
    "annotator": "unknown",
    "config": {"source": {"name": "unknown"}, "images": {"backend": "unknown"}, "seed": "-"},
}


def read_folder(folder: Path) -> tuple[list[OkeditRecord], list[Rejection], dict]:
    """Records (images as their stored bytes), rejections and manifest of a published folder."""
    shards = sorted((folder / "data").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no data/*.parquet: is it an okedit dataset folder?")
    records = read_parquet_records(shards)
    rejected_path = folder / "rejected.jsonl"
    rejected = (
        [Rejection.model_validate_json(line) for line in rejected_path.read_text().splitlines()]
        if rejected_path.exists()
        else []
    )
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return records, rejected, manifest


def revalidated_manifest(
    manifest: dict, validation: ResolvedValidation, counts: dict, stage: dict
) -> dict:
    """The folder's manifest with this re-validation's settings and counts, so that nothing
    of the earlier validation is left to contradict the records."""
    config = {**_UNKNOWN_BUILD["config"], **manifest.get("config", {})}
    # as `BuildConfig.describe()` records it
    config["validation"] = {
        **validation.settings.model_dump(mode="json"),
        "resolved_editor": validation.editor.model_dump(mode="json"),
    }
    return {
        **_UNKNOWN_BUILD,
        **manifest,
        "config": config,
        "counts": counts,
        "stages": {**manifest.get("stages", {}), "revalidate": stage},
        "revalidated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def revalidate_folder(
    folder: Path,
    out: Path,
    model: str | None,
    device: str,
    filter_mode: FilterMode = "none",
    editor: dict | None = None,
    editor_preset: str = "default",
    batch_items: int = 1,
) -> dict:
    """Validate every published record again (`batch_items` at a time: the same results),
    drop what `filter_mode` drops, publish to `out` (in place when `out` is `folder`);
    returns the summary (in = published + rejected)."""
    from pipeline.validate import validate_records

    records, rejected, manifest = read_folder(folder)
    settings = ValidateSettings(
        device=device,
        editor=editor or {},
        editor_preset=editor_preset,
        filter=filter_mode,
        **({"model": model} if model else {}),
    )
    validation = resolve_validation(settings)
    if records:  # no model load for an empty folder
        records = validate_records(
            records,
            validation.editor,
            validation.model,
            check=settings.check,
            batch_items=batch_items,
        )
    records, dropped = filter_by_check(records, settings.filter)
    rejected += dropped
    counts = {
        "in": len(records) + len(rejected),
        "published": len(records),
        "rejected": len(rejected),
    }
    previous_in = manifest.get("counts", {}).get("in")
    if previous_in is not None and previous_in != counts["in"]:
        raise ValueError(
            f"{folder} does not reconcile: its manifest counts {previous_in} items in, its "
            f"data and rejected.jsonl {counts['in']}"
        )
    stage = {"ok": len(records), "rejected": len(dropped)}
    manifest = revalidated_manifest(manifest, validation, counts, stage)
    paths = publish_local(records, rejected, out, manifest, validation.summary())
    return {
        "counts": counts,
        "stages": {"validate": stage},
        "paths": {k: str(v) for k, v in paths.items()},
    }
