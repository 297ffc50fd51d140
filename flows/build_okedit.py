"""The `build-okedit` Prefect flow: the stages of `pipeline.stages` as tasks over chunks.

Prefect adds retries, caching, concurrency, artifacts and deployments; the work itself is in
the plain stage functions, which also run without Prefect (see `bench/`). Every chunk's
output lands in the output folder with a completion marker, so a run that is killed (in any
stage) and started again continues from the finished chunks. Validation can be spread over
GPU workers as `validate-okedit-shard` flow runs (`BuildConfig.scale`, docs/scaling.md).
"""

# No `from __future__ import annotations` here: a served flow is cloudpickled by value with
# only the globals its code uses, so string annotations (BuildConfig) would not resolve when
# Prefect validates the parameters of a deployment run.
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

# The embedded (ephemeral) API migrates a SQLite database on first use; give it time, and
# keep an offline machine from trying to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import Flow, flow, get_run_logger, runtime, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.futures import as_completed, wait  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    temporary_settings,
)
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from rich.progress import Progress, TaskID  # noqa: E402

from flows import tasks  # noqa: E402
from flows.validate_shard import report_path  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.config import BuildConfig  # noqa: E402
from pipeline.llm import redact_secrets  # noqa: E402
from pipeline.sources import input_hashes  # noqa: E402
from pipeline.work import WorkDir  # noqa: E402

# Stages that can take long enough to watch in the UI (LLM calls, image models, edits).
LONG_STAGES = {"annotate", "images", "validate"}


class ShardRunError(RuntimeError):
    """A validation shard's flow run did not complete."""


def _run_stage(
    name: str,
    fn: Any,
    args: list[tuple],
    progress: Progress,
    parallel: bool,
    artifacts: tasks.ArtifactSender,
) -> list[dict]:
    """Run one stage over all chunks (in threads when `parallel`), with a console bar and,
    for long stages, a progress artifact updated as chunks finish (sent in the background)."""
    bar = progress.add_task(f"{name:<9}", total=len(args))
    artifact = (
        tasks.StageProgress(name, len(args), sender=artifacts) if name in LONG_STAGES else None
    )

    def advance(done: int) -> None:
        progress.update(bar, completed=done)
        if artifact is not None:
            artifact.update(done)

    if not parallel:
        results = []
        for a in args:
            results.append(fn(*a))
            advance(len(results))
        return results
    futures = [fn.submit(*a) for a in args]
    for done, _ in enumerate(as_completed(futures), 1):
        advance(done)
    return [f.result() for f in futures]


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Any:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 3)


def _apply_overrides(config: BuildConfig | None, overrides: dict[str, Any]) -> BuildConfig:
    cfg = config or BuildConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if "source" in updates:
        updates["source"] = cfg.source.model_copy(update={"name": updates["source"]})
    if "repo_id" in updates:
        updates["publish"] = cfg.publish.model_copy(update={"repo_id": updates.pop("repo_id")})
    return BuildConfig.model_validate({**cfg.model_dump(), **updates})


@flow(name="build-okedit", task_runner=ThreadPoolTaskRunner(max_workers=8), persist_result=False)
def build_okedit(
    config: BuildConfig | None = None,
    source: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    out: str | None = None,
    repo_id: str | None = None,
    out_root: str | None = None,
) -> dict:
    """Gather → annotate → images → build (QC) → validate (BalancEdit) → publish.

    `config` carries every setting; the flat parameters override it, so a deployment can
    be run with `-p limit=100` alone. `repo_id` also pushes the result to the Hub.

    Where it writes: `out` (or `config.out`) is one folder (a re-run resumes, another build
    there is refused). `out_root` is a root of versions: the build goes to
    `out_root/<version>/` and `out_root/LATEST` names the last completed one; a build that
    is already complete (and pushed) there is a no-op. A deployment run given neither gets
    `$OKEDIT_HOME/okedit-builds` (the environment of the process running the flow, read
    when it runs) as its `out_root` (docs/deploy.md).
    """
    out_explicit = out is not None or (config is not None and "out" in config.model_fields_set)
    root = resolve_out_root(out_root, out_explicit, runtime.deployment.id)
    overrides = {"source": source, "limit": limit, "seed": seed, "out": out, "repo_id": repo_id}
    cfg = _apply_overrides(config, overrides)
    if root is not None:
        return _build_version(cfg, root)
    work = WorkDir(cfg.out)
    resumed = work.claim(cfg.fingerprint(), cfg.describe(), input_hashes(cfg.source))
    with work.lock(), _own_sigterm():
        return _build(cfg, resumed)


