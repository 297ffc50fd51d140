"""Sources of knowledge-based VQA items, each normalized to `SourceItem`.

A source lists item ids (deterministic for a seed) and loads items by id, so that the
flow can hand small, hashable id chunks to its tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from schemas.record import Rejection, SourceItem

if TYPE_CHECKING:
    from pipeline.config import SourceSettings


class Source(Protocol):
    name: str

    def list_ids(self, limit: int | None, seed: int) -> list[str]: ...

    def load_items(self, ids: list[str]) -> list[SourceItem | Rejection]: ...


def get_source(settings: SourceSettings, cache_dir: Path) -> Source:
    """The source named in the settings; an unknown name is a clear error."""
    if settings.name == "flagworld":
        from pipeline.sources.flagworld import FlagworldSource

        return FlagworldSource()
    if settings.name in ("okvqa-hub", "okvqa-files"):
        from pipeline.sources.okvqa import get_okvqa_source

        return get_okvqa_source(settings, cache_dir=cache_dir)
    raise ValueError(f"unknown source {settings.name!r}: use flagworld, okvqa-hub or okvqa-files")
