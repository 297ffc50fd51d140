"""target: one counterfactual answer B, the edit target (design §5 step 2)."""

from __future__ import annotations

from typing import Any

from pipeline.fields.base import FieldTask, ItemInput, _Out, answer_problems, clean


class TargetOut(_Out):
    target: str


class Target(FieldTask):
    template_id = "target"
    fills = ("target",)

    def schema(self) -> type[TargetOut]:
        return TargetOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {"question": inp.question, "answers": inp.answers_text}

    def validate(self, out: TargetOut, inp: ItemInput) -> list[str]:
        return answer_problems(out.target, inp.answers, "target")

    def parse(self, out: TargetOut, inp: ItemInput) -> dict[str, Any]:
        return {"target": clean(out.target)}
