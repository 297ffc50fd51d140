"""The build's chunk tasks fanned out over a Dask cluster (docs/scaling.md): two local worker
processes stand in for a cluster; the dataset must equal the thread-pool build's."""

from __future__ import annotations

import json
import os

import pytest
from distributed import LocalCluster, get_task_stream
from prefect.settings import get_current_settings
from prefect_dask import DaskTaskRunner

from pipeline.config import BuildConfig

LIMIT = 6


def _build(cfg: BuildConfig, task_runner=None) -> dict:
    from flows.build_okedit import build_okedit

    flow = build_okedit.with_options(task_runner=task_runner) if task_runner else build_okedit
    return flow(config=cfg)


def _published(cfg: BuildConfig) -> list[dict]:
    entries = json.loads((cfg.out / "easyedit" / "okedit.json").read_text())
    return sorted(entries, key=lambda e: (e["src"], e["image"]))


@pytest.fixture
def api_url_for_workers(prefect_api, monkeypatch) -> str:
    # Worker processes read settings from the environment, not from the test's context.
    url = str(get_current_settings().api.url)
    monkeypatch.setenv("PREFECT_API_URL", url)
    return url


def test_dask_task_runner_builds_the_same_dataset(api_url_for_workers, tmp_path) -> None:
    settings = {"limit": LIMIT, "chunk_size": 2, "validation": {"enabled": False}}
    threads = BuildConfig(out=tmp_path / "threads", **settings)
    fanned = BuildConfig(out=tmp_path / "dask", **settings)
    expected = _build(threads)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        cluster.get_client() as client,
    ):
        assert os.environ["PREFECT_API_URL"] == api_url_for_workers
        with get_task_stream(client) as stream:
            summary = _build(fanned, DaskTaskRunner(address=cluster.scheduler_address))
        workers = client.run(os.getpid)
    ran_on = {task["worker"] for task in stream.data}
    # 3 chunks, each one gather..assemble task, ran on the cluster's worker processes
    assert len(stream.data) >= LIMIT // 2 and ran_on <= set(workers)
    assert os.getpid() not in workers.values()
    assert summary["counts"] == expected["counts"]
    assert summary["counts"]["in"] == LIMIT
    assert _published(fanned) == _published(threads)
