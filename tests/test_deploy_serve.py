"""The deployment end to end: a real Prefect server, `okedit serve`, and
`prefect deployment run build-okedit/build-okedit --watch` (docs/deploy.md)."""

# ruff: noqa: F811 (pytest fixtures imported from tests.fixtures_prefect_server)
from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from flows.serve import DEPLOYMENT_NAME
from pipeline.config import TINY_MODEL
from tests.fixtures_prefect_server import (  # noqa: F401 (pytest fixtures)
    PREFECT,
    REPO,
    prefect_server,
    start,
    stop,
    validation_model,
    wait_for,
)

DEPLOYMENT = f"build-okedit/{DEPLOYMENT_NAME}"


def test_prefect_yaml_declares_both_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    build = by_name[DEPLOYMENT_NAME]
    assert build["entrypoint"] == "flows/build_okedit.py:build_okedit"
    assert build["concurrency_limit"] == 1 and build["work_pool"]["name"]
    shard = by_name["validate-okedit-shard"]
    assert shard["entrypoint"] == "flows/validate_shard.py:validate_okedit_shard"


@pytest.fixture()
def served(prefect_server, tmp_path):
    """`okedit serve` against the test server; stopped (by PID) before the server."""
    proc = start(
        [sys.executable, "-m", "pipeline.cli", "serve"],
        prefect_server.env(),
        tmp_path / "serve.log",
    )
    try:

        def registered() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "serve.log").read_text()[-3000:])
            return prefect_server.get(f"/deployments/name/{DEPLOYMENT}").status_code == 200

        wait_for(registered, 90, f"the {DEPLOYMENT} deployment")
        yield proc
    finally:
        stop(proc)


def test_deployment_run_watch_completes(prefect_server, served, validation_model, tmp_path):
    out = tmp_path / "okedit"
    cmd = ["deployment", "run", DEPLOYMENT, "-p", "limit=3", "-p", f"out={out}"]
    if validation_model != TINY_MODEL:
        cmd += ["-p", "config=" + json.dumps({"validation": {"model": validation_model}})]
    result = prefect_server.cli(*cmd, "--watch", "--watch-interval", "1", timeout=240)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output + (tmp_path / "serve.log").read_text()[-3000:]
    assert "Completed" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["in"] == 3
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("*.parquet"))
    assert rows == manifest["counts"]["published"] >= 1
    assert manifest["validation"]["validated"] == rows
