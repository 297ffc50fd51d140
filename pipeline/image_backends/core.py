"""The machinery every image backend shares: slots, jobs, checks, retries, provenance.

An `ImageGenerator` only turns jobs (one image each: an item's field, a prompt, an attempt
number and a seed) into encoded images or typed failures. `ImageMaker` is the
`ImageBackend` the build calls: it lays out each item's slots (10 image rephrases of
`image_object`, the near-miss `locality_images` of `locality_image_object`, the training
negative of `locality_image_train_object`), asks the generator for all pending slots of a
chunk at once (so a GPU backend batches them and an API backend runs them concurrently),
checks every image, and asks again for the failed ones (attempt + 1: another seed, or the
next pool neighbour) up to `max_attempts`. An item with a slot that still fails, or that
failed for good (a refusal with no fallback, an object the backend cannot show), becomes
`Rejection(stage="images")` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from PIL import Image

from pipeline.image_backends.checks import (
    Checked,
    Fingerprint,
    ImageChecker,
    check_image,
    fingerprint,
)
from schemas.record import Annotation, FieldProvenance, ItemImages, Rejection, SourceItem

log = logging.getLogger(__name__)

Role = Literal["positive", "locality", "train"]
# the annotation field each role's prompt comes from
ROLE_SOURCE: dict[Role, str] = {
    "positive": "image_object",
    "locality": "locality_image_object",
    "train": "locality_image_train_object",
}


@dataclass(frozen=True)
class Slot:
    """One image of an item: where it goes and what it must show."""

    field: str  # "image_rephrases[3]", "locality_images[0]", "locality_image_train"
    role: Role
    prompt: str
    position: int = 0  # index within its list (0 for the training negative)

    @property
    def source_field(self) -> str:
        return ROLE_SOURCE[self.role]


def item_slots(annotation: Annotation, n_rephrases: int, n_locality: int) -> list[Slot]:
    slots = [
        Slot(f"image_rephrases[{i}]", "positive", annotation.image_object, i)
        for i in range(n_rephrases)
    ]
    slots += [
        Slot(f"locality_images[{i}]", "locality", annotation.locality_image_object, i)
        for i in range(n_locality)
    ]
    slots.append(Slot("locality_image_train", "train", annotation.locality_image_train_object))
    return slots


@dataclass
class ItemContext:
    """What a generator may need to know about the item (retrieval excludes with it)."""

    item: SourceItem
    annotation: Annotation
    original: Fingerprint | None  # None: the original does not decode (nothing to compare)
    chosen: list[Fingerprint] = field(default_factory=list)  # accepted images so far
    tried: set[str] = field(default_factory=set)  # candidate ids used or refused already


@dataclass(frozen=True)
class Job:
    context: ItemContext
    slot: Slot
    attempt: int  # 0 first, 1 the first replacement, ...
    seed: int  # derived from (build seed, item, field, attempt): batch-independent


@dataclass
class Produced:
    """One image and how it was made."""

    data: bytes
    backend: str
    model: str = ""
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    score: float | None = None  # cosine to the prompt, when the backend computed it
    candidate: str = ""  # identity excluded from later attempts (retrieval: the pool file)
    request_hash: str = ""
    timestamp: str = ""
    template_id: str = ""
    template_version: str = ""


@dataclass(frozen=True)
class Failed:
    """No image for this job; `retry` False when another attempt cannot help (refusal)."""

    kind: str  # refusal | bad_request | server_error | unsupported | exhausted | ...
    reason: str
    retry: bool = True


Result = Produced | Failed


class ImageGenerator(Protocol):
    name: str

    def generate(self, jobs: list[Job]) -> list[Result]: ...


class ImageFatalError(RuntimeError):
    """Every further request would fail the same way (bad key, unknown model)."""


class ImageConfigError(ValueError):
    """Settings that cannot work (missing pool, missing optional extra, no API key)."""


def job_seed(seed: int, item_id: str, field_name: str, attempt: int) -> int:
    blob = f"{seed}:{item_id}:{field_name}:{attempt}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Stats:
    """Thread-safe counters a backend reports (requests, refusals, cache hits, ...)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class WithFallback:
    """Jobs the primary generator fails go to the fallback; the reason is kept in params."""

    def __init__(self, primary: ImageGenerator, fallback: ImageGenerator) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name

    def generate(self, jobs: list[Job]) -> list[Result]:
        results = self.primary.generate(jobs)
        failed = [i for i, r in enumerate(results) if isinstance(r, Failed)]
        if not failed:
            return results
        second = self.fallback.generate([jobs[i] for i in failed])
        for i, fallback_result in zip(failed, second, strict=True):
            first = results[i]
            assert isinstance(first, Failed)
            if isinstance(fallback_result, Produced):
                fallback_result.params = {
                    **fallback_result.params,
                    "fallback_from": self.primary.name,
                    "fallback_reason": f"{first.kind}: {first.reason}",
                }
                results[i] = fallback_result
            else:
                results[i] = Failed(
                    fallback_result.kind,
                    f"{first.reason}; fallback {self.fallback.name}: {fallback_result.reason}",
                    fallback_result.retry,
                )
        return results


