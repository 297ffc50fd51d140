"""A chunk's done-marker lands only after all of its data (issue 15).

A re-run skips every chunk with a marker, so a marker written before the data it vouches for
turns a crash between the two into a chunk that is "done" with missing or partial data, and
that data is never redone. These tests use the real `WorkDir` on a temporary folder and make
the writes fail as an interrupted write would (a real exception from the file system layer),
at every step of `write_chunk`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.work import WorkDir
from schemas.record import OkeditRecord, Rejection
from tests.records import make_record

STAGE = "assemble"


class Crash(OSError):
    """What an interrupted write raises (a full disk, a killed NFS mount, ...)."""


def chunk_data() -> tuple[list[OkeditRecord], list[Rejection]]:
    ok = [make_record("a"), make_record("b"), make_record("c")]
    rejected = [
        Rejection(item_id="x", stage="build", reason="because"),
        Rejection(item_id="y", stage="build", reason="also"),
    ]
    return ok, rejected


def assert_complete(work: WorkDir, index: int = 0) -> None:
    ok, rejected = chunk_data()
    assert work.is_done(STAGE, index)
    assert work.read_ok(STAGE, index, OkeditRecord) == ok
    assert work.read_rejected(STAGE, index) == rejected
    assert work.chunk_counts(STAGE, index) == {"ok": len(ok), "rejected": len(rejected)}


def assert_done_implies_complete(work: WorkDir, index: int = 0) -> None:
    """The invariant a resume relies on: a marker means the chunk reads back whole."""
    if work.is_done(STAGE, index):
        try:
            assert_complete(work, index)
        except (OSError, ValueError) as exc:  # missing or truncated parquet
            raise AssertionError(
                f"chunk marked done but its data does not read back: {type(exc).__name__}: {exc}"
            ) from exc


@pytest.mark.parametrize("failing", [1, 2], ids=["ok-data-fails", "rejected-data-fails"])
def test_failed_data_write_leaves_no_marker_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """The n-th parquet data file of the chunk fails to write: no marker, and the re-run
    (which skips only marked chunks) writes the whole chunk."""
    work = WorkDir(tmp_path / "out")
    work.claim("fp", {})
    real = pq.write_table
    calls = {"n": 0}

    def write_table(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing:
            raise Crash("interrupted while writing the chunk's data")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    ok, rejected = chunk_data()
    with pytest.raises(Crash):
        work.write_chunk(STAGE, 0, ok, rejected)
    assert calls["n"] == failing
    assert not work.is_done(STAGE, 0), "a chunk whose data write failed is marked done"

    monkeypatch.setattr(pq, "write_table", real)
    assert work.write_chunk(STAGE, 0, ok, rejected) == {"ok": 3, "rejected": 2}
    assert_complete(work)


def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Make the `step`-th file-system write (0-based) raise; returns the writes seen.

    The writes counted are the ones a file reaches disk through: `Path.write_bytes`,
    `Path.write_text` and `os.replace` (the atomic rename of a finished temporary file)."""
    seen: list[str] = []
    real = {
        "write_bytes": Path.write_bytes,
        "write_text": Path.write_text,
        "replace": os.replace,
    }

    def gate(what: str, target: object) -> None:
        seen.append(f"{what} {Path(str(target)).name}")
        if len(seen) - 1 == step:
            raise Crash(f"interrupted at {seen[-1]}")

    def write_bytes(self: Path, data: bytes) -> int:
        gate("write", self)
        return real["write_bytes"](self, data)

    def write_text(self: Path, data: str, *args, **kwargs) -> int:
        gate("write", self)
        return real["write_text"](self, data, *args, **kwargs)

    def replace(src, dst, *args, **kwargs) -> None:
        gate("replace", dst)
        return real["replace"](src, dst, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_a_crash_at_any_write_never_leaves_a_false_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash `write_chunk` at each of its file writes in turn; after every crash the chunk is
    either not done, or done and complete; and a re-run then completes it."""
    ok, rejected = chunk_data()
    step = 0
    while True:
        work = WorkDir(tmp_path / f"out-{step}")
        work.claim("fp", {})
        with monkeypatch.context() as patch:
            seen = _crash_at(patch, step)
            try:
                work.write_chunk(STAGE, 0, ok, rejected)
                crashed = False
            except Crash:
                crashed = True
        if not crashed:
            assert_complete(work)
            break
        assert_done_implies_complete(work)
        if not work.is_done(STAGE, 0):  # what a re-run does: redo the unmarked chunk
            work.write_chunk(STAGE, 0, ok, rejected)
        assert_complete(work)
        step += 1
        assert step < 50, f"write_chunk never finished: {seen}"
    assert step >= 3, f"expected at least the two data files and the marker, saw {seen}"


def test_the_marker_is_the_last_file_of_the_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record the order in which the chunk's files land: the marker comes after every data
    file, and when it lands the data it vouches for already reads back whole."""
    work = WorkDir(tmp_path / "out")
    work.claim("fp", {})
    landed: list[str] = []
    real_replace, real_write_bytes = os.replace, Path.write_bytes

    def note(target: object) -> None:
        name = Path(str(target)).name
        if name.startswith("chunk-"):  # the final name, not a temporary file
            if name.endswith("done.json"):
                # the marker is about to land: everything it vouches for is already there
                assert_complete_data(work)
            landed.append(name)

    def replace(src, dst, *args, **kwargs) -> None:
        note(dst)
        return real_replace(src, dst, *args, **kwargs)

    def write_bytes(self: Path, data: bytes) -> int:
        note(self)
        return real_write_bytes(self, data)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    ok, rejected = chunk_data()
    work.write_chunk(STAGE, 0, ok, rejected)
    monkeypatch.undo()

    assert landed[-1] == "chunk-00000.done.json", landed
    assert {"chunk-00000.ok.parquet", "chunk-00000.rejected.parquet"} <= set(landed[:-1]), landed
    assert_complete(work)


def assert_complete_data(work: WorkDir, index: int = 0) -> None:
    ok, rejected = chunk_data()
    try:
        assert work.read_ok(STAGE, index, OkeditRecord) == ok
        assert work.read_rejected(STAGE, index) == rejected
    except (OSError, ValueError) as exc:
        raise AssertionError(
            f"the done marker lands before the chunk's data: {type(exc).__name__}: {exc}"
        ) from exc


def test_rewriting_a_chunk_after_a_crash_keeps_other_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in chunk 1 leaves the finished chunk 0 done and whole, and chunk 1 undone."""
    work = WorkDir(tmp_path / "out")
    work.claim("fp", {})
    ok, rejected = chunk_data()
    work.write_chunk(STAGE, 0, ok, rejected)

    def broken(*args, **kwargs):
        raise Crash("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", broken)
        with pytest.raises(Crash):
            work.write_chunk(STAGE, 1, ok, rejected)
    assert_complete(work, 0)
    assert not work.is_done(STAGE, 1)
    work.write_chunk(STAGE, 1, ok, rejected)
    assert_complete(work, 1)
