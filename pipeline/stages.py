"""The build's stages, declared once (`STAGES`), and the one chunk runner.

A stage is a plain function `(build, work, index) -> (ok, rejected)`: it reads the chunk's
earlier results from the build's `WorkDir`, does its work, and returns its results;
`run_chunk` skips a finished chunk (what makes a re-run resume: the chunk markers are the
only resume mechanism), runs the stage, and writes the chunk with its marker last. Every
stage gets the build's settings resolved once (`pipeline.config.ResolvedBuild`), and the
objects a stage needs (source, annotator, image backend, model) are made once per process.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from pipeline.assemble import build_records
from pipeline.config import BuildConfig, ResolvedBuild, model_problem
from pipeline.work import WorkDir
from schemas.record import Annotation, ItemImages, OkeditRecord, Rejection, SourceItem


def stamped(results: list) -> list:
    """`results` with a timestamp in every provenance entry: deterministic backends (the
    offline annotator, the render backend) leave it empty, so that what they return depends
    on their inputs only; the build records when its chunk made the field. Entries that
    have one (an LLM answer, a cached image) keep it; a re-run reuses the chunk as written."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = []
    for result in results:
        provenance = getattr(result, "provenance", None)
        if provenance and any(not p.timestamp for p in provenance):
            filled = [
                p if p.timestamp else p.model_copy(update={"timestamp": now}) for p in provenance
            ]
            result = result.model_copy(update={"provenance": filled})
        out.append(result)
    return out


# this process, among all that work on a build (threads share it; runs and workers do not)
PROCESS = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_STATS_LOCK = threading.Lock()


def summed(parts: list[dict]) -> dict:
    """Counts of several processes added up, nested dicts by key; an unknown (None) cost
    makes the sum unknown."""
    total: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key] = summed([total.get(key, {}), value])
            elif key not in total:
                total[key] = value
            else:
                total[key] = None if value is None or total[key] is None else total[key] + value
    return total


def split_ok(results: list) -> tuple[list, list[Rejection]]:
    ok = [r for r in results if not isinstance(r, Rejection)]
    return ok, [r for r in results if isinstance(r, Rejection)]


# ---- what the stages use, made once per process and build ------------------------------


@lru_cache(maxsize=4)
def source(build: ResolvedBuild):
    from pipeline.sources import get_source

    return get_source(build.config.source, cache_dir=build.config.cache_dir)


@lru_cache(maxsize=4)
def annotator(build: ResolvedBuild):
    return make_annotator(build)


@lru_cache(maxsize=4)
def image_backend(build: ResolvedBuild):
    return make_image_backend(build.config)


def adapter(build: ResolvedBuild):
    """The validation model, loaded once per worker process and reused by every chunk (and
    every build with the same model settings) it validates."""
    assert build.validation is not None
    return _load_model(build.validation.model.model_dump_json())


@lru_cache(maxsize=1)
def _load_model(model_json: str):
    from editors.adapters import load_model
    from editors.config import ModelConfig

    return load_model(ModelConfig.model_validate_json(model_json))


class ConfigError(ValueError):
    """Settings that cannot work together."""


class BuildStopped(RuntimeError):
    """The build was asked to stop (Ctrl-C, SIGTERM): finished chunks are kept, no new
    chunk starts; a re-run of the same command resumes."""


_STOP = threading.Event()


def request_stop() -> None:
    """Start no further chunk and send no further LLM request in this process; chunks and
    requests already running end normally. Called by `okedit build` on SIGINT/SIGTERM."""
    from pipeline.llm import request_stop as stop_llm_requests

    _STOP.set()
    stop_llm_requests()


def _starting(stage: str, index: int) -> None:
    if _STOP.is_set():
        raise BuildStopped(f"stopping: {stage} chunk {index} not started")


