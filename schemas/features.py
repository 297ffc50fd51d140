"""`datasets.Features` and a polars schema matching `OkeditRecord`.

Images become `Image()` columns holding embedded bytes, so a parquet file is
self-contained. `to_hf_row`/`from_hf_row` convert between the pydantic record and the row
dicts `datasets` reads and writes; `records_to_dataset`/`read_parquet_records` write and read
whole files, keeping every image's stored bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value

from schemas.record import IMAGE_FIELDS, IMAGE_LIST_FIELDS, OkeditRecord

_PROVENANCE = {
    "field": Value("string"),
    "backend": Value("string"),
    "model": Value("string"),
    "template_id": Value("string"),
    "template_version": Value("string"),
    "seed": Value("int64"),
    "params": Value("string"),
    "request_hash": Value("string"),
    "timestamp": Value("string"),
    "prompt_tokens": Value("int64"),
    "completion_tokens": Value("int64"),
}

GENERATION_METRICS = (
    "gen_reliability",
    "gen_text_generality",
    "gen_image_generality",
    "gen_locality",
    "gen_text_locality",
)

_METRICS = {
    name: Value("float64")
    for name in (
        "reliability",
        "text_generality",
        "image_generality",
        "locality_label",
        "locality_agreement",
        "text_locality_label",
        "text_locality_agreement",
        "hm",
        *GENERATION_METRICS,
        "image_free_locality",
    )
}

_PROBE = {
    "kind": Value("string"),
    "index": Value("int64"),
    "distance": Value("float64"),
    "routed": Value("bool"),
    "expected": Value("string"),
    "pre_accuracy": Value("float64"),
    "post_accuracy": Value("float64"),
    "agreement": Value("float64"),
    "pre_answer": Value("string"),
    "post_answer": Value("string"),
    "pre_generation_match": Value("float64"),
    "post_generation_match": Value("float64"),
}

_CHECK = {
    "status": Value("string"),
    "reasons": List(
        {
            "code": Value("string"),
            "probe": Value("string"),
            "measured": Value("string"),
            "dropped": Value("bool"),
        }
    ),
    "clean_answer": Value("string"),
    "knows_original": Value("bool"),
}

_EDIT = {
    "epsilon_set_by": Value("string"),
    "margin": Value("float64"),
    "separable": Value("bool"),
    "families": List(
        {
            "family": Value("string"),
            "probes": Value("int64"),
            "routed_share": Value("float64"),
            "median_relative_distance": Value("float64"),
        }
    ),
}

_VALIDATION = {
    "check": _CHECK,
    "edit": _EDIT,
    "verdict": Value("string"),
    "reason": Value("string"),
    "in_scope_ok": Value("bool"),
    "out_of_scope_ok": Value("bool"),
    "editor": Value("string"),
    "model": Value("string"),
    "key_variant": Value("string"),
    "epsilon": Value("float64"),
    "alpha": Value("float64"),
    "edit_config": Value("string"),
    "metrics": _METRICS,
    "probes": List(_PROBE),
    "seconds": Value("float64"),
}

OKEDIT_FEATURES = Features(
    {
        "item_id": Value("string"),
        "source": Value("string"),
        "question_id": Value("string"),
        "image_id": Value("string"),
        "question_type": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answers": List(Value("string")),
        "original_answer": Value("string"),
        "majority_answer": Value("string"),
        "image_object": Value("string"),
        "target": Value("string"),
        "counterfact_type": Value("string"),
        "counterfact_votes": List(Value("string")),
        "counterfact_reason": Value("string"),
        "rephrases": List(Value("string")),
        "rephrases_train": List(Value("string")),
        "image_rephrases": List(Image()),
        "locality_answer": Value("string"),
        "locality_image_object": Value("string"),
        "locality_images": List(Image()),
        "locality_answer_train": Value("string"),
        "locality_image_train_object": Value("string"),
        "locality_image_train": Image(),
        "text_negatives": List({"question": Value("string"), "answer": Value("string")}),
        "image_free_locality": {"question": Value("string"), "answer": Value("string")},
        "provenance": List(_PROVENANCE),
        "validation": _VALIDATION,
    }
)


def _image_cell(data: bytes) -> dict[str, Any]:
    return {"bytes": data, "path": None}


def to_hf_row(record: OkeditRecord) -> dict[str, Any]:
    """A row for `Dataset.from_list(..., features=OKEDIT_FEATURES)` with embedded image bytes."""
    row = record.model_dump()
    for name in IMAGE_FIELDS:
        row[name] = _image_cell(row[name])
    for name in IMAGE_LIST_FIELDS:
        row[name] = [_image_cell(b) for b in row[name]]
    return row


def _image_bytes(cell: Any) -> bytes:
    """Bytes of an image cell as `datasets` returns it (undecoded dict, or a PIL image).

    A PIL image has lost its stored bytes and is re-encoded (a JPEG changes): read published
    files with `read_parquet_records`, which never decodes.
    """
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        with open(cell["path"], "rb") as handle:
            return handle.read()
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    from io import BytesIO

    buffer = BytesIO()
    cell.save(buffer, format=cell.format or "PNG")
    return buffer.getvalue()


def from_hf_row(row: dict[str, Any]) -> OkeditRecord:
    """Inverse of `to_hf_row`; accepts decoded (PIL) or undecoded image cells."""
    data = dict(row)
    for name in IMAGE_FIELDS:
        data[name] = _image_bytes(data[name])
    for name in IMAGE_LIST_FIELDS:
        data[name] = [_image_bytes(c) for c in data[name]]
    return OkeditRecord.model_validate(data)


def records_to_dataset(records: list[OkeditRecord]) -> Dataset:
    """A `Dataset` with `OKEDIT_FEATURES`, also for no records: built column-wise, because
    `Dataset.from_list([])` cannot match an empty row list to the features."""
    rows = [to_hf_row(r) for r in records]
    return Dataset.from_dict(
        {name: [row[name] for row in rows] for name in OKEDIT_FEATURES}, features=OKEDIT_FEATURES
    )


def read_parquet_records(paths: Iterable[Path], batch_size: int = 64) -> list[OkeditRecord]:
    """The records of OKEDIT parquet files, read with pyarrow so that image cells stay the
    stored bytes: `datasets` decodes `Image()` columns to PIL, and writing those back
    re-encodes every JPEG."""
    records = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            records += [from_hf_row(row) for row in batch.to_pylist()]
    return records


# A flat view for fast statistics with polars (no image bytes).
POLARS_STATS_SCHEMA = pl.Schema(
    {
        "item_id": pl.String,
        "source": pl.String,
        "question_type": pl.String,
        "counterfact_type": pl.String,
        "n_rephrases": pl.Int64,
        "n_image_rephrases": pl.Int64,
        "n_locality_images": pl.Int64,
        "n_text_negatives": pl.Int64,
        "verdict": pl.String,
        "epsilon": pl.Float64,
        "reliability": pl.Float64,
        "text_generality": pl.Float64,
        "image_generality": pl.Float64,
        "locality_label": pl.Float64,
        "text_locality_label": pl.Float64,
        "image_free_locality": pl.Float64,
        "hm": pl.Float64,
        **{name: pl.Float64 for name in GENERATION_METRICS},
    }
)


def stats_frame(records: list[OkeditRecord]) -> pl.DataFrame:
    """One row per record with counts and validation metrics, for tables and plots."""
    rows = [
        {
            "item_id": r.item_id,
            "source": r.source,
            "question_type": r.question_type,
            "counterfact_type": r.counterfact_type,
            "n_rephrases": len(r.rephrases),
            "n_image_rephrases": len(r.image_rephrases),
            "n_locality_images": len(r.locality_images),
            "n_text_negatives": len(r.text_negatives),
            "verdict": r.validation.verdict,
            "epsilon": r.validation.epsilon,
            "reliability": r.validation.metrics.reliability,
            "text_generality": r.validation.metrics.text_generality,
            "image_generality": r.validation.metrics.image_generality,
            "locality_label": r.validation.metrics.locality_label,
            "text_locality_label": r.validation.metrics.text_locality_label,
            "image_free_locality": r.validation.metrics.image_free_locality,
            "hm": r.validation.metrics.hm,
            **{name: getattr(r.validation.metrics, name) for name in GENERATION_METRICS},
        }
        for r in records
    ]
    return pl.DataFrame(rows, schema=POLARS_STATS_SCHEMA)
