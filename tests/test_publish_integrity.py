"""Publishing and re-validation lose nothing (issue 12): stored image bytes survive, an empty
result is a complete folder, an interrupted publish keeps the old data, and the manifest
describes what was published with the settings that were used."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image, ImageDraw

import pipeline.publish as publish
from pipeline.config import BuildConfig, ValidateSettings, resolve_validation
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.publish import describe_for_manifest, publish_local
from pipeline.revalidate import read_folder, revalidate_folder
from schemas.easyedit import EASYEDIT_FIELDS
from schemas.features import OKEDIT_FEATURES
from schemas.record import IMAGE_FIELDS, IMAGE_LIST_FIELDS, ItemCheck, OkeditRecord, Validation
from tests.records import make_record


def jpeg(seed: int, size: int = 64) -> bytes:
    """A JPEG with edges and gradients, so that any decode/re-encode changes its bytes."""
    img = Image.new("RGB", (size, size), (seed * 37 % 256, 90, 200))
    draw = ImageDraw.Draw(img)
    for i in range(0, size, 6):
        draw.line([(i, 0), (size - i, size)], fill=((i * 7 + seed) % 256, 255 - i, i * 3))
    buffer = BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def jpeg_record(item_id: str, seed: int) -> OkeditRecord:
    return make_record(
        item_id,
        image=jpeg(seed),
        image_rephrases=[jpeg(seed + 1 + i) for i in range(10)],
        locality_images=[jpeg(seed + 20), jpeg(seed + 21)],
        locality_image_train=jpeg(seed + 30),
    )


def image_hashes(record: OkeditRecord) -> list[str]:
    images = [getattr(record, f) for f in IMAGE_FIELDS]
    images += [b for f in IMAGE_LIST_FIELDS for b in getattr(record, f)]
    return [hashlib.sha256(b).hexdigest() for b in images]


def parquet_image_hashes(folder: Path) -> dict[str, list[str]]:
    """Per item, the sha256 of every image cell as stored in the published parquet."""
    hashes = {}
    for path in sorted((folder / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            cells = [row[f] for f in IMAGE_FIELDS] + [c for f in IMAGE_LIST_FIELDS for c in row[f]]
            hashes[row["item_id"]] = [hashlib.sha256(c["bytes"]).hexdigest() for c in cells]
    return hashes


def visible_files(folder: Path) -> dict[Path, bytes]:
    """The published files (staging folders of an interrupted publish are hidden)."""
    return {
        p: p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def manifest_for(published: int, rejected: int) -> dict:
    return {
        "name": "OKEDIT",
        "fingerprint": "f",
        "config": BuildConfig().describe(),
        "annotator": "flagworld-offline",
        "counts": {"in": published + rejected, "published": published, "rejected": rejected},
    }


def build_settings() -> ValidateSettings:
    return ValidateSettings(editor={"key_variant": "last_prompt"})


def publish_build(records: list[OkeditRecord], out: Path) -> None:
    publish_local(
        records,
        [],
        out,
        manifest_for(len(records), 0),
        resolve_validation(build_settings()).summary(),
    )


@pytest.fixture()
def fake_validate(monkeypatch):
    """`validate_records` without a model: the verdict records the editor settings it got,
    the check status comes from `statuses` (default sound)."""
    import pipeline.validate

    statuses: dict[str, str] = {}

    def validate(
        records, config, model_config, model=None, show_progress=True, check=None, batch_items=1
    ):
        return [
            r.model_copy(
                update={
                    "validation": Validation(
                        verdict="ok",
                        editor=config.editor,
                        key_variant=config.key_variant,
                        model=model_config.name or model_config.model,
                        check=ItemCheck(status=statuses.get(r.item_id, "sound")),
                    )
                }
            )
            for r in records
        ]

    monkeypatch.setattr(pipeline.validate, "validate_records", validate)
    return statuses


def test_read_and_publish_again_keep_every_image_byte(tmp_path: Path):
    records = [jpeg_record("a", 1), jpeg_record("b", 50)]
    publish_build(records, tmp_path / "one")
    back, _, _ = read_folder(tmp_path / "one")
    assert [image_hashes(r) for r in back] == [image_hashes(r) for r in records]
    publish_build(back, tmp_path / "two")
    assert parquet_image_hashes(tmp_path / "two") == {r.item_id: image_hashes(r) for r in records}


def test_revalidation_in_place_keeps_every_image_byte(tmp_path: Path, fake_validate):
    records = [jpeg_record("a", 1), jpeg_record("b", 50)]
    out = tmp_path / "build"
    publish_build(records, out)
    for _ in range(2):  # each re-validation reads what the previous one wrote
        revalidate_folder(out, out, None, "cpu")
    assert parquet_image_hashes(out) == {r.item_id: image_hashes(r) for r in records}


def test_every_item_filtered_leaves_a_complete_empty_folder(tmp_path: Path, fake_validate):
    out = tmp_path / "build"
    publish_build([make_record("a"), make_record("b"), make_record("c")], out)
    fake_validate.update({"a": "unsound", "b": "unsound", "c": "unsound"})
    summary = revalidate_folder(out, out, None, "cpu", filter_mode="unsound")

    assert summary["counts"] == {"in": 3, "published": 0, "rejected": 3}
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 1 and pq.read_table(shards[0]).num_rows == 0
    assert pq.read_schema(shards[0]).remove_metadata() == OKEDIT_FEATURES.arrow_schema
    # non-streaming `load_dataset` refuses any split with no rows (huggingface/datasets#8401)
    streamed = load_dataset("parquet", data_files=str(shards[0]), split="train", streaming=True)
    assert streamed.features == OKEDIT_FEATURES and list(streamed) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == summary["counts"]
    assert manifest["files"]["data"] == [f"data/{shards[0].name}"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["item_id"] for r in rejected) == ["a", "b", "c"]
    assert all(r["stage"] == "validate" and r["reason"].startswith("unsound") for r in rejected)
    assert "3 items in, 0 published, 3 rejected" in (out / "README.md").read_text()
    assert json.loads((out / "easyedit" / "okedit.json").read_text()) == []
    assert read_folder(out)[0] == []
    # and an empty folder re-validates (no model load) and reconciles
    assert revalidate_folder(out, out, None, "cpu")["counts"] == summary["counts"]


def test_build_with_every_item_rejected_publishes_cleanly(tmp_path: Path):
    from schemas.record import Rejection

    rejections = [Rejection(item_id=i, stage="annotate", reason="no target") for i in "xy"]
    out = tmp_path / "build"
    paths = publish_local([], rejections, out, manifest_for(0, 2), None)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"] == {"in": 2, "published": 0, "rejected": 2}
    assert manifest["validation"]["validated"] == 0
    assert json.loads(paths["easyedit"].read_text()) == []
    assert len(paths["rejected"].read_text().splitlines()) == 2
    assert "plot" not in paths and paths["card"].exists()


def test_export_holds_exactly_the_published_items_with_their_ids(tmp_path: Path, fake_validate):
    out = tmp_path / "build"
    publish_build([make_record(i) for i in ("a", "b", "c")], out)
    fake_validate["b"] = "unsound"
    revalidate_folder(out, out, None, "cpu", filter_mode="unsound")
    entries = json.loads((out / "easyedit" / "okedit.json").read_text())
    assert [e["item_id"] for e in entries] == sorted(parquet_image_hashes(out)) == ["a", "c"]
    assert all(tuple(e) == ("item_id", *EASYEDIT_FIELDS) for e in entries)


def test_manifest_after_revalidation_names_the_new_settings(tmp_path: Path, fake_validate):
    out = tmp_path / "build"
    publish_build([make_record("a"), make_record("b")], out)
    before = json.loads((out / "manifest.json").read_text())
    assert before["validation"]["key_variant"] == "last_prompt"

    fake_validate["b"] = "model_gap"
    revalidate_folder(out, out, None, "cpu", editor={"key_variant": "reference"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["key_variant"] == "reference"
    assert manifest["validation"]["edit_config"]["key_variant"] == "reference"
    assert manifest["config"]["validation"]["resolved_editor"]["key_variant"] == "reference"
    assert manifest["validation"]["checks"] == {"sound": 1, "model_gap": 1}
    assert manifest["validation"]["verdicts"] == {"ok": 2}
    assert manifest["fingerprint"] == before["fingerprint"] and "revalidated" in manifest
    assert "| key variant | `reference` |" in (out / "README.md").read_text()


def test_summary_takes_the_resolved_settings_not_an_item(tmp_path: Path):
    record = make_record("a", validation=Validation(verdict="ok", key_variant="stale"))
    out = tmp_path / "build"
    publish_build([record], out)
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert validation["key_variant"] == "last_prompt"
    assert validation["model"] == build_settings().model
    assert validation["checks"] == {"not_run": 1}


def test_flagworld_manifest_names_no_okvqa_split_nor_llm(tmp_path: Path):
    out = tmp_path / "build"
    publish_build([make_record("a")], out)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["source"] == {"name": "flagworld"}
    assert config["annotator"] == {"kind": "offline", "offline_version": FlagworldAnnotator.version}
    okvqa = BuildConfig.model_validate(
        {"source": {"name": "okvqa-hub"}, "annotator": {"kind": "llm"}}
    ).describe()
    described = describe_for_manifest(okvqa)
    assert described["source"]["split"] == "val2014" and "coco_dir" not in described["source"]
    assert described["annotator"]["llm_model"] == okvqa["annotator"]["llm_model"]


@pytest.mark.parametrize("fails", ["parquet", "easyedit"])
def test_interrupted_publish_keeps_the_old_folder(tmp_path: Path, monkeypatch, fails):
    out = tmp_path / "build"
    publish_build([make_record("a"), make_record("b")], out)
    before = visible_files(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    if fails == "parquet":  # the second shard fails, after the first was written
        monkeypatch.setattr(publish, "SHARD_SIZE", 1)
        written = []
        real = publish.records_to_dataset

        def flaky(records):
            written.append(records)
            return broken() if len(written) > 1 else real(records)

        monkeypatch.setattr(publish, "records_to_dataset", flaky)
    else:
        monkeypatch.setattr(publish, "export_easyedit", broken)
    with pytest.raises(OSError, match="disk full"):
        publish_build([make_record(i) for i in "cdef"], out)

    assert visible_files(out) == before
    assert [r.item_id for r in read_folder(out)[0]] == ["a", "b"]
    monkeypatch.undo()
    publish_build([make_record("c")], out)
    assert [r.item_id for r in read_folder(out)[0]] == ["c"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_counts_that_do_not_match_the_records_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="do not match"):
        publish_local([make_record("a")], [], tmp_path / "build", manifest_for(2, 0), None)
