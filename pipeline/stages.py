"""The build as chunk-level stage functions over a `WorkDir`.

Each function reads its inputs from the previous stage's chunk files, calls the plain stage
function, and writes its own chunk, skipping chunks already done, which is what makes a
re-run resume (`run_chunk` is that skeleton, once). They take only small, hashable arguments
(a config, a chunk index, ids), so Prefect can wrap them as cached tasks without moving
images through its results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from pipeline.build import build_records
from pipeline.config import BuildConfig
from pipeline.sources import input_hashes
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


def split_ok(results: list) -> tuple[list, list[Rejection]]:
    ok = [r for r in results if not isinstance(r, Rejection)]
    return ok, [r for r in results if isinstance(r, Rejection)]


@lru_cache(maxsize=4)
def _source(config_json: str):
    from pipeline.sources import get_source

    cfg = BuildConfig.model_validate_json(config_json)
    return get_source(cfg.source, cache_dir=cfg.cache_dir)


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


def stop_requested() -> bool:
    return _STOP.is_set()


def _starting(stage: str, index: int) -> None:
    if _STOP.is_set():
        raise BuildStopped(f"stopping: {stage} chunk {index} not started")


def make_annotator(cfg: BuildConfig):
    """The offline flagworld annotator, or the LLM annotator for real sources."""
    if cfg.annotator.kind == "offline":
        if cfg.source.name != "flagworld":
            raise ConfigError(
                "the offline annotator only knows the flagworld; use --annotator llm "
                "with --llm-base-url for OK-VQA"
            )
        from pipeline.offline_annotator import FlagworldAnnotator

        return FlagworldAnnotator(seed=cfg.seed)
    from pipeline.annotate import make_annotator as make_llm_annotator

    return make_llm_annotator(cfg)


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


@lru_cache(maxsize=4)
def _annotator(config_json: str):
    return make_annotator(BuildConfig.model_validate_json(config_json))


@lru_cache(maxsize=4)
def _image_backend(config_json: str):
    return make_image_backend(BuildConfig.model_validate_json(config_json))


def preflight(cfg: BuildConfig) -> None:
    """Fail before any work (or any paid request) when the settings cannot work.

    Reads and checks the source's input files (every column and entry), builds the
    annotator and image backend (cached for the run), and finds every model the build will
    load (a local folder, or a Hub id on the Hub or, offline, in the local cache) and the
    CUDA device it asks for, so a missing file, key, pool folder, model or GPU is one clear
    error up front (`ConfigError`, `FileNotFoundError`, `ValueError`, `LLMFatalError`)
    instead of a failure stages later.
    """
    config_json = cfg.model_dump_json()
    for setting, url in _urls(cfg):
        problem = url_problem(url)
        if problem:
            from pipeline.llm import redact_url

            raise ConfigError(f"{setting} {redact_url(url)}: {problem}")
    _source(config_json).list_ids(cfg.limit, cfg.seed)  # reads and checks the input files
    _annotator(config_json)
    _image_backend(config_json)
    for setting, model in _image_models(cfg):
        _require_model(model, setting)
    if cfg.images.device == "cuda" and _image_models(cfg):
        _require_cuda("images.device")
    if cfg.validation.enabled:
        settings = cfg.validation.model_settings()  # the tiny VLM: FileNotFoundError
        if settings.device == "cuda":
            _require_cuda("--device")
        _require_model(settings.model, "--model")
        try:
            cfg.validation.family()
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--model {cfg.validation.model}: {_first_line(exc)}") from None


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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


def model_problem(name: str) -> str | None:
    """Why the model `name` (a local folder or a Hub id) cannot be loaded on this machine,
    or None. A Hub id needs a local copy in the Hugging Face cache, or (online) to exist on
    the Hub, which must then be reachable."""
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if Path(name).expanduser().exists():
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return "no such model folder"
    try:
        snapshot_download(name, local_files_only=True)
        return None  # a local copy
    except HFValidationError:
        return "neither a model folder nor a Hugging Face Hub model id"
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            return (
                "no local copy in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                "download it once online or pass a model folder"
            )
    except Exception:
        pass
    try:
        model_info(name, timeout=10)
    except HFValidationError:
        return "neither a model folder nor a Hugging Face Hub model id"
    except GatedRepoError:
        return "gated on the Hugging Face Hub: accept its terms and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face Hub (a private one? set HF_TOKEN)"
    except (OSError, *httpx_errors()) as exc:
        return (
            "no local copy in the Hugging Face cache and the Hub cannot be reached "
            f"({type(exc).__name__}: {_first_line(exc)}); connect, or pass a model folder"
        )
    return None


def httpx_errors() -> tuple[type[Exception], ...]:
    """The transport errors of the HTTP client huggingface_hub uses (httpx or its fork)."""
    found: list[type[Exception]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _require_model(name: str, setting: str) -> None:
    problem = model_problem(name)
    if problem:
        raise ConfigError(f"{setting} {name}: {problem}")


def list_ids(cfg: BuildConfig) -> list[str]:
    return _source(cfg.model_dump_json()).list_ids(cfg.limit, cfg.seed)


def chunked(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


StageResult = tuple[list, list[Rejection]]


def run_chunk(
    cfg: BuildConfig, stage: str, index: int, step: Callable[[WorkDir], StageResult]
) -> dict[str, int]:
    """The one skeleton of every chunk: skip a finished chunk (what makes a re-run resume),
    else run `step` on the build's files and write its results, the done-marker last."""
    work = WorkDir(cfg.out)
    if work.is_done(stage, index):
        return work.chunk_counts(stage, index)
    _starting(stage, index)
    ok, rejected = step(work)
    return work.write_chunk(stage, index, ok, rejected)


