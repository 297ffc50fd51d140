"""A build killed (SIGKILL) in the middle of validation and started again finishes from the
chunks it had and publishes the same dataset as an uninterrupted build."""

# ruff: noqa: F811 (pytest fixtures imported from tests.fixtures_prefect_server)
from __future__ import annotations

import signal

from tests.fixtures_prefect_server import (  # noqa: F401 (pytest fixtures)
    SMALL_CHUNK,
    SMALL_LIMIT,
    build_command,
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

N_CHUNKS = -(-SMALL_LIMIT // SMALL_CHUNK)


def test_killed_in_validation_resumes_to_the_same_dataset(
    prefect_server, validation_model, reference_build, tmp_path
):
    ref_cfg, ref_summary = reference_build
    cfg = small_config(tmp_path / "okedit", validation_model)
    markers = cfg.out / ".okedit" / "validate"

    def validated() -> list:
        return sorted(markers.glob("*.done.json")) if markers.exists() else []

    log = tmp_path / "killed.log"
    proc = start(build_command(cfg), prefect_server.env(), log)
    try:
        # kill as soon as validation has started but not finished
        wait_for(lambda: len(validated()) >= 1 or proc.poll() is not None, 180, "validation", 0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop(proc)
    done_before = {p: p.stat().st_mtime_ns for p in validated()}
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert 1 <= len(done_before) < N_CHUNKS
    assert not (cfg.out / "manifest.json").exists()

    summary = run_build(prefect_server, cfg, tmp_path / "resumed.log")

    assert "(resuming)" in (tmp_path / "resumed.log").read_text()
    assert summary["counts"] == ref_summary["counts"]
    assert summary["stages"] == ref_summary["stages"]
    assert dataset_rows(cfg.out) == dataset_rows(ref_cfg.out)
    # chunks finished before the kill were kept, not redone
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert len(validated()) == N_CHUNKS