def make_annotator(build: ResolvedBuild):
    """The offline flagworld annotator, or the LLM annotator for real sources."""
    cfg = build.config
    if cfg.annotator.kind == "offline":
        if cfg.source.name != "flagworld":
            raise ConfigError(
                "the offline annotator only knows the flagworld; use --annotator llm "
                "with --llm-base-url for OK-VQA"
            )
        from pipeline.offline_annotator import FlagworldAnnotator

        return FlagworldAnnotator(seed=cfg.seed)
    from pipeline.annotate import make_annotator as make_llm_annotator

    return make_llm_annotator(build)


def annotator_name(build: ResolvedBuild) -> str:
    """The annotator's name for the manifest, without making one (an LLM client, a cache)."""
    if build.config.annotator.kind == "offline":
        from pipeline.offline_annotator import FlagworldAnnotator

        return FlagworldAnnotator.name
    from pipeline.annotate import LLMAnnotator

    return LLMAnnotator.name


def make_image_backend(cfg: BuildConfig):
    """The images stage of `pipeline.images` for this build; settings that cannot work
    (render for a real source, retrieve without a pool, openai without a key) fail here."""
    from pipeline.images import ImageConfigError
    from pipeline.images import make_image_backend as make_backend

    if "render" in (cfg.images.backend, cfg.images.fallback) and cfg.source.name != "flagworld":
        raise ConfigError("the render backend draws flagworld flags only")
    try:
        return make_backend(cfg.images, seed=cfg.seed, cache_dir=cfg.cache_dir)
    except ImageConfigError as exc:
        raise ConfigError(str(exc)) from None


def preflight(build: ResolvedBuild) -> None:
    """Fail before any work (or any paid request) when the settings cannot work.

    Reads and checks the source's input files (every column and entry), builds the
    annotator and image backend (cached for the run), and finds every model the build will
    load (a local folder, or a Hub id on the Hub or, offline, in the local cache) and the
    CUDA device it asks for, so a missing file, key, pool folder, model or GPU is one clear
    error up front (`ConfigError`, `FileNotFoundError`, `ValueError`, `LLMFatalError`)
    instead of a failure stages later. (A missing tiny VLM already failed in
    `pipeline.config.resolve`.)
    """
    cfg = build.config
    for setting, url in _urls(cfg):
        problem = url_problem(url)
        if problem:
            from pipeline.llm import redact_url

            raise ConfigError(f"{setting} {redact_url(url)}: {problem}")
    chunk_ids(build)  # reads and checks the input files
    annotator(build)
    image_backend(build)
    for setting, model in _image_models(cfg):
        _require_model(model, setting)
    if cfg.images.device == "cuda" and _image_models(cfg):
        _require_cuda("images.device")
    if build.validation is not None:
        if build.validation.model.device == "cuda":
            _require_cuda("--device")
        _require_model(build.validation.model.model, "--model")
        try:
            build.validation.family()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _urls(cfg: BuildConfig) -> list[tuple[str, str]]:
    """(setting, URL) of every server the build will talk to."""
    urls = []
    if cfg.annotator.kind == "llm" and cfg.annotator.llm_base_url:
        urls.append(("--llm-base-url", cfg.annotator.llm_base_url))
    if cfg.source.name == "okvqa-files" and cfg.source.image_base_url:
        urls.append(("--image-base-url", cfg.source.image_base_url))
    if "openai" in (cfg.images.backend, cfg.images.fallback) and cfg.images.api_base_url:
        urls.append(("images.api_base_url", cfg.images.api_base_url))
    return urls


