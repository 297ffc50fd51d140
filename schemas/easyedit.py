"""Export to the 11-field JSON that EasyEdit/MMEdit's multimodal loaders read.

One object per edit; images are written beside the JSON and referenced by relative path.
EasyEdit silently drops items with an empty field, so the export refuses them instead. Each
object also carries the OKEDIT `item_id`, which EasyEdit's loaders ignore, so that results
can be joined back to the parquet.
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

from PIL import Image

from schemas.record import OkeditRecord

EASYEDIT_FIELDS = (
    "src",
    "pred",
    "alt",
    "rephrase",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)


def _write_image(data: bytes, folder: Path, root: Path) -> str:
    """Write an image once under a content hash; return its path relative to `root`."""
    with Image.open(BytesIO(data)) as img:
        ext = (img.format or "PNG").lower().replace("jpeg", "jpg")
    path = folder / f"{hashlib.sha256(data).hexdigest()[:20]}.{ext}"
    if not path.exists():
        path.write_bytes(data)
    return path.relative_to(root).as_posix()


def easyedit_entry(record: OkeditRecord, image_dir: Path, root: Path) -> dict[str, str]:
    """`item_id` and the 11 fields for one record.

    The text-locality pair (`loc`, `loc_ans`) is the record's own first text negative — a
    real question with a known answer, different for every item — in EasyEdit's
    "nq question:" convention.
    """
    if not record.text_negatives or not record.locality_images or not record.image_rephrases:
        raise ValueError(f"{record.item_id}: needs text negatives, locality and rephrase images")
    negative = record.text_negatives[0]
    entry = {
        "item_id": record.item_id,
        "src": record.question,
        "pred": record.original_answer,
        "alt": record.target,
        "rephrase": record.rephrases[0] if record.rephrases else "",
        "image": _write_image(record.image, image_dir, root),
        "image_rephrase": _write_image(record.image_rephrases[0], image_dir, root),
        "loc": f"nq question: {negative.question}",
        "loc_ans": negative.answer,
        "m_loc": _write_image(record.locality_images[0], image_dir, root),
        "m_loc_q": record.question,
        "m_loc_a": record.locality_answer,
    }
    empty = [k for k, v in entry.items() if not v.strip()]
    if empty:
        raise ValueError(f"{record.item_id}: empty EasyEdit fields {empty}")
    return entry


def export_easyedit(records: list[OkeditRecord], folder: Path, name: str = "okedit.json") -> Path:
    """Write `folder/name` and `folder/images/*`; return the JSON path."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = [easyedit_entry(r, image_dir, folder) for r in records]
    path = folder / name
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False))
    return path
