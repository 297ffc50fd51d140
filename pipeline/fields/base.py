"""What every annotation field task is made of, and the text helpers the tasks share.

A field task (`FieldTask`) turns one LLM answer into record fields: its prompt template id
(the YAML in `pipeline/prompts/`), its response schema (`schema`), `format_input` (the item
and the fields filled before it → the template's variables), `validate` (the raw answer →
problems; any problem means a re-ask) and `parse` (a valid answer → record fields). The
annotator (`pipeline/annotate.py`) sends the requests, re-asks, records provenance and
schedules the tasks; a task never talks to the LLM itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from editors.metrics import normalize_answer
from pipeline.llm import TRANSIENT_KINDS
from pipeline.quality import repeats
from schemas.record import FieldProvenance, SourceItem

if TYPE_CHECKING:
    from pipeline.annotate import LLMAnnotatorConfig

T = TypeVar("T", bound=BaseModel)


class _Out(BaseModel):
    """A response schema: exactly the keys the prompt asks for."""

    model_config = ConfigDict(extra="forbid")


def counted(model: type[T], **counts: int) -> type[T]:
    """`model` whose JSON schema carries how many items each list holds (`minItems` =
    `maxItems` = the count asked for in the prompt), so that servers decoding by the schema
    alone (vLLM and Ollama guided decoding, strict structured outputs) return that many.
    Only the schema says so: a longer answer is truncated and a shorter one re-asked by the
    field's validation, never failed by parsing."""
    return _counted(model, tuple(sorted(counts.items())))


@lru_cache(maxsize=64)
def _counted(model: type[T], counts: tuple[tuple[str, int], ...]) -> type[T]:
    fields: dict[str, Any] = {
        name: (
            model.model_fields[name].annotation,
            Field(json_schema_extra={"minItems": n, "maxItems": n}),
        )
        for name, n in counts
    }
    return create_model(model.__name__, __base__=model, __module__=model.__module__, **fields)


# --------------------------------------------------------------------------- text helpers


def clean(text: str) -> str:
    """Trim whitespace and wrapping quotes; keep the model's wording otherwise."""
    return " ".join(text.split()).strip().strip("\"'`").strip()


def clean_list(values: list[str]) -> list[str]:
    """Cleaned, empty ones dropped, duplicates (after normalisation) dropped, order kept."""
    seen: set[str] = set()
    out: list[str] = []
    for value in values:
        text = clean(value)
        key = normalize_answer(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def answer_problems(value: str, forbidden: list[str], what: str) -> list[str]:
    """Why `value` cannot be a new answer: empty, or one of `forbidden` (QC's `repeats`)."""
    if not normalize_answer(value):
        return [f"{what} is empty"]
    if repeats(value, forbidden):
        return [f"{what} {value!r} repeats a forbidden answer"]
    return []


def leaked(text: str, phrase: str, question: str) -> bool:
    """`phrase` occurs in `text` as whole words although the question does not contain it."""
    p = normalize_answer(phrase)
    if not p:
        return False
    pattern = re.compile(rf"\b{re.escape(p)}\b")
    in_text = pattern.search(normalize_answer(text))
    return bool(in_text) and not pattern.search(normalize_answer(question))


# --------------------------------------------------------------------------- the task


class FieldFailed(Exception):
    """A field has no valid answer: the item becomes `Rejection("<field>: <kind>: <detail>")`."""

    def __init__(self, field: str, kind: str, detail: str):
        super().__init__(f"{field}: {kind}: {detail}")
        self.field, self.kind, self.detail = field, kind, detail

    @property
    def transient(self) -> bool:
        """Failed on 429/5xx/timeouts/connection after the retries: a re-run may succeed."""
        return self.kind in TRANSIENT_KINDS


@dataclass(frozen=True)
class ItemInput:
    """What a task may read: the item, its cleaned answers and the fields filled so far."""

    item: SourceItem
    answers: list[str]  # cleaned, none empty; answers[0] is the reference answer
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, item: SourceItem) -> ItemInput:
        answers = [clean(a) for a in item.answers if clean(a)]
        if not answers:
            raise FieldFailed("answers", "validation", "the source item has no answer")
        return cls(item, answers)

    @property
    def question(self) -> str:
        return self.item.question

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def answers_text(self) -> str:
        """The distinct answers as the prompts list them."""
        return "; ".join(dict.fromkeys(self.answers))

    def with_values(self, values: Mapping[str, Any]) -> ItemInput:
        return ItemInput(self.item, self.answers, {**self.values, **values})


@dataclass(frozen=True)
class Filled:
    """Record fields a task fills without asking the LLM, with their provenance."""

    values: dict[str, Any]
    provenance: tuple[FieldProvenance, ...] = ()


class FieldTask:
    """One annotation field: one request per sample to the template `template_id`.

    `fills` names the record fields `parse` returns (the first one names the field in
    rejections); `needs` the record fields `format_input` reads, which must be filled by a
    task registered before this one. A task is built once per annotator from its config.
    """

    template_id: ClassVar[str]
    fills: ClassVar[tuple[str, ...]]
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: LLMAnnotatorConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.fills[0]

    @property
    def samples(self) -> int:
        """Requests per item (different seeds): more than one only for voting fields."""
        return 1

    def schema(self) -> type[_Out]:
        raise NotImplementedError

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, out: Any, inp: ItemInput) -> list[str]:
        """Why the answer cannot be used (empty: it can)."""
        raise NotImplementedError

    def parse(self, out: Any, inp: ItemInput) -> dict[str, Any]:
        """The record fields of a valid answer."""
        raise NotImplementedError

    def without_request(self, inp: ItemInput) -> Filled | None:
        """The fields when no request is needed (switched off, or from a file), else None."""
        return None

    def provenance_fields(self, sample: int) -> list[str]:
        """The record fields one sample's provenance entries are written for."""
        return list(self.fills)

    def combine(
        self, answers: list[Any], failures: list[FieldFailed], inp: ItemInput
    ) -> dict[str, Any]:
        """The record fields from the samples' valid answers and failures (one of each
        sample): a single answer's failure is the field's."""
        if failures:
            raise failures[0]
        return self.parse(answers[0], inp)
