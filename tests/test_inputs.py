"""Inputs are part of a build's identity, and every input entry is accounted for (issue 16,
part 7).

- A questions file with 61 entries, 3 of them not items (not an object, no id, a repeated
  id): the source lists 61 ids and loads 58 items and 3 rejections with their reasons; the
  same for a Hub-layout parquet with a row without an id and a repeated id.
- A small OK-VQA-files build through the command line and the real flow (LLM annotator on
  the loopback server, local COCO images, tiny-CLIP retrieval): `in` counts every entry,
  rejected.jsonl gives each dropped entry its reason, the manifest holds the input files'
  sha256; the same command after the questions file was edited is refused in one line
  (exit 2) instead of resuming stale chunks, and runs again once the file is restored.
- A missing or malformed questions file: exit 2, one line, no traceback, no claimed folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import SourceSettings
from pipeline.sources import input_hashes
from pipeline.sources.okvqa import OkvqaFilesSource, OkvqaHubSource
from schemas.record import Rejection, SourceItem
from tests.fixtures_images_api import render_pool, tiny_clip
from tests.fixtures_servers import llm_server, make_jpeg

OKEDIT = str(Path(sys.executable).parent / "okedit")
ANSWERS = [{"answer": "cat", "answer_confidence": "yes"}] * 10


def vqa_entries(n_good: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """`n_good` valid questions (images 1..n) and their annotations, then three entries that
    are no items: a string, an object without question_id, a repeat of the first id."""
    questions: list[Any] = [
        {"image_id": i, "question": f"What animal is in picture {i}?", "question_id": i * 10}
        for i in range(1, n_good + 1)
    ]
    annotations = [
        {"image_id": i, "question_id": i * 10, "question_type": "other", "answers": ANSWERS}
        for i in range(1, n_good + 1)
    ]
    questions += [
        "What is this?",
        {"image_id": 1, "question": "Which id?"},
        {"image_id": 2, "question": "Again?", "question_id": 10},
    ]
    return questions, annotations


def write_files(root: Path, questions: list[Any], annotations: list[Any]) -> tuple[Path, Path]:
    q = root / "OpenEnded_mscoco_val2014_questions.json"
    a = root / "mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def write_coco(root: Path, image_ids: range) -> Path:
    folder = root / "coco" / "val2014"
    folder.mkdir(parents=True)
    for i in image_ids:
        (folder / f"COCO_val2014_{i:012d}.jpg").write_bytes(make_jpeg(i, size=(96, 72)))
    return root / "coco"


DROPPED = {
    "okvqa-val-#58": "malformed question entry 58: not an object but str",
    "okvqa-val-#59": "malformed question entry 59: no question_id",
    "okvqa-val-10#60": "duplicate question_id 10: entry 60 repeats entry 0 (the first is kept)",
}


def test_61_entries_are_61_ids_and_each_dropped_one_is_a_rejection(tmp_path: Path) -> None:
    q, a = write_files(tmp_path, *vqa_entries(58))
    coco = write_coco(tmp_path, range(1, 59))
    source = OkvqaFilesSource(q, a, coco_dir=coco, image_base_url=None, cache_dir=tmp_path / "c")
    ids = source.list_ids(None, 0)
    assert len(ids) == 61 and len(set(ids)) == 61
    results = source.load_items(ids)
    items = [r for r in results if isinstance(r, SourceItem)]
    rejected = {r.item_id: r.reason for r in results if isinstance(r, Rejection)}
    assert len(items) == 58
    assert rejected == DROPPED
    # a sample may draw them too, and still loads one result per id
    sample = source.list_ids(20, seed=1)
    assert len(source.load_items(sample)) == 20


def test_hub_rows_without_or_with_a_repeated_id_are_rejections(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
        }
    )
    rows = {
        "question_id": ["2971475", None, "2971475", "2971476"],
        "image": [{"bytes": make_jpeg(i), "path": None} for i in range(4)],
        "question": ["What sport?", "No id?", "Again?", "Who made this?"],
        "answers": [["racing"] * 10, ["x"], ["y"], ["honda"] * 10],
    }
    path = tmp_path / "val.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    source = OkvqaHubSource(parquet=path, split="val2014")
    ids = source.list_ids(None, 0)
    assert ids == ["okvqa-val-2971475", "okvqa-val-#1", "okvqa-val-2971475#2", "okvqa-val-2971476"]
    results = {r.item_id: r for r in source.load_items(ids)}
    assert isinstance(results["okvqa-val-2971475"], SourceItem)
    assert results["okvqa-val-2971475"].question == "What sport?"
    assert results["okvqa-val-#1"].reason == "malformed question entry 1: no question_id"
    assert results["okvqa-val-2971475#2"].reason.startswith("duplicate question_id 2971475")


def test_input_hashes_follow_the_files_content(tmp_path: Path) -> None:
    q, a = write_files(tmp_path, *vqa_entries(2))
    settings = SourceSettings(name="okvqa-files", questions_file=q, annotations_file=a)
    hashes = input_hashes(settings)
    assert hashes == {
        "questions_file": hashlib.sha256(q.read_bytes()).hexdigest(),
        "annotations_file": hashlib.sha256(a.read_bytes()).hexdigest(),
    }
    q.write_text(q.read_text().replace("picture 1", "picture one"))
    assert input_hashes(settings)["questions_file"] != hashes["questions_file"]
    assert input_hashes(SourceSettings()) == {}  # flagworld reads no file


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["build", *args], catch_exceptions=False)


def test_build_accounts_for_every_entry_and_refuses_an_edited_questions_file(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q, a = write_files(tmp_path, *vqa_entries(2))  # 2 items + 3 dropped entries
    coco = write_coco(tmp_path, range(1, 3))
    pool = render_pool(tmp_path / "pool")
    clip = tiny_clip(tmp_path / "tiny-clip")
    out = tmp_path / "okedit"
    try:
        with llm_server() as llm:
            args = [
                *("--source", "okvqa-files", "--out", str(out), "--chunk-size", "2"),
                *("--okvqa-questions", str(q), "--okvqa-annotations", str(a)),
                *("--coco-dir", str(coco), "--annotator", "llm", "--llm-base-url", llm.url),
                *("--image-backend", "retrieve", "--image-pool", str(pool)),
                *("--image-model", str(clip), "--no-validate"),
            ]
            first = invoke(*args)
            assert first.exit_code == 0, first.output
            manifest = json.loads((out / "manifest.json").read_text())
            rows = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]

            original = q.read_text()
            q.write_text(original.replace("picture 2", "picture two"))  # an edited question
            edited = invoke(*args)
            requests = llm.log.requests
            q.write_text(original)
            again = invoke(*args)
    finally:
        torch.set_num_threads(threads)
    assert manifest["counts"]["in"] == 5
    assert manifest["counts"]["in"] == manifest["counts"]["published"] + len(rows)
    dropped = {r["item_id"]: r["reason"] for r in rows if r["stage"] == "gather"}
    assert dropped == {
        "okvqa-val-#2": "malformed question entry 2: not an object but str",
        "okvqa-val-#3": "malformed question entry 3: no question_id",
        "okvqa-val-10#4": "duplicate question_id 10: entry 4 repeats entry 0 (the first is kept)",
    }
    assert manifest["inputs"] == {
        "questions_file": hashlib.sha256(original.encode()).hexdigest(),
        "annotations_file": hashlib.sha256(a.read_bytes()).hexdigest(),
    }
    assert edited.exit_code == 2
    assert "built from other input files (questions_file changed since)" in edited.output
    assert len(edited.output.strip().splitlines()) == 1
    assert llm.log.requests == requests  # refused before any request
    assert again.exit_code == 0, again.output  # the original file: the same build resumes


def run_okedit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API"))}
    return subprocess.run(
        [OKEDIT, "build", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("{not json", "not valid JSON"),
        (json.dumps({"items": []}), "expected an object with a 'questions' list"),
        ("", "not valid JSON"),
    ],
    ids=["missing", "not-json", "not-vqa", "empty"],
)
def test_a_missing_or_malformed_questions_file_is_one_line_and_exit_2(
    content: str | None, message: str, tmp_path: Path
) -> None:
    _, a = write_files(tmp_path, *vqa_entries(1))
    q = tmp_path / "questions.json"
    if content is not None:
        q.write_text(content)
    out = tmp_path / "okedit"
    result = run_okedit(
        *("--source", "okvqa-files", "--okvqa-questions", str(q), "--okvqa-annotations", str(a)),
        *("--annotator", "llm", "--llm-base-url", "http://127.0.0.1:9/v1", "--no-validate"),
        *("--out", str(out)),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {q}: ") and message in line
    assert not (out / ".okedit" / "build.json").exists()
