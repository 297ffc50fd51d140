"""Assemble (the QC stage): join each item's source, annotation and images into an
`OkeditRecord`, then run QC (`pipeline.quality`)."""

from __future__ import annotations

from pipeline.quality import QualityConfig, check_record, majority_answer
from schemas.record import Annotation, ItemImages, OkeditRecord, Rejection, SourceItem


def assemble_record(item: SourceItem, ann: Annotation, images: ItemImages) -> OkeditRecord:
    """One record; provenance of every generated field and image kept side by side."""
    return OkeditRecord(
        **item.model_dump(),
        original_answer=item.answers[0] if item.answers else "",
        majority_answer=majority_answer(item.answers),
        **ann.model_dump(exclude={"item_id", "provenance"}),
        **images.model_dump(exclude={"item_id", "provenance"}),
        provenance=[*ann.provenance, *images.provenance],
    )


def build_records(
    items: list[SourceItem],
    annotations: list[Annotation],
    images: list[ItemImages],
    quality: QualityConfig | None = None,
) -> tuple[list[OkeditRecord], list[Rejection]]:
    """Records that pass QC, and a rejection (with every violated rule) for each that does not.

    Items missing an annotation or images were already rejected by the stage that dropped
    them, so they are simply not joined here.
    """
    by_id_ann = {a.item_id: a for a in annotations}
    by_id_img = {i.item_id: i for i in images}
    kept: list[OkeditRecord] = []
    rejected: list[Rejection] = []
    for item in items:
        ann, img = by_id_ann.get(item.item_id), by_id_img.get(item.item_id)
        if ann is None or img is None:
            continue
        record = assemble_record(item, ann, img)
        reasons = check_record(record, quality)
        if reasons:
            rejected.append(
                Rejection(item_id=item.item_id, stage="build", reason="; ".join(reasons))
            )
        else:
            kept.append(record)
    return kept, rejected