DEFAULT_ROOT = "okedit-builds"


def resolve_out_root(
    out_root: str | None, out_explicit: bool, deployment_id: str | None
) -> Path | None:
    """The root of versions of this run, or None for a one-folder build.

    `out_root` wins; with an explicit `out` too the run is refused (ambiguous). A
    deployment run with neither builds versions under `$OKEDIT_HOME/okedit-builds`
    (`./okedit-builds` when OKEDIT_HOME is unset), read now, in the process running the
    flow. Anything else (`okedit build`, a flow called in Python) keeps `config.out`."""
    if out_root:
        if out_explicit:
            raise ValueError("give either out (one folder) or out_root (versions), not both")
        return Path(out_root)
    if out_explicit or deployment_id is None:
        return None
    return Path(os.environ.get("OKEDIT_HOME") or ".") / DEFAULT_ROOT


def _build_version(cfg: BuildConfig, root: Path) -> dict:
    """Build `cfg` as a version under `root` (see `build_okedit`); returns the summary with
    `version`, `noop` and `latest`."""
    from pipeline import work as versions

    logger = get_run_logger()
    fingerprint, inputs = cfg.fingerprint(), input_hashes(cfg.source)
    version = versions.version_id(fingerprint, inputs)
    publish = cfg.publish
    if publish.repo_id and not publish.revision:
        publish = publish.model_copy(update={"revision": versions.version_revision(version)})
    cfg = cfg.model_copy(update={"out": root / version, "publish": publish})
    hub = (publish.repo_id, publish.revision) if publish.repo_id else None
    work = WorkDir(cfg.out)
    resumed = work.claim(fingerprint, cfg.describe(), inputs)
    with work.lock(), _own_sigterm():
        record = versions.read_version_record(cfg.out)
        why = versions.version_is_done(record, fingerprint, inputs, hub)
        if why is not None:
            previous = versions.read_latest(root)
            versions.set_latest(root, version)
            logger.info(
                "no-op: version %s in %s is already %s; nothing built or pushed again; LATEST %s",
                version,
                root,
                why,
                "unchanged" if previous == version else f"moved from {previous} to {version}",
            )
            summary = {**record["summary"], "version": version, "noop": True, "noop_reason": why}
            summary["latest"] = version
            summary["hub_pushes"] = record.get("hub", [])
            create_markdown_artifact(
                key="okedit-summary",
                markdown=f"# OKEDIT build: no-op\n\nVersion `{version}` in `{root}` is "
                f"already {why}. Nothing was built or pushed again; `LATEST` = `{version}`.",
            )
            return summary
        summary = _build(cfg, resumed)
        pushed = None
        if summary.get("hub"):  # push_to_hub verified it, or the run failed before here
            pushed = {
                "repo_id": publish.repo_id,
                "revision": publish.revision,
                "commit_url": summary["hub"].get("commit_url"),
            }
        plain = {k: v for k, v in summary.items() if k != "hub"}
        versions.write_version_record(cfg.out, version, fingerprint, inputs, plain, pushed)
        versions.set_latest(root, version)
    logger.info("version %s built in %s; LATEST = %s", version, cfg.out, version)
    return {**summary, "version": version, "noop": False, "latest": version}


# `okedit build`'s SIGTERM handler (pipeline.cli: stop sending, keep finished chunks, stop
# the embedded API). Prefect's flow engine swaps SIGTERM for its own handler during a run,
# meant for a runner cancelling a deployment run; in the command's own process the build
# puts the command's handler back for the flow's body. None elsewhere (workers, serve).
SIGTERM_HANDLER: Any = None


