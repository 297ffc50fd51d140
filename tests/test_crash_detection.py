"""Runs that lose their process (issue 14, parts 3 and 4), on a real Prefect server with
`python -m flows.serve` (what `okedit serve` runs) and a small validated build:

- the machine dies: SIGKILL to the serve process and the flow-run process. Only the
  heartbeats and the automation that `flows.serve` created can end the run: it becomes
  `Crashed`, its concurrency slot is freed, and the next run resumes from finished chunks;
- the serve process is stopped (SIGTERM): the chunks in flight finish, the run says why it
  stopped, and a resuming run is scheduled, which the next serve process completes.

Prefect's shortest heartbeat interval is 30 s, so the crash test waits about that long.
"""

# ruff: noqa: F811 (pytest fixtures imported from tests.fixtures_prefect_server)
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.automations import AUTOMATION_NAME
from flows.build_okedit import descendants
from flows.serve import DEPLOYMENT_NAME
from tests.fixtures_prefect_server import (  # noqa: F401 (pytest fixtures)
    SMALL_CHUNK,
    SMALL_LIMIT,
    PrefectServer,
    prefect_server,
    start,
    stop,
    validation_model,
    wait_for,
)

DEPLOYMENT = f"build-okedit/{DEPLOYMENT_NAME}"
HEARTBEAT_S = 30  # Prefect's minimum
CRASH_AFTER_S = 35  # a little more than one heartbeat interval


@pytest.fixture(autouse=True)
def _no_crash_window_left_behind(prefect_server) -> Iterator[None]:
    yield
    prefect_server.delete_automations(AUTOMATION_NAME)


@contextlib.contextmanager
def serving(
    server: PrefectServer, home: Path, log: Path, crash_after_s: float = CRASH_AFTER_S
) -> Iterator[subprocess.Popen]:
    """`python -m flows.serve` (no schedule) with 30 s heartbeats and a 35 s crash window;
    yields once it serves the deployment (so it has set up crash detection); stopped (by
    PID) at the end."""
    cmd = [sys.executable, "-m", "flows.serve", "--no-schedule"]
    env = server.env(OKEDIT_HOME=str(home), PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    proc = start([*cmd, "--crash-after-s", str(crash_after_s)], env, log)
    try:

        def polling() -> bool:  # this process, not one of an earlier test
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            return "is being served" in log.read_text()

        wait_for(polling, 90, f"serving {DEPLOYMENT}")
        yield proc
    finally:
        stop(proc)


def start_run(server: PrefectServer, out: Path, model: str) -> dict:
    deployment = server.get(f"/deployments/name/{DEPLOYMENT}").json()
    config = {"limit": SMALL_LIMIT, "chunk_size": SMALL_CHUNK, "validation": {"model": model}}
    body = {"parameters": {"out": str(out), "config": config}}
    response = server.post(f"/deployments/{deployment['id']}/create_flow_run", body)
    response.raise_for_status()
    return response.json()


def state(server: PrefectServer, run_id: str) -> dict:
    return server.get(f"/flow_runs/{run_id}").json()["state"] or {}


def wait_state(server: PrefectServer, run_id: str, types: set[str], timeout: float) -> dict:
    wait_for(lambda: state(server, run_id).get("type") in types, timeout, f"{run_id} {types}")
    return state(server, run_id)


def markers(out: Path) -> dict[str, int]:
    """Completion marker -> its mtime (ns): a chunk redone gets a new one."""
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in (out / ".okedit").glob("*/*.done.json")
    }


def first_validated_chunk(out: Path) -> bool:
    return (out / ".okedit" / "validate" / "chunk-00000.done.json").exists()


