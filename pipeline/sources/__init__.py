"""Sources of knowledge-based VQA items, each normalized to `SourceItem`.

A source lists item ids (deterministic for a seed) and loads items by id, so that the
flow can hand small, hashable id chunks to its tasks.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
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


# The settings that name local files a source reads its items from.
INPUT_FILE_SETTINGS = {
    "okvqa-files": ("questions_file", "annotations_file"),
    "okvqa-hub": ("parquet",),
}


def input_files(settings: SourceSettings) -> dict[str, Path]:
    """The local input files of a source, by setting name (none for flagworld or the Hub)."""
    names = INPUT_FILE_SETTINGS.get(settings.name, ())
    return {n: Path(v) for n in names if (v := getattr(settings, n, None)) is not None}


def input_hashes(settings: SourceSettings) -> dict[str, str]:
    """`{setting name: sha256 of the file's bytes}` of the source's input files: with the
    config's fingerprint, the identity of a build (an edited questions file is another
    build). Keyed by setting, not path, so that no path of this machine is written with
    it; "" for a file that cannot be read (preflight reports it)."""
    return {name: file_sha256(path) for name, path in input_files(settings).items()}


def file_sha256(path: Path | str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    if not Path(path).is_file():
        return ""
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """Hashed once per file version (size and mtime are part of the cache key)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()
