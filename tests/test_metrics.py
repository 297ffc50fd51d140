"""Metrics on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from editors.metrics import (
    MISSING,
    exact_match,
    generation_exact_match,
    harmonic_mean,
    item_metrics,
    macro_average,
    normalize_answer,
    token_accuracy,
    topk_agreement,
)
from schemas.record import EditMetrics, ProbeResult


def logits_for(*winners: int, vocab: int = 5) -> torch.Tensor:
    """One row per position whose argmax is the given token."""
    out = torch.zeros(len(winners), vocab)
    for row, token in enumerate(winners):
        out[row, token] = 1.0
    return out


def test_teacher_forced_accuracy_and_exact_match() -> None:
    logits = logits_for(1, 2, 3)
    assert token_accuracy(logits, torch.tensor([1, 2, 3])) == 1.0
    assert token_accuracy(logits, torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    assert exact_match(logits, torch.tensor([1, 2, 3]))
    assert not exact_match(logits, torch.tensor([1, 0, 3]))
    with pytest.raises(ValueError, match="no target tokens"):
        token_accuracy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def test_topk_agreement_is_position_and_rank_wise() -> None:
    pre = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert topk_agreement(pre, pre.clone(), 1) == 1.0
    post = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 2.0, 3.0, 1.0]])
    assert topk_agreement(pre, post, 1) == 0.5  # position 2's argmax changed (3 -> 0)
    # top-2 ids: pre [[0,1],[3,2]], post [[0,1],[0,2]] -> 3 of 4 rank slots equal
    assert topk_agreement(pre, post, 2) == 0.75
    assert topk_agreement(pre, post, 10) == topk_agreement(pre, post, 4)  # k capped at V


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  TWO dogs ", "2 dogs"),
        ("an apple, a pear", "apple pear"),
        ("it's 2.5 meters.", "its 2.5 meters"),
        ("New York-City", "new york city"),
        ("ten", "10"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_generation_exact_match() -> None:
    assert generation_exact_match("The Lyon.", "lyon") == 1.0
    assert generation_exact_match("two", ["2", "two cats"]) == 1.0
    assert generation_exact_match("lyon city", "lyon") == 0.0


def test_harmonic_mean() -> None:
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([1.0, MISSING]) == MISSING


def probe(kind: str, post: float, agreement: float = -1.0, index: int = 0) -> ProbeResult:
    return ProbeResult(
        kind=kind,
        index=index,
        distance=0.1,
        routed=True,
        expected="x",
        pre_accuracy=0.0,
        post_accuracy=post,
        agreement=agreement,
    )


def test_item_metrics_by_hand() -> None:
    probes = [
        probe("edit", 1.0),
        probe("rephrase", 1.0),
        probe("rephrase", 0.0, index=1),
        probe("image_rephrase", 1.0),
        probe("locality", 0.0, agreement=0.8),
        probe("text_negative", 1.0, agreement=1.0),
        probe("train_pos", 1.0),
    ]
    metrics = item_metrics(probes)
    assert metrics.reliability == 1.0
    assert metrics.text_generality == 0.5
    assert metrics.image_generality == 1.0
    assert (metrics.locality_label, metrics.locality_agreement) == (0.0, 0.8)
    assert (metrics.text_locality_label, metrics.text_locality_agreement) == (1.0, 1.0)
    assert metrics.hm == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.8))
    assert item_metrics(probes, hm_locality="label").hm == 0.0
    no_images = item_metrics([p for p in probes if p.kind != "image_rephrase"])
    assert no_images.image_generality == MISSING and no_images.hm == MISSING


def test_macro_average_skips_missing() -> None:
    a = EditMetrics(
        reliability=1.0, text_generality=1.0, image_generality=0.5, locality_agreement=1.0
    )
    b = EditMetrics(reliability=0.0, text_generality=0.5, image_generality=MISSING)
    avg = macro_average([a, b])
    assert avg.reliability == 0.5 and avg.text_generality == 0.75
    assert avg.image_generality == 0.5 and avg.locality_label == MISSING
    assert avg.hm == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 1.0))