def run_logs(server: PrefectServer, run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
    return "\n".join(entry["message"] for entry in server.post("/logs/filter", body).json())


def test_serve_sets_up_crash_detection_once(prefect_server, tmp_path):
    """Serving twice leaves one automation, with the window of the last start."""
    for window in (50, CRASH_AFTER_S):
        with serving(prefect_server, tmp_path, tmp_path / f"serve-{window}.log", window):
            pass
    body = {"automations": {"name": {"any_": [AUTOMATION_NAME]}}}
    found = prefect_server.post("/automations/filter", body).json()
    assert len(found) == 1 and found[0]["enabled"]
    trigger, [action] = found[0]["trigger"], found[0]["actions"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == CRASH_AFTER_S
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"


def test_a_run_whose_machine_died_is_crashed_and_the_next_run_resumes(
    prefect_server, validation_model, tmp_path
):
    out = tmp_path / "okedit"
    with serving(prefect_server, tmp_path, tmp_path / "serve-1.log") as proc:
        run = start_run(prefect_server, out, validation_model)
        wait_for(lambda: first_validated_chunk(out), 180, "a validated chunk")
        for pid in [proc.pid, *descendants(proc.pid)]:  # the machine dies: nothing reports
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
    before = markers(out)
    assert state(prefect_server, run["id"])["type"] == "RUNNING"

    crashed = wait_state(prefect_server, run["id"], {"CRASHED"}, CRASH_AFTER_S + HEARTBEAT_S + 30)
    took = time.monotonic() - killed
    print(
        f"\nSIGKILL -> Crashed: {took:.1f} s (heartbeat {HEARTBEAT_S} s, window {CRASH_AFTER_S} s)"
    )
    assert "No heartbeat" in crashed["message"]  # the automation did it, nothing else could

    # the slot is free (concurrency limit 1): the next run starts, resumes and completes
    with serving(prefect_server, tmp_path, tmp_path / "serve-2.log"):
        again = start_run(prefect_server, out, validation_model)
        done = wait_state(prefect_server, again["id"], {"COMPLETED", "FAILED", "CRASHED"}, 240)
    assert done["type"] == "COMPLETED", run_logs(prefect_server, again["id"])[-3000:]
    after = markers(out)
    assert before and all(after[m] == t for m, t in before.items())  # finished chunks kept
    assert len(after) > len(before)
    assert "(resuming)" in run_logs(prefect_server, again["id"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["in"] == SMALL_LIMIT


def test_sigterm_to_serve_finishes_the_chunks_in_flight_and_schedules_the_resume(
    prefect_server, validation_model, tmp_path
):
    out = tmp_path / "okedit"
    with serving(prefect_server, tmp_path, tmp_path / "serve-1.log") as proc:
        run = start_run(prefect_server, out, validation_model)
        wait_for(lambda: first_validated_chunk(out), 180, "a validated chunk")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the serve process only, as `kill PID` does
        proc.wait(60)
        took = time.monotonic() - signalled
    print(f"\nSIGTERM to serve -> serve exited: {took:.1f} s")
    assert took < 30  # the run ended by itself, before the runner's SIGKILL (30 s)
    stopped = wait_state(prefect_server, run["id"], {"CANCELLED", "FAILED", "CRASHED"}, 30)
    assert stopped["type"] != "CRASHED"
    logs = run_logs(prefect_server, run["id"])
    assert "SIGTERM: the chunks in flight finish" in logs
    assert "stopped by SIGTERM" in logs and "is scheduled to resume it" in logs
    assert not list((out / ".okedit").glob("*/.*tmp*"))  # no chunk cut in the middle
    before = markers(out)

    deployment = prefect_server.get(f"/deployments/name/{DEPLOYMENT}").json()
    body = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
    runs = prefect_server.post("/flow_runs/filter", body).json()
    [resume] = [r for r in runs if r["id"] != run["id"] and r["parameters"]["out"] == str(out)]
    assert resume["state"]["type"] == "SCHEDULED" and resume["name"] in logs
    assert resume["parameters"] == run["parameters"]

    with serving(prefect_server, tmp_path, tmp_path / "serve-2.log"):  # picks it up
        done = wait_state(prefect_server, resume["id"], {"COMPLETED", "FAILED", "CRASHED"}, 240)
    assert done["type"] == "COMPLETED", run_logs(prefect_server, resume["id"])[-3000:]
    assert all(markers(out)[m] == t for m, t in before.items())
    assert json.loads((out / "manifest.json").read_text())["counts"]["in"] == SMALL_LIMIT


def test_watch_says_why_a_run_failed(prefect_server, tmp_path):
    """`prefect deployment run --watch` streams the run's logs: the reason is printed above
    Prefect's last line ("Flow run finished in state 'Failed'")."""
    with serving(prefect_server, tmp_path, tmp_path / "serve.log"):
        cmd = ["deployment", "run", DEPLOYMENT, "-p", f"out={tmp_path / 'a'}"]
        result = prefect_server.cli(*cmd, "-p", f"out_root={tmp_path / 'b'}", "--watch")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "'Failed'" in output
    assert "give either out (one folder) or out_root (versions), not both" in output, output
