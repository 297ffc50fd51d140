"""The item check (pipeline/check.py) on hand-made records and probe results: each rule, the
drop-and-reindex of bad probes, and the statuses."""

from __future__ import annotations

import pytest

from pipeline.check import (
    CheckConfig,
    check_item,
    dropped_probes,
    reindexed,
    without_probes,
)
from pipeline.similarity import SimilarityChecker
from schemas.record import ProbeResult, TextNegative
from tests.records import make_record

CONFIG = CheckConfig(text_similarity=False)


def probe(kind: str, index: int, answer: str, expected: str = "lyon") -> ProbeResult:
    return ProbeResult(
        kind=kind,
        index=index,
        distance=0.1,
        routed=True,
        expected=expected,
        pre_accuracy=0.0,
        post_accuracy=1.0,
        pre_answer=answer,
        pre_generation_match=0.0,
    )


def record(**overrides):
    fields = dict(
        rephrases=[
            f"what is the capital city of this flag's country, variant {i}?" for i in range(4)
        ],
        rephrases_train=["which city is the capital of the country this flag belongs to?"],
        image_rephrases=[b"x"] * 4,
        locality_images=[b"y"] * 3,
        text_negatives=[
            TextNegative(
                question="what currency is used in the country of this flag?", answer="euro"
            ),
            TextNegative(
                question="which language is spoken in the country of this flag?", answer="french"
            ),
            TextNegative(
                question="on which continent is the country of this flag?", answer="europe"
            ),
        ],
    )
    return make_record(**{**fields, **overrides})


def probes(**answers: str) -> list[ProbeResult]:
    """All probes of `record()` answered correctly by the clean model, with overrides by name
    (e.g. `image_rephrase_2="rome"`)."""
    rows = [probe("edit", 0, "paris")]
    rows += [probe("rephrase", i, "paris") for i in range(4)]
    rows += [probe("image_rephrase", i, "paris") for i in range(4)]
    rows += [probe("locality", i, "moscow", "moscow") for i in range(3)]
    rows += [probe("text_negative", i, a, a) for i, a in enumerate(["euro", "french"])]
    rows += [probe("train_pos", 0, "paris"), probe("train_neg", 0, "amsterdam", "amsterdam")]
    rows += [probe("train_text_neg", 2, "europe", "europe")]
    for name, answer in answers.items():
        kind, index = name.rsplit("_", 1)
        row = next(p for p in rows if p.kind == kind and p.index == int(index))
        row.pre_answer = answer
    return rows


def codes(check) -> list[tuple[str, str]]:
    return [(r.code, r.probe) for r in check.reasons]


def test_a_sound_item_has_no_reasons() -> None:
    check = check_item(record(), probes(), CONFIG)
    assert check.status == "sound" and check.reasons == [] and check.knows_original
    assert check.clean_answer == "paris"


def test_model_gap_when_the_clean_model_does_not_know_the_fact() -> None:
    check = check_item(record(), probes(edit_0="rome"), CONFIG)
    assert check.status == "model_gap" and not check.knows_original
    assert codes(check) == [("model_gap", "edit[0]")]
    assert "rome" in check.reasons[0].measured


def test_target_equal_to_a_gold_answer_is_unsound() -> None:
    check = check_item(record(target="Paris"), probes(), CONFIG)
    assert check.status == "unsound" and ("target_is_gold", "") in codes(check)


def test_near_miss_answer_equal_to_the_original_is_unsound() -> None:
    check = check_item(record(locality_answer="the paris"), probes(), CONFIG)
    assert check.status == "unsound" and ("near_miss_answer_is_gold", "") in codes(check)


def test_one_bad_image_rephrase_is_dropped_and_the_item_stays_sound() -> None:
    check = check_item(record(), probes(image_rephrase_2="rome"), CONFIG)
    assert check.status == "sound"
    assert codes(check) == [("image_rephrase_differs", "image_rephrase[2]")]
    assert dropped_probes(check) == {"image_rephrase[2]"}


def test_most_image_rephrases_bad_makes_the_item_unsound_and_drops_nothing() -> None:
    bad = {f"image_rephrase_{i}": "rome" for i in range(3)}
    check = check_item(record(), probes(**bad), CONFIG)
    assert check.status == "unsound" and ("too_many_bad", "image_rephrase") in codes(check)
    assert dropped_probes(check) == set()  # an unsound item keeps its probes as they are


def test_near_miss_answered_with_the_original_is_dropped() -> None:
    check = check_item(record(), probes(locality_1="Paris"), CONFIG)
    assert check.status == "sound"
    assert dropped_probes(check) == {"locality[1]"}
    assert codes(check) == [("near_miss_looks_original", "locality[1]")]


def test_near_misses_the_model_cannot_tell_apart_are_a_model_gap() -> None:
    check = check_item(record(), probes(locality_0="paris", locality_2="paris"), CONFIG)
    assert check.status == "model_gap" and check.knows_original
    assert ("near_miss_indistinct", "locality") in codes(check)
    assert dropped_probes(check) == set()  # the item keeps its near misses
    training = check_item(record(), probes(train_neg_0="paris"), CONFIG)
    assert training.status == "model_gap"
    assert codes(training) == [("bad_training_probe", "train_neg[0]")]


def test_a_rephrase_answered_as_another_question_is_dropped() -> None:
    check = check_item(record(), probes(rephrase_3="euro"), CONFIG)
    assert codes(check) == [("rephrase_differs", "rephrase[3]")]


def test_a_text_negative_that_expects_the_original_is_dropped() -> None:
    negatives = record().text_negatives
    negatives[1] = TextNegative(question="what is this country's capital?", answer="paris")
    rows = probes()
    rows[[p.kind for p in rows].index("text_negative") + 1].expected = "paris"
    check = check_item(record(text_negatives=negatives), rows, CONFIG)
    assert codes(check) == [("text_negative_same_fact", "text_negative[1]")]


