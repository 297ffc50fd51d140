"""Annotate: every generated field of design §5, from any OpenAI-compatible LLM.

`Annotator` is the stage's interface (the offline FlagworldAnnotator implements it too).
`LLMAnnotator` runs the field tasks of `pipeline/fields/` (one file per field: its prompt
template, response schema, `format_input`, `validate` and `parse`) over every item: it asks
one structured question per field with the prompt templates in `pipeline/prompts/*.yaml`
(id + version, both part of the cache key and the provenance), validates every answer with
the field's `validate` and re-asks (a new `attempt`, a new cache key) when an answer is
malformed or invalid. Items run concurrently (`LLMConfig.concurrency` items in flight, one
request each); an item whose field still fails becomes
`Rejection(stage="annotate", reason="<field>: <kind>: <detail>")`.

Per item the fields run in levels (`pipeline.fields.levels`; each needs the answers of the
one before):
1. image_object(A), target B;
2. 3 counterfact votes, 10 + 3 rephrases, C and D;
3. image_object(C), image_object(D), k text negatives, the image-free locality question.
That is 10 requests when nothing needs a re-ask, plus one for the image-free locality
question (EasyEdit's `loc`) when `image_free_locality` is on (the default), unless a
`text_locality_file` gives it (`pipeline/fields/image_free_locality.py`: one pair per item
by id and seed).
With `LLMConfig.batch_mode` the items run in rounds: each round queues the requests whose
inputs are known, sends them as one OpenAI Batch API job, waits for it and continues from
the cache (3 rounds + 1 per re-ask).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.fields import FIELD_TASKS, levels
from pipeline.fields.base import FieldFailed, FieldTask, ItemInput, answer_problems, counted, leaked
from pipeline.fields.counterfact_type import CounterfactTypeOut, majority
from pipeline.fields.image_free_locality import ImageFreeLocalityOut, image_free_problems
from pipeline.fields.image_object import ImageObjectOut
from pipeline.fields.locality import LocalityOut
from pipeline.fields.rephrases import RephrasesOut, rephrase_problems
from pipeline.fields.target import TargetOut
from pipeline.fields.text_negatives import TextNegativesOut
from pipeline.llm import (
    BudgetExceededError,
    LLMClient,
    LLMConfig,
    LLMFailure,
    LLMFatalError,
    LLMStats,
    LLMSuccess,
    usage_report,
)
from schemas.record import Annotation, FieldProvenance, Rejection, SourceItem

if TYPE_CHECKING:
    from pipeline.config import AnnotatorSettings, BuildConfig, ResolvedBuild

__all__ = [
    "PROMPTS_DIR",
    "TEMPLATE_IDS",
    "Annotator",
    "LLMAnnotator",
    "LLMAnnotatorConfig",
    "annotator_config",
    "build_id",
    "llm_usage",
    "load_template",
    "make_annotator",
    # the field tasks' schemas and rules, for the callers that import them from here
    # (pipeline/plan.py, the tests); their home is pipeline/fields/
    "CounterfactTypeOut",
    "ImageFreeLocalityOut",
    "ImageObjectOut",
    "LocalityOut",
    "RephrasesOut",
    "TargetOut",
    "TextNegativesOut",
    "answer_problems",
    "counted",
    "image_free_problems",
    "leaked",
    "majority",
    "rephrase_problems",
]

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BACKEND = "openai-chat"


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


def template_ids(tasks: Sequence[type[FieldTask]]) -> tuple[str, ...]:
    """The prompt templates the field tasks ask with, each once, in request order."""
    return tuple(dict.fromkeys(task.template_id for task in tasks))


TEMPLATE_IDS = template_ids(FIELD_TASKS)


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
        *,
        fields: Sequence[type[FieldTask]] = FIELD_TASKS,
        record: type[Annotation] = Annotation,
    ):
        """`fields`: the field tasks in request order (`pipeline.fields.FIELD_TASKS`);
        `record`: the model their fields make up, with the item id and the provenance."""
        self.config = config
        self.client = client or LLMClient(config.llm)
        prompts = config.prompts_dir or PROMPTS_DIR
        self.templates = {t: load_template(t, prompts) for t in template_ids(fields)}
        # built here (a task may read a file or load a model), so that preflight reports it
        self.levels = levels([task(config) for task in fields])
        self.record = record
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
        except FieldFailed as exc:  # transient only: deferred, tried again by a re-run
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
    """The requests of one item, level by level, with their provenance."""

    def __init__(self, annotator: LLMAnnotator, item: SourceItem):
        self.a = annotator
        self.cfg = annotator.config
        self.item = item
        self.provenance: list[FieldProvenance] = []
        self.inp = ItemInput.of(item)

    def run(self) -> Annotation:
        """Each level needs the answers of the one before. In batch mode a level queues all
        its requests before the item waits (raises `_Deferred`)."""
        for level in self.a.levels:
            self.inp = self.inp.with_values(self.level(level))
        return self.a.record(
            item_id=self.item.item_id, **self.inp.values, provenance=self.provenance
        )

    def level(self, tasks: list[FieldTask]) -> dict[str, Any]:
        """Run every task; a failed field fails the item at once, waiting tasks after all
        tasks of the level have queued their requests."""
        values: dict[str, Any] = {}
        waiting = False
        for task in tasks:
            try:
                values.update(self.field(task))
            except _Deferred:
                waiting = True
        if waiting:
            raise _Deferred
        return values

    def field(self, task: FieldTask) -> dict[str, Any]:
        """The record fields of one task: without a request, or from its samples' answers."""
        filled = task.without_request(self.inp)
        if filled is not None:
            self.provenance += filled.provenance
            return filled.values
        answers: list[Any] = []
        failures: list[FieldFailed] = []
        waiting = False
        for sample in range(task.samples):
            try:
                answers.append(self.ask(task, sample))
            except FieldFailed as exc:
                failures.append(exc)
            except _Deferred:
                waiting = True
        if waiting:
            raise _Deferred
        return task.combine(answers, failures, self.inp)

    # ---- the request loop

    def ask(self, task: FieldTask, sample: int) -> Any:
        """Ask until a valid answer (1 + retries attempts); record provenance; or fail."""
        template = self.a.templates[task.template_id]
        messages = template.render(**task.format_input(self.inp))
        schema = task.schema()
        fields = task.provenance_fields(sample)
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
            problems = task.validate(result.value, self.inp)
            if not problems:
                self._record(fields, template, result, sample, attempt)
                return result.value
            last = ("validation", "; ".join(problems))
        raise FieldFailed(fields[0], *last)

    def _record(
        self,
        fields: list[str],
        template: PromptTemplate,
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


def annotator_config(
    config: ResolvedBuild | BuildConfig | LLMAnnotatorConfig | Mapping[str, Any],
) -> LLMAnnotatorConfig:
    """An `LLMAnnotatorConfig` from itself, a plain mapping (tests, benches), or a build
    (its annotator settings, with the build's request account: `build_id`); a build's
    config is resolved here, a resolved build is used as it is."""
    if isinstance(config, LLMAnnotatorConfig):
        return config
    if isinstance(config, Mapping):
        return LLMAnnotatorConfig.model_validate(config)
    from pipeline.config import ResolvedBuild, resolve

    build = config if isinstance(config, ResolvedBuild) else resolve(config)
    cfg = build.config
    account = build_id(build.fingerprint, cfg.out)
    return settings_config(cfg.annotator, cache_dir=cfg.cache_dir, seed=cfg.seed, account=account)


def settings_config(
    settings: AnnotatorSettings, *, cache_dir: Path, seed: int = 0, account: str | None = None
) -> LLMAnnotatorConfig:
    """The LLM annotator's config from a build's `AnnotatorSettings`: the request cache under
    `cache_dir`, the text-locality sample by `seed`, requests counted on `account` (none for a
    plan, which sends nothing)."""
    llm: dict[str, Any] = dict(settings.llm)
    if settings.llm_base_url:
        llm["base_url"] = settings.llm_base_url
    llm["model"] = settings.llm_model
    llm["concurrency"] = settings.concurrency
    llm.setdefault("cache_path", Path(cache_dir) / "llm-cache.sqlite")
    if account is not None:
        llm.setdefault("build_id", account)
    return LLMAnnotatorConfig(
        llm=LLMConfig.model_validate(llm),
        n_rephrases=settings.n_rephrases,
        n_text_negatives=settings.n_text_negatives,
        n_votes=settings.n_votes,
        prompts_dir=settings.prompts_dir,
        text_locality_file=settings.text_locality_file,
        text_locality_seed=seed,
        image_free_locality=True,  # a build's records need EasyEdit's `loc`
    )


def build_id(fingerprint: str, out: Path) -> str:
    """The account of a build in the request database: its fingerprint (which leaves out
    budgets and limits, so a re-run with a raised budget is the same build) and its output
    folder. Every process and every resumed run of the build shares it: one budget, one
    concurrency, one rate limit and one usage report."""
    where = f"{fingerprint}|{Path(out).resolve()}"
    return "build-" + hashlib.sha256(where.encode()).hexdigest()[:16]


def llm_usage(config: ResolvedBuild | BuildConfig) -> dict[str, Any]:
    """The build's LLM usage report (`pipeline.llm.usage_report`), located from the build
    alone: no client is built, no request is sent."""
    llm = annotator_config(config).llm
    report = usage_report(llm.cache_path, llm.build_id or "")
    price = llm.price()
    report["model"] = llm.model
    report["price_per_1m_usd"] = price.model_dump() if price else None
    report["budget_usd"] = llm.budget_usd
    return report


def make_annotator(
    config: ResolvedBuild | BuildConfig | LLMAnnotatorConfig | Mapping[str, Any],
    on_result: ResultCallback | None = None,
) -> LLMAnnotator:
    """The LLM annotator; `config` as accepted by `annotator_config`."""
    return LLMAnnotator(annotator_config(config), on_result=on_result)
