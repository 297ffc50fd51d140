"""On-disk state of a build: per-stage, per-chunk outputs with completion markers.

Every stage writes, for each chunk, `<stage>/chunk-NNNNN.ok.parquet` (the models that
passed), `...rejected.parquet` (the `Rejection`s) and last a `...done.json` marker with the
counts. A chunk with a marker is finished; a re-run skips it, so an interrupted build
resumes where it stopped. Parquet (not JSON) keeps image bytes compact and typed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import BaseModel

from schemas.record import Rejection

M = TypeVar("M", bound=BaseModel)


class BuildExistsError(RuntimeError):
    """The output folder holds a different build."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # one temporary file per writer: threads of one process may write the same file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
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
        deferred = sum(r.deferred for r in rejected)
        counts = {"ok": len(ok), "rejected": len(rejected) - deferred}
        if deferred:  # failed on transient errors only: not final, a re-run retries them
            counts["deferred"] = deferred
        _atomic_write_bytes(self._chunk(stage, index, "done.json"), json.dumps(counts).encode())
        return counts

    def is_final(self, stage: str, index: int) -> bool:
        """Done, with no deferred item left for a re-run to retry."""
        return self.is_done(stage, index) and not self.chunk_counts(stage, index).get("deferred")

    def reopen(self, index: int, stages: Sequence[str]) -> None:
        """Remove the chunk's markers of `stages`: called before an earlier stage rewrites
        the chunk, so a crash in between leaves them to be redone."""
        for stage in stages:
            self._chunk(stage, index, "done.json").unlink(missing_ok=True)

    def marker_token(self, stage: str, index: int) -> str:
        """Identity of the chunk's current marker ("" when there is none): it changes each
        time the chunk is written, so it keys what was derived from the chunk."""
        try:
            stat = self._chunk(stage, index, "done.json").stat()
        except FileNotFoundError:
            return ""
        return f"{stat.st_ino}-{stat.st_mtime_ns}"

    def read_ok(self, stage: str, index: int, model: type[M]) -> list[M]:
        return _read_models(self._chunk(stage, index, "ok.parquet"), model)

    def read_rejected(self, stage: str, index: int) -> list[Rejection]:
        return _read_models(self._chunk(stage, index, "rejected.parquet"), Rejection)

    def chunk_counts(self, stage: str, index: int) -> dict[str, int]:
        return json.loads(self._chunk(stage, index, "done.json").read_text())

    def write_stats(self, stage: str, process: str, stats: dict) -> None:
        """What `stage` did in one process so far (cumulative: the last write counts), e.g.
        image requests and cost, which no chunk file holds."""
        folder = self.root / "stats"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(folder / f"{stage}-{process}.json", json.dumps(stats).encode())

    def read_stats(self, stage: str) -> list[dict]:
        """Every process's `write_stats` of `stage`, of every run of this build."""
        return [json.loads(f.read_text()) for f in sorted(self.root.glob(f"stats/{stage}-*.json"))]

    def check(self, fingerprint: str, inputs: dict[str, str] | None = None) -> bool:
        """True when this folder holds this build (resume), False when it is free.

        A build is its config's fingerprint and the content hashes of its input files
        (`pipeline.sources.input_hashes`). Raises `BuildExistsError` when the folder holds a
        different build or other files, so that no earlier output is ever overwritten by an
        unrelated configuration. A folder claimed by a build that finished no chunk (it
        failed at its start) holds nothing to keep: it is free.
        """
        marker = self.root / "build.json"
        if marker.exists():
            held = json.loads(marker.read_text())
            if held.get("fingerprint") != fingerprint:
                if self._nothing_built():
                    return False
                raise BuildExistsError(
                    f"{self.out} holds a different build (fingerprint {held.get('fingerprint')}"
                    f" != {fingerprint}); choose another --out or delete that folder"
                )
            if inputs is not None and "inputs" in held and held["inputs"] != inputs:
                if self._nothing_built():
                    return False
                changed = sorted(k for k in {*held["inputs"], *inputs}
                                 if held["inputs"].get(k) != inputs.get(k))  # fmt: skip
                raise BuildExistsError(
                    f"{self.out} was built from other input files ({', '.join(changed)} "
                    "changed since); choose another --out or delete that folder"
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

    def _nothing_built(self) -> bool:
        """No chunk finished, no other file, and no build running here."""
        if any(self.root.glob("*/*.done.json")):
            return False
        if any(p.name != ".okedit" for p in self.out.iterdir()):
            return False
        try:
            with FileLock(self.root / "build.lock", timeout=0):
                return True
        except TimeoutError:  # filelock.Timeout: a build holds the folder right now
            return False

    def claim(
        self, fingerprint: str, description: dict, inputs: dict[str, str] | None = None
    ) -> bool:
        """Bind this folder to one build. Returns True when resuming an earlier run."""
        if self.check(fingerprint, inputs):
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": fingerprint, "config": description}
        if inputs:
            payload["inputs"] = inputs
        _atomic_write_bytes(self.root / "build.json", json.dumps(payload, indent=2).encode())
        return False


# ---- build versions: one folder per build identity under an output root ------------------
#
# ROOT/<version>/   a complete build (the usual output folder, resumable while unfinished)
# ROOT/LATEST       text file: the version id of the last run that completed (built, or found
#                   built = a no-op), written atomically after the version is complete and,
#                   with a Hub target, pushed and verified.
# ROOT/<version>/.okedit/version.json  the record that the version is complete (and where
#                   it was pushed); written last, so its presence means "done".

LATEST = "LATEST"
VERSION_RECORD = "version.json"


def version_id(fingerprint: str, inputs: dict[str, str] | None = None) -> str:
    """The name of a build's version folder: its fingerprint, or, for sources read from
    files (okvqa-files), a hash of the fingerprint and the files' content hashes, so that an
    edited input file is a new version instead of a refused resume."""
    if not inputs:
        return fingerprint
    import hashlib

    blob = json.dumps({"fingerprint": fingerprint, "inputs": inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def version_revision(version: str) -> str:
    """The Hub branch a version is pushed to when the config names none."""
    return f"v-{version}"


def read_version_record(out: Path) -> dict | None:
    """The completion record of the version folder `out`, or None when it is unfinished."""
    path = Path(out) / ".okedit" / VERSION_RECORD
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def version_is_done(
    record: dict | None, fingerprint: str, inputs: dict[str, str], hub: tuple[str, str] | None
) -> str | None:
    """Why a run of this identity has nothing left to do (None when it has): the version is
    complete with this fingerprint and inputs, has no deferred items (a re-run would retry
    them), and, when `hub` = (repo_id, revision) is set, was pushed and verified there."""
    if not record or record.get("fingerprint") != fingerprint:
        return None
    if (record.get("inputs") or {}) != (inputs or {}):
        return None
    if record.get("summary", {}).get("counts", {}).get("deferred"):
        return None
    if hub is None:
        return "complete (no Hub target)"
    pushed = [p for p in record.get("hub", []) if (p.get("repo_id"), p.get("revision")) == hub]
    if not pushed:
        return None
    return f"complete and pushed to {hub[0]}@{hub[1]} ({pushed[-1].get('commit_url')})"


def write_version_record(
    out: Path,
    version: str,
    fingerprint: str,
    inputs: dict[str, str],
    summary: dict,
    hub: dict | None = None,
) -> dict:
    """Record the version folder `out` as complete (and, with `hub`, one more verified push,
    keeping earlier ones). Returns the record."""
    old = read_version_record(out) or {}
    pushes = list(old.get("hub", []))
    if hub:
        pushes.append(hub)
    record = {
        "version": version,
        "fingerprint": fingerprint,
        "inputs": inputs or {},
        "summary": summary,
        "hub": pushes,
    }
    path = Path(out) / ".okedit" / VERSION_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps(record, indent=2, default=str).encode())
    return record


def set_latest(root: Path, version: str) -> None:
    """Point ROOT/LATEST at `version` (atomic replace of a one-line text file)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(Path(root) / LATEST, f"{version}\n".encode())


def read_latest(root: Path) -> str | None:
    """The version ROOT/LATEST points at (None when no version completed yet)."""
    try:
        return (Path(root) / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None
