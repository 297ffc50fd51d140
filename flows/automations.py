"""What keeps okedit's deployment runs going when their process dies or is stopped.

Crash detection for deployment runs of okedit (`build-okedit`, `validate-okedit-shard`).

A flow run whose process dies with its machine (power loss, OOM kill of the worker, a lost
VM) never reports a final state: it stays `Running` and keeps the deployment's concurrency
slot, so the next scheduled build waits for it forever. Prefect's answer is two parts:

- flow-run heartbeats: served and worker runs emit `prefect.flow-run.heartbeat` every
  `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (okedit sets `HEARTBEAT_S` for its runs:
  `okedit serve` in its environment, prefect.yaml in the work-pool job's);
- an automation with a proactive trigger: after a heartbeat of a run tagged `okedit`, when
  neither another heartbeat nor a final state follows within `within` seconds, it changes
  the run to `Crashed`, which releases its concurrency slot. The next run of the same build
  resumes from its finished chunks.

`ensure_crash_detection()` creates or updates that automation (by name, so it is safe to call
at every start): `okedit serve` calls it, `prefect deploy` runs it as prefect.yaml's build
step, and `python -m flows.automations` does it by hand.

A graceful stop (`GracefulStop`): a SIGTERM to a deployment run's process (from `okedit
serve` stopping, from `kill`, or from systemd stopping the whole unit; a Prefect 3.9 worker
that stops sends SIGKILL instead, see docs/deploy.md §6) lets the chunks in flight finish,
starts no other, and schedules a new run of the same deployment and parameters, which the
next serve or worker process picks up and which resumes from the finished chunks.
"""

from __future__ import annotations

import argparse
import os
import threading
from datetime import timedelta
from typing import Any

HEARTBEAT_S = 60  # okedit's heartbeat interval for deployment runs (Prefect's minimum is 30)
MISSED_HEARTBEATS = 3  # heartbeats missed in a row before a run counts as crashed
AUTOMATION_NAME = "okedit: mark runs without heartbeats as Crashed"
TAG = "okedit"  # both okedit deployments tag their runs with it (prefect.yaml, serve)
# what ends a run: after one of these no heartbeat is expected any more
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def heartbeat_s() -> int:
    """The heartbeat interval deployment runs get: `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` from
    this environment when it is set (as a worker or serve process passes it on), else
    `HEARTBEAT_S`."""
    value = os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    return max(int(value), 30) if value else HEARTBEAT_S


def crash_automation(within_s: float) -> Any:
    """The automation (not yet saved): a run tagged `okedit` that sent a heartbeat and then
    neither a heartbeat nor a final state for `within_s` seconds becomes `Crashed`."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=AUTOMATION_NAME,
        description=(
            f"okedit (flows/automations.py): a flow run tagged {TAG!r} that stopped sending "
            f"heartbeats for {within_s:.0f} s lost its process; mark it Crashed so its "
            "concurrency slot is freed and the next run resumes the build."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                *(f"prefect.flow-run.{state}" for state in FINAL_EVENTS),
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{TAG}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"No heartbeat for {within_s:.0f} s: the flow-run process is gone "
                    "(okedit crash detection). Run the same build again to resume it."
                ),
            )
        ],
    )


def ensure_crash_detection(within_s: float | None = None) -> Any:
    """Create the crash-detection automation on the API of PREFECT_API_URL, or bring the one
    of the same name up to date; returns it. `within_s` defaults to `MISSED_HEARTBEATS`
    heartbeat intervals (`heartbeat_s()`)."""
    from prefect.automations import Automation

    wanted = crash_automation(within_s or MISSED_HEARTBEATS * heartbeat_s())
    try:
        found = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # none of that name yet
        return wanted.create()
    wanted.id = found.id
    wanted.update()
    return wanted


def crash_detection_step(within_s: float | None = None) -> dict[str, str]:
    """prefect.yaml build step (`prefect deploy`): `ensure_crash_detection`, with the
    automation's id as the step's output."""
    return {"automation_id": str(ensure_crash_detection(within_s).id)}


class GracefulStop:
    """The SIGTERM handler of a deployment run (installed by `flows.build_okedit._own_sigterm`).

    Prefect's own handler ends the run at once, losing the chunks in flight. This one asks
    the pipeline to stop (`pipeline.stages.request_stop`: no new chunk, no new LLM request;
    the next chunk raises `BuildStopped`) and, from a thread (a signal handler must not wait
    on the API), schedules the resuming run. A cancel from the UI or API also arrives as a
    SIGTERM, after the run went to `Cancelling`: then nothing is scheduled. The serve or
    worker process sends SIGKILL 30 s after its SIGTERM; a chunk still running then is
    redone by the resuming run.
    """

    def __init__(self, flow_run_id: Any, deployment_id: Any, logger: Any) -> None:
        self.flow_run_id, self.deployment_id, self.logger = flow_run_id, deployment_id, logger
        self.signalled = threading.Event()
        self.resumed_by: str | None = None  # the scheduled run's name
        self.cancelled = False  # the run was cancelled: nothing to resume
        self._thread: threading.Thread | None = None

    def handle(self, signum: int, _frame: object) -> None:
        if self.signalled.is_set():  # the runner's SIGTERM after the process group's one
            return
        from pipeline.stages import request_stop

        self.signalled.set()
        request_stop()
        self.logger.warning(
            "SIGTERM: the chunks in flight finish, no other starts; the build stops after them"
        )
        self._thread = threading.Thread(target=self._schedule_resume, name="okedit-resume")
        self._thread.start()

    def _schedule_resume(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(self.flow_run_id)
                if run.state is not None and run.state.is_cancelling():
                    self.cancelled = True
                    return
                # the run's parameters as the API holds them (credentials redacted); the
                # key makes a second stop of this run schedule nothing more
                resume = client.create_flow_run_from_deployment(
                    self.deployment_id,
                    parameters=run.parameters,
                    tags=run.tags,
                    idempotency_key=f"okedit-resume-{run.id}",
                )
            self.resumed_by = resume.name
        except Exception as exc:  # the stop must go on; the reason says how to resume
            self.logger.error(
                "could not schedule the resuming run: %s: %s", type(exc).__name__, exc
            )

    def reason(self) -> str:
        """Why the build stopped and what resumes it (waits for the scheduling thread)."""
        if self._thread is not None:
            self._thread.join(timeout=20)
        if self.cancelled:
            return "cancelled: stopped after the chunks in flight; finished chunks are kept"
        then = (
            f"flow run {self.resumed_by!r} is scheduled to resume it"
            if self.resumed_by
            else "run the deployment again with the same parameters to resume it"
        )
        return (
            "stopped by SIGTERM (its serve process stopping, or a kill) after the chunks in "
            f"flight; finished chunks are kept, and {then} when a serve or worker process "
            "runs again"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Create or update okedit's crash-detection automation (PREFECT_API_URL)."
    )
    parser.add_argument(
        "--within-s",
        type=float,
        help=f"seconds without a heartbeat before Crashed (default {MISSED_HEARTBEATS} x "
        "the heartbeat interval)",
    )
    args = parser.parse_args(argv)
    automation = ensure_crash_detection(args.within_s)
    print(f"automation {automation.name!r} ({automation.id}): {automation.trigger.within}")


if __name__ == "__main__":  # pragma: no cover
    main()
