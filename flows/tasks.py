"""Prefect tasks over `pipeline.stages`, shared by the build flow and the shard flow.

One task runs stages of one chunk (`run_stages`), another publishes. Task inputs are the
build's resolved settings, stage names and a chunk index; records and images stay in the
output folder (`pipeline.work`), never in Prefect results. Resuming is the chunk markers'
job alone: a re-run's task finds its chunk finished and returns its counts, so no Prefect
result cache is kept. Retries happen only for errors that a second try can cure (network,
timeouts, flaky shared storage); a bad setting or a bug fails at once.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import runtime, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import stages
from pipeline.config import ResolvedBuild

# OSErrors that say "this will fail the same way again".
PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth a retry: connection/timeouts, other OSErrors (flaky disks,
    network file systems) and HTTP 429/5xx; never for config errors, bad values or 4xx.
    A bare OSError that wraps another error (transformers re-raises the Hub's "no such
    model" or "not in the cache offline" that way) is what the wrapped error is."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # requests/httpx/huggingface_hub HTTP errors
        return status == 429 or status >= 500
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    cause = exc.__cause__
    if type(exc) is OSError and exc.errno is None and cause is not None and cause is not exc:
        return is_transient(cause)
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for Prefect tasks: retry only when `is_transient`."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by the Failed state
        return is_transient(exc)
    return False


def chunk_task(name: str, **options: Any) -> Callable[[Callable], Any]:
    """The settings of every per-chunk task; `options` override them (tests use this)."""
    settings: dict[str, Any] = {
        "name": name,
        "task_run_name": f"{name}-{{index}}",
        "cache_policy": NO_CACHE,  # the chunk markers resume a build
        "persist_result": False,
        "retries": 2,
        "retry_delay_seconds": [5, 30],
        "retry_condition_fn": retry_transient,
    }
    return task(**{**settings, **options})


def run_name(stage_names: Sequence[str], index: int) -> str:
    """`images-3` for one stage, `gather..assemble-3` for several."""
    first, last = stage_names[0], stage_names[-1]
    return f"{first}-{index}" if first == last else f"{first}..{last}-{index}"


def _task_run_name() -> str:
    parameters = runtime.task_run.parameters
    return run_name(parameters["stage_names"], parameters["index"])


@chunk_task("chunk", task_run_name=_task_run_name)
def run_stages(build: ResolvedBuild, stage_names: list[str], index: int) -> dict[str, dict]:
    return stages.run_chunk_stages(build, stage_names, index)


@task(name="publish-local", cache_policy=NO_CACHE, persist_result=False)
def publish_local(build: ResolvedBuild, reports: list[dict[str, dict]] | None = None) -> dict:
    return stages.finalize(build, reports)


def retry_hub_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` of the Hub push: retry only huggingface_hub's and its HTTP
    client's transient errors (`pipeline.publish.is_transient_hub_error`)."""
    from pipeline.publish import is_transient_hub_error

    try:
        state.result()
    except Exception as exc:
        return is_transient_hub_error(exc)
    return False


@task(
    name="publish-hub",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=[10, 30, 60],
    retry_condition_fn=retry_hub_transient,
)
def publish_hub(build: ResolvedBuild) -> dict | None:
    return stages.publish_hub(build)


class ArtifactSender:
    """The artifact API calls of one flow run, made in order on one background thread.

    Each call is a blocking round trip to the API (15-50 ms on the embedded API of a busy
    2-core machine, about ten per demo build), so the flow hands them over and goes on
    with its chunks. Calls run in a copy of the caller's context, so they belong to the same
    flow run. Leaving the `with` block waits for the last call and re-raises the first
    failure (unless the block itself is failing).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="okedit-artifacts")
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future = self._pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)
        self._futures.append(future)
        return future

    def close(self) -> None:
        """Wait for every call; raise the first error."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ArtifactSender:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the flow's own error wins: drop calls not started, wait for the one running
            self._pool.shutdown(wait=True, cancel_futures=True)


class StageProgress:
    """A Prefect progress artifact (percent of chunks done) for one stage of one flow run.

    Updated as chunks finish, at most once per `min_interval_s` (a demo build finishes
    chunks faster than anyone reads them), and always at the end of the stage. With a
    `sender` the calls go through it (the flow does not wait on the API) and coalesce: a
    call that has not started yet sends the latest count, so a stage that ends before its
    artifact was created costs one call, created at 100 %. Without one, every call blocks.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        done: int = 0,
        min_interval_s: float = 1.0,
        sender: ArtifactSender | None = None,
    ):
        self.stage, self.total, self.done = stage, max(total, 1), done
        self.min_interval_s = min_interval_s
        self.id: Any = None
        self._sender = sender
        self._lock = threading.Lock()
        self._queued = False  # a send is waiting in the sender and will read `done` then
        self._request()

    def _percent(self, done: int) -> float:
        return round(100.0 * done / self.total, 1)

    def _description(self, done: int) -> str:
        return f"{self.stage}: {done} of {self.total} chunks done"

    def update(self, done: int) -> None:
        finished = done >= self.total
        recent = time.monotonic() - self._sent_at < self.min_interval_s
        if done == self.done or (recent and not finished):
            return
        with self._lock:
            self.done = done
        self._request()

    def _request(self) -> None:
        self._sent_at = time.monotonic()
        if self._sender is None:
            self._send()
            return
        with self._lock:
            if self._queued:
                return  # the queued send will carry this count
            self._queued = True
        self._sender.submit(self._send)

    def _send(self) -> None:
        with self._lock:
            done, self._queued = self.done, False
        progress, description = self._percent(done), self._description(done)
        if self.id is None:
            self.id = create_progress_artifact(
                progress=progress, key=f"okedit-{self.stage}-progress", description=description
            )
        else:
            update_progress_artifact(self.id, progress=progress, description=description)


def reject_reasons(rejected_jsonl: Path) -> list[dict[str, Any]]:
    """Rejections grouped by stage and reason (as in the card), most frequent first."""
    counts: dict[tuple[str, str], int] = {}
    for line in Path(rejected_jsonl).read_text().splitlines():
        row = json.loads(line)
        key = (row["stage"], row["reason"].split(";")[0][:90])
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [{"stage": s, "reason": r, "items": n} for (s, r), n in ranked]
