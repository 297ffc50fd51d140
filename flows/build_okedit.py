"""The `build-okedit` Prefect flow: the stages of `pipeline.stages` as tasks over chunks.

Prefect adds retries, concurrency, artifacts and deployments; the work itself is in the
plain stage functions, which also run without Prefect (see `bench/`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# The embedded (ephemeral) API migrates a SQLite database on first use; give it time, and
# keep an offline machine from trying to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from rich.progress import Progress  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.config import BuildConfig  # noqa: E402

gather_task = task(name="gather", retries=2, retry_delay_seconds=5)(stages.gather_chunk)
annotate_task = task(name="annotate", retries=2, retry_delay_seconds=5)(stages.annotate_chunk)
images_task = task(name="images", retries=2, retry_delay_seconds=5)(stages.images_chunk)
assemble_task = task(name="assemble")(stages.assemble_chunk)
validate_task = task(name="validate")(stages.validate_chunk)
finalize_task = task(name="publish-local")(stages.finalize)


def _run_stage(
    name: str, fn: Callable, args: list[tuple], progress: Progress, parallel: bool
) -> list[dict]:
    """Run one stage over all chunks, in threads when `parallel`, with a progress bar."""
    bar = progress.add_task(f"{name:<9}", total=len(args))
    if not parallel:
        results = []
        for a in args:
            results.append(fn(*a))
            progress.advance(bar)
        return results
    futures = [fn.submit(*a) for a in args]
    results = []
    for future in futures:
        results.append(future.result())
        progress.advance(bar)
    return results


def _apply_overrides(config: BuildConfig | None, overrides: dict[str, Any]) -> BuildConfig:
    cfg = config or BuildConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if "source" in updates:
        updates["source"] = cfg.source.model_copy(update={"name": updates["source"]})
    return BuildConfig.model_validate({**cfg.model_dump(), **updates})


@flow(name="build-okedit", task_runner=ThreadPoolTaskRunner(max_workers=8))
def build_okedit(
    config: BuildConfig | None = None,
    source: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    out: str | None = None,
) -> dict:
    """Gather → annotate → images → build (QC) → validate (BalancEdit) → publish.

    `config` carries every setting; the flat parameters override it, so a deployment can
    be run with `-p limit=100` alone.
    """
    cfg = _apply_overrides(config, {"source": source, "limit": limit, "seed": seed, "out": out})
    from pipeline.work import WorkDir

    work = WorkDir(cfg.out)
    resumed = work.claim(cfg.fingerprint(), cfg.describe())
    with work.lock():
        return _build(cfg, resumed)


def _build(cfg: BuildConfig, resumed: bool) -> dict:
    ids = stages.list_ids(cfg)
    chunks = stages.chunked(ids, cfg.chunk_size)
    logger = get_run_logger()
    logger.info("%d items in %d chunks%s", len(ids), len(chunks), " (resuming)" if resumed else "")
    indexed = list(range(len(chunks)))
    with Progress() as progress:
        _run_stage(
            "gather", gather_task, [(cfg, i, c) for i, c in enumerate(chunks)], progress, True
        )
        for name, fn in (
            ("annotate", annotate_task),
            ("images", images_task),
            ("assemble", assemble_task),
        ):
            _run_stage(name, fn, [(cfg, i) for i in indexed], progress, True)
        # one model per process; the edits themselves use all cores
        _run_stage("validate", validate_task, [(cfg, i) for i in indexed], progress, False)
    summary = finalize_task(cfg, len(chunks), len(ids))
    _report(summary)
    return summary


def _report(summary: dict) -> None:
    rows = [{"stage": s, **c} for s, c in summary["stages"].items()]
    create_table_artifact(key="okedit-stage-counts", table=rows, description="Items per stage")
    counts = summary["counts"]
    create_markdown_artifact(
        key="okedit-summary",
        markdown=(
            f"# OKEDIT build\n\n{counts['in']} in, {counts['published']} published, "
            f"{counts['rejected']} rejected.\n\nCard: `{summary['paths']['card']}`"
        ),
    )
