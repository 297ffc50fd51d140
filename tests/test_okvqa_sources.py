"""OK-VQA sources: the VQA-API files with images from a real HTTP server on 127.0.0.1 or a
local COCO folder, and the Hub loader on a local parquet copy (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.download import DownloadConfig, ImageDownloader, check_url, image_problem
from pipeline.sources.okvqa import (
    OkvqaFileError,
    OkvqaFilesSource,
    OkvqaHubSource,
    get_okvqa_source,
)
from schemas.record import Rejection, SourceItem
from tests.fixtures_servers import FakeImageServer, Route, make_jpeg, make_png

GOOD_A, GOOD_B = make_jpeg(1), make_jpeg(2)
FAST = DownloadConfig(
    connect_timeout_s=1.0,
    read_timeout_s=0.3,
    retries=1,
    backoff_s=0.01,
    max_bytes=50_000,
    max_pixels=1_000_000,
    workers=4,
)

# image_id -> (question, route); 404 and the bomb are special
IMAGES: dict[int, Route | None] = {
    1: Route(GOOD_A),
    2: Route(GOOD_B),
    3: Route(b"\xff\xd8\xff\xe0 this is not a jpeg"),
    4: Route(GOOD_A, content_type="text/html"),
    5: Route(b"\xff" * 60_000),
    6: None,  # 404
    7: Route(GOOD_A, delay_s=1.0),  # slower than the read timeout, twice
    8: Route(GOOD_B, fail_first=1),  # one 503, then fine
    9: Route(make_png((2000, 2000)), content_type="image/png"),  # 4 Mpx > 1 Mpx guard
    10: Route(GOOD_A),  # same bytes as image 1: stored once
}


def image_path(image_id: int) -> str:
    return f"/val2014/COCO_val2014_{image_id:012d}.jpg"


def write_vqa_files(tmp_path: Path, extra_questions: list[Any] | None = None) -> tuple[Path, Path]:
    questions = [
        {
            "image_id": iid,
            "question": f"What is shown in picture {iid}?",
            "question_id": iid * 10 + 1,
        }
        for iid in IMAGES
    ]
    annotations = [
        {
            "image_id": iid,
            "question_id": iid * 10 + 1,
            "question_type": "other",
            "answer_type": "other",
            "answers": [
                {"answer": f"thing {iid}", "raw_answer": f"Thing {iid}", "answer_confidence": "yes"}
            ]
            * 10,
        }
        for iid in IMAGES
    ]
    questions += extra_questions or []
    q = tmp_path / "OpenEnded_mscoco_val2014_questions.json"
    a = tmp_path / "mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"questions": questions, "data_subtype": "val2014"}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


@pytest.fixture()
def image_server() -> Any:
    routes = {image_path(i): r for i, r in IMAGES.items() if r is not None}
    with FakeImageServer(routes) as server:
        yield server


def files_source(tmp_path: Path, server: FakeImageServer, **kwargs: Any) -> OkvqaFilesSource:
    q, a = write_vqa_files(tmp_path)
    return OkvqaFilesSource(
        q, a, image_base_url=server.url, cache_dir=tmp_path / "cache", download=FAST, **kwargs
    )


def by_id(results: list[SourceItem | Rejection]) -> dict[str, SourceItem | Rejection]:
    return {r.item_id: r for r in results}


def test_files_source_downloads_checks_and_rejects_with_reasons(
    tmp_path: Path, image_server: FakeImageServer
) -> None:
    source = files_source(tmp_path, image_server)
    ids = source.list_ids(None, seed=0)
    assert ids[0] == "okvqa-val-11" and len(ids) == len(IMAGES)
    results = source.load_items(ids + ["okvqa-val-999", "12345"])
    got = by_id(results)
    assert len(results) == len(IMAGES) + 2

    good = got["okvqa-val-11"]
    assert isinstance(good, SourceItem)
    assert good.image == GOOD_A and good.image_id == "1" and good.question_id == "11"
    assert good.source == "okvqa/val2014" and good.answers == ["thing 1"] * 10
    assert good.question == "What is shown in picture 1?" and good.question_type == "other"
    assert isinstance(got["okvqa-val-21"], SourceItem) and got["okvqa-val-21"].image == GOOD_B
    assert isinstance(got["okvqa-val-81"], SourceItem)  # a 503 is retried
    assert isinstance(got["okvqa-val-101"], SourceItem)

    def reason(item_id: str) -> str:
        r = got[item_id]
        assert isinstance(r, Rejection) and r.stage == "gather", item_id
        return r.reason

    assert "not a valid image" in reason("okvqa-val-31")
    assert "content-type 'text/html'" in reason("okvqa-val-41")
    assert "too large" in reason("okvqa-val-51")
    assert "HTTP 404" in reason("okvqa-val-61")
    assert "timed out" in reason("okvqa-val-71") and "after 2 attempts" in reason("okvqa-val-71")
    assert "bomb guard" in reason("okvqa-val-91")
    assert reason("okvqa-val-999") == "unknown question id"
    assert reason("okvqa-val-12345") == "unknown question id"

    objects = [p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 2  # GOOD_A (images 1 and 10), GOOD_B (2 and 8): content-addressed
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_files_source_resumes_from_the_cache(tmp_path: Path, image_server: FakeImageServer) -> None:
    first = files_source(tmp_path, image_server)
    first.load_items(["okvqa-val-11", "okvqa-val-21"])
    hits = sum(image_server.hits.values())
    again = files_source(tmp_path, image_server).load_items(["okvqa-val-11", "okvqa-val-21"])
    assert sum(image_server.hits.values()) == hits
    assert all(isinstance(r, SourceItem) for r in again)


def test_a_corrupted_cache_object_is_downloaded_again(
    tmp_path: Path, image_server: FakeImageServer
) -> None:
    source = files_source(tmp_path, image_server)
    source.load_items(["okvqa-val-21"])
    (obj,) = [p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()]
    obj.write_bytes(b"garbage")
    (item,) = files_source(tmp_path, image_server).load_items(["okvqa-val-21"])
    assert isinstance(item, SourceItem) and item.image == GOOD_B
    assert image_server.hits[image_path(2)] == 2


def test_local_coco_folder_is_used_before_downloading(
    tmp_path: Path, image_server: FakeImageServer
) -> None:
    coco = tmp_path / "coco" / "val2014"
    coco.mkdir(parents=True)
    (coco / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_B)
    (coco / "COCO_val2014_000000000003.jpg").write_bytes(b"broken")
    source = files_source(tmp_path, image_server, coco_dir=tmp_path / "coco")
    got = by_id(source.load_items(["okvqa-val-11", "okvqa-val-31", "okvqa-val-21"]))
    assert isinstance(got["okvqa-val-11"], SourceItem) and got["okvqa-val-11"].image == GOOD_B
    assert isinstance(got["okvqa-val-31"], Rejection)
    assert "bad local image" in got["okvqa-val-31"].reason
    assert isinstance(got["okvqa-val-21"], SourceItem)  # not local: downloaded
    assert image_server.hits[image_path(1)] == 0 and image_server.hits[image_path(3)] == 0


def test_local_only_without_base_url(tmp_path: Path) -> None:
    q, a = write_vqa_files(tmp_path)
    source = OkvqaFilesSource(
        q, a, coco_dir=tmp_path, image_base_url=None, cache_dir=tmp_path / "c"
    )
    (r,) = source.load_items(["okvqa-val-11"])
    assert isinstance(r, Rejection) and "not found in" in r.reason


def test_sampling_is_deterministic_and_in_source_order(tmp_path: Path) -> None:
    q, a = write_vqa_files(tmp_path)
    source = OkvqaFilesSource(q, a, cache_dir=tmp_path / "c")
    everything = source.list_ids(None, 0)
    five = source.list_ids(5, seed=3)
    assert five == source.list_ids(5, seed=3) and len(five) == 5
    assert five == [i for i in everything if i in five]
    assert source.list_ids(5, seed=4) != five or len(everything) <= 5


def test_malformed_files_raise_clear_errors(tmp_path: Path) -> None:
    q, a = write_vqa_files(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OkvqaFileError, match="not valid JSON"):
        OkvqaFilesSource(bad, a, cache_dir=tmp_path / "c").list_ids(None, 0)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"items": []}))
    with pytest.raises(OkvqaFileError, match="'questions' list"):
        OkvqaFilesSource(wrong, a, cache_dir=tmp_path / "c").list_ids(None, 0)
    with pytest.raises(OkvqaFileError, match="file not found"):
        OkvqaFilesSource(tmp_path / "missing.json", a, cache_dir=tmp_path / "c").list_ids(None, 0)


def test_malformed_entries_are_rejected_per_item(tmp_path: Path) -> None:
    extra = [
        {"image_id": "x", "question": "Broken?", "question_id": 7001},
        {"image_id": 1, "question": "", "question_id": 7002},
        {"image_id": 1, "question": "No annotation?", "question_id": 7003},
    ]
    q, a = write_vqa_files(tmp_path, extra)
    source = OkvqaFilesSource(q, a, image_base_url=None, cache_dir=tmp_path / "c")
    got = by_id(source.load_items(["7001", "7002", "7003"]))
    assert "image_id" in got["okvqa-val-7001"].reason
    assert "no question text" in got["okvqa-val-7002"].reason
    assert "no annotation" in got["okvqa-val-7003"].reason


def test_non_http_urls_are_refused(tmp_path: Path) -> None:
    q, a = write_vqa_files(tmp_path)
    with pytest.raises(ValueError, match="scheme 'file'"):
        OkvqaFilesSource(q, a, image_base_url="file:///etc", cache_dir=tmp_path / "c")
    assert check_url("ftp://example.org/x.jpg")
    assert check_url("http://127.0.0.1/x.jpg") is None
    result = ImageDownloader(tmp_path / "c").fetch("file:///etc/passwd")
    assert "unsupported URL scheme" in getattr(result, "reason", "")


def test_image_checks() -> None:
    assert image_problem(make_jpeg(0), 10_000) is None
    assert "bomb guard" in (image_problem(make_png((400, 400)), 10_000) or "")
    truncated = make_jpeg(0, (200, 200))[:-200]
    assert "not a valid image" in (image_problem(truncated, 10**6) or "")
    assert image_problem(b"", 10) == "empty file"


def test_factory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--okvqa-questions"):
        get_okvqa_source("okvqa-files")
    q, a = write_vqa_files(tmp_path)
    src = get_okvqa_source(
        "okvqa-files", questions_file=q, annotations_file=a, cache_dir=tmp_path, split="val"
    )
    assert isinstance(src, OkvqaFilesSource) and src.name == "okvqa-files"
    assert isinstance(get_okvqa_source("okvqa-hub"), OkvqaHubSource)
    with pytest.raises(ValueError, match="split"):
        get_okvqa_source("okvqa-hub", split="test2015")


# --------------------------------------------------------------------------- Hub layout


def write_parquet(path: Path, rows: dict[str, list[Any]]) -> Path:
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
            "question_type": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(path))
    return path


def lmms_rows() -> dict[str, list[Any]]:
    return {
        "question_id": ["2971475", "2971476", "1234560"],
        "image": [
            {"bytes": GOOD_A, "path": None},
            {"bytes": GOOD_B, "path": None},
            {"bytes": b"\xff\xd8 broken", "path": None},
        ],
        "question": ["What sport can you use this for?", "Who made this?", "Broken?"],
        "answers": [["racing"] * 10, ["honda"] * 10, ["x"] * 10],
        "question_type": ["sports", "brands", "other"],
        "answer_type": ["other", "other", "other"],
    }


def test_hub_source_on_the_lmms_lab_layout(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "val2014-00000-of-00001.parquet", lmms_rows())
    source = OkvqaHubSource(parquet=path, split="val2014")
    ids = source.list_ids(None, 0)
    assert ids == ["okvqa-val-2971475", "okvqa-val-2971476", "okvqa-val-1234560"]
    got = by_id(source.load_items([*ids, "okvqa-val-1"]))
    first = got["okvqa-val-2971475"]
    assert isinstance(first, SourceItem)
    assert first.image == GOOD_A and first.image_id == "297147" and first.question_id == "2971475"
    assert first.answers == ["racing"] * 10 and first.question_type == "sports"
    assert first.source == "okvqa/val2014"
    assert isinstance(got["okvqa-val-1234560"], Rejection)
    assert "bad image" in got["okvqa-val-1234560"].reason
    assert got["okvqa-val-1"].reason == "unknown question id"
    assert source.list_ids(2, seed=1) == source.list_ids(2, seed=1)


def test_hub_source_on_a_train_copy_with_other_columns(tmp_path: Path) -> None:
    import datasets

    rows = {
        "question_id": [5001, 5002],
        "image_id": [500, 500],
        "image": [{"bytes": GOOD_A, "path": None}, {"bytes": GOOD_B, "path": None}],
        "question": ["What is this?", "Where is this?"],
        "answers": [["cat"] * 10, ["home"] * 10],
        "confidence": [3, 2],
    }
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "question_id": datasets.Value("int64"),
                "image_id": datasets.Value("int64"),
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.List(datasets.Value("string")),
                "confidence": datasets.Value("int64"),
            }
        ),
    )
    path = tmp_path / "train.parquet"
    ds.to_parquet(str(path))
    source = OkvqaHubSource(parquet=path, split="train2014")
    items = source.load_items(source.list_ids(None, 0))
    assert [i.item_id for i in items] == ["okvqa-train-5001", "okvqa-train-5002"]
    assert all(isinstance(i, SourceItem) and i.source == "okvqa/train2014" for i in items)
    assert items[0].image_id == "500" and items[0].question_type == ""


def test_hub_source_missing_columns(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "x.parquet"
    datasets.Dataset.from_dict({"question_id": ["1"], "question": ["Q?"]}).to_parquet(str(path))
    with pytest.raises(OkvqaFileError, match="lacks column"):
        OkvqaHubSource(parquet=path).list_ids(None, 0)


def test_factory_takes_the_build_settings(tmp_path: Path) -> None:
    from pipeline.config import SourceSettings

    q, a = write_vqa_files(tmp_path)
    settings = SourceSettings(
        name="okvqa-files",
        questions_file=q,
        annotations_file=a,
        coco_dir=tmp_path,
        image_base_url="http://127.0.0.1:9",
    )
    source = get_okvqa_source(settings, cache_dir=tmp_path / "cache")
    assert isinstance(source, OkvqaFilesSource)
    assert source.image_url(1) == "http://127.0.0.1:9/val2014/COCO_val2014_000000000001.jpg"
    assert source.downloader.cache.root == tmp_path / "cache" / "images"