def url_problem(url: str) -> str | None:
    """Why `url` is no http(s) server address, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"not an http(s) URL (scheme {parts.scheme or '(none)'!r})"
    if not parts.hostname:
        return "no host in the URL"
    return None


def _image_models(cfg: BuildConfig) -> list[tuple[str, str]]:
    """(setting, model id or folder) of every model the images stage loads."""
    images = cfg.images
    models: list[tuple[str, str]] = []
    for backend, primary in ((images.backend, True), (images.fallback, False)):
        model = images.model if primary else ""
        if backend == "retrieve":
            models.append(("--image-model" if model else "images.clip_model",
                           model or images.clip_model))  # fmt: skip
        elif backend == "diffusers":
            from pipeline.image_backends.diffusion import DEFAULT_MODEL

            models.append(("--image-model", model or DEFAULT_MODEL))
    if images.clip_threshold is not None:
        models.append(("images.clip_model", images.clip_model))
    return list(dict.fromkeys(models))


def _require_cuda(setting: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} cuda: no CUDA device here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); use cpu or auto"
        )


def _require_model(name: str, setting: str) -> None:
    problem = model_problem(name)
    if problem:
        raise ConfigError(f"{setting} {name}: {problem}")


@lru_cache(maxsize=4)
def chunk_ids(build: ResolvedBuild) -> tuple[tuple[str, ...], ...]:
    """The build's item ids (the source's sample), in chunks of `chunk_size`."""
    cfg = build.config
    ids = source(build).list_ids(cfg.limit, cfg.seed)
    return tuple(tuple(ids[i : i + cfg.chunk_size]) for i in range(0, len(ids), cfg.chunk_size))


StageResult = tuple[list, list[Rejection]]
StageFn = Callable[[ResolvedBuild, WorkDir, int], StageResult]


def gather(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult:
    ids = chunk_ids(build)[index]
    results = source(build).load_items(list(ids))
    ok, rejected = split_ok(results)
    seen = {r.item_id for r in results}  # an id the source skipped is still accounted for
    missing = [i for i in ids if i not in seen]
    reason = "not returned by source"
    return ok, rejected + [Rejection(item_id=i, stage="gather", reason=reason) for i in missing]


def annotate(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult:
    items = work.read_ok("gather", index, SourceItem)
    return split_ok(stamped(annotator(build).annotate(items) if items else []))


def retry_deferred(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult | None:
    """An annotate chunk done with deferred items (transient LLM failures) asks again for
    those items only (the request cache makes everything answered before free); None when
    they are still waiting, else the chunk's new results."""
    items = work.read_ok("gather", index, SourceItem)
    before_ok = work.read_ok("annotate", index, Annotation)
    before_rejected = work.read_rejected("annotate", index)
    retry = {r.item_id for r in before_rejected if r.deferred}
    again = annotator(build).annotate([i for i in items if i.item_id in retry])
    if all(isinstance(r, Rejection) and r.deferred for r in again):
        return None
    new_ok, new_rejected = split_ok(stamped(again))
    order = {item.item_id: n for n, item in enumerate(items)}
    ok = sorted([*before_ok, *new_ok], key=lambda a: order.get(a.item_id, len(order)))
    return ok, [r for r in before_rejected if not r.deferred] + new_rejected