@contextlib.contextmanager
def _own_sigterm() -> Any:
    import signal
    import threading

    handler = SIGTERM_HANDLER
    if handler is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _RedactedParameters(Flow):
    """What Prefect records of a run (the parameters sent to its API, database and UI) has
    credentials in URLs redacted (`user:key@`, `?api-key=`); the run itself gets them as
    passed. A deployment run only gets what the API holds: its keys come from the worker's
    environment (OPENAI_API_KEY, OPENAI_BASE_URL), never from parameters."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return redact_secrets(super().serialize_parameters(parameters))

    def with_options(self, **kwargs: Any) -> Any:
        new = super().with_options(**kwargs)
        new.__class__ = _RedactedParameters
        return new


build_okedit.__class__ = _RedactedParameters


def run_build(config: BuildConfig) -> dict:
    """Run the flow in this process, as `okedit build`/`okedit demo` do.

    On the embedded API (no PREFECT_API_URL) flow-run heartbeats are switched off: nothing
    outlives the process to watch them, and Prefect 3.9 stops its heartbeat thread in 1 s
    sleeps, which adds up to a second to every run (bench/orchestration_overhead.py). With
    a real server they stay on, for crash detection.
    """
    if PREFECT_API_URL.value():
        return build_okedit(config=config)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return build_okedit(config=config)


def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of `pid` (Linux /proc; empty elsewhere)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def stop_children(grace_s: float = 2.0) -> None:
    """Stop the embedded Prefect API server this process started, and any other process
    it started (SIGTERM, then SIGKILL after `grace_s`), and reap them: what a stopped build
    must not leave behind. Safe to call when there is none."""
    import signal
    import time

    from prefect.server.api.server import SubprocessASGIServer

    servers = list(SubprocessASGIServer._instances.values())
    pids = _descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive_child(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive_child(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(OSError):  # not ours to reap (a grandchild) or reaped
            os.waitpid(pid, 0)
    for server in servers:  # its bookkeeping: the process is gone
        server.server_process = None
        server.stop()


def _alive_child(pid: int) -> bool:
    """True while `pid` runs (a zombie child is reaped here and counts as gone)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child: see whether it still exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _build(cfg: BuildConfig, resumed: bool) -> dict:
    ids = stages.list_ids(cfg)
    chunks = stages.chunked(ids, cfg.chunk_size)
    logger = get_run_logger()
    logger.info("%d items in %d chunks%s", len(ids), len(chunks), " (resuming)" if resumed else "")
    config_json, build = cfg.model_dump_json(), tasks.build_token(cfg.out)

    def indexed(stage: str) -> list[tuple]:  # read when the stage starts: see chunk_revision
        return [
            (config_json, build, i, tasks.chunk_revision(cfg.out, stage, i))
            for i in range(len(chunks))
        ]

    # Artifact calls leave the flow's thread; leaving this block waits for the last one.
    with tasks.ArtifactSender() as artifacts:
        # bars move when chunks finish: 2 redraws a second, not rich's 10 (each costs CPU)
        with Progress(refresh_per_second=2) as progress:
            seconds: dict[str, float] = {}  # wall time of each stage in this run (plan vs actual)
            gather_args = [(config_json, build, i, c) for i, c in enumerate(chunks)]
            with _timed(seconds, "gather"):
                _run_stage("gather", tasks.gather, gather_args, progress, True, artifacts)
            for name in ("annotate", "images", "assemble"):
                with _timed(seconds, name):
                    task_ = tasks.CHUNK_TASKS[name]
                    _run_stage(name, task_, indexed(name), progress, True, artifacts)
            with _timed(seconds, "validate"):
                if cfg.scale.validate_deployment and cfg.validation.enabled:
                    shards = _validate_sharded(cfg, len(chunks), progress, artifacts)
                else:
                    # one model per process; the edits themselves use all cores
                    validate_args = indexed("validate")
                    _run_stage(
                        "validate", tasks.validate, validate_args, progress, False, artifacts
                    )
                    shards = []
        summary = tasks.publish_local(config_json, len(chunks), len(ids), seconds)
        if cfg.publish.repo_id:
            summary["hub"] = tasks.publish_hub(config_json)
        if shards:
            summary["shards"] = shards
        _report(summary, artifacts)
    return summary


# ---- scale-out: validation shards as flow runs on a work pool --------------------------


