"""Scale-out: two process workers (one per "GPU") make the images and validate two shards
each of a flagworld build as `validate-okedit-shard` flow runs; the parent run goes on from
their chunks to the same dataset as an unsharded build."""

# ruff: noqa: F811 (pytest fixtures imported from tests.fixtures_prefect_server)
from __future__ import annotations

import sys

import pytest

from flows.build_okedit import shard_plan
from flows.validate_shard import DEPLOYMENT_NAME, FLOW_NAME
from tests.fixtures_prefect_server import (  # noqa: F401 (pytest fixtures)
    PREFECT,
    dataset_rows,
    prefect_server,
    reference_build,
    run_build,
    small_config,
    start,
    stop,
    validation_model,
    wait_for,
)

POOL = "okedit-test-gpu"


def test_shard_plan_round_robins_what_is_left():
    assert shard_plan([0, 1, 2, 3, 4, 5], 2) == [[0, 2, 4], [1, 3, 5]]
    assert shard_plan([4, 5], 4) == [[4], [5]]  # never an empty shard run
    assert shard_plan([], 2) == []


@pytest.fixture()
def gpu_pool(prefect_server, tmp_path):
    """A process work pool with the shard deployment and two workers, `--limit 1` each, the
    way one would start one worker per GPU (CUDA_VISIBLE_DEVICES=0 and 1)."""
    created = prefect_server.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    workers = []
    try:
        for gpu in ("0", "1"):
            env = prefect_server.env(CUDA_VISIBLE_DEVICES=gpu)
            cmd = [PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"]
            cmd += ["--name", f"okedit-gpu-{gpu}"]
            workers.append(start(cmd, env, tmp_path / f"worker-{gpu}.log"))
        deploy = start(
            [sys.executable, "-m", "flows.validate_shard", "--pool", POOL],
            prefect_server.env(),
            tmp_path / "deploy.log",
        )
        assert deploy.wait(120) == 0, (tmp_path / "deploy.log").read_text()

        def online() -> bool:
            response = prefect_server.post(f"/work_pools/{POOL}/workers/filter", {})
            return sum(w["status"] == "ONLINE" for w in response.json()) == 2

        wait_for(online, 90, "two online workers")
        yield workers
    finally:
        for worker in workers:  # workers before the server (session end)
            stop(worker)


def test_two_workers_validate_two_shards(
    prefect_server, gpu_pool, validation_model, reference_build, tmp_path
):
    ref_cfg, ref_summary = reference_build
    deployment = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
    scale = {"validate_deployment": deployment, "shards": 2, "poll_s": 1.0}
    scale["shard_stages"] = ["images", "validate"]
    cfg = small_config(tmp_path / "okedit", validation_model)
    cfg = cfg.model_copy(update={"scale": cfg.scale.model_validate(scale)})

    summary = run_build(prefect_server, cfg, tmp_path / "parent.log")

    shards = summary["shards"]
    assert sorted((s["stage"], s["shard"]) for s in shards) == [
        ("images", 0),
        ("images", 1),
        ("validate", 0),
        ("validate", 1),
    ]
    for stage in ("images", "validate"):
        chunks = [c for s in shards if s["stage"] == stage for c in s["chunks"]]
        assert sorted(chunks) == list(range(6))
    for shard in shards:
        run = prefect_server.get(f"/flow_runs/{shard['flow_run_id']}").json()
        assert run["state"]["type"] == "COMPLETED"
        assert run["work_pool_name"] == POOL and run["infrastructure_pid"]
    # one shard per worker ("GPU"): each worker runs one flow run at a time (--limit 1)
    for stage in ("images", "validate"):
        assert sorted(s["device"] for s in shards if s["stage"] == stage) == ["0", "1"]
    # merged output == the unsharded build (the fingerprint ignores the scale settings)
    assert summary["counts"] == ref_summary["counts"]
    assert dataset_rows(cfg.out) == dataset_rows(ref_cfg.out)