Scorer = Callable[[list[bytes], list[str]], list[float]]


@dataclass
class _SlotState:
    accepted: tuple[Checked, Produced, float | None, int] | None = None
    reason: str = ""
    attempts: int = 0


def _chain(generator: Any) -> list[Any]:
    """`generator` and what it wraps: a cache's inner generator, a fallback's two."""
    parts = [generator]
    for attr in ("inner", "primary", "fallback"):
        wrapped = getattr(generator, attr, None)
        if wrapped is not None:
            parts += _chain(wrapped)
    return parts


class ImageMaker:
    """The images stage over any generator: checks, replacements, provenance."""

    def __init__(
        self,
        generator: ImageGenerator,
        *,
        seed: int = 0,
        n_rephrases: int = 10,
        n_locality: int = 3,
        max_attempts: int = 3,
        checker: ImageChecker | None = None,
        scorer: Scorer | None = None,
        clip_threshold: float | None = None,
    ) -> None:
        if n_rephrases < 1 or n_locality < 1 or max_attempts < 1:
            raise ValueError("need n_rephrases >= 1, n_locality >= 1 and max_attempts >= 1")
        if clip_threshold is not None and scorer is None:
            raise ValueError("a CLIP threshold needs a scorer")
        self.generator = generator
        self.name = generator.name
        self.seed = seed
        self.n_rephrases = n_rephrases
        self.n_locality = n_locality
        self.max_attempts = max_attempts
        self.checker = checker or ImageChecker()
        self.scorer = scorer
        self.clip_threshold = clip_threshold
        self.stats = Stats()

    def make_images(
        self, pairs: list[tuple[SourceItem, Annotation]]
    ) -> list[ItemImages | Rejection]:
        contexts = [ItemContext(item, ann, _original(item.image)) for item, ann in pairs]
        slots = [item_slots(ann, self.n_rephrases, self.n_locality) for _, ann in pairs]
        states = [[_SlotState() for _ in s] for s in slots]
        dead: dict[int, str] = {}  # item index -> reason it cannot be completed
        for attempt in range(self.max_attempts):
            pending = [
                (i, k)
                for i in range(len(pairs))
                if i not in dead
                for k, state in enumerate(states[i])
                if state.accepted is None
            ]
            if not pending:
                break
            jobs = [self._job(contexts[i], slots[i][k], attempt) for i, k in pending]
            results = self.generator.generate(jobs)
            scores = self._scores(jobs, results)
            for (i, k), job, result, score in zip(pending, jobs, results, scores, strict=True):
                if i not in dead:
                    self._settle(job, result, score, states[i][k], dead, i)
        return [
            self._finish(ctx, s, st, dead.get(i))
            for i, (ctx, s, st) in enumerate(zip(contexts, slots, states, strict=True))
        ]

    def report(self) -> dict[str, int]:
        return self.stats.snapshot()

    def usage(self) -> dict[str, Any]:
        """What this stage did in this process: its own counts (images accepted, checks
        failed, ...) and, per backend in its chain (the generator, its cache, a fallback),
        the requests, images, cache hits and the list-price cost where one is known."""
        backends: dict[str, dict[str, Any]] = {}
        seen: set[int] = set()  # a cache wrapper counts into its generator's stats
        for part in _chain(self.generator):
            counts = backends.setdefault(part.name, {})
            cost = getattr(part, "cost_usd", None)
            if callable(cost):
                counts["cost_usd"] = cost()
            stats = getattr(part, "stats", None)
            if stats is not None and id(stats) not in seen:
                seen.add(id(stats))
                for key, n in stats.snapshot().items():
                    counts[key] = counts.get(key, 0) + n
        return {**self.report(), "backends": backends}

    # ---- internals

    def _job(self, ctx: ItemContext, slot: Slot, attempt: int) -> Job:
        return Job(ctx, slot, attempt, job_seed(self.seed, ctx.item.item_id, slot.field, attempt))

    def _scores(self, jobs: list[Job], results: list[Result]) -> list[float | None]:
        """The backend's own score, else CLIP's when a threshold asks for one."""
        scores: list[float | None] = [r.score if isinstance(r, Produced) else None for r in results]
        if self.scorer is None or self.clip_threshold is None:
            return scores
        todo = [i for i, r in enumerate(results) if isinstance(r, Produced) and scores[i] is None]
        # only images that decode: the others fail their check anyway
        usable = [i for i in todo if check_image(_data(results[i]), self.checker.min_size) is None]
        if usable:
            fresh = self.scorer(
                [_data(results[i]) for i in usable], [jobs[i].slot.prompt for i in usable]
            )
            for i, value in zip(usable, fresh, strict=True):
                scores[i] = value
        return scores

    def _settle(
        self,
        job: Job,
        result: Result,
        score: float | None,
        state: _SlotState,
        dead: dict[int, str],
        index: int,
    ) -> None:
        state.attempts += 1
        ctx = job.context
        if isinstance(result, Failed):
            self.stats.add(f"failed_{result.kind}")
            state.reason = f"{result.kind}: {result.reason}"
            if not result.retry:
                dead[index] = f"{job.slot.field}: {state.reason}"
        else:
            if result.candidate:
                ctx.tried.add(result.candidate)
            outcome = self.checker.check(result.data, ctx.original, ctx.chosen)
            if isinstance(outcome, Checked) and self._too_low(score):
                shown = "none" if score is None else f"{score:.3f}"
                outcome = f"CLIP score {shown} < threshold {self.clip_threshold}"
            if isinstance(outcome, str):
                self.stats.add("check_failed")
                state.reason = f"check: {outcome}"
            else:
                ctx.chosen.append(outcome.fingerprint)
                state.accepted = (outcome, result, score, job.attempt)
                self.stats.add("images")
                return
        if index not in dead and state.attempts >= self.max_attempts:
            dead[index] = f"{job.slot.field}: {state.reason} (after {state.attempts} attempts)"

    def _too_low(self, score: float | None) -> bool:
        return self.clip_threshold is not None and (score is None or score < self.clip_threshold)

    def _finish(
        self,
        ctx: ItemContext,
        slots: list[Slot],
        states: list[_SlotState],
        dead_reason: str | None,
    ) -> ItemImages | Rejection:
        item_id = ctx.item.item_id
        if dead_reason is not None:
            self.stats.add("items_rejected")
            return Rejection(item_id=item_id, stage="images", reason=dead_reason)
        images: dict[str, bytes] = {}
        provenance: list[FieldProvenance] = []
        for slot, state in zip(slots, states, strict=True):
            assert state.accepted is not None
            checked, produced, score, attempt = state.accepted
            images[slot.field] = checked.data
            provenance.append(_provenance(slot, checked, produced, score, attempt))
        n_loc = sum(s.role == "locality" for s in slots)
        return ItemImages(
            item_id=item_id,
            image_rephrases=[images[s.field] for s in slots if s.role == "positive"],
            locality_images=[images[f"locality_images[{i}]"] for i in range(n_loc)],
            locality_image_train=images["locality_image_train"],
            provenance=provenance,
        )


def _data(result: Result) -> bytes:
    return result.data if isinstance(result, Produced) else b""


def _original(data: bytes) -> Fingerprint | None:
    try:
        return fingerprint(data)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # an undecodable original has nothing to compare to


def _provenance(
    slot: Slot, checked: Checked, produced: Produced, score: float | None, attempt: int
) -> FieldProvenance:
    params = {**produced.params, "prompt": slot.prompt, "score": score, "attempt": attempt}
    if checked.converted_from:
        params["converted_from"] = checked.converted_from
    return FieldProvenance(
        field=slot.field,
        backend=produced.backend,
        model=produced.model,
        template_id=produced.template_id,
        template_version=produced.template_version,
        seed=produced.seed,
        params=json.dumps(params, sort_keys=True, default=str),
        request_hash=produced.request_hash,
        timestamp=produced.timestamp,
    )


def with_params(result: Result, **params: Any) -> Result:
    """A copy of a produced result with extra provenance params."""
    if isinstance(result, Failed):
        return result
    return replace(result, params={**result.params, **params})
