"""Export to the 11-field JSON that EasyEdit/MMEdit's multimodal loaders read.

One object per edit; images are written beside the JSON and referenced by relative path.
EasyEdit silently drops items with an empty field, so the export refuses them instead. Each
object also carries the OKEDIT `item_id`, which EasyEdit's loaders ignore, so that results
can be joined back to the parquet.

`loc` carries MMEdit's `"nq question: "` prefix only when the record's pair came from
Natural Questions (its provenance params say `"source": "nq"`).

EasyEdit's `VQADataset` joins `image` and `m_loc` to its `coco_image` setting and
`image_rephrase` to `rephrase_image`: both must name the export folder (docs/schema.md).
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

from PIL import Image

from schemas.record import OkeditRecord

NQ_PREFIX = "nq question: "  # how MMEdit writes its NQ `loc` questions

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


def _from_nq(record: OkeditRecord) -> bool:
    """Whether the record's image-free locality pair came from Natural Questions: its
    provenance entry for the field says `"source": "nq"` in its params."""
    for prov in record.provenance:
        if prov.field != "image_free_locality":
            continue
        try:
            params = json.loads(prov.params or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(params, dict) and str(params.get("source", "")).strip().lower() == "nq":
            return True
    return False


def easyedit_loc(record: OkeditRecord) -> str:
    """EasyEdit's `loc`: the image-free question, prefixed `"nq question: "` only when the
    pair came from NQ (as MMEdit writes its NQ items), otherwise as written."""
    free = record.image_free_locality
    if free is None:
        raise ValueError(f"{record.item_id}: no image-free locality question")
    return (NQ_PREFIX + free.question) if _from_nq(record) else free.question


def easyedit_entry(record: OkeditRecord, image_dir: Path, root: Path) -> dict[str, str]:
    """`item_id` and the 11 fields for one record.

    `loc`/`loc_ans` are the record's image-free locality question and its answer
    (`image_free_locality`): EasyEdit asks `loc` with no image, so it must be a
    self-contained question on an unrelated fact (in MMEdit an NQ question; the
    `"nq question: "` prefix only for pairs from NQ). okedit's text negatives (same image,
    another question) need the image and stay okedit's own field.
    """
    if not record.locality_images or not record.image_rephrases:
        raise ValueError(f"{record.item_id}: needs locality and rephrase images")
    free = record.image_free_locality
    if free is None:
        raise ValueError(
            f"{record.item_id}: no image-free locality question (field `image_free_locality`) "
            "for EasyEdit's `loc`/`loc_ans`; rebuild the item with an annotator that writes one"
        )
    entry = {
        "item_id": record.item_id,
        "src": record.question,
        "pred": record.original_answer,
        "alt": record.target,
        "rephrase": record.rephrases[0] if record.rephrases else "",
        "image": _write_image(record.image, image_dir, root),
        "image_rephrase": _write_image(record.image_rephrases[0], image_dir, root),
        "loc": easyedit_loc(record),
        "loc_ans": free.answer,
        "m_loc": _write_image(record.locality_images[0], image_dir, root),
        "m_loc_q": record.question,
        "m_loc_a": record.locality_answer,
    }
    empty = [k for k, v in entry.items() if not v.strip()]
    if empty:
        raise ValueError(f"{record.item_id}: empty EasyEdit fields {empty}")
    return entry


def export_easyedit(records: list[OkeditRecord], folder: Path, name: str = "okedit.json") -> Path:
    """Write `folder/name` and `folder/images/*`; return the JSON path.

    A record without an image-free locality question has no EasyEdit `loc`: the export is
    refused (ValueError naming the records, before anything is written) rather than
    leaving it out or writing a `loc` that needs the image."""
    missing = [r.item_id for r in records if r.image_free_locality is None]
    if missing:
        raise ValueError(
            f"EasyEdit export: {len(missing)} of {len(records)} records have no image-free "
            "locality question (field `image_free_locality`, EasyEdit's `loc`/`loc_ans`): "
            + ", ".join(missing[:5])
            + (", ..." if len(missing) > 5 else "")
            + "; rebuild them with an annotator that writes one"
        )
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = [easyedit_entry(r, image_dir, folder) for r in records]
    path = folder / name
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False))
    return path
