"""Serve the `build-okedit` deployment from this process (`okedit serve`, `python -m flows.serve`).

One definition: the parameters, schedules, concurrency limit, tags and description are
read from prefect.yaml's `build-okedit` entry, the one `prefect deploy` registers on the
`okedit` work pool. A served deployment has no work pool (this process runs its runs), so
it is registered under its own name, `build-okedit/build-okedit-served`: the two never
overwrite each other. `prefect deployment run build-okedit/build-okedit-served -p limit=100`
starts a run here. Runs never overlap (deployment concurrency limit 1, as in prefect.yaml,
and this process runs one at a time), and each build holds a lock on its output folder.

Crash detection (flows/automations.py): the runs this process starts send heartbeats
(`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, default 60 s), and serving first creates or updates
the automation that marks a run whose heartbeats stopped as `Crashed`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from flows import automations
from flows.build_okedit import build_okedit

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
POOL_DEPLOYMENT = "build-okedit"  # prefect.yaml's entry (work pool `okedit`)
DEPLOYMENT_NAME = "build-okedit-served"  # this process's deployment


def definition(path: Path = PREFECT_YAML) -> dict[str, Any]:
    """prefect.yaml's `build-okedit` deployment entry."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    return next(d for d in spec["deployments"] if d["name"] == POOL_DEPLOYMENT)


def serve_options(
    cron: str | None = None,
    interval_s: int | None = None,
    parameters: dict[str, Any] | None = None,
    no_schedule: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of `build_okedit.serve`: prefect.yaml's definition, with the
    command line's schedule (replacing prefect.yaml's) and parameters (merged over them)."""
    from prefect.schedules import Cron, Interval

    spec = definition()
    if no_schedule:
        schedules = []
    elif cron or interval_s:
        schedules = [Cron(cron, timezone="UTC")] if cron else [Interval(interval_s)]
    else:
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in spec.get("schedules") or []
        ]
    return {
        "name": DEPLOYMENT_NAME,
        "description": spec.get("description"),
        "tags": spec.get("tags"),
        "parameters": {**(spec.get("parameters") or {}), **(parameters or {})},
        "schedules": schedules,
        "global_limit": spec.get("concurrency_limit"),  # the deployment's concurrency limit
        "limit": 1,  # runs this process executes at once
        "pause_on_shutdown": False,  # a restart of the server process must not stop the schedule
    }


def serve(
    cron: str | None = None,
    interval_s: int | None = None,
    parameters: dict[str, Any] | None = None,
    no_schedule: bool = False,
    crash_after_s: float | None = None,
) -> None:
    """Register the deployment and poll for its runs until interrupted (SIGTERM: each run
    finishes its chunks in flight and is resumed by a new run, see `_own_sigterm`).

    The runs get heartbeats every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (this
    environment's, else 60: the flow-run processes inherit it), and the crash-detection
    automation is created or updated first, marking a run `Crashed` after `crash_after_s`
    seconds without a heartbeat (default: 3 heartbeats)."""
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(automations.HEARTBEAT_S))
    try:
        automations.ensure_crash_detection(crash_after_s)
    except Exception as exc:  # serving matters more; say how to add it later
        logging.getLogger("okedit.serve").warning(
            "crash detection not set up (%s: %s); runs whose process dies stay Running. "
            "Create it with: python -m flows.automations",
            type(exc).__name__,
            exc,
        )
    build_okedit.serve(**serve_options(cron, interval_s, parameters, no_schedule))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the build-okedit deployment.")
    parser.add_argument("--cron", help="schedule (UTC), e.g. '0 3 * * 1'; default: prefect.yaml's")
    parser.add_argument("--interval-s", type=int, help="or: every N seconds")
    parser.add_argument("--no-schedule", action="store_true", help="manual runs only")
    parser.add_argument("--limit", type=int, help="default limit of runs")
    parser.add_argument("--out-root", help="root of versions (default $OKEDIT_HOME/okedit-builds)")
    parser.add_argument("--out", help="or: one output folder (resumes; other builds refused)")
    parser.add_argument("--repo-id", help="also push every build to this Hub dataset repo")
    parser.add_argument(
        "--crash-after-s",
        type=float,
        help="a run without heartbeat for this long is marked Crashed (default 3 heartbeats)",
    )
    args = parser.parse_args(argv)
    defaults = {
        "limit": args.limit,
        "out_root": args.out_root,
        "out": args.out,
        "repo_id": args.repo_id,
    }
    parameters = {k: v for k, v in defaults.items() if v is not None}
    serve(args.cron, args.interval_s, parameters, args.no_schedule, args.crash_after_s)


if __name__ == "__main__":  # pragma: no cover
    main()
