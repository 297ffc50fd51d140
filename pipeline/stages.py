"""The build as chunk-level stage functions over a `WorkDir`.

Each function reads its inputs from the previous stage's chunk files, calls the plain stage
function, and writes its own chunk (skipping chunks already done, which is what makes a
re-run resume). They take only small, hashable arguments (a config, a chunk index, ids),
so Prefect can wrap them as cached tasks without moving images through its results.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from functools import lru_cache

from pipeline.build import build_records
from pipeline.config import BuildConfig
from pipeline.work import WorkDir
from schemas.record import Annotation, ItemImages, OkeditRecord, Rejection, SourceItem


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

    Builds the source, annotator and image backend (cached for the run) and resolves the
    validation model, so a missing key, pool folder or model is one clear error up front.
    """
    config_json = cfg.model_dump_json()
    _source(config_json)
    _annotator(config_json)
    _image_backend(config_json)
    if cfg.validation.enabled:
        cfg.validation.model_settings().torch_device()


def list_ids(cfg: BuildConfig) -> list[str]:
    return _source(cfg.model_dump_json()).list_ids(cfg.limit, cfg.seed)


def chunked(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def gather_chunk(cfg: BuildConfig, index: int, ids: list[str]) -> dict[str, int]:
    work = WorkDir(cfg.out)
    if work.is_done("gather", index):
        return work.chunk_counts("gather", index)
    _starting("gather", index)
    results = _source(cfg.model_dump_json()).load_items(ids)
    ok, rejected = split_ok(results)
    # an id the source silently skipped is still accounted for
    seen = {r.item_id for r in results}
    rejected += [
        Rejection(item_id=i, stage="gather", reason="not returned by source")
        for i in ids
        if i not in seen
    ]
    return work.write_chunk("gather", index, ok, rejected)


def annotate_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    work = WorkDir(cfg.out)
    if work.is_done("annotate", index):
        return work.chunk_counts("annotate", index)
    _starting("annotate", index)
    items = work.read_ok("gather", index, SourceItem)
    ok, rejected = split_ok(_annotator(cfg.model_dump_json()).annotate(items) if items else [])
    return work.write_chunk("annotate", index, ok, rejected)


def images_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    work = WorkDir(cfg.out)
    if work.is_done("images", index):
        return work.chunk_counts("images", index)
    _starting("images", index)
    items = {i.item_id: i for i in work.read_ok("gather", index, SourceItem)}
    anns = work.read_ok("annotate", index, Annotation)
    pairs = [(items[a.item_id], a) for a in anns]
    results = _image_backend(cfg.model_dump_json()).make_images(pairs) if pairs else []
    ok, rejected = split_ok(results)
    return work.write_chunk("images", index, ok, rejected)


def assemble_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    work = WorkDir(cfg.out)
    if work.is_done("assemble", index):
        return work.chunk_counts("assemble", index)
    _starting("assemble", index)
    records, rejected = build_records(
        work.read_ok("gather", index, SourceItem),
        work.read_ok("annotate", index, Annotation),
        work.read_ok("images", index, ItemImages),
        cfg.quality,
    )
    return work.write_chunk("assemble", index, records, rejected)


@lru_cache(maxsize=1)
def _adapter(model_json: str):
    """One model load per worker process, reused by every chunk it validates."""
    from editors.adapters import load_model
    from editors.config import ModelConfig

    return load_model(ModelConfig.model_validate_json(model_json))


def validate_chunk(cfg: BuildConfig, index: int) -> dict[str, int]:
    """Edit the model once per record and store the scope verdict; errors stay per item."""
    work = WorkDir(cfg.out)
    if work.is_done("validate", index):
        return work.chunk_counts("validate", index)
    _starting("validate", index)
    records = work.read_ok("assemble", index, OkeditRecord)
    if cfg.validation.enabled and records:
        from pipeline.validate import validate_records

        model_settings = cfg.validation.model_settings()
        records = validate_records(
            records,
            cfg.validation.editor_settings(),
            model_settings,
            model=_adapter(model_settings.model_dump_json()),
            show_progress=False,  # the flow shows its own progress
            check=cfg.validation.check,
        )
    return work.write_chunk("validate", index, records, [])


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
        for i in range(n_chunks):
            rejected += work.read_rejected(stage, i)
    for i in range(n_chunks):
        records += work.read_ok("validate", i, OkeditRecord)
    return records, rejected, stage_counts


def finalize(cfg: BuildConfig, n_chunks: int, n_in: int) -> dict:
    """Publish the local folder; returns the summary (in = published + rejected)."""
    from pipeline.check import filter_by_check
    from pipeline.publish import publish_local, resolved_validation

    records, rejected, stage_counts = collect(cfg, n_chunks)
    records, dropped = filter_by_check(records, cfg.validation.filter)
    rejected += dropped
    stage_counts["validate"]["ok"] -= len(dropped)
    stage_counts["validate"]["rejected"] += len(dropped)
    counts = {"in": n_in, "published": len(records), "rejected": len(rejected)}
    if counts["in"] != counts["published"] + counts["rejected"]:
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
    if cfg.annotator.kind == "llm":  # every request of the build, as the server counted it
        from pipeline.annotate import llm_usage

        manifest["llm"] = llm_usage(cfg)
    paths = publish_local(records, rejected, cfg.out, manifest, resolved_validation(cfg.validation))
    return {
        "counts": counts,
        "stages": stage_counts,
        "paths": {k: str(v) for k, v in paths.items()},
    }


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
