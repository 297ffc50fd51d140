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
from collections.abc import Sequence
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
from prefect.futures import wait  # noqa: E402
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
from pipeline.config import BuildConfig, ResolvedBuild, resolve  # noqa: E402
from pipeline.llm import redact_secrets  # noqa: E402
from pipeline.work import WorkDir  # noqa: E402

POLL_S = 1.0  # how often the bars read the chunk markers while chunks run


class ShardRunError(RuntimeError):
    """A shard's flow run did not complete."""


class StageBars:
    """The console bars (and, for long stages, Prefect progress artifacts) of a build's
    stages, read from the chunk markers: they count work wherever it runs (threads, Dask
    workers, shard runs on other machines)."""

    def __init__(
        self, build: ResolvedBuild, progress: Progress, artifacts: tasks.ArtifactSender
    ) -> None:
        self.work, self.progress = WorkDir(build.out), progress
        self.n_chunks = len(stages.chunk_ids(build))
        self.bars: dict[str, TaskID] = {}
        self.artifacts: dict[str, tasks.StageProgress] = {}
        for stage in stages.STAGES:
            done = self._done(stage.name)
            self.bars[stage.name] = progress.add_task(
                f"{stage.name:<9}", total=self.n_chunks, completed=done
            )
            if stage.long:
                self.artifacts[stage.name] = tasks.StageProgress(
                    stage.name, self.n_chunks, done, sender=artifacts
                )

    def _done(self, stage: str) -> int:
        return sum(self.work.is_done(stage, i) for i in range(self.n_chunks))

    def refresh(self, stage_names: Sequence[str]) -> None:
        for name in stage_names:
            done = self._done(name)
            self.progress.update(self.bars[name], completed=done)
            if name in self.artifacts:
                self.artifacts[name].update(done)


class Estimate:
    """The build plan's time estimate, refined by the first chunk each stage does in this
    run (`pipeline.plan.refine_from_chunk`) and logged, so that a long build says early how
    long it will really take."""

    def __init__(self, build: ResolvedBuild) -> None:
        from pipeline.plan import plan_for_config

        self.build, self.done = build, set()
        try:
            self.plan = plan_for_config(build.config)
        except ValueError:  # no plan for this build (e.g. an unknown split size)
            self.plan = None

    def chunk_done(self, report: dict[str, dict], index: int) -> None:
        from pipeline.plan import duration, refine_from_chunk

        todo = {k: v for k, v in report.items() if k not in self.done}
        if self.plan is None or not todo:
            return
        items = len(stages.chunk_ids(self.build)[index])
        self.plan, refined = refine_from_chunk(self.plan, todo, items)
        if refined:
            self.done.update(refined)
            per_stage = ", ".join(f"{s} {duration(self.plan.stage(s).seconds)}" for s in refined)
            get_run_logger().info(
                "estimate refined on this run's first chunk: %s; whole build %s",
                per_stage,
                duration(self.plan.seconds),
            )