@task(name="validate-shard", task_run_name="validate-shard-{shard}", cache_policy=NO_CACHE)
def run_shard(
    deployment: str, config: dict, shard: int, chunks: list[int], timeout_s: float | None
) -> dict:
    """Start one shard's flow run on the work pool and wait for it to end."""
    run = run_deployment(
        deployment,
        parameters={"config": config, "chunks": chunks, "shard": shard},
        timeout=timeout_s,
        poll_interval=2,
        tags=["okedit", "okedit-shard"],
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise ShardRunError(
            f"validation shard {shard} (flow run {run.name}) is {state}, not Completed; "
            "re-run the build to resume: finished chunks are kept"
        )
    return {"shard": shard, "flow_run_id": str(run.id), "flow_run": run.name}


def shard_plan(todo: list[int], shards: int) -> list[list[int]]:
    """Round-robin the chunks still to validate over at most `shards` shards."""
    plan = [todo[s::shards] for s in range(shards)]
    return [p for p in plan if p]


def _validate_sharded(
    cfg: BuildConfig, n_chunks: int, progress: Progress, artifacts: tasks.ArtifactSender
) -> list[dict]:
    """Validate through shard flow runs; returns their reports. The parent keeps the folder
    lock; shards write chunk markers into the shared folder, which is what it waits for."""
    todo = stages.missing_chunks(cfg, "validate", n_chunks)
    bar = progress.add_task(f"{'validate':<9}", total=n_chunks, completed=n_chunks - len(todo))
    artifact = tasks.StageProgress("validate", n_chunks, n_chunks - len(todo), sender=artifacts)
    plan = shard_plan(todo, cfg.scale.shards)
    # workers elsewhere must see the same absolute paths
    shared = cfg.model_copy(update={"out": cfg.out.resolve(), "cache_dir": cfg.cache_dir.resolve()})
    params = redact_secrets(shared.model_dump(mode="json"))  # shards ask no LLM
    futures = [
        run_shard.submit(
            cfg.scale.validate_deployment, params, s, chunks, cfg.scale.shard_timeout_s
        )
        for s, chunks in enumerate(plan)
    ]
    pending = list(futures)
    while pending:
        _, not_done = wait(pending, timeout=cfg.scale.poll_s)
        pending = list(not_done)
        done = n_chunks - len(stages.missing_chunks(cfg, "validate", n_chunks))
        _advance(progress, bar, artifact, done)
    runs = [f.result() for f in futures]  # raises ShardRunError for a failed shard
    missing = stages.missing_chunks(cfg, "validate", n_chunks)
    if missing:
        raise ShardRunError(f"shard runs finished but chunks {missing} have no validate marker")
    return [_shard_report(cfg, run) for run in runs]


def _advance(progress: Progress, bar: TaskID, artifact: tasks.StageProgress, done: int) -> None:
    progress.update(bar, completed=done)
    artifact.update(done)


def _shard_report(cfg: BuildConfig, run: dict) -> dict:
    path = report_path(cfg.out, run["shard"])
    report = json.loads(path.read_text()) if path.exists() else {}
    if report.get("flow_run_id") != run["flow_run_id"]:
        report = {}  # a report of an earlier run; this run's shard left none
    return {**run, **{k: report.get(k) for k in ("chunks", "host", "pid", "device", "seconds")}}


# ---- artifacts ---------------------------------------------------------------------------


def _report(summary: dict, artifacts: tasks.ArtifactSender) -> None:
    rows = [{"stage": s, **c} for s, c in summary["stages"].items()]
    send = artifacts.submit
    send(
        create_table_artifact, key="okedit-stage-counts", table=rows, description="Items per stage"
    )
    reasons = tasks.reject_reasons(summary["paths"]["rejected"])
    if reasons:
        send(
            create_table_artifact,
            key="okedit-reject-reasons",
            table=reasons,
            description="Rejected items by reason",
        )
    if summary.get("shards"):
        send(
            create_table_artifact,
            key="okedit-validate-shards",
            table=summary["shards"],
            description="Shard runs",
        )
    counts = summary["counts"]
    hub = summary.get("hub")
    send(
        create_markdown_artifact,
        key="okedit-summary",
        markdown=(
            f"# OKEDIT build\n\n{counts['in']} in, {counts['published']} published, "
            f"{counts['rejected']} rejected"
            + (
                f", {counts['deferred']} deferred (a re-run retries them)"
                if "deferred" in counts
                else ""
            )
            + f".\n\nCard: `{summary['paths']['card']}`"
            + (f"\n\nHub: {hub['commit_url']}" if hub else "")
            + f"\n\nFlow run: `{runtime.flow_run.name}`"
        ),
    )
