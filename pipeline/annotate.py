"""Annotate: every generated field of design §5, from any OpenAI-compatible LLM.

`Annotator` is the stage's interface (the offline FlagworldAnnotator implements it too).
`LLMAnnotator` asks one structured question per field with the prompt templates in
`pipeline/prompts/*.yaml` (id + version, both part of the cache key and the provenance),
validates every answer client-side and re-asks (a new `attempt`, a new cache key) when an
answer is malformed or invalid. Items run concurrently (`LLMConfig.concurrency` items in
flight, one request each); an item whose field still fails becomes
`Rejection(stage="annotate", reason="<field>: <kind>: <detail>")`.

Per item, in three levels (each needs the answers of the one before):
1. image_object(A), target B;
2. 3 counterfact votes, 10 + 3 rephrases, C and D;
3. image_object(C), image_object(D), k text negatives.
That is 10 requests when nothing needs a re-ask, plus one for the image-free locality
question (EasyEdit's `loc`) when `image_free_locality` is on (the default), unless a
`text_locality_file` gives it (`TextLocalityPool`: one pair per item by id and seed).
With `LLMConfig.batch_mode` the items run in rounds: each round queues the requests whose
inputs are known, sends them as one OpenAI Batch API job, waits for it and continues from
the cache (3 rounds + 1 per re-ask).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

from editors.metrics import normalize_answer
from pipeline.llm import (
    TRANSIENT_KINDS,
    BudgetExceededError,
    LLMClient,
    LLMConfig,
    LLMFailure,
    LLMFatalError,
    LLMStats,
    LLMSuccess,
    usage_report,
)
from schemas.record import (
    Annotation,
    CounterfactType,
    FieldProvenance,
    ImageFreeQuestion,
    Rejection,
    SourceItem,
    TextNegative,
)

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BACKEND = "openai-chat"
T = TypeVar("T", bound=BaseModel)


@runtime_checkable
class Annotator(Protocol):
    """The annotate stage: one Annotation or one Rejection per item, in input order."""

    name: str
    version: str

    def annotate(self, items: list[SourceItem]) -> list[Annotation | Rejection]: ...


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: str
    system: str
    user: str

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def render(self, **variables: Any) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system.format(**variables).strip()},
            {"role": "user", "content": self.user.format(**variables).strip()},
        ]


def load_template(template_id: str, directory: Path = PROMPTS_DIR) -> PromptTemplate:
    path = directory / f"{template_id}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt template {template_id!r} not found at {path}") from None
    missing = [k for k in ("id", "version", "system", "user") if not isinstance(data.get(k), str)]
    if missing:
        raise ValueError(f"prompt template {path} lacks string field(s) {missing}")
    if data["id"] != template_id:
        raise ValueError(f"prompt template {path} has id {data['id']!r}, expected {template_id!r}")
    return PromptTemplate(data["id"], data["version"], data["system"], data["user"])


TEMPLATE_IDS = (
    "image_object",
    "target",
    "counterfact_type",
    "rephrases",
    "locality",
    "text_negatives",
    "image_free_locality",
)


# --------------------------------------------------------------------------- answer models


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageObjectOut(_Out):
    image_object: str


class TargetOut(_Out):
    target: str


class CounterfactTypeOut(_Out):
    counterfact_type: Literal["image-text", "text"]
    reason: str


class RephrasesOut(_Out):
    rephrases: list[str]
    rephrases_train: list[str]


class LocalityOut(_Out):
    locality_answer: str
    locality_answer_train: str


class TextNegativeOut(_Out):
    question: str
    answer: str


class TextNegativesOut(_Out):
    text_negatives: list[TextNegativeOut]


class ImageFreeLocalityOut(_Out):
    question: str
    answer: str


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


# --------------------------------------------------------------------------- validation


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
    if not normalize_answer(value):
        return [f"{what} is empty"]
    bad = {normalize_answer(f) for f in forbidden if normalize_answer(f)}
    if normalize_answer(value) in bad:
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


def rephrase_problems(
    question: str,
    rephrases: list[str],
    train: list[str],
    n_eval: int,
    n_train: int,
    answers: list[str],
) -> list[str]:
    problems: list[str] = []
    if len(rephrases) < n_eval:
        problems.append(f"{len(rephrases)} distinct rephrases, need {n_eval}")
    if len(train) < n_train:
        problems.append(f"{len(train)} distinct training rephrases, need {n_train}")
    q = normalize_answer(question)
    if any(normalize_answer(r) == q for r in rephrases + train):
        problems.append("a rephrase repeats the question")
    if {normalize_answer(r) for r in rephrases} & {normalize_answer(r) for r in train}:
        problems.append("training rephrases overlap the evaluation rephrases")
    for phrase in answers:
        if any(leaked(r, phrase, question) for r in rephrases + train):
            problems.append(f"a rephrase mentions the answer {phrase!r}")
    return problems


def negative_problems(
    question: str, rephrases: list[str], negatives: list[TextNegative], k: int
) -> list[str]:
    problems: list[str] = []
    if len(negatives) < k:
        problems.append(f"{len(negatives)} text negatives, need {k}")
    taken = {normalize_answer(question)} | {normalize_answer(r) for r in rephrases}
    if any(normalize_answer(n.question) in taken for n in negatives):
        problems.append("a text negative repeats the question or a rephrase")
    if any(not normalize_answer(n.answer) for n in negatives):
        problems.append("a text negative has an empty answer")
    return problems


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


def majority(votes: list[str]) -> str | None:
    """The label more than half of the votes agree on, else None."""
    if not votes:
        return None
    label, count = Counter(votes).most_common(1)[0]
    return label if count * 2 > len(votes) else None


# --------------------------------------------------------------------------- annotator


class LLMAnnotatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    llm: LLMConfig = Field(default_factory=LLMConfig)
    n_rephrases: int = Field(10, ge=1)
    n_rephrases_train: int = Field(3, ge=1)
    n_text_negatives: int = Field(3, ge=0)
    n_votes: int = Field(3, ge=1)
    retries: int = Field(2, ge=0)  # re-asks after a malformed or invalid answer
    max_batch_rounds: int = Field(12, ge=1)  # batch mode: 3 rounds + one per re-ask level
    prompts_dir: Path | None = None  # None: the templates shipped in pipeline/prompts
    # EasyEdit's `loc`: pairs from this JSONL file, else (when on) asked of the LLM
    text_locality_file: Path | None = None
    text_locality_seed: int = 0
    image_free_locality: bool = True  # ask the LLM for it (every path fills the field)
    image_free_max_cos: float = Field(0.5, ge=-1, le=1)  # MiniLM cos to the item's question


class AnnotationReport(BaseModel):
    items_in: int = 0  # = kept + rejected + deferred
    kept: int = 0
    rejected: int = 0
    deferred: int = 0  # failed on transient errors only: a re-run tries them again
    rejections_by_kind: dict[str, int] = Field(default_factory=dict)
    llm: LLMStats = Field(default_factory=LLMStats)
    cost_per_1k_items_usd: float | None = None


class _Deferred(Exception):
    """A request of this item waits for the next batch (batch mode only)."""


class _FieldFailed(Exception):
    def __init__(self, field: str, kind: str, detail: str):
        super().__init__(f"{field}: {kind}: {detail}")
        self.field, self.kind, self.detail = field, kind, detail

    @property
    def transient(self) -> bool:
        """Failed on 429/5xx/timeouts/connection after the retries: a re-run may succeed."""
        return self.kind in TRANSIENT_KINDS


ResultCallback = Callable[[Annotation | Rejection], None]


class LLMAnnotator:
    """The LLM backend of the annotate stage (design §5); thread-safe, re-entrant."""

    name = BACKEND
    version = "1"

    def __init__(
        self,
        config: LLMAnnotatorConfig,
        client: LLMClient | None = None,
        on_result: ResultCallback | None = None,
    ):
        self.config = config
        self.client = client or LLMClient(config.llm)
        prompts = config.prompts_dir or PROMPTS_DIR
        self.templates = {t: load_template(t, prompts) for t in TEMPLATE_IDS}
        self.text_locality = (
            TextLocalityPool(config.text_locality_file, config.text_locality_seed)
            if config.text_locality_file is not None
            else None
        )  # read and checked here, so that preflight reports a bad file
        if config.image_free_locality and self.text_locality is None:
            from pipeline.similarity import SimilarityChecker

            SimilarityChecker()  # load MiniLM here: transformers' lazy imports race in threads
        self.on_result = on_result
        self._lock = threading.Lock()
        self._report = AnnotationReport()

    # ---- public

    def annotate(self, items: list[SourceItem]) -> list[Annotation | Rejection]:
        """One result per item, in order. Raises `BudgetExceededError` (with the finished
        results in `.partial`) or another `LLMFatalError` after the items in flight end.
        In batch mode, items run in rounds: each round queues every request whose inputs
        are known, sends them as one Batch API job and waits for it."""
        results: list[Annotation | Rejection | None] = [None] * len(items)
        todo = list(range(len(items)))
        rounds = self.config.max_batch_rounds if self.config.llm.batch_mode else 1
        for round_index in range(rounds):
            done = self._pass([items[i] for i in todo], results_so_far=results)
            for i, result in zip(todo, done, strict=True):
                results[i] = result
            todo = [i for i in todo if results[i] is None]
            if not todo or round_index == rounds - 1 or not self._run_batch(results):
                break
        for i in todo:  # still waiting after the last round
            results[i] = self._finish(
                Rejection(
                    item_id=items[i].item_id,
                    stage="annotate",
                    reason=f"batch: deferred: still incomplete after {rounds} batch rounds",
                    deferred=True,
                )
            )
        return [r for r in results if r is not None]

    def _run_batch(self, results: list[Annotation | Rejection | None]) -> bool:
        try:
            return self.client.run_batch() is not None
        except BudgetExceededError as error:
            error.partial = [r for r in results if r is not None]
            raise

    def _pass(
        self, items: list[SourceItem], results_so_far: list[Annotation | Rejection | None]
    ) -> list[Annotation | Rejection | None]:
        """Annotate concurrently; None for items waiting on a batch."""
        stop = threading.Event()
        fatal: list[LLMFatalError] = []

        def work(item: SourceItem) -> Annotation | Rejection | None:
            if stop.is_set():
                return None
            try:
                result = self.annotate_one(item)
            except LLMFatalError as exc:
                fatal.append(exc)
                stop.set()
                return None
            return None if result is None else self._finish(result)

        with ThreadPoolExecutor(max_workers=self.config.llm.concurrency) as pool:
            results = list(pool.map(work, items))
        if fatal:
            error = fatal[0]
            if isinstance(error, BudgetExceededError):
                finished = [r for r in results_so_far if r is not None]
                error.partial = finished + [r for r in results if r is not None]
            raise error
        return results

    def annotate_one(self, item: SourceItem) -> Annotation | Rejection | None:
        """The item's annotation or rejection; None while it waits on a batch."""
        try:
            return _ItemRun(self, item).run()
        except _Deferred:
            return None
        except _FieldFailed as exc:  # transient only: deferred, tried again by a re-run
            return Rejection(
                item_id=item.item_id, stage="annotate", reason=str(exc), deferred=exc.transient
            )

    def _finish(self, result: Annotation | Rejection) -> Annotation | Rejection:
        self._count(result)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def close(self) -> None:
        self.client.close()

    def report(self) -> AnnotationReport:
        with self._lock:
            report = self._report.model_copy(deep=True)
        report.llm = self.client.stats()
        if report.items_in and report.llm.cost_known:
            report.cost_per_1k_items_usd = report.llm.cost_usd / report.items_in * 1000
        return report

    # ---- internals

    def _count(self, result: Annotation | Rejection) -> None:
        with self._lock:
            self._report.items_in += 1
            if isinstance(result, Rejection):
                if result.deferred:
                    self._report.deferred += 1
                else:
                    self._report.rejected += 1
                kind = result.reason.split(": ")[1] if ": " in result.reason else "other"
                by_kind = self._report.rejections_by_kind
                by_kind[kind] = by_kind.get(kind, 0) + 1
            else:
                self._report.kept += 1


