"""text_negatives: k near-miss questions about the same image, worded close to the
question but asking a different fact, with their answers (beyond the paper)."""

from __future__ import annotations

from typing import Any

from editors.metrics import normalize_answer
from pipeline.fields.base import FieldTask, Filled, ItemInput, _Out, clean, counted
from pipeline.quality import negative_repeats
from schemas.record import TextNegative


class TextNegativeOut(_Out):
    question: str
    answer: str


class TextNegativesOut(_Out):
    text_negatives: list[TextNegativeOut]


def negative_problems(
    question: str, rephrases: list[str], negatives: list[TextNegative], k: int
) -> list[str]:
    """Too few, one repeating the question or a rephrase (QC's rule), an empty answer."""
    problems: list[str] = []
    if len(negatives) < k:
        problems.append(f"{len(negatives)} text negatives, need {k}")
    if negative_repeats(question, rephrases, [n.question for n in negatives]):
        problems.append("a text negative repeats the question or a rephrase")
    if any(not normalize_answer(n.answer) for n in negatives):
        problems.append("a text negative has an empty answer")
    return problems


class TextNegatives(FieldTask):
    template_id = "text_negatives"
    fills = ("text_negatives",)
    needs = ("image_object", "rephrases", "rephrases_train")

    def without_request(self, inp: ItemInput) -> Filled | None:
        return Filled({"text_negatives": []}) if self.config.n_text_negatives == 0 else None

    def schema(self) -> type[TextNegativesOut]:
        return counted(TextNegativesOut, text_negatives=self.config.n_text_negatives)

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {
            "question": inp.question,
            "answer": inp.answer,
            "image_object": inp.values["image_object"],
            "k": self.config.n_text_negatives,
        }

    def validate(self, out: TextNegativesOut, inp: ItemInput) -> list[str]:
        rephrases = [*inp.values["rephrases"], *inp.values["rephrases_train"]]
        negatives = self.parse(out, inp)["text_negatives"]
        return negative_problems(inp.question, rephrases, negatives, self.config.n_text_negatives)

    def parse(self, out: TextNegativesOut, inp: ItemInput) -> dict[str, Any]:
        """Cleaned, those with an empty or repeated question dropped, cut to k."""
        seen: set[str] = set()
        negatives: list[TextNegative] = []
        for neg in out.text_negatives:
            q, a = clean(neg.question), clean(neg.answer)
            if normalize_answer(q) and normalize_answer(q) not in seen:
                seen.add(normalize_answer(q))
                negatives.append(TextNegative(question=q, answer=a))
        return {"text_negatives": negatives[: self.config.n_text_negatives]}