def gather_chunk(cfg: BuildConfig, index: int, ids: list[str]) -> dict[str, int]:
    def step(work: WorkDir) -> StageResult:
        results = _source(cfg.model_dump_json()).load_items(ids)
        ok, rejected = split_ok(results)
        seen = {r.item_id for r in results}  # an id the source skipped is still accounted for
        missing = [i for i in ids if i not in seen]
        reason = "not returned by source"
        return ok, rejected + [Rejection(item_id=i, stage="gather", reason=reason) for i in missing]

    return run_chunk(cfg, "gather", index, step)


def annotate_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    """Annotate a chunk; a chunk done with deferred items (transient LLM failures) is not
    final: this asks again for those items only (the request cache makes everything that
    was answered before free) and, when anything changed, rewrites the chunk and reopens
    the later stages of the chunk."""
    work = WorkDir(cfg.out)
    if work.is_final("annotate", index):
        return work.chunk_counts("annotate", index)
    _starting("annotate", index)
    items = work.read_ok("gather", index, SourceItem)
    if not work.is_done("annotate", index):
        results = _annotator(cfg.model_dump_json()).annotate(items) if items else []
        ok, rejected = split_ok(stamped(results))
        return work.write_chunk("annotate", index, ok, rejected)
    return _retry_deferred(cfg, work, index, items)


def _retry_deferred(
    cfg: BuildConfig, work: WorkDir, index: int, items: list[SourceItem]
) -> dict[str, int]:
    before_ok = work.read_ok("annotate", index, Annotation)
    before_rejected = work.read_rejected("annotate", index)
    retry = {r.item_id for r in before_rejected if r.deferred}
    again = _annotator(cfg.model_dump_json()).annotate([i for i in items if i.item_id in retry])
    if all(isinstance(r, Rejection) and r.deferred for r in again):
        return work.chunk_counts("annotate", index)  # still waiting: nothing to redo
    new_ok, new_rejected = split_ok(stamped(again))
    order = {item.item_id: n for n, item in enumerate(items)}
    ok = sorted([*before_ok, *new_ok], key=lambda a: order.get(a.item_id, len(order)))
    rejected = [r for r in before_rejected if not r.deferred] + new_rejected
    work.reopen_after("annotate", index)  # first: the later stages are stale from here on
    return work.write_chunk("annotate", index, ok, rejected)


def images_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    def step(work: WorkDir) -> StageResult:
        items = {i.item_id: i for i in work.read_ok("gather", index, SourceItem)}
        pairs = [(items[a.item_id], a) for a in work.read_ok("annotate", index, Annotation)]
        results = _image_backend(cfg.model_dump_json()).make_images(pairs) if pairs else []
        return split_ok(stamped(results))

    return run_chunk(cfg, "images", index, step)


