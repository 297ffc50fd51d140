"""The `validate-okedit-shard` flow: one stage (validate, or images) for some chunks of a
build, run as its own flow run on a GPU worker (docs/scaling.md).

The parent `build-okedit` run starts one run per shard with `run_deployment`, waits for
them, and goes on from the chunk markers they leave in the shared output folder. A shard
gets the build's resolved settings (`pipeline.config.ResolvedBuild`), never claims or locks
the folder (the parent holds the lock for the whole build), and only checks that the
folder holds the build it was given.

Deploy it once per work pool (one worker per GPU):

    prefect work-pool create okedit-gpu --type process
    python -m flows.validate_shard --pool okedit-gpu
    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool okedit-gpu --limit 1
    CUDA_VISIBLE_DEVICES=1 prefect worker start --pool okedit-gpu --limit 1
"""

# No `from __future__ import annotations` here: a served flow is cloudpickled by value with
# only the globals its code uses, so string annotations (BuildConfig) would not resolve when
# Prefect validates the parameters of a deployment run.
import argparse
import json
import os
import socket
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, runtime  # noqa: E402

from flows.tasks import StageProgress, run_stages  # noqa: E402
from pipeline.config import ResolvedBuild  # noqa: E402
from pipeline.stages import STAGES  # noqa: E402
from pipeline.work import WorkDir  # noqa: E402

FLOW_NAME = "validate-okedit-shard"
DEPLOYMENT_NAME = "validate-okedit-shard"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ShardInputError(RuntimeError):
    """The shard cannot see the parent's build (wrong or unshared output folder)."""


def report_path(out: Path, stage: str, shard: int) -> Path:
    return Path(out) / ".okedit" / "shards" / f"{stage}-{shard:03d}.json"


def _check_inputs(build: ResolvedBuild, stage: str, chunks: list[int]) -> None:
    work = WorkDir(build.out)
    held = work.root / "build.json"
    if not held.exists() or not work.check(build.fingerprint):
        raise ShardInputError(
            f"{build.out} holds no okedit build on {socket.gethostname()}; shard workers need "
            "the parent's output folder at the same path (shared storage)"
        )
    names = [s.name for s in STAGES]
    if stage not in names or stage == names[0]:
        raise ShardInputError(f"a shard runs one of {names[1:]}, not {stage!r}")
    before = names[names.index(stage) - 1]
    missing = [i for i in chunks if not work.is_done(before, i)]
    if missing:
        raise ShardInputError(f"{before} chunks {missing} are missing in {build.out}")


@flow(name=FLOW_NAME, persist_result=False)
def validate_okedit_shard(
    build: ResolvedBuild, chunks: list[int], shard: int = 0, stage: str = "validate"
) -> dict:
    """Run `stage` for `chunks` of the build in `build.config.out`, one after another on
    this worker's model (one load per process), and leave a report beside the markers."""
    start = time.perf_counter()
    _check_inputs(build, stage, chunks)
    progress = StageProgress(f"{stage}-shard-{shard}", len(chunks))
    counts = {"ok": 0, "rejected": 0}
    for done, index in enumerate(chunks, 1):
        result = run_stages(build, [stage], index)[stage]["counts"]
        counts = {k: counts[k] + result[k] for k in counts}
        progress.update(done)
    report = {
        "stage": stage,
        "shard": shard,
        "chunks": chunks,
        "flow_run_id": runtime.flow_run.id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "seconds": round(time.perf_counter() - start, 2),
        **counts,
    }
    path = report_path(build.out, stage, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    get_run_logger().info(
        "%s shard %d: %d chunks in %.1f s", stage, shard, len(chunks), report["seconds"]
    )
    return report


def deploy(
    work_pool: str,
    name: str = DEPLOYMENT_NAME,
    source: Path = REPO_ROOT,
    concurrency_limit: int | None = None,
) -> str:
    """Register the shard deployment on `work_pool`; workers run it from `source` (this
    checkout, or the same path on every worker machine). Returns the deployment id."""
    deployable = validate_okedit_shard.from_source(
        source=str(source), entrypoint="flows/validate_shard.py:validate_okedit_shard"
    )
    deployment_id = deployable.deploy(
        name=name,
        work_pool_name=work_pool,
        concurrency_limit=concurrency_limit,
        tags=["okedit", "okedit-shard"],
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


def main() -> None:  # pragma: no cover - thin command line
    parser = argparse.ArgumentParser(description="Deploy the validate-okedit-shard flow.")
    parser.add_argument("--pool", required=True, help="a process (or GPU) work pool")
    parser.add_argument("--name", default=DEPLOYMENT_NAME)
    parser.add_argument("--source", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    deployment_id = deploy(args.pool, args.name, args.source)
    print(f"deployed {FLOW_NAME}/{args.name} ({deployment_id}) on pool {args.pool}")


if __name__ == "__main__":  # pragma: no cover
    main()
