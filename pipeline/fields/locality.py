"""locality: a near-miss answer C for evaluation and D, the editor's training negative
(design §5 steps 5 and 7), both outside the answers and the target."""

from __future__ import annotations

from typing import Any

from pipeline.fields.base import FieldTask, ItemInput, _Out, answer_problems, clean


class LocalityOut(_Out):
    locality_answer: str
    locality_answer_train: str


class Locality(FieldTask):
    template_id = "locality"
    fills = ("locality_answer", "locality_answer_train")
    needs = ("target",)

    def schema(self) -> type[LocalityOut]:
        return LocalityOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {
            "question": inp.question,
            "answers": inp.answers_text,
            "target": inp.values["target"],
        }

    def validate(self, out: LocalityOut, inp: ItemInput) -> list[str]:
        forbidden = [*inp.answers, inp.values["target"]]
        problems = answer_problems(out.locality_answer, forbidden, "C")
        problems += answer_problems(
            out.locality_answer_train, [*forbidden, out.locality_answer], "D"
        )
        return problems

    def parse(self, out: LocalityOut, inp: ItemInput) -> dict[str, Any]:
        return {
            "locality_answer": clean(out.locality_answer),
            "locality_answer_train": clean(out.locality_answer_train),
        }
