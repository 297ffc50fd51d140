"""rephrases: paraphrases of the question for evaluation and a disjoint set for training
(design §5 steps 4 and 7), in one request so that the two do not overlap."""

from __future__ import annotations

from typing import Any

from editors.metrics import normalize_answer
from pipeline.fields.base import FieldTask, ItemInput, _Out, clean_list, counted, leaked
from pipeline.quality import rephrase_sets_overlap, rephrases_repeat_question


class RephrasesOut(_Out):
    rephrases: list[str]
    rephrases_train: list[str]


def rephrase_problems(
    question: str,
    rephrases: list[str],
    train: list[str],
    n_eval: int,
    n_train: int,
    answers: list[str],
) -> list[str]:
    """Too few, the question repeated, the two sets overlapping (QC's rules), an answer
    leaked into a rephrase."""
    problems: list[str] = []
    if len(rephrases) < n_eval:
        problems.append(f"{len(rephrases)} distinct rephrases, need {n_eval}")
    if len(train) < n_train:
        problems.append(f"{len(train)} distinct training rephrases, need {n_train}")
    if rephrases_repeat_question(question, rephrases + train):
        problems.append("a rephrase repeats the question")
    if rephrase_sets_overlap(rephrases, train):
        problems.append("training rephrases overlap the evaluation rephrases")
    for phrase in answers:
        if any(leaked(r, phrase, question) for r in rephrases + train):
            problems.append(f"a rephrase mentions the answer {phrase!r}")
    return problems


class Rephrases(FieldTask):
    template_id = "rephrases"
    fills = ("rephrases", "rephrases_train")
    needs = ("target",)

    def schema(self) -> type[RephrasesOut]:
        return counted(
            RephrasesOut,
            rephrases=self.config.n_rephrases,
            rephrases_train=self.config.n_rephrases_train,
        )

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {
            "question": inp.question,
            "n_eval": self.config.n_rephrases,
            "n_train": self.config.n_rephrases_train,
        }

    def validate(self, out: RephrasesOut, inp: ItemInput) -> list[str]:
        values = self.parse(out, inp)
        return rephrase_problems(
            inp.question,
            values["rephrases"],
            values["rephrases_train"],
            self.config.n_rephrases,
            self.config.n_rephrases_train,
            [*inp.answers, inp.values["target"]],
        )

    def parse(self, out: RephrasesOut, inp: ItemInput) -> dict[str, Any]:
        """Distinct rephrases, training ones that repeat an evaluation one dropped, each
        list cut to the count asked for."""
        evals = clean_list(out.rephrases)[: self.config.n_rephrases]
        taken = {normalize_answer(r) for r in evals}
        train = [r for r in clean_list(out.rephrases_train) if normalize_answer(r) not in taken]
        return {"rephrases": evals, "rephrases_train": train[: self.config.n_rephrases_train]}
