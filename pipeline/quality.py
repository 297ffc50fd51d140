"""Quality checks on assembled records: one reason string per violated rule.

A record is kept only if `check_record` returns no reasons; otherwise it becomes a
`Rejection` whose reason lists every violated rule, so a reader of `rejected.jsonl` can
tell what to fix.

The text rules (`repeats`, `rephrases_repeat_question`, `rephrase_sets_overlap`,
`negative_repeats`) are the ones the annotator's field tasks (`pipeline/fields/`) apply to
each answer: one normaliser (`editors.metrics.normalize_answer`), one rule each, so an
annotation the annotator accepts cannot fail QC on a rule the two would read differently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from io import BytesIO

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from editors.metrics import normalize_answer
from schemas.record import OkeditRecord


class QualityConfig(BaseModel):
    """Minimum counts an item must carry (design §3)."""

    min_rephrases: int = 10
    min_rephrases_train: int = 3
    min_image_rephrases: int = 10
    min_locality_images: int = 1
    min_text_negatives: int = 1
    min_image_side: int = 32


def majority_answer(answers: list[str]) -> str:
    """The most frequent normalized answer; ties go to the earliest, as answers[0] is the ref."""
    normalized = [normalize_answer(a) for a in answers if a.strip()]
    if not normalized:
        return ""
    counts = Counter(normalized)
    best = max(counts.values())
    return next(a for a in normalized if counts[a] == best)


# --------------------------------------------------------------------------- text rules


def repeats(text: str, others: Iterable[str]) -> bool:
    """`text` is one of `others` once both are normalised."""
    return normalize_answer(text) in {normalize_answer(other) for other in others}


def rephrases_repeat_question(question: str, rephrases: Iterable[str]) -> bool:
    """A rephrase is the question itself."""
    return repeats(question, rephrases)


def rephrase_sets_overlap(evals: Iterable[str], trains: Iterable[str]) -> bool:
    """A training rephrase is also an evaluation rephrase."""
    evals = list(evals)
    return any(repeats(train, evals) for train in trains)


def negative_repeats(question: str, rephrases: Iterable[str], negatives: Iterable[str]) -> bool:
    """A text negative's question is the item's question or one of its rephrases."""
    taken = [question, *rephrases]
    return any(repeats(negative, taken) for negative in negatives)


# --------------------------------------------------------------------------- record checks


def _image_problem(data: bytes, min_side: int) -> str | None:
    try:
        with Image.open(BytesIO(data)) as img:
            img.load()
            if min(img.size) < min_side:
                return f"too small {img.size[0]}x{img.size[1]} (< {min_side}px)"
            img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"does not decode ({type(exc).__name__})"
    return None


def _empty_text_fields(record: OkeditRecord) -> list[str]:
    scalar = [
        "question",
        "original_answer",
        "image_object",
        "target",
        "counterfact_reason",
        "locality_answer",
        "locality_image_object",
        "locality_answer_train",
        "locality_image_train_object",
    ]
    empty = [name for name in scalar if not getattr(record, name).strip()]
    for name in ("answers", "rephrases", "rephrases_train"):
        if any(not s.strip() for s in getattr(record, name)):
            empty.append(f"{name}[*]")
    if any(not n.question.strip() or not n.answer.strip() for n in record.text_negatives):
        empty.append("text_negatives[*]")
    return empty


def _count_problems(record: OkeditRecord, cfg: QualityConfig) -> list[str]:
    wanted = {
        "rephrases": (len(record.rephrases), cfg.min_rephrases),
        "rephrases_train": (len(record.rephrases_train), cfg.min_rephrases_train),
        "image_rephrases": (len(record.image_rephrases), cfg.min_image_rephrases),
        "locality_images": (len(record.locality_images), cfg.min_locality_images),
        "text_negatives": (len(record.text_negatives), cfg.min_text_negatives),
    }
    return [f"{name}: {n} < {low}" for name, (n, low) in wanted.items() if n < low]


def _answer_problems(record: OkeditRecord) -> list[str]:
    problems = []
    if repeats(record.target, record.answers):
        problems.append("target is one of the original answers")
    for name in ("locality_answer", "locality_answer_train"):
        if repeats(getattr(record, name), [*record.answers, record.target]):
            problems.append(f"{name} is an original answer or the target")
    return problems


def _disjointness_problems(record: OkeditRecord) -> list[str]:
    rephrases = [*record.rephrases, *record.rephrases_train]
    problems = []
    if rephrase_sets_overlap(record.rephrases, record.rephrases_train):
        problems.append("rephrases and rephrases_train overlap")
    if rephrases_repeat_question(record.question, rephrases):
        problems.append("a rephrase repeats the question")
    if len({normalize_answer(q) for q in record.rephrases}) < len(record.rephrases):
        problems.append("duplicate rephrases")
    negatives = [n.question for n in record.text_negatives]
    if negative_repeats(record.question, rephrases, negatives):
        problems.append("a text negative repeats the question or a rephrase")
    if record.locality_image_train in record.locality_images:
        problems.append("training negative image is also an evaluation locality image")
    return problems


def _image_problems(record: OkeditRecord, cfg: QualityConfig) -> list[str]:
    named = [("image", record.image), ("locality_image_train", record.locality_image_train)]
    named += [(f"image_rephrases[{i}]", b) for i, b in enumerate(record.image_rephrases)]
    named += [(f"locality_images[{i}]", b) for i, b in enumerate(record.locality_images)]
    problems = []
    for name, data in named:
        problem = _image_problem(data, cfg.min_image_side)
        if problem:
            problems.append(f"{name} {problem}")
    return problems


def check_record(record: OkeditRecord, cfg: QualityConfig | None = None) -> list[str]:
    """Every QC rule the record violates (empty list = keep)."""
    cfg = cfg or QualityConfig()
    empty = _empty_text_fields(record)
    reasons = [f"empty fields: {', '.join(empty)}"] if empty else []
    reasons += _count_problems(record, cfg)
    reasons += _answer_problems(record)
    reasons += _disjointness_problems(record)
    reasons += _image_problems(record, cfg)
    return reasons
