"""EasyEdit's `loc`/`loc_ans` for OK-VQA builds (issue 13): an image-free question per item,
from `--text-locality FILE` or written by the LLM and checked client-side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.annotate import LLMAnnotator, make_annotator
from pipeline.assemble import assemble_record
from pipeline.config import AnnotatorSettings, BuildConfig
from schemas.record import Annotation, ItemImages
from tests.fixtures_servers import llm_server, okedit_responder, schema_name
from tests.test_llm_annotator import make_items

FACTS = [
    {"question": f"What is fact number {i} of world history?", "answer": f"answer {i}"}
    for i in range(40)
]


def write_pairs(path: Path, pairs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def annotator(url: str, tmp_path: Path, name: str, **extra: Any) -> LLMAnnotator:
    llm = {
        "base_url": url,
        "model": "fake-model",
        "api_key": "sk-test",
        "cache_path": str(tmp_path / f"{name}.sqlite"),
        "max_retries": 0,
    }
    return make_annotator({"llm": llm, **extra})


def test_file_pairs_are_distinct_deterministic_and_reach_the_record(tmp_path: Path) -> None:
    pairs = [{**FACTS[0], "source": "nq"}, *FACTS[1:]]
    path = write_pairs(tmp_path / "nq.jsonl", pairs)
    items = make_items(5)
    runs = []
    with llm_server() as server:
        for seed in (0, 0, 1):
            ann = annotator(
                server.url, tmp_path, f"s{seed}", text_locality_file=str(path),
                text_locality_seed=seed, image_free_locality=True,
            )  # fmt: skip
            runs.append(ann.annotate(items))
        assert server.log.schemas["ImageFreeLocalityOut"] == 0  # the file answers, not the LLM
    first, again, other = ([r.image_free_locality for r in run] for run in runs)
    assert all(isinstance(r, Annotation) for run in runs for r in run)
    assert len({q.question for q in first}) == len(items)  # a different pair per item
    assert first == again and first != other  # by item id and seed
    known = {(f["question"], f["answer"]) for f in FACTS}
    assert all((q.question, q.answer) in known for q in first)

    a = runs[0][0]
    images = ItemImages(
        item_id=a.item_id, image_rephrases=[b"x"], locality_images=[b"x"], locality_image_train=b"x"
    )
    record = assemble_record(items[0], a, images)
    assert record.image_free_locality == a.image_free_locality
    (prov,) = [p for p in record.provenance if p.field == "image_free_locality"]
    params = json.loads(prov.params)
    assert prov.backend == "text-locality-file" and prov.seed == 0
    assert FACTS[params["line"] - 1]["question"] == record.image_free_locality.question


def test_only_the_pair_from_nq_gets_the_nq_prefix_in_the_export(tmp_path: Path) -> None:
    """EasyEdit's `loc` carries MMEdit's "nq question: " prefix for a pair whose file line
    says `"source": "nq"` (recorded in the provenance params), and no other."""
    from schemas.easyedit import export_easyedit
    from tests.records import make_record

    pairs = [{**f, "source": "nq"} if i % 2 == 0 else f for i, f in enumerate(FACTS)]
    path = write_pairs(tmp_path / "mixed.jsonl", pairs)
    items = make_items(6)
    with llm_server() as server:
        ann = annotator(server.url, tmp_path, "mixed", text_locality_file=str(path))
        results = ann.annotate(items)
    records = []
    for item, a in zip(items, results, strict=True):
        assert isinstance(a, Annotation)
        images = ItemImages(
            item_id=a.item_id, image_rephrases=[b"x"], locality_images=[b"x"],
            locality_image_train=b"x",
        )  # fmt: skip
        built = assemble_record(item, a, images)
        records.append(
            make_record(
                built.item_id,
                image_free_locality=built.image_free_locality,
                provenance=built.provenance,
            )
        )
    export = json.loads(export_easyedit(records, tmp_path / "easyedit").read_text())
    by_question = {f["question"]: "source" in f for f in pairs}
    seen = set()
    for entry, record in zip(export, records, strict=True):
        free = record.image_free_locality
        assert free is not None and entry["loc_ans"] == free.answer
        from_nq = by_question[free.question]
        seen.add(from_nq)
        assert entry["loc"] == ("nq question: " + free.question if from_nq else free.question)
    assert seen == {True, False}  # both kinds among the items


def test_text_locality_joins_the_build_identity(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "nq.jsonl", FACTS)
    annotator = {"kind": "llm", "text_locality_file": str(path)}
    cfg = BuildConfig.model_validate({"source": {"name": "okvqa-hub"}, "annotator": annotator})
    before = cfg.fingerprint()
    assert str(path) not in json.dumps(cfg.describe())
    write_pairs(path, FACTS[:-1])
    assert cfg.fingerprint() != before
    with pytest.raises(ValueError, match="--text-locality needs --annotator llm"):
        AnnotatorSettings(text_locality_file=path)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not json", "line 2: not JSON"),
        ('{"question": "Who?"}', "line 2: needs non-empty string question and answer"),
        ('{"question": "What colour is this car?", "answer": "red"}', "refers to an image"),
    ],
)
def test_a_malformed_file_is_one_line_at_preflight(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FACTS[0]) + "\n" + line + "\n")
    with llm_server() as server, pytest.raises(ValueError) as error:
        annotator(server.url, tmp_path, "bad", text_locality_file=str(path))
    message = str(error.value)
    assert why in message and "\n" not in message and str(path) in message


def test_the_llm_writes_it_and_a_bad_reply_is_asked_again(tmp_path: Path) -> None:
    asked: list[int] = []

    def responder(body: dict[str, Any]) -> str:
        if schema_name(body) == "ImageFreeLocalityOut":
            asked.append(1)
            if len(asked) == 1:  # refers to the image
                return json.dumps({"question": "What is shown in this picture?", "answer": "x"})
            if len(asked) == 2:  # repeats an item answer
                return json.dumps({"question": "Which company makes Inspiron?", "answer": "Dell"})
        return okedit_responder(body)

    with llm_server(responder=responder) as server:
        ann = annotator(server.url, tmp_path, "llm", image_free_locality=True, retries=2)
        (result,) = ann.annotate(make_items(1))
    assert isinstance(result, Annotation) and len(asked) == 3
    free = result.image_free_locality
    assert free is not None and "this" not in free.question.lower()
    (prov,) = [p for p in result.provenance if p.field == "image_free_locality"]
    assert prov.backend == "openai-chat" and prov.template_id == "image_free_locality"
    assert json.loads(prov.params)["attempt"] == 2


def test_a_reply_that_stays_bad_rejects_the_item(tmp_path: Path) -> None:
    def responder(body: dict[str, Any]) -> str:
        if schema_name(body) == "ImageFreeLocalityOut":
            return json.dumps(
                {"question": "What brand is the computer in the photo?", "answer": "x"}
            )
        return okedit_responder(body)

    with llm_server(responder=responder) as server:
        ann = annotator(server.url, tmp_path, "bad-llm", image_free_locality=True, retries=1)
        (result,) = ann.annotate(make_items(1))
        assert server.log.schemas["ImageFreeLocalityOut"] == 2  # asked, then asked once more
    assert result.reason.startswith("image_free_locality: validation: ")


def test_builds_ask_for_it_and_a_related_question_is_refused() -> None:
    from pipeline.annotate import annotator_config, image_free_problems

    cfg = BuildConfig.model_validate(
        {"source": {"name": "okvqa-hub"}, "annotator": {"kind": "llm"}}
    )
    assert annotator_config(cfg).image_free_locality
    q = "What brand is the computer in item 3?"
    assert image_free_problems(
        "Which company makes this laptop brand's computers?", "x", [], q, 0.5
    )
    assert image_free_problems("Who makes the Dell computer brand laptops?", "x", [], q, 0.5)
    assert not image_free_problems("What is the capital of Peru?", "lima", ["dell"], q, 0.5)
