from pipeline.quality import check_record, majority_answer
from schemas.record import TextNegative
from tests.records import make_record


def test_clean_record_passes():
    assert check_record(make_record()) == []


def test_majority_answer_normalizes():
    assert majority_answer(["The Dog", "cat", "dog", "a dog"]) == "dog"


def test_each_rule_names_its_reason():
    cases = {
        "target is one of the original answers": {"target": "Paris"},
        "locality_answer is an original answer or the target": {"locality_answer": "lyon"},
        "empty fields: image_object": {"image_object": " "},
        "rephrases: 9 < 10": {"rephrases": [f"r {i}?" for i in range(9)]},
        "rephrases and rephrases_train overlap": {
            "rephrases_train": ["rephrase number 1?", "x?", "y?"]
        },
        "a text negative repeats the question": {
            "text_negatives": [TextNegative(question="rephrase number 2?", answer="euro")]
        },
        "image does not decode": {"image": b"not an image"},
    }
    for expected, change in cases.items():
        reasons = check_record(make_record(**change))
        assert any(expected in r for r in reasons), (expected, reasons)


def test_small_image_rejected():
    from tests.records import png

    reasons = check_record(make_record(locality_image_train=png((1, 2, 3), size=8)))
    assert any("locality_image_train too small" in r for r in reasons)


def test_text_rules_compare_text_as_the_vqa_normaliser_does():
    """The rules QC shares with the annotator's field tasks read "two" as "2" and drop case,
    articles and punctuation, as `editors.metrics.normalize_answer` does."""
    from pipeline.quality import (
        negative_repeats,
        repeats,
        rephrase_sets_overlap,
        rephrases_repeat_question,
    )

    assert repeats("The Two Towers!", ["2 towers"]) and not repeats("two", ["three"])
    assert rephrases_repeat_question("How many flags are there?", ["how many flags are there"])
    assert rephrase_sets_overlap(["Name the 2 colours?"], ["name the two colours"])
    assert negative_repeats("What is it?", ["Which one is it?"], ["which one is it"])
    assert not negative_repeats("What is it?", ["Which one is it?"], ["Which two are they?"])


def test_qc_reads_a_rephrase_with_number_words_as_the_question():
    echo = "How many 2 door cars are in this photo"
    record = make_record(
        question="how many two-door cars are in this photo?",
        rephrases=[f"rephrase number {i}?" for i in range(9)] + [echo],
    )
    assert "a rephrase repeats the question" in check_record(record)
