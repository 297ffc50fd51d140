"""image_free_locality: EasyEdit's text locality (`loc`, `loc_ans`), a general-knowledge
question that needs no image, unrelated to the item, and its answer. From a JSONL file of
pairs (`text_locality_file`, one pair per item by id and seed) when given, else asked of
the LLM when `image_free_locality` is on, else None."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editors.metrics import normalize_answer
from pipeline.fields.base import (
    FieldFailed,
    FieldTask,
    Filled,
    ItemInput,
    _Out,
    answer_problems,
    clean,
)
from schemas.record import FieldProvenance, ImageFreeQuestion

if TYPE_CHECKING:
    from pipeline.annotate import LLMAnnotatorConfig


class ImageFreeLocalityOut(_Out):
    question: str
    answer: str


# words that make a question point at an image it does not have
_IMAGE_REFERENCE = re.compile(
    r"\b(this|that|these|those|shown|pictured|depicted|visible|"
    r"(the|this|that) (picture|image|photo|photograph|scene))\b",
    re.IGNORECASE,
)


def image_free_problems(
    question: str, answer: str, forbidden: list[str], item_question: str, max_cos: float
) -> list[str]:
    """Why a pair cannot be the item's image-free locality question (EasyEdit's `loc`):
    empty, refers to an image, answers with one of the item's answers or its target, or is
    related to the item's question (MiniLM cosine >= `max_cos`)."""
    if not normalize_answer(question):
        return ["image-free question is empty"]
    problems = answer_problems(answer, forbidden, "image-free answer")
    found = _IMAGE_REFERENCE.search(question)
    if found:
        problems.append(f"image-free question refers to an image ({found.group(0)!r})")
    if not problems:
        from pipeline.similarity import SimilarityChecker

        cos = SimilarityChecker().cosine([question], [item_question])[0][0]
        if cos >= max_cos:
            problems.append(f"image-free question related to the item (cos {cos:.2f})")
    return problems


@dataclass(frozen=True)
class TextLocalityPair:
    question: str
    answer: str
    line: int  # 1-based line of the file
    source: str = ""  # "nq": the export prefixes "nq question: "


class TextLocalityPool:
    """Image-free {question, answer} pairs from a JSONL file (`--text-locality`), one per
    item, chosen by a hash of the seed and the item id (so the same in every chunk and
    re-run, and different across items as far as the file allows), skipping pairs whose
    answer is one of the item's answers or its target."""

    def __init__(self, path: Path, seed: int = 0):
        self.path, self.seed = Path(path), seed
        self.pairs = load_text_locality(self.path)
        from pipeline.sources import file_sha256

        self.sha256 = file_sha256(self.path)

    def pick(self, item_id: str, forbidden: list[str]) -> TextLocalityPair | None:
        bad = {normalize_answer(f) for f in forbidden}
        key = hashlib.sha256(f"{self.seed}:{item_id}".encode()).digest()
        start = int.from_bytes(key[:8], "big") % len(self.pairs)
        for offset in range(len(self.pairs)):
            pair = self.pairs[(start + offset) % len(self.pairs)]
            if normalize_answer(pair.answer) not in bad:
                return pair
        return None


def load_text_locality(path: Path) -> list[TextLocalityPair]:
    """The pairs of a `--text-locality` JSONL file; any problem is a one-line ValueError
    naming the file and line (FileNotFoundError for a missing file)."""
    where = f"--text-locality {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    pairs: list[TextLocalityPair] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{where} line {n}: not a JSON object")
            values = [data.get(k) for k in ("question", "answer")]
            if not all(isinstance(v, str) and clean(v) for v in values):
                raise ValueError(f"{where} line {n}: needs non-empty string question and answer")
            source = data.get("source", "")
            if not isinstance(source, str):
                raise ValueError(f"{where} line {n}: source must be a string")
            question, answer = (clean(v) for v in values)
            if _IMAGE_REFERENCE.search(question):
                raise ValueError(f"{where} line {n}: the question refers to an image")
            pairs.append(TextLocalityPair(question, answer, n, source.strip().lower()))
    if not pairs:
        raise ValueError(f"{where}: no question/answer pairs")
    return pairs


class ImageFreeLocality(FieldTask):
    template_id = "image_free_locality"
    fills = ("image_free_locality",)
    needs = ("target",)

    def __init__(self, config: LLMAnnotatorConfig) -> None:
        super().__init__(config)
        self.pool = (
            TextLocalityPool(config.text_locality_file, config.text_locality_seed)
            if config.text_locality_file is not None
            else None
        )  # read and checked here, when the annotator is built, so that preflight reports it
        if config.image_free_locality and self.pool is None:
            from pipeline.similarity import SimilarityChecker

            SimilarityChecker()  # load MiniLM here: transformers' lazy imports race in threads

    def without_request(self, inp: ItemInput) -> Filled | None:
        if self.pool is not None:
            return self.from_file(self.pool, inp)
        if not self.config.image_free_locality:
            return Filled({self.name: None})
        return None

    def from_file(self, pool: TextLocalityPool, inp: ItemInput) -> Filled:
        pair = pool.pick(inp.item.item_id, self.forbidden(inp))
        if pair is None:
            why = "every text-locality pair repeats an answer"
            raise FieldFailed(self.name, "validation", why)
        params: dict[str, Any] = {"line": pair.line, "file_sha256": pool.sha256}
        if pair.source:
            params["source"] = pair.source
        provenance = FieldProvenance(
            field=self.name,
            backend="text-locality-file",
            seed=pool.seed,
            params=json.dumps(params, sort_keys=True),
        )
        value = ImageFreeQuestion(question=pair.question, answer=pair.answer)
        return Filled({self.name: value}, (provenance,))

    @staticmethod
    def forbidden(inp: ItemInput) -> list[str]:
        return [*inp.answers, inp.values["target"]]

    def schema(self) -> type[ImageFreeLocalityOut]:
        return ImageFreeLocalityOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {
            "question": inp.question,
            "answers": inp.answers_text,
            "target": inp.values["target"],
        }

    def validate(self, out: ImageFreeLocalityOut, inp: ItemInput) -> list[str]:
        return image_free_problems(
            clean(out.question),
            clean(out.answer),
            self.forbidden(inp),
            inp.question,
            self.config.image_free_max_cos,
        )

    def parse(self, out: ImageFreeLocalityOut, inp: ItemInput) -> dict[str, Any]:
        value = ImageFreeQuestion(question=clean(out.question), answer=clean(out.answer))
        return {self.name: value}
