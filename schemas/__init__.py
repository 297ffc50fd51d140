"""OKEDIT record models, `datasets` features and the EasyEdit export."""

from schemas.record import (
    Annotation,
    EditMetrics,
    FieldProvenance,
    ItemImages,
    OkeditRecord,
    ProbeResult,
    Rejection,
    SourceItem,
    TextNegative,
    Validation,
)

__all__ = [
    "Annotation",
    "EditMetrics",
    "FieldProvenance",
    "ItemImages",
    "OkeditRecord",
    "ProbeResult",
    "Rejection",
    "SourceItem",
    "TextNegative",
    "Validation",
]
