"""On-disk state of a build: per-stage, per-chunk outputs with completion markers.

Every stage writes, for each chunk, `<stage>/chunk-NNNNN.ok.parquet` (the models that
passed), `...rejected.parquet` (the `Rejection`s) and last a `...done.json` marker with the
counts. A chunk with a marker is finished; a re-run skips it, so an interrupted build
resumes where it stopped. Parquet (not JSON) keeps image bytes compact and typed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import BaseModel

from schemas.record import Rejection

M = TypeVar("M", bound=BaseModel)

STAGES = ("gather", "annotate", "images", "assemble", "validate")


class BuildExistsError(RuntimeError):
    """The output folder holds a different build."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_models(path: Path, models: Sequence[BaseModel]) -> None:
    table = pa.Table.from_pylist([m.model_dump() for m in models])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_models(path: Path, model: type[M]) -> list[M]:
    return [model.model_validate(row) for row in pq.read_table(path).to_pylist()]


class WorkDir:
    """The `.okedit/` folder inside an output folder."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.root = self.out / ".okedit"

    def _chunk(self, stage: str, index: int, suffix: str) -> Path:
        return self.root / stage / f"chunk-{index:05d}.{suffix}"

    def is_done(self, stage: str, index: int) -> bool:
        return self._chunk(stage, index, "done.json").exists()

    def write_chunk(
        self, stage: str, index: int, ok: Sequence[BaseModel], rejected: Sequence[Rejection]
    ) -> dict[str, int]:
        """Write a chunk's results, then its marker (so a crash never leaves a false 'done')."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        _write_models(self._chunk(stage, index, "ok.parquet"), ok)
        _write_models(self._chunk(stage, index, "rejected.parquet"), rejected)
        counts = {"ok": len(ok), "rejected": len(rejected)}
        _atomic_write_bytes(self._chunk(stage, index, "done.json"), json.dumps(counts).encode())
        return counts

    def read_ok(self, stage: str, index: int, model: type[M]) -> list[M]:
        return _read_models(self._chunk(stage, index, "ok.parquet"), model)

    def read_rejected(self, stage: str, index: int) -> list[Rejection]:
        return _read_models(self._chunk(stage, index, "rejected.parquet"), Rejection)

    def chunk_counts(self, stage: str, index: int) -> dict[str, int]:
        return json.loads(self._chunk(stage, index, "done.json").read_text())

    def check(self, fingerprint: str) -> bool:
        """True when this folder holds this build (resume), False when it is free.

        Raises `BuildExistsError` when the folder holds a different build or other files,
        so that no earlier output is ever overwritten by an unrelated configuration.
        """
        marker = self.root / "build.json"
        if marker.exists():
            held = json.loads(marker.read_text())
            if held.get("fingerprint") != fingerprint:
                raise BuildExistsError(
                    f"{self.out} holds a different build (fingerprint {held.get('fingerprint')}"
                    f" != {fingerprint}); choose another --out or delete that folder"
                )
            return True
        if self.out.exists() and any(p.name != ".okedit" for p in self.out.iterdir()):
            raise BuildExistsError(
                f"{self.out} is not empty and is not an okedit build; choose another --out"
            )
        return False

    def lock(self) -> FileLock:
        """Held for a whole build: a second build into this folder waits for the first."""
        return FileLock(self.root / "build.lock")

    def claim(self, fingerprint: str, description: dict) -> bool:
        """Bind this folder to one build. Returns True when resuming an earlier run."""
        if self.check(fingerprint):
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": fingerprint, "config": description}
        _atomic_write_bytes(self.root / "build.json", json.dumps(payload, indent=2).encode())
        return False
