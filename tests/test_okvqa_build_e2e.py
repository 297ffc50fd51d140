"""Issue 5's "done when", end to end through the CLI and the Prefect flow (in-process, on
the session's embedded Prefect API): a small OK-VQA-files build (VQA-API files, COCO images
from a loopback image server, the LLM annotator on the loopback OpenAI-compatible server,
real-photo retrieval with a tiny random CLIP over a local pool) and a flagworld build with
the render backend. Validation is off (no VLM for COCO offline)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from datasets import load_dataset
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.image_backends.checks import NearDuplicateRule, fingerprint
from pipeline.images import check_image
from tests.fixtures_images_api import render_pool, tiny_clip
from tests.fixtures_servers import FakeImageServer, Route, llm_server, make_jpeg

IMAGE_IDS = (11, 12, 13)


def write_vqa_files(root: Path) -> tuple[Path, Path]:
    questions = [
        {"image_id": i, "question": f"What animal is in picture {i}?", "question_id": i * 10}
        for i in IMAGE_IDS
    ]
    answers = [{"answer": f"animal {i}", "answer_confidence": "yes"} for i in range(10)]
    annotations = [
        {"image_id": i, "question_id": i * 10, "question_type": "other", "answers": answers}
        for i in IMAGE_IDS
    ]
    q = root / "OpenEnded_mscoco_val2014_questions.json"
    a = root / "mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"questions": questions, "data_subtype": "val2014"}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def coco(image_id: int) -> bytes:
    return make_jpeg(image_id, size=(96, 72))


def build(*args: str) -> Any:
    result = CliRunner().invoke(app, ["build", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def published(out: Path) -> list[dict[str, Any]]:
    shard = next((out / "data").glob("*.parquet"))
    return list(load_dataset("parquet", data_files=str(shard), split="train"))


def encoded(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_images_pass_checks(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every image decodes, is large enough and RGB-convertible, is not a near-duplicate of
    the original, and has one provenance entry; returns those entries."""
    rule = NearDuplicateRule()
    original = fingerprint(encoded(row["image"]))
    every = [*row["image_rephrases"], *row["locality_images"], row["locality_image_train"]]
    assert len(row["image_rephrases"]) == 10 and len(every) == 14
    for img in every:
        data = encoded(img)
        assert check_image(data) is None
        assert not rule.same(fingerprint(data), original)
    prov = [
        p
        for p in row["provenance"]
        if p["field"].startswith(("image_rephrases[", "locality_images["))
        or p["field"] == "locality_image_train"
    ]
    assert len(prov) == 14
    return prov


def test_okvqa_files_build_with_retrieved_images(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)  # the build cache (.okedit-cache) stays in tmp_path
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CLIP on 2 shared cores
    questions, annotations = write_vqa_files(tmp_path)
    pool = render_pool(tmp_path / "pool")
    (pool / "own_copy.jpg").write_bytes(coco(IMAGE_IDS[0]))  # an item's own image
    clip = tiny_clip(tmp_path / "tiny-clip")
    routes = {f"/val2014/COCO_val2014_{i:012d}.jpg": Route(coco(i)) for i in IMAGE_IDS}
    out = tmp_path / "okedit"
    try:
        with FakeImageServer(routes) as images, llm_server() as llm:
            build(
                *("--source", "okvqa-files", "--out", str(out), "--chunk-size", "2"),
                *("--okvqa-questions", str(questions), "--okvqa-annotations", str(annotations)),
                *("--image-base-url", images.url),
                *("--annotator", "llm", "--llm-base-url", llm.url),
                *("--image-backend", "retrieve", "--image-pool", str(pool)),
                *("--image-model", str(clip), "--no-validate"),
            )
    finally:
        torch.set_num_threads(threads)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"in": 3, "published": 3, "rejected": 0}
    assert manifest["config"]["images"]["backend"] == "retrieve"
    rows = published(out)
    assert len(rows) == 3
    for row in rows:
        prov = assert_images_pass_checks(row)
        assert {p["backend"] for p in prov} == {"retrieve"}
        assert {p["model"] for p in prov} == {str(clip)}
        params = [json.loads(p["params"]) for p in prov]
        assert all(isinstance(p["score"], float) and p["prompt"] for p in params)
        files = [p["pool_file"] for p in params]
        assert len(set(files)) == 14 and "own_copy.jpg" not in files
    indexes = list((tmp_path / ".okedit-cache" / "images" / "pool-index").glob("*.npz"))
    assert len(indexes) == 1  # built once for both chunks


def test_flagworld_build_with_rendered_images(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "flagworld"
    build("--limit", "4", "--out", str(out), "--image-backend", "render", "--no-validate")
    rows = published(out)
    assert len(rows) >= 1
    for row in rows:
        prov = assert_images_pass_checks(row)
        assert {p["backend"] for p in prov} == {"render"}
        assert all(json.loads(p["params"])["country"] for p in prov)
