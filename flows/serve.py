"""Serve the `build-okedit` deployment from this process (`okedit serve`).

`prefect deployment run build-okedit/build-okedit -p limit=100` then starts a run here.
Runs of this deployment never overlap (limit 1), and the flow itself holds a lock on its
output folder, so two builds never publish into the same place at once.
"""

from __future__ import annotations

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


if __name__ == "__main__":  # pragma: no cover
    serve()