def test_a_text_negative_answered_with_the_original_is_dropped() -> None:
    check = check_item(record(), probes(text_negative_0="paris"), CONFIG)
    assert codes(check) == [("text_negative_same_fact", "text_negative[0]")]
    assert check.status == "sound" and dropped_probes(check) == {"text_negative[0]"}


def test_a_bad_training_probe_makes_the_item_unsound() -> None:
    check = check_item(record(), probes(train_pos_0="euro"), CONFIG)
    assert check.status == "unsound"
    assert codes(check) == [("bad_training_probe", "train_pos[0]")]
    assert not check.reasons[0].dropped


def test_answer_rules_wait_for_a_model_that_knows_the_fact() -> None:
    # the model does not know the fact: its other answers say nothing about the probes
    check = check_item(record(), probes(edit_0="rome", image_rephrase_1="oslo"), CONFIG)
    assert check.status == "model_gap" and codes(check) == [("model_gap", "edit[0]")]


def test_without_answers_the_check_does_not_run() -> None:
    rows = probes()
    for p in rows:
        p.pre_answer, p.pre_generation_match = "", -1.0
    assert check_item(record(), rows, CONFIG).status == "not_run"


@pytest.fixture(scope="module")
def similarity() -> SimilarityChecker:
    return SimilarityChecker()


def test_text_similarity_flags_far_rephrases_and_paraphrased_negatives(similarity) -> None:
    rephrases = record().rephrases
    rephrases[1] = "how many people live in this city?"
    negatives = record().text_negatives
    negatives[0] = TextNegative(
        question="what is the capital city of the country with this flag?", answer="euro"
    )
    item = record(rephrases=rephrases, text_negatives=negatives)
    check = check_item(item, probes(), CheckConfig(), similarity)
    assert ("rephrase_far", "rephrase[1]") in codes(check)
    assert ("text_negative_paraphrase", "text_negative[0]") in codes(check)
    assert check.status == "sound"  # one bad probe per family: dropped, not unsound
    clean = check_item(record(), probes(), CheckConfig(), similarity)
    assert clean.status == "sound" and clean.reasons == []


def test_a_shared_answer_string_counts_only_with_close_wording(similarity) -> None:
    """Another fact may share the original's string ("luxembourg": capital and country):
    far wording is no defect; close wording is dropped as asking the same fact (MiniLM puts
    "which country uses this flag?" at 0.85 from the capital question: measured, accepted)."""
    item = record(answers=["luxembourg"] * 10, original_answer="luxembourg")
    rows = probes(edit_0="luxembourg", text_negative_0="luxembourg")
    for p in rows:
        if p.kind in ("rephrase", "image_rephrase", "train_pos"):
            p.pre_answer = "luxembourg"
    rows[[p.kind for p in rows].index("text_negative")].expected = "luxembourg"

    def check(question: str):
        negatives = list(item.text_negatives)
        negatives[0] = TextNegative(question=question, answer="luxembourg")
        changed = item.model_copy(update={"text_negatives": negatives})
        return check_item(changed, rows, CheckConfig(), similarity)

    far = check("which grand duchy is this?")
    assert far.status == "sound" and far.reasons == []
    close = check("which country uses this flag?")
    assert close.status == "sound" and dropped_probes(close) == {"text_negative[0]"}


def test_dropping_prunes_the_record_and_renumbers_the_probes() -> None:
    item = record()
    rows = probes()
    dropped = {"image_rephrase[1]", "text_negative[0]"}
    pruned = without_probes(item, dropped)
    assert len(pruned.image_rephrases) == 3 and len(pruned.text_negatives) == 2
    assert pruned.text_negatives[0] == item.text_negatives[1]
    left = reindexed(rows, dropped)
    assert [p.index for p in left if p.kind == "image_rephrase"] == [0, 1, 2]
    assert [p.index for p in left if p.kind == "text_negative"] == [0]
    # the held-out training text negative still points at its question
    train = next(p for p in left if p.kind == "train_text_neg")
    assert pruned.text_negatives[train.index] == item.text_negatives[2]


def test_filtered_items_are_counted_as_rejections(tmp_path) -> None:
    """in = published + rejected holds with the filter on: every dropped item is a rejection
    of the validate stage, in the summary, the manifest and rejected.jsonl."""
    import json

    from pipeline.config import BuildConfig, resolve
    from pipeline.stages import finalize
    from pipeline.work import WorkDir
    from schemas.record import CheckReason, ItemCheck, Validation

    def checked(item_id: str, status: str):
        reasons = [] if status == "sound" else [CheckReason(code="model_gap", probe="edit[0]")]
        check = ItemCheck(status=status, reasons=reasons)
        return make_record(item_id, validation=Validation(verdict="fail", check=check))

    records = [checked("a", "sound"), checked("b", "unsound"), checked("c", "model_gap")]
    cfg = BuildConfig(
        out=tmp_path / "out",
        limit=3,
        chunk_size=3,
        validation={"filter": "model-gap", "enabled": False},
    )
    work = WorkDir(cfg.out)
    for stage in ("gather", "annotate", "images", "assemble"):
        work.write_chunk(stage, 0, [], [])
    work.write_chunk("validate", 0, records, [])
    summary = finalize(resolve(cfg))
    assert summary["counts"] == {"in": 3, "published": 1, "rejected": 2}
    assert summary["stages"]["validate"] == {"ok": 1, "rejected": 2}
    lines = (cfg.out / "rejected.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["item_id"] for line in lines) == ["b", "c"]
    manifest = json.loads((cfg.out / "manifest.json").read_text())
    assert manifest["counts"] == summary["counts"]
