"""Editing metrics (design §7.3): teacher-forced target-token accuracy, top-k agreement with
the unedited model, VQA-normalised generation exact match, and the per-item summary.

Teacher-forced accuracy (EasyEdit-comparable): run `prompt + target`, take the argmax of the
logits at the positions that predict the target tokens, fraction correct; `exact_match` =
all target tokens right. Agreement: EasyEdit's locality, the fraction of positions whose
top-k token ids (in rank order) are equal before and after the edit — top-1 for text probes,
top-10 for image probes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from schemas.record import EditMetrics, ProbeResult

MISSING = -1.0

# VQA evaluation normalisation (the official VQA eval script's rules, condensed).
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point


def token_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of target tokens that are the argmax at their positions. logits (m, V)."""
    if targets.numel() == 0:
        raise ValueError("no target tokens to score")
    return float((logits.argmax(dim=-1) == targets).float().mean())


def exact_match(logits: Tensor, targets: Tensor) -> bool:
    """True when every target token is the argmax."""
    return bool((logits.argmax(dim=-1) == targets).all())


def topk_agreement(pre_logits: Tensor, post_logits: Tensor, k: int) -> float:
    """EasyEdit's locality: mean over positions and ranks of `topk(pre) == topk(post)`."""
    k = min(k, pre_logits.shape[-1])
    pre = torch.topk(pre_logits.float(), k, dim=-1).indices
    post = torch.topk(post_logits.float(), k, dim=-1).indices
    return float((pre == post).float().mean())


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: lower-case, punctuation, articles, number words -> digits."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PUNCT.sub(lambda m: "" if m.group() == "'" else " ", text)
    text = _PERIOD.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def generation_exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer."""
    references = [answers] if isinstance(answers, str) else list(answers)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(a) for a in references))


def mean_or_missing(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else MISSING


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0, MISSING if any is missing."""
    if not values or any(v < 0 for v in values):
        return MISSING
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def item_metrics(probes: Sequence[ProbeResult], hm_locality: str = "agreement") -> EditMetrics:
    """Per-item metrics from its probe results (post-edit accuracy and agreement)."""

    def post(kind: str) -> float:
        return mean_or_missing(p.post_accuracy for p in probes if p.kind == kind)

    def measured(kind: str, field: str) -> float:
        values = (getattr(p, field) for p in probes if p.kind == kind)
        return mean_or_missing(v for v in values if v >= 0)

    def agree(kind: str) -> float:
        return measured(kind, "agreement")

    def generated(kind: str) -> float:
        return measured(kind, "post_generation_match")

    metrics = EditMetrics(
        reliability=post("edit"),
        text_generality=post("rephrase"),
        image_generality=post("image_rephrase"),
        locality_label=post("locality"),
        locality_agreement=agree("locality"),
        text_locality_label=post("text_negative"),
        text_locality_agreement=agree("text_negative"),
        gen_reliability=generated("edit"),
        gen_text_generality=generated("rephrase"),
        gen_image_generality=generated("image_rephrase"),
        gen_locality=generated("locality"),
        gen_text_locality=generated("text_negative"),
        image_free_locality=agree("image_free_locality"),
    )
    locality = metrics.locality_agreement if hm_locality == "agreement" else metrics.locality_label
    metrics.hm = harmonic_mean([metrics.text_generality, metrics.image_generality, locality])
    return metrics


def macro_average(items: Sequence[EditMetrics], hm_locality: str = "agreement") -> EditMetrics:
    """Mean of each metric over the items that measured it; HM of the averaged T-Gen, I-Gen
    and Loc."""
    fields = [f for f in EditMetrics.model_fields if f != "hm"]
    averaged = EditMetrics(
        **{f: mean_or_missing(getattr(m, f) for m in items if getattr(m, f) >= 0) for f in fields}
    )
    locality = (
        averaged.locality_agreement if hm_locality == "agreement" else averaged.locality_label
    )
    averaged.hm = harmonic_mean([averaged.text_generality, averaged.image_generality, locality])
    return averaged