def images(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult:
    items = {i.item_id: i for i in work.read_ok("gather", index, SourceItem)}
    pairs = [(items[a.item_id], a) for a in work.read_ok("annotate", index, Annotation)]
    backend = image_backend(build)
    results = backend.make_images(pairs) if pairs else []
    with _STATS_LOCK:  # chunks in threads: the newest counts are written last
        work.write_stats("images", PROCESS, backend.usage())  # requests and cost, for the manifest
    return split_ok(stamped(results))


def assemble(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult:
    """QC: the item's parts joined into records, checked (`pipeline.assemble`)."""
    return build_records(
        work.read_ok("gather", index, SourceItem),
        work.read_ok("annotate", index, Annotation),
        work.read_ok("images", index, ItemImages),
        build.config.quality,
    )


def validate(build: ResolvedBuild, work: WorkDir, index: int) -> StageResult:
    """Edit the model once per record and store both outcomes; errors stay per item."""
    records = work.read_ok("assemble", index, OkeditRecord)
    if build.validation is None or not records:
        return records, []
    from pipeline.validate import validate_records

    validated = validate_records(
        records,
        build.validation.editor,
        build.validation.model,
        model=adapter(build),
        show_progress=False,  # the flow shows its own progress
        check=build.validation.settings.check,
        batch_items=build.validation.settings.batch_items,
    )
    return validated, []


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    # a chunk done with deferred items is tried again by this (annotate only)
    retry: Callable[[ResolvedBuild, WorkDir, int], StageResult | None] | None = None
    long: bool = False  # slow enough to watch in the UI (LLM calls, image models, edits)


# The build, in order. Each stage reads the chunk files of the stages before it.
STAGES: tuple[Stage, ...] = (
    Stage("gather", gather),
    Stage("annotate", annotate, retry=retry_deferred, long=True),
    Stage("images", images, long=True),
    Stage("assemble", assemble),
    Stage("validate", validate, long=True),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def run_chunk(build: ResolvedBuild, stage_name: str, index: int) -> dict[str, int]:
    """The one runner of every stage and chunk: skip a finished chunk (what makes a re-run
    resume), else run the stage on the build's files and write its results, the marker
    last. A chunk rewritten by a retry reopens the chunk's later stages."""
    stage = _BY_NAME[stage_name]
    work = WorkDir(build.out)
    if work.is_final(stage.name, index):
        return work.chunk_counts(stage.name, index)
    _starting(stage.name, index)
    if work.is_done(stage.name, index):  # done, with deferred items
        again = stage.retry(build, work, index) if stage.retry else None
        if again is None:
            return work.chunk_counts(stage.name, index)
        work.reopen(index, STAGE_NAMES[STAGE_NAMES.index(stage.name) + 1 :])
        return work.write_chunk(stage.name, index, *again)
    return work.write_chunk(stage.name, index, *stage.run(build, work, index))


def run_chunk_stages(
    build: ResolvedBuild, stage_names: Sequence[str], index: int
) -> dict[str, dict]:
    """`run_chunk` for several stages of one chunk, in order: per stage its counts, when it
    ran in this process (`start`, `end`: `time.time()`) and whether it did any work (`ran`:
    False for a chunk an earlier run finished)."""
    work = WorkDir(build.out)
    report = {}
    for name in stage_names:
        ran = not work.is_final(name, index)
        start = time.time()
        counts = run_chunk(build, name, index)
        report[name] = {"counts": counts, "start": start, "end": time.time(), "ran": ran}
    return report


def stage_seconds(reports: list[dict[str, dict]]) -> dict[str, float]:
    """Wall time of each stage in this run, from `run_chunk_stages` reports: from its first
    chunk's start to its last chunk's end (the stages of one chunk task overlap other
    chunks' stages)."""
    spans: dict[str, list[float]] = {}
    for report in reports:
        for name, ran in report.items():
            span = spans.setdefault(name, [ran["start"], ran["end"]])
            span[0], span[1] = min(span[0], ran["start"]), max(span[1], ran["end"])
    return {name: round(end - start, 3) for name, (start, end) in spans.items()}


def collect(
    build: ResolvedBuild, n_chunks: int
) -> tuple[list[OkeditRecord], list[Rejection], dict]:
    """All validated records, every rejection, and per-stage counts."""
    work = WorkDir(build.out)
    records: list[OkeditRecord] = []
    rejected: list[Rejection] = []
    stage_counts = {}
    for stage in STAGE_NAMES:
        counts = [work.chunk_counts(stage, i) for i in range(n_chunks)]
        stage_counts[stage] = {
            "ok": sum(c["ok"] for c in counts),
            "rejected": sum(c["rejected"] for c in counts),
        }
        deferred = sum(c.get("deferred", 0) for c in counts)
        if deferred:  # items a re-run retries (transient failures)
            stage_counts[stage]["deferred"] = deferred
        for i in range(n_chunks):
            rejected += work.read_rejected(stage, i)
    for i in range(n_chunks):
        records += work.read_ok("validate", i, OkeditRecord)
    return records, rejected, stage_counts


def finalize(build: ResolvedBuild, reports: list[dict[str, dict]] | None = None) -> dict:
    """Publish the local folder; returns the summary (in = published + rejected, + deferred
    when items wait for a re-run: those are listed in rejected.jsonl with `deferred: true`).
    `reports` (`run_chunk_stages`'s, of this run) time the stages for the manifest."""
    from pipeline.check import filter_by_check
    from pipeline.plan import resolved_image_model
    from pipeline.publish import publish_local

    cfg = build.config
    chunks = chunk_ids(build)
    records, rejected, stage_counts = collect(build, len(chunks))
    records, dropped = filter_by_check(records, cfg.validation.filter)
    rejected += dropped
    stage_counts["validate"]["ok"] -= len(dropped)
    stage_counts["validate"]["rejected"] += len(dropped)
    deferred = sum(r.deferred for r in rejected)
    n_in = sum(len(c) for c in chunks)
    counts = {"in": n_in, "published": len(records), "rejected": len(rejected) - deferred}
    if deferred:
        counts["deferred"] = deferred
    if counts["in"] != counts["published"] + counts["rejected"] + deferred:
        raise RuntimeError(f"counts do not reconcile: {counts}")
    manifest = {
        "name": "OKEDIT",
        "fingerprint": build.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": build.described,
        "annotator": annotator_name(build),
        "counts": counts,
        "stages": stage_counts,
    }
    if build.inputs:  # sha256 of the source files, by setting (part of the build's identity)
        manifest["inputs"] = build.inputs
    if cfg.annotator.kind == "llm":  # every request of the build, as the server counted it
        from pipeline.annotate import llm_usage

        manifest["llm"] = llm_usage(build)
    manifest["image_model"] = resolved_image_model(cfg)
    images_usage = WorkDir(build.out).read_stats("images")
    if images_usage:  # every process and run of the build, as the images stage counted it
        manifest["images_usage"] = summed(images_usage)
    if reports:  # this run's wall time, per stage and in all, against the plan's estimate
        manifest["stage_seconds"] = stage_seconds(reports)
        spans = [(r["start"], r["end"]) for chunk in reports for r in chunk.values()]
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        manifest["build_seconds"] = round(wall, 3)
        manifest["estimate_vs_actual"] = plan_rows(cfg, manifest)
    validation = build.validation.summary() if build.validation else None
    paths = publish_local(records, rejected, cfg.out, manifest, validation)
    return {
        "counts": counts,
        "stages": stage_counts,
        "paths": {k: str(v) for k, v in paths.items()},
    }


def plan_rows(cfg: BuildConfig, manifest: dict) -> list[dict]:
    """The plan's estimates next to what the build measured ([] when no plan can be made)."""
    from pipeline.plan import estimate_vs_actual, plan_for_config

    try:
        return estimate_vs_actual(plan_for_config(cfg), manifest)
    except ValueError:  # e.g. a split of unknown size without --limit
        return []


def missing_chunks(build: ResolvedBuild, stage: str) -> list[int]:
    """Chunks of `stage` without a completion marker (what a resumed or sharded run still owes)."""
    work = WorkDir(build.out)
    return [i for i in range(len(chunk_ids(build))) if not work.is_done(stage, i)]


def publish_hub(build: ResolvedBuild) -> dict | None:
    """Push the finished folder to `publish.repo_id` (token from HF_TOKEN) and verify it;
    None when no Hub target is set."""
    publish = build.config.publish
    if not publish.repo_id:
        return None
    from pipeline.publish import push_to_hub

    return push_to_hub(
        build.out,
        publish.repo_id,
        private=publish.private,
        revision=publish.revision,
        commit_message=publish.commit_message,
    )
