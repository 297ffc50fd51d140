"""The deployment end to end: a real Prefect server, `okedit serve`, and
`prefect deployment run build-okedit/build-okedit --watch` (docs/deploy.md)."""

# ruff: noqa: F811 (pytest fixtures imported from tests.fixtures_prefect_server)
from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import flows.serve
from flows.automations import AUTOMATION_NAME, MISSED_HEARTBEATS, crash_detection_step
from flows.serve import DEPLOYMENT_NAME, POOL_DEPLOYMENT, serve_options
from pipeline.cli import app
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
    build = by_name[POOL_DEPLOYMENT]
    assert build["entrypoint"] == "flows/build_okedit.py:build_okedit"
    assert build["concurrency_limit"] == 1 and build["work_pool"]["name"]
    shard = by_name["validate-okedit-shard"]
    assert shard["entrypoint"] == "flows/validate_shard.py:validate_okedit_shard"
    # OKEDIT_HOME is read by the run (a shell step), never frozen by `prefect deploy`
    assert "{{ $" not in json.dumps(spec["pull"]) and "OKEDIT_HOME" in json.dumps(spec["pull"])


def test_serve_uses_prefect_yaml_definition_under_its_own_name():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    build = next(d for d in spec["deployments"] if d["name"] == POOL_DEPLOYMENT)
    options = serve_options()
    assert options["name"] == DEPLOYMENT_NAME != POOL_DEPLOYMENT  # never overwrite each other
    assert options["global_limit"] == build["concurrency_limit"] == 1
    assert options["parameters"] == build["parameters"]
    assert options["tags"] == build["tags"] and options["description"] == build["description"]
    assert [(s.cron, s.timezone) for s in options["schedules"]] == [
        (s["cron"], s["timezone"]) for s in build["schedules"]
    ]
    custom = serve_options(cron="0 1 * * *", parameters={"limit": 3})
    assert [s.cron for s in custom["schedules"]] == ["0 1 * * *"]
    assert custom["parameters"] == {**build["parameters"], "limit": 3}
    assert serve_options(no_schedule=True)["schedules"] == []


def test_okedit_serve_passes_its_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(flows.serve, "serve", lambda **kwargs: seen.update(kwargs))
    args = ["serve", "--no-schedule", "--out-root", "/data/builds", "--limit", "3"]
    result = CliRunner().invoke(app, [*args, "--crash-after-s", "90"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["no_schedule"] is True and seen["crash_after_s"] == 90
    assert seen["parameters"] == {"limit": 3, "out_root": "/data/builds"}
    assert serve_options(parameters=seen["parameters"])["parameters"]["out_root"] == "/data/builds"


def test_prefect_yaml_sets_up_crash_detection():
    """Heartbeats for the runs of both deployments, and the automation at `prefect deploy`."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    steps = [next(iter(step)) for step in spec["build"]]
    assert steps == [f"{crash_detection_step.__module__}.{crash_detection_step.__name__}"]
    for deployment in spec["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum


def test_prefect_deploy_creates_the_crash_automation(prefect_server):
    created = prefect_server.cli("work-pool", "create", "okedit", "--type", "process")
    assert created.returncode == 0 or "already exists" in created.stdout, created.stdout
    deployed = prefect_server.cli("deploy", "--name", POOL_DEPLOYMENT, timeout=240)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    body = {"automations": {"name": {"any_": [AUTOMATION_NAME]}}}
    [automation] = prefect_server.post("/automations/filter", body).json()
    assert automation["trigger"]["within"] == MISSED_HEARTBEATS * 60
    deployment = prefect_server.get(f"/deployments/name/build-okedit/{POOL_DEPLOYMENT}").json()
    assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    prefect_server.delete_automations(AUTOMATION_NAME)


@pytest.fixture()
def served(prefect_server, tmp_path):
    """`okedit serve` against the test server; stopped (by PID) before the server."""
    proc = start(
        [sys.executable, "-m", "pipeline.cli", "serve"],
        prefect_server.env(OKEDIT_HOME=str(tmp_path)),  # root of versions: tmp/okedit-builds
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
        prefect_server.delete_automations(AUTOMATION_NAME)  # serve created it


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


def test_deployment_runs_build_versions_under_okedit_home(prefect_server, served, tmp_path):
    """No `out`: versions under $OKEDIT_HOME/okedit-builds (the serve process's environment,
    read by the run); the same parameters again are a no-op, another seed a new version."""
    quick = ["-p", "limit=2", "-p", "config=" + json.dumps({"validation": {"enabled": False}})]
    root = tmp_path / "okedit-builds"
    latest = []
    for extra in ([], [], ["-p", "seed=5"]):
        cmd = ["deployment", "run", DEPLOYMENT, *quick, *extra, "--watch", "--watch-interval", "1"]
        result = prefect_server.cli(*cmd, timeout=240)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output + (tmp_path / "serve.log").read_text()[-3000:]
        latest.append((root / "LATEST").read_text().strip())
    assert latest[0] == latest[1] != latest[2]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted({*latest})
    assert "no-op: version " + latest[0] in (tmp_path / "serve.log").read_text()
