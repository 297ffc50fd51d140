"""counterfact_type: is the edit image-text or text (design §5 step 3)? `n_votes` samples,
the majority of all votes asked for kept, with its reason."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pipeline.fields.base import FieldFailed, FieldTask, ItemInput, _Out, clean


class CounterfactTypeOut(_Out):
    counterfact_type: Literal["image-text", "text"]
    reason: str


def majority(votes: list[str]) -> str | None:
    """The label more than half of the votes agree on, else None."""
    if not votes:
        return None
    label, count = Counter(votes).most_common(1)[0]
    return label if count * 2 > len(votes) else None


class CounterfactType(FieldTask):
    template_id = "counterfact_type"
    fills = ("counterfact_type", "counterfact_votes", "counterfact_reason")
    needs = ("target", "image_object")

    @property
    def samples(self) -> int:
        return self.config.n_votes

    def schema(self) -> type[CounterfactTypeOut]:
        return CounterfactTypeOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {
            "question": inp.question,
            "answer": inp.answer,
            "target": inp.values["target"],
            "image_object": inp.values["image_object"],
        }

    def validate(self, out: CounterfactTypeOut, inp: ItemInput) -> list[str]:
        return [] if clean(out.reason) else ["empty reason"]

    def provenance_fields(self, sample: int) -> list[str]:
        return [f"counterfact_votes[{sample}]"]

    def combine(
        self, answers: list[CounterfactTypeOut], failures: list[FieldFailed], inp: ItemInput
    ) -> dict[str, Any]:
        """A failed vote does not fail the field; too few agreeing votes do."""
        votes = [a.counterfact_type for a in answers]
        # a majority of all votes asked for, not only of those that succeeded
        winner = majority(votes) if len(votes) * 2 > self.samples else None
        chosen = [a for a in answers if a.counterfact_type == winner]
        if winner is None or len(chosen) * 2 <= self.samples:
            failed = [f"{f.kind}: {f.detail}" for f in failures]
            detail = f"no majority in votes {votes}" + (f"; failed: {failed}" if failed else "")
            # votes lost to 429/5xx may still make a majority: a re-run asks them again
            transient = [f.kind for f in failures if f.transient]
            raise FieldFailed(self.name, transient[0] if transient else "validation", detail)
        return {**self.parse(chosen[0], inp), "counterfact_votes": list(votes)}

    def parse(self, out: CounterfactTypeOut, inp: ItemInput) -> dict[str, Any]:
        """One vote's label and reason."""
        return {"counterfact_type": out.counterfact_type, "counterfact_reason": clean(out.reason)}