def _wait(futures: list, bars: StageBars, stage_names: Sequence[str], estimate: Estimate) -> list:
    """The futures' results, refreshing the bars and the estimate while they run."""
    pending, seen = list(futures), set()
    while pending:
        _, not_done = wait(pending, timeout=POLL_S)
        pending = list(not_done)
        bars.refresh(stage_names)
        for index, future in enumerate(futures):
            if index not in seen and future.state.is_completed():
                seen.add(index)
                estimate.chunk_done(future.result(), index)
    return [f.result() for f in futures]


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
    build = resolve(cfg)  # every setting resolved once: what each stage is handed
    work = WorkDir(cfg.out)
    resumed = work.claim(build.fingerprint, build.described, build.inputs)
    with work.lock(), _own_sigterm():
        return _build(build, resumed)


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
    build = resolve(cfg)
    fingerprint, inputs = build.fingerprint, build.inputs
    version = versions.version_id(fingerprint, inputs)
    publish = cfg.publish
    # `main` follows the versions only when the config names no branch of its own
    follow_main = bool(publish.repo_id and not publish.revision)
    if follow_main:
        publish = publish.model_copy(update={"revision": versions.version_revision(version)})
    build = build.moved(out=root / version, publish=publish)
    cfg = build.config
    hub = (publish.repo_id, publish.revision) if publish.repo_id else None
    work = WorkDir(cfg.out)
    resumed = work.claim(fingerprint, build.described, inputs)
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
        summary = _build(build, resumed)
        pushed = None
        if summary.get("hub"):  # push_to_hub verified it, or the run failed before here
            pushed = {
                "repo_id": publish.repo_id,
                "revision": publish.revision,
                "commit_url": summary["hub"].get("commit_url"),
            }
            if follow_main:  # a failure here fails the run; a re-run pushes and moves again
                from pipeline.publish import move_main

                main = move_main(
                    cfg.out,
                    publish.repo_id,
                    publish.revision,
                    commit_message=publish.commit_message,
                )
                summary["hub"]["main"] = pushed["main"] = main["commit_url"]
                logger.info("main of %s = %s (verified)", publish.repo_id, publish.revision)
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
    """SIGTERM during the flow's body: `okedit build`'s handler in that command's process;
    in a deployment run (serve, workers) `flows.automations.GracefulStop`, which lets the
    chunks in flight finish and schedules a run that resumes the build, and the run fails
    with `BuildStopped` saying so (what `--watch` and the UI show); Prefect's handler in a
    flow called from Python."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    handler, stop = SIGTERM_HANDLER, None
    if handler is None and runtime.deployment.id is not None:
        from flows.automations import GracefulStop

        stop = GracefulStop(runtime.flow_run.id, runtime.deployment.id, get_run_logger())
        handler = stop.handle
    if handler is None:
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except stages.BuildStopped as exc:
        if stop is None or not stop.signalled.is_set():
            raise
        raise stages.BuildStopped(stop.reason()) from exc
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


def descendants(pid: int) -> list[int]:
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
    pids = descendants(os.getpid())
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


def stage_groups(build: ResolvedBuild) -> list[tuple[str, list[str]]]:
    """The build's stages in runs of one placement, in order: `chunks` (one task per chunk
    runs the run's stages, chunks in parallel), `serial` (validate: one model per process,
    chunk after chunk; the edits use all cores) or `shards` (flow runs on a GPU work pool,
    `BuildConfig.scale`)."""
    scale = build.config.scale
    groups: list[tuple[str, list[str]]] = []
    for stage in stages.STAGES:
        if scale.validate_deployment and stage.name in scale.shard_stages:
            placement = "shards"
        else:
            placement = "serial" if stage.name == "validate" else "chunks"
        if groups and groups[-1][0] == placement and placement == "chunks":
            groups[-1][1].append(stage.name)
        else:
            groups.append((placement, [stage.name]))
    return groups


def _build(build: ResolvedBuild, resumed: bool) -> dict:
    n_chunks = len(stages.chunk_ids(build))
    logger = get_run_logger()
    n_items = sum(len(c) for c in stages.chunk_ids(build))
    logger.info("%d items in %d chunks%s", n_items, n_chunks, " (resuming)" if resumed else "")
    reports: list[dict[str, dict]] = []  # per chunk task: {stage: counts, start, end}
    shards: list[dict] = []
    # Artifact calls leave the flow's thread; leaving this block waits for the last one.
    with tasks.ArtifactSender() as artifacts:
        # 2 redraws a second, not rich's 10 (each costs CPU)
        with Progress(refresh_per_second=2) as progress:
            bars, estimate = StageBars(build, progress, artifacts), Estimate(build)
            for placement, names in stage_groups(build):
                if placement == "shards":
                    started = time.time()
                    for name in names:
                        shards += _run_sharded(build, name, bars)
                    reports.append({n: {"start": started, "end": time.time()} for n in names})
                elif placement == "serial":
                    for index in range(n_chunks):
                        reports.append(tasks.run_stages(build, names, index))
                        bars.refresh(names)
                        estimate.chunk_done(reports[-1], index)
                else:
                    futures = [tasks.run_stages.submit(build, names, i) for i in range(n_chunks)]
                    reports += _wait(futures, bars, names, estimate)
        summary = tasks.publish_local(build, reports)
        if build.config.publish.repo_id:
            summary["hub"] = tasks.publish_hub(build)
        if shards:
            summary["shards"] = shards
        _report(summary, artifacts)
    return summary


# ---- scale-out: stages as shard flow runs on a work pool --------------------------------


@task(name="shard", task_run_name="{stage}-shard-{shard}", cache_policy=NO_CACHE)
def run_shard(
    deployment: str,
    build: dict,
    stage: str,
    shard: int,
    chunks: list[int],
    timeout_s: float | None,
) -> dict:
    """Start one shard's flow run on the work pool and wait for it to end."""
    run = run_deployment(
        deployment,
        parameters={"build": build, "stage": stage, "chunks": chunks, "shard": shard},
        timeout=timeout_s,
        poll_interval=2,
        tags=["okedit", "okedit-shard"],
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise ShardRunError(
            f"{stage} shard {shard} (flow run {run.name}) is {state}, not Completed; "
            "re-run the build to resume: finished chunks are kept"
        )
    return {"stage": stage, "shard": shard, "flow_run_id": str(run.id), "flow_run": run.name}


def shard_plan(todo: list[int], shards: int) -> list[list[int]]:
    """Round-robin the chunks still to run over at most `shards` shards."""
    plan = [todo[s::shards] for s in range(shards)]
    return [p for p in plan if p]


def _run_sharded(build: ResolvedBuild, stage: str, bars: StageBars) -> list[dict]:
    """Run `stage` through shard flow runs; returns their reports. The parent keeps the
    folder lock; shards write chunk markers into the shared folder, which is what it
    waits for."""
    scale = build.config.scale
    todo = stages.missing_chunks(build, stage)
    # workers elsewhere must see the same absolute paths; shards ask no LLM (no keys)
    cfg = build.config
    shared = cfg.model_copy(update={"out": cfg.out.resolve(), "cache_dir": cfg.cache_dir.resolve()})
    params = redact_secrets(build.model_copy(update={"config": shared}).model_dump(mode="json"))
    futures = [
        run_shard.submit(scale.validate_deployment, params, stage, s, chunks, scale.shard_timeout_s)
        for s, chunks in enumerate(shard_plan(todo, scale.shards))
    ]
    pending = list(futures)
    while pending:
        _, not_done = wait(pending, timeout=scale.poll_s)
        pending = list(not_done)
        bars.refresh([stage])
    runs = [f.result() for f in futures]  # raises ShardRunError for a failed shard
    missing = stages.missing_chunks(build, stage)
    if missing:
        raise ShardRunError(f"shard runs finished but {stage} chunks {missing} have no marker")
    return [_shard_report(shared.out, run) for run in runs]


def _shard_report(out: Path, run: dict) -> dict:
    path = report_path(out, run["stage"], run["shard"])
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