class _ItemRun:
    """The requests of one item, in dependency order, with their provenance."""

    def __init__(self, annotator: LLMAnnotator, item: SourceItem):
        self.a = annotator
        self.cfg = annotator.config
        self.item = item
        self.provenance: list[FieldProvenance] = []
        answers = [clean(a) for a in item.answers if clean(a)]
        if not answers:
            raise _FieldFailed("answers", "validation", "the source item has no answer")
        self.answers = answers
        self.answer = answers[0]
        self.answers_text = "; ".join(dict.fromkeys(answers))

    def run(self) -> Annotation:
        """Three levels; each needs the answers of the one before. In batch mode a level
        queues all its requests before the item waits (raises `_Deferred`)."""
        image_object, target = self.level(
            lambda: self.image_object("image_object", self.answer), self.target
        )
        (votes, winner, reason), (rephrases, train), (c, d) = self.level(
            lambda: self.votes(target, image_object),
            lambda: self.rephrases(target),
            lambda: self.locality(target),
        )
        c_object, d_object, negatives, image_free = self.level(
            lambda: self.image_object("locality_image_object", c),
            lambda: self.image_object("locality_image_train_object", d),
            lambda: self.text_negatives(image_object, rephrases + train),
            lambda: self.image_free_locality(target),
        )
        return Annotation(
            item_id=self.item.item_id,
            image_object=image_object,
            target=target,
            counterfact_type=winner,
            counterfact_votes=votes,
            counterfact_reason=reason,
            rephrases=rephrases,
            rephrases_train=train,
            locality_answer=c,
            locality_image_object=c_object,
            locality_answer_train=d,
            locality_image_train_object=d_object,
            text_negatives=negatives,
            image_free_locality=image_free,
            provenance=self.provenance,
        )

    @staticmethod
    def level(*steps: Callable[[], Any]) -> list[Any]:
        """Run every step; a failed field fails the item at once, waiting steps after all
        steps of the level have queued their requests."""
        values: list[Any] = []
        waiting = False
        for step in steps:
            try:
                values.append(step())
            except _Deferred:
                waiting = True
                values.append(None)
        if waiting:
            raise _Deferred
        return values

    # ---- one field each

    def target(self) -> str:
        out = self.ask(
            "target",
            TargetOut,
            {"question": self.item.question, "answers": self.answers_text},
            lambda o: answer_problems(o.target, self.answers, "target"),
            fields=["target"],
        )
        return clean(out.target)

    def image_object(self, field: str, answer: str) -> str:
        out = self.ask(
            "image_object",
            ImageObjectOut,
            {"question": self.item.question, "answer": answer},
            lambda o: [] if clean(o.image_object) else ["empty image object"],
            fields=[field],
        )
        return clean(out.image_object)

    def votes(self, target: str, image_object: str) -> tuple[list[str], CounterfactType, str]:
        variables = {
            "question": self.item.question,
            "answer": self.answer,
            "target": target,
            "image_object": image_object,
        }
        results: list[CounterfactTypeOut] = []
        failures: list[str] = []
        transient: list[str] = []
        waiting = False
        for sample in range(self.cfg.n_votes):
            try:
                results.append(
                    self.ask(
                        "counterfact_type",
                        CounterfactTypeOut,
                        variables,
                        lambda o: [] if clean(o.reason) else ["empty reason"],
                        fields=[f"counterfact_votes[{sample}]"],
                        sample=sample,
                    )
                )
            except _FieldFailed as exc:
                failures.append(f"{exc.kind}: {exc.detail}")
                transient += [exc.kind] if exc.transient else []
            except _Deferred:
                waiting = True
        if waiting:
            raise _Deferred
        votes = [r.counterfact_type for r in results]
        # a majority of all votes asked for, not only of those that succeeded
        winner = majority(votes) if len(votes) * 2 > self.cfg.n_votes else None
        chosen = [r for r in results if r.counterfact_type == winner]
        if winner is None or len(chosen) * 2 <= self.cfg.n_votes:
            detail = f"no majority in votes {votes}" + (f"; failed: {failures}" if failures else "")
            # votes lost to 429/5xx may still make a majority: a re-run asks them again
            raise _FieldFailed(
                "counterfact_type", transient[0] if transient else "validation", detail
            )
        return list(votes), chosen[0].counterfact_type, clean(chosen[0].reason)

    def rephrases(self, target: str) -> tuple[list[str], list[str]]:
        n_eval, n_train = self.cfg.n_rephrases, self.cfg.n_rephrases_train
        question = self.item.question
        forbidden = [*self.answers, target]

        def split(o: RephrasesOut) -> tuple[list[str], list[str]]:
            evals = clean_list(o.rephrases)[:n_eval]
            taken = {normalize_answer(r) for r in evals}
            train = [r for r in clean_list(o.rephrases_train) if normalize_answer(r) not in taken]
            return evals, train[:n_train]

        def check(o: RephrasesOut) -> list[str]:
            evals, train = split(o)
            return rephrase_problems(question, evals, train, n_eval, n_train, forbidden)

        out = self.ask(
            "rephrases",
            counted(RephrasesOut, rephrases=n_eval, rephrases_train=n_train),
            {"question": question, "n_eval": n_eval, "n_train": n_train},
            check,
            fields=["rephrases", "rephrases_train"],
        )
        return split(out)

    def locality(self, target: str) -> tuple[str, str]:
        forbidden = [*self.answers, target]

        def check(o: LocalityOut) -> list[str]:
            problems = answer_problems(o.locality_answer, forbidden, "C")
            problems += answer_problems(
                o.locality_answer_train, [*forbidden, o.locality_answer], "D"
            )
            return problems

        out = self.ask(
            "locality",
            LocalityOut,
            {"question": self.item.question, "answers": self.answers_text, "target": target},
            check,
            fields=["locality_answer", "locality_answer_train"],
        )
        return clean(out.locality_answer), clean(out.locality_answer_train)

    def text_negatives(self, image_object: str, rephrases: list[str]) -> list[TextNegative]:
        k = self.cfg.n_text_negatives
        if k == 0:
            return []

        def convert(o: TextNegativesOut) -> list[TextNegative]:
            seen: set[str] = set()
            out: list[TextNegative] = []
            for neg in o.text_negatives:
                q, a = clean(neg.question), clean(neg.answer)
                if normalize_answer(q) and normalize_answer(q) not in seen:
                    seen.add(normalize_answer(q))
                    out.append(TextNegative(question=q, answer=a))
            return out[:k]

        out = self.ask(
            "text_negatives",
            counted(TextNegativesOut, text_negatives=k),
            {
                "question": self.item.question,
                "answer": self.answer,
                "image_object": image_object,
                "k": k,
            },
            lambda o: negative_problems(self.item.question, rephrases, convert(o), k),
            fields=["text_negatives"],
        )
        return convert(out)

    def image_free_locality(self, target: str) -> ImageFreeQuestion | None:
        """EasyEdit's `loc`/`loc_ans`: from the text-locality file, else asked of the LLM
        (when on), else None."""
        forbidden = [*self.answers, target]
        pool = self.a.text_locality
        if pool is not None:
            pair = pool.pick(self.item.item_id, forbidden)
            if pair is None:
                why = "every text-locality pair repeats an answer"
                raise _FieldFailed("image_free_locality", "validation", why)
            params = {"line": pair.line, "file_sha256": pool.sha256}
            if pair.source:
                params["source"] = pair.source
            self.provenance.append(
                FieldProvenance(
                    field="image_free_locality",
                    backend="text-locality-file",
                    seed=pool.seed,
                    params=json.dumps(params, sort_keys=True),
                )
            )
            return ImageFreeQuestion(question=pair.question, answer=pair.answer)
        if not self.cfg.image_free_locality:
            return None
        out = self.ask(
            "image_free_locality",
            ImageFreeLocalityOut,
            {"question": self.item.question, "answers": self.answers_text, "target": target},
            lambda o: image_free_problems(
                clean(o.question),
                clean(o.answer),
                forbidden,
                self.item.question,
                self.cfg.image_free_max_cos,
            ),
            fields=["image_free_locality"],
        )
        return ImageFreeQuestion(question=clean(out.question), answer=clean(out.answer))

    # ---- the request loop

    def ask(
        self,
        template_id: str,
        schema: type[T],
        variables: Mapping[str, Any],
        validate: Callable[[T], list[str]],
        *,
        fields: list[str],
        sample: int = 0,
    ) -> T:
        """Ask until a valid answer (1 + retries attempts); record provenance; or fail."""
        template = self.a.templates[template_id]
        messages = template.render(**variables)
        last = ("", "")
        for attempt in range(1 + self.cfg.retries):
            result = self.a.client.complete(
                messages, schema, template=template.ref, sample=sample, attempt=attempt
            )
            if isinstance(result, LLMFailure):
                if result.kind == "deferred":
                    raise _Deferred
                last = (result.kind, result.reason)
                if result.kind not in ("parse", "length", "empty"):
                    break  # refusals, filters and exhausted transient errors: no re-ask
                continue
            problems = validate(result.value)
            if not problems:
                self._record(fields, template, result, sample, attempt)
                return result.value
            last = ("validation", "; ".join(problems))
        raise _FieldFailed(fields[0], *last)

    def _record(
        self,
        fields: list[str],
        template: Any,
        result: LLMSuccess[Any],
        sample: int,
        attempt: int,
    ) -> None:
        params = self.a.client.params(None, sample, attempt)
        for field in fields:
            self.provenance.append(
                FieldProvenance(
                    field=field,
                    backend=BACKEND,
                    model=self.cfg.llm.model,
                    template_id=template.id,
                    template_version=template.version,
                    seed=params["seed"],
                    params=json.dumps(
                        {
                            "temperature": params["temperature"],
                            "max_tokens": params["max_tokens"],
                            "sample": sample,
                            "attempt": attempt,
                            "structured_output": result.mode,
                            "served_model": result.model,
                        },
                        sort_keys=True,
                    ),
                    request_hash=result.request_hash,
                    timestamp=result.timestamp,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
            )


def annotator_config(config: Any) -> LLMAnnotatorConfig:
    """An `LLMAnnotatorConfig` from itself, a plain mapping (CLI / Prefect parameters), or a
    build config shaped like `pipeline.config.BuildConfig` (`.annotator.llm_base_url`,
    `.annotator.llm_model`, `.annotator.concurrency`, optional `.annotator.llm` with any
    `LLMConfig` fields, and `.cache_dir`, under which the request cache lives)."""
    if isinstance(config, LLMAnnotatorConfig):
        return config
    if isinstance(config, Mapping):
        return LLMAnnotatorConfig.model_validate(config)
    settings = getattr(config, "annotator", None)
    if settings is None:
        raise TypeError(f"cannot build an LLM annotator config from {type(config).__name__}")
    llm: dict[str, Any] = {}
    extra = getattr(settings, "llm", None)
    if extra is not None:
        llm.update(extra.model_dump() if isinstance(extra, BaseModel) else dict(extra))
    if getattr(settings, "llm_base_url", None):
        llm["base_url"] = settings.llm_base_url
    if getattr(settings, "llm_model", None):
        llm["model"] = settings.llm_model
    if getattr(settings, "concurrency", None):
        llm["concurrency"] = settings.concurrency
    cache_dir = getattr(config, "cache_dir", None)
    if cache_dir is not None and "cache_path" not in llm:
        llm["cache_path"] = Path(cache_dir) / "llm-cache.sqlite"
    if "build_id" not in llm and hasattr(config, "fingerprint"):
        llm["build_id"] = build_id(config)
    return LLMAnnotatorConfig(
        llm=LLMConfig.model_validate(llm),
        text_locality_file=getattr(settings, "text_locality_file", None),
        text_locality_seed=getattr(config, "seed", 0) or 0,
        image_free_locality=True,  # a build's records need EasyEdit's `loc`
    )


def build_id(config: Any) -> str:
    """The account of a build in the request database: its fingerprint (which leaves out
    budgets and limits, so a re-run with a raised budget is the same build) and its output
    folder. Every process and every resumed run of the build shares it: one budget, one
    concurrency, one rate limit and one usage report."""
    where = f"{config.fingerprint()}|{Path(config.out).resolve()}"
    return "build-" + hashlib.sha256(where.encode()).hexdigest()[:16]


def llm_usage(config: Any) -> dict[str, Any]:
    """The build's LLM usage report (`pipeline.llm.usage_report`), located from the build
    config alone: no client is built, no request is sent."""
    llm = annotator_config(config).llm
    report = usage_report(llm.cache_path, llm.build_id or "")
    price = llm.price()
    report["model"] = llm.model
    report["price_per_1m_usd"] = price.model_dump() if price else None
    report["budget_usd"] = llm.budget_usd
    return report


def make_annotator(config: Any, on_result: ResultCallback | None = None) -> LLMAnnotator:
    """The LLM annotator; `config` as accepted by `annotator_config`."""
    return LLMAnnotator(annotator_config(config), on_result=on_result)
