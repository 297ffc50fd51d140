"""The EasyEdit export loads with EasyEdit's own loader once the two documented settings are
set (issue 13, part 3).

`easyedit_records` below re-states, for reference and without EasyEdit installed, what
`VQADataset.__init__` of zjunlp/EasyEdit (`easyeditor/dataset/vqa.py`) does with the JSON:
skip records whose `alt` is empty, open `join(coco_image, image)`,
`join(rephrase_image, image_rephrase)` and `join(coco_image, m_loc)` as images, read the
text fields, and drop the item if any of them is an empty string. Its `collate_fn` then asks
`loc` with no image at all (`loc['image'] = None`, or a text-only chat).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.assemble import build_records
from pipeline.images import RenderBackend
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.sources.flagworld import FlagworldSource
from schemas.easyedit import EASYEDIT_FIELDS, easyedit_entry, export_easyedit
from schemas.record import OkeditRecord, Rejection

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
# The record fields VQADataset.__init__ reads, image paths first.
IMAGE_FIELDS = {"image": "coco_image", "image_rephrase": "rephrase_image", "m_loc": "coco_image"}
TEXT_FIELDS = ("src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
# Words that make a question point at an image it is shown with.
DEICTIC = re.compile(r"\b(this|these|that|shown|image|picture|here|flag)\b")


def easyedit_records(annotation: Path, coco_image: str, rephrase_image: str) -> list[dict]:
    """The items VQADataset.__init__ keeps, with every image opened as its processor does."""
    roots = {"coco_image": coco_image, "rephrase_image": rephrase_image}
    items = []
    for record in json.loads(annotation.read_text()):
        if record["alt"] == "":
            continue
        images = {}
        for field, root in IMAGE_FIELDS.items():
            with Image.open(os.path.join(roots[root], record[field])) as img:
                images[field] = img.convert("RGB").size
        item = {field: record[field] for field in TEXT_FIELDS}
        if any(value == "" for value in item.values()):
            continue  # EasyEdit drops the item silently
        items.append({**item, **images})
    return items


@pytest.fixture(scope="module")
def records() -> list[OkeditRecord]:
    """Flagworld records built by the real stages (source, annotator, render, QC)."""
    source = FlagworldSource()
    items = [
        i for i in source.load_items(source.list_ids(12, seed=0)) if not isinstance(i, Rejection)
    ]
    anns = [a for a in FlagworldAnnotator(seed=0).annotate(items) if not isinstance(a, Rejection)]
    by_id = {i.item_id: i for i in items}
    images = RenderBackend(seed=0).make_images([(by_id[a.item_id], a) for a in anns])
    built, _ = build_records(items, anns, [i for i in images if not isinstance(i, Rejection)])
    assert len(built) >= 8
    return built


@pytest.fixture(scope="module")
def exported(records, tmp_path_factory) -> Path:
    return export_easyedit(records, tmp_path_factory.mktemp("export") / "easyedit")


def test_documented_settings_load_every_record(records, exported) -> None:
    lines = re.findall(r"^(coco_image|rephrase_image): (\S+)$", DOCS.read_text(), re.M)
    assert dict(lines) == {
        "coco_image": "/path/to/okedit-out/demo/easyedit/",
        "rephrase_image": "/path/to/okedit-out/demo/easyedit/",
    }
    root = str(exported.parent) + "/"  # the documented value: the export folder
    items = easyedit_records(exported, coco_image=root, rephrase_image=root)
    assert len(items) == len(records)  # nothing skipped or dropped
    raw = json.loads(exported.read_text())
    for item, entry, record in zip(items, raw, records, strict=True):
        assert tuple(entry) == ("item_id", *EASYEDIT_FIELDS) and entry["item_id"] == record.item_id
        for field in IMAGE_FIELDS:
            assert not Path(entry[field]).is_absolute()
            assert item[field] == (64, 64)
        expected = {
            "src": record.question,
            "pred": record.original_answer,
            "alt": record.target,
            "rephrase": record.rephrases[0],
            "m_loc_q": record.question,
            "m_loc_a": record.locality_answer,
        }
        assert {k: item[k] for k in expected} == expected
        image_bytes = {
            "image": record.image,
            "image_rephrase": record.image_rephrases[0],
            "m_loc": record.locality_images[0],
        }
        for field, data in image_bytes.items():
            assert (exported.parent / entry[field]).read_bytes() == data


def test_shipped_settings_fail_on_the_first_record(exported, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # EasyEdit's `../` is relative to where Python runs
    with pytest.raises(FileNotFoundError):
        easyedit_records(exported, coco_image="../", rephrase_image="../")


def test_loc_is_an_image_free_question_of_its_own(records, exported) -> None:
    items = easyedit_records(exported, str(exported.parent), str(exported.parent))
    for item, record in zip(items, records, strict=True):
        free = record.image_free_locality
        assert free is not None
        assert (item["loc"], item["loc_ans"]) == (free.question, free.answer)
        assert not item["loc"].startswith("nq question:")  # not from Natural Questions
        assert not DEICTIC.search(item["loc"]), item["loc"]  # asked with no image
        assert item["loc"] not in {n.question for n in record.text_negatives}
        assert item["loc_ans"] not in {*record.answers, record.target}
    assert len({item["loc"] for item in items}) >= len(items) - 1  # one per item


def test_a_record_without_an_image_free_question_is_refused(records, tmp_path) -> None:
    """No `loc` that needs the image, and no record silently left out: an old record is
    refused alone and refuses the export, naming it, before anything is written."""
    old = records[0].model_copy(update={"image_free_locality": None})
    with pytest.raises(ValueError, match="image_free_locality") as error:
        easyedit_entry(old, tmp_path, tmp_path)
    assert old.item_id in str(error.value)
    with pytest.raises(ValueError, match="image_free_locality") as error:
        export_easyedit([*records[1:3], old], tmp_path / "easyedit")
    assert old.item_id in str(error.value) and records[1].item_id not in str(error.value)
    assert not (tmp_path / "easyedit").exists()
