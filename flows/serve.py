"""Serve the `build-okedit` deployment from this process (`okedit serve`, `python -m flows.serve`).

`prefect deployment run build-okedit/build-okedit -p limit=100` then starts a run here.
Runs of this deployment never overlap (limit 1), and the flow itself holds a lock on its
output folder, so two builds never publish into the same place at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.build_okedit import build_okedit

DEPLOYMENT_NAME = "build-okedit"


def serve(
    cron: str | None = None,
    interval_s: int | None = None,
    parameters: dict[str, Any] | None = None,
) -> None:
    """Register the deployment and poll for its runs until interrupted."""
    build_okedit.serve(
        name=DEPLOYMENT_NAME,
        cron=cron,
        interval=interval_s,
        parameters=parameters or {},
        pause_on_shutdown=False,  # a restart of the server process must not stop the schedule
        limit=1,
        tags=["okedit"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the build-okedit deployment.")
    parser.add_argument("--cron", help="schedule, e.g. '0 3 * * 1'")
    parser.add_argument("--interval-s", type=int, help="or: every N seconds")
    parser.add_argument("--limit", type=int, help="default limit of runs")
    parser.add_argument("--out", help="default output folder of runs")
    parser.add_argument("--repo-id", help="also push every build to this Hub dataset repo")
    args = parser.parse_args(argv)
    defaults = {"limit": args.limit, "out": args.out, "repo_id": args.repo_id}
    parameters = {k: v for k, v in defaults.items() if v is not None}
    serve(cron=args.cron, interval_s=args.interval_s, parameters=parameters)


if __name__ == "__main__":  # pragma: no cover
    main()