def assemble_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    def step(work: WorkDir) -> StageResult:
        return build_records(
            work.read_ok("gather", index, SourceItem),
            work.read_ok("annotate", index, Annotation),
            work.read_ok("images", index, ItemImages),
            cfg.quality,
        )

    return run_chunk(cfg, "assemble", index, step)


@lru_cache(maxsize=1)
def _adapter(model_json: str):
    """One model load per worker process, reused by every chunk it validates."""
    from editors.adapters import load_model
    from editors.config import ModelConfig

    return load_model(ModelConfig.model_validate_json(model_json))


def validate_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    """Edit the model once per record and store both outcomes; errors stay per item."""

    def step(work: WorkDir) -> StageResult:
        records = work.read_ok("assemble", index, OkeditRecord)
        if not (cfg.validation.enabled and records):
            return records, []
        from pipeline.validate import validate_records

        model_settings = cfg.validation.model_settings()
        validated = validate_records(
            records,
            cfg.validation.editor_settings(),
            model_settings,
            model=_adapter(model_settings.model_dump_json()),
            show_progress=False,  # the flow shows its own progress
            check=cfg.validation.check,
        )
        return validated, []

    return run_chunk(cfg, "validate", index, step)


def collect(cfg: BuildConfig, n_chunks: int) -> tuple[list[OkeditRecord], list[Rejection], dict]:
    """All validated records, every rejection, and per-stage counts."""
    work = WorkDir(cfg.out)
    records: list[OkeditRecord] = []
    rejected: list[Rejection] = []
    stage_counts = {}
    for stage in ("gather", "annotate", "images", "assemble", "validate"):
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


def finalize(
    cfg: BuildConfig, n_chunks: int, n_in: int, stage_seconds: dict[str, float] | None = None
) -> dict:
    """Publish the local folder; returns the summary (in = published + rejected, + deferred
    when items wait for a re-run: those are listed in rejected.jsonl with `deferred: true`)."""
    from pipeline.check import filter_by_check
    from pipeline.plan import resolved_image_model
    from pipeline.publish import publish_local, resolved_validation

    records, rejected, stage_counts = collect(cfg, n_chunks)
    records, dropped = filter_by_check(records, cfg.validation.filter)
    rejected += dropped
    stage_counts["validate"]["ok"] -= len(dropped)
    stage_counts["validate"]["rejected"] += len(dropped)
    deferred = sum(r.deferred for r in rejected)
    counts = {"in": n_in, "published": len(records), "rejected": len(rejected) - deferred}
    if deferred:
        counts["deferred"] = deferred
    if counts["in"] != counts["published"] + counts["rejected"] + deferred:
        raise RuntimeError(f"counts do not reconcile: {counts}")
    manifest = {
        "name": "OKEDIT",
        "fingerprint": cfg.fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.describe(),
        "annotator": _annotator(cfg.model_dump_json()).name,
        "counts": counts,
        "stages": stage_counts,
    }
    inputs = input_hashes(cfg.source)
    if inputs:  # sha256 of the source files, by setting (part of the build's identity)
        manifest["inputs"] = inputs
    if cfg.annotator.kind == "llm":  # every request of the build, as the server counted it
        from pipeline.annotate import llm_usage

        manifest["llm"] = llm_usage(cfg)
    manifest["image_model"] = resolved_image_model(cfg)
    if stage_seconds:  # this run's wall time per stage, against the plan's estimate
        manifest["stage_seconds"] = stage_seconds
        manifest["estimate_vs_actual"] = plan_rows(cfg, manifest)
    paths = publish_local(records, rejected, cfg.out, manifest, resolved_validation(cfg.validation))
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


def missing_chunks(cfg: BuildConfig, stage: str, n_chunks: int) -> list[int]:
    """Chunks of `stage` without a completion marker (what a resumed or sharded run still owes)."""
    work = WorkDir(cfg.out)
    return [i for i in range(n_chunks) if not work.is_done(stage, i)]


def publish_hub(cfg: BuildConfig) -> dict | None:
    """Push the finished folder to `cfg.publish.repo_id` (token from HF_TOKEN) and verify it;
    None when no Hub target is set."""
    if not cfg.publish.repo_id:
        return None
    from pipeline.publish import push_to_hub

    return push_to_hub(
        cfg.out,
        cfg.publish.repo_id,
        private=cfg.publish.private,
        revision=cfg.publish.revision,
        commit_message=cfg.publish.commit_message,
    )
