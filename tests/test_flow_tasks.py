"""Task design of the build flow on a real (embedded) Prefect API: retries only for transient
errors, resuming by the chunk markers alone (no Prefect result cache that could outlive the
output folder), no Prefect results at all, progress/table/markdown artifacts, and the Hub
publish stage."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect import flow
from prefect.cache_policies import NO_CACHE

from flows import tasks
from flows.tasks import chunk_task, is_transient
from pipeline.config import BuildConfig
from pipeline.stages import ConfigError
from tests.test_publish_hub import FakeHub

STAGE_NAMES = {"gather", "annotate", "images", "assemble", "validate"}
# one task per chunk for the stages up to QC, one per chunk for validation
CHUNK_RUN = re.compile(r"^(gather\.\.assemble|validate)-\d+$")


@pytest.fixture(scope="module", autouse=True)
def _no_heartbeats(prefect_api):
    """As `run_build` does on the embedded API: Prefect 3.9 takes up to 1 s to stop the
    heartbeat thread of each flow run, and this module runs eight."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class _HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


@pytest.mark.parametrize(
    "exc, transient",
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError("stale NFS handle"), True),
        (_HTTPError(503), True),
        (_HTTPError(429), True),
        (_HTTPError(401), False),
        (FileNotFoundError("no model"), False),
        (PermissionError("read-only"), False),
        (ValueError("bad"), False),
        (ConfigError("render needs flagworld"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_transient_errors(exc, transient):
    assert is_transient(exc) is transient


def test_chunk_tasks_retry_transient_errors_only(prefect_api):
    attempts: Counter[str] = Counter()
    errors = {"conn": ConnectionError, "timeout": TimeoutError, "value": ValueError}
    errors |= {"config": ConfigError, "missing": FileNotFoundError}

    @chunk_task("flaky", retry_delay_seconds=0, cache_policy=NO_CACHE, persist_result=False)
    def flaky(index: int, error: str) -> int:
        attempts[error] += 1
        if attempts[error] == 1:
            raise errors[error]("first try fails")
        return index

    @flow
    def run(error: str) -> bool:
        return flaky(0, error, return_state=True).is_completed()

    for error in errors:
        completed = run(error)
        retried = error in {"conn", "timeout"}
        assert attempts[error] == (2 if retried else 1), error
        assert completed is retried, error


# ---- one small build, three times ---------------------------------------------------------


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [r for r in runs if CHUNK_RUN.match(r.name)]


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


class FlakyHub(FakeHub):
    """Drops the connection on the first data upload, like a network hiccup."""

    def upload_folder(self, **kwargs):
        if "upload_folder" not in self.calls:
            self.calls.append("upload_folder")
            raise ConnectionError("connection reset by peer")
        return super().upload_folder(**kwargs)


@pytest.fixture(scope="module")
def runs(prefect_api, tmp_path_factory):
    """Build, build again (resumed: every chunk finished), delete the folder, build again
    (nothing to resume). Returns the chunk markers' modification times after each build."""
    import pipeline.publish
    from flows.build_okedit import build_okedit

    hub = FlakyHub()
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline.publish, "default_hub_api", lambda: hub)
    patch.setattr(tasks, "publish_hub", tasks.publish_hub.with_options(retry_delay_seconds=0))
    out = tmp_path_factory.mktemp("cache") / "okedit"
    cfg = BuildConfig(
        limit=4, chunk_size=2, out=out, validation={"enabled": False}, publish={"repo_id": "me/ok"}
    )
    started = time.time()
    states, markers = [], []
    try:
        for fresh in (False, False, True):
            if fresh:
                shutil.rmtree(out)
            states.append(build_okedit(config=cfg, return_state=True))
            done = sorted((out / ".okedit").glob("*/*.done.json"))
            markers.append({p.relative_to(out): p.stat().st_mtime_ns for p in done})
    finally:
        patch.undo()
    return cfg, states, hub, started, markers


def test_a_second_run_resumes_from_the_markers_and_a_new_folder_is_built(runs):
    cfg, states, _, _, markers = runs
    summaries = [s.result() for s in states]
    assert summaries[0]["counts"] == summaries[1]["counts"] == summaries[2]["counts"]
    names = [Counter(r.state_name for r in _task_runs(s.state_details.flow_run_id)) for s in states]
    n_tasks = 2 * 2  # (gather..assemble, validate) x two chunks
    assert names == [{"Completed": n_tasks}] * 3
    assert len(markers[0]) == 5 * 2  # five stages, two chunks
    assert markers[1] == markers[0]  # the second run found every chunk finished
    # a deleted and rebuilt folder is a new build: every chunk written again
    assert markers[2].keys() == markers[0].keys()
    assert all(markers[2][k] > markers[0][k] for k in markers[0])
    assert (cfg.out / "manifest.json").exists()


def test_prefect_results_hold_no_data(runs):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    _, _, _, started, _ = runs
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    written = [p for p in storage.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1]
    assert written == []  # records and images stay in the output folder; resuming needs none


def test_artifacts(runs):
    _, states, _, _, _ = runs
    found = _artifacts(states[0].state_details.flow_run_id)
    assert {"okedit-stage-counts", "okedit-summary", "okedit-validate-progress"} <= set(found)
    assert found["okedit-validate-progress"].type == "progress"
    assert float(found["okedit-validate-progress"].data) == 100.0
    assert found["okedit-annotate-progress"].data == 100.0
    stages = {row["stage"] for row in json.loads(found["okedit-stage-counts"].data)}
    assert stages == STAGE_NAMES
    assert "https://hub.test/commit/abc" in found["okedit-summary"].data


def test_publish_stage_retries_a_dropped_connection(runs):
    _, states, hub, _, _ = runs
    summary = states[0].result()
    assert summary["hub"]["commit_url"] == "https://hub.test/commit/abc"
    assert summary["hub"]["rows"] == summary["counts"]["published"]
    assert "README.md" in hub.files and any(f.startswith("data/") for f in hub.files)


# ---- artifact calls off the flow's thread ------------------------------------------------


def test_progress_artifact_calls_coalesce_in_the_background(monkeypatch):
    """While a call is in flight, newer counts replace each other: the artifact gets the
    first and the last value, in order, and the caller never waits."""
    calls: list[tuple] = []
    entered, release = threading.Event(), threading.Event()

    def create(progress, key, description):
        entered.set()
        release.wait(5)  # a slow API
        calls.append(("create", progress))
        return "artifact-id"

    def update(artifact_id, progress, description):
        calls.append(("update", artifact_id, progress))

    monkeypatch.setattr(tasks, "create_progress_artifact", create)
    monkeypatch.setattr(tasks, "update_progress_artifact", update)
    with tasks.ArtifactSender() as sender:
        progress = tasks.StageProgress("images", 4, min_interval_s=0, sender=sender)
        assert entered.wait(5)
        started = time.monotonic()
        for done in (1, 2, 3, 4):
            progress.update(done)
        assert time.monotonic() - started < 1  # nothing blocked on the slow create
        release.set()
    assert calls == [("create", 0.0), ("update", "artifact-id", 100.0)]


def test_a_stage_that_ends_before_its_artifact_is_sent_costs_one_call(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(tasks, "create_progress_artifact", lambda **kw: calls.append(kw) or "x")
    monkeypatch.setattr(tasks, "update_progress_artifact", lambda *a, **kw: calls.append(kw))
    blocker = threading.Event()
    with tasks.ArtifactSender() as sender:
        sender.submit(blocker.wait, 5)  # the sender is busy with an earlier call
        progress = tasks.StageProgress("annotate", 3, sender=sender)
        progress.update(3)
        blocker.set()
    assert [c["progress"] for c in calls] == [100.0]
    assert calls[0]["key"] == "okedit-annotate-progress"


def test_artifact_sender_raises_a_failed_call_unless_the_flow_failed():
    def boom():
        raise ConnectionError("API down")

    with pytest.raises(ConnectionError):
        with tasks.ArtifactSender() as sender:
            sender.submit(boom)
    with pytest.raises(ValueError, match="the flow's own error"):
        with tasks.ArtifactSender() as sender:
            sender.submit(boom)
            raise ValueError("the flow's own error")


def test_background_artifacts_belong_to_the_flow_run(prefect_api):
    """Calls made on the sender's thread see the flow run's context."""
    from prefect.artifacts import create_markdown_artifact

    @flow
    def report() -> str:
        from prefect.runtime import flow_run

        with tasks.ArtifactSender() as sender:
            sender.submit(create_markdown_artifact, key="okedit-test-sender", markdown="hi")
        return flow_run.id

    state = report(return_state=True)
    found = _artifacts(state.state_details.flow_run_id)
    assert found["okedit-test-sender"].data == "hi"
