import pytest

from pipeline.work import BuildExistsError, WorkDir
from schemas.record import Rejection
from tests.records import make_record


def test_chunk_round_trip_and_marker(tmp_path):
    work = WorkDir(tmp_path / "out")
    work.claim("abc", {})
    assert not work.is_done("assemble", 0)
    rejected = [Rejection(item_id="x", stage="build", reason="because")]
    counts = work.write_chunk("assemble", 0, [make_record("a")], rejected)
    assert counts == {"ok": 1, "rejected": 1}
    assert work.is_done("assemble", 0)
    from schemas.record import OkeditRecord

    assert work.read_ok("assemble", 0, OkeditRecord)[0] == make_record("a")
    assert work.read_rejected("assemble", 0) == rejected


def test_empty_chunk(tmp_path):
    work = WorkDir(tmp_path)
    work.write_chunk("gather", 3, [], [])
    from schemas.record import SourceItem

    assert work.read_ok("gather", 3, SourceItem) == []


def test_claim_refuses_another_build_and_keeps_its_files(tmp_path):
    work = WorkDir(tmp_path / "out")
    assert work.claim("one", {"a": 1}) is False
    (tmp_path / "out" / "README.md").write_text("earlier output")
    assert work.claim("one", {"a": 1}) is True
    with pytest.raises(BuildExistsError, match="different build"):
        work.claim("two", {"a": 2})
    assert (tmp_path / "out" / "README.md").read_text() == "earlier output"


def test_claim_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BuildExistsError, match="not an okedit build"):
        WorkDir(tmp_path).claim("one", {})


def test_threads_write_one_stats_file_at_once(tmp_path):
    """Chunks of one process run in threads and write the process's stats file each."""
    from concurrent.futures import ThreadPoolExecutor

    work = WorkDir(tmp_path)

    def write(n: int) -> None:
        for i in range(30):
            work.write_stats("images", "this-process", {"images": n * 100 + i})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))  # a shared temporary file raised FileNotFoundError
    (stats,) = work.read_stats("images")
    assert set(stats) == {"images"}
