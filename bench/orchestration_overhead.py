"""Orchestration overhead: the demo build through the `build-okedit` Prefect flow against the
same stage functions called directly (no Prefect), in one process and one run.

Both paths do identical work: flagworld, offline annotator, rendered images (warm image
cache), tiny VLM validation, local publish; chunks of the first four stages in 8 threads,
validation chunk after chunk. An untimed warm-up build loads the model and fills the caches
first, and the Prefect API is started (and timed) before the flow runs, so the ratio is
what Prefect adds per build: task runs, state updates, cache keys, artifacts. Runs
alternate direct / flow / flow with Prefect's default heartbeats, each into a fresh folder;
the medians give the ratio (target ≤ 1.15).

    .venv/bin/python bench/orchestration_overhead.py [--items 40] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pipeline import stages  # noqa: E402
from pipeline.config import TINY_MODEL, BuildConfig  # noqa: E402
from pipeline.work import WorkDir  # noqa: E402


def build_direct(cfg: BuildConfig) -> dict:
    """The flow's work without Prefect: same chunks, same threads, same order."""
    work = WorkDir(cfg.out)
    work.claim(cfg.fingerprint(), cfg.describe())
    with work.lock():
        ids = stages.list_ids(cfg)
        chunks = stages.chunked(ids, cfg.chunk_size)
        indices = range(len(chunks))
        with ThreadPoolExecutor(max_workers=8) as pool:  # the flow's ThreadPoolTaskRunner(8)
            list(pool.map(lambda a: stages.gather_chunk(cfg, *a), enumerate(chunks)))
            for fn in (stages.annotate_chunk, stages.images_chunk, stages.assemble_chunk):
                list(pool.map(lambda i, fn=fn: fn(cfg, i), indices))
        for i in indices:
            stages.validate_chunk(cfg, i)
        return stages.finalize(cfg, len(chunks), len(ids))


def build_flow(cfg: BuildConfig) -> dict:
    """The flow as the CLI runs it (`run_build`: no heartbeats on the embedded API)."""
    from flows.build_okedit import run_build

    return run_build(cfg)


def build_flow_heartbeats(cfg: BuildConfig) -> dict:
    """The flow called plainly, with Prefect's default flow-run heartbeats."""
    from flows.build_okedit import build_okedit

    return build_okedit(config=cfg)


def start_prefect_api() -> float:
    """Start the embedded API (what `okedit demo` uses) with one trivial flow run; seconds."""
    from prefect import flow

    @flow(name="okedit-bench-warm-up")
    def warm_up() -> None:
        return None

    start = time.perf_counter()
    warm_up()
    return time.perf_counter() - start


def validation_model(tmp: Path) -> str:
    """The shipped tiny VLM, else an untrained model of the same size (same compute)."""
    from pipeline.tiny_model import default_model_dir

    if (default_model_dir() / "model.safetensors").exists():
        return TINY_MODEL
    from editors.tiny_vlm import build_tiny_llava, okedit_meta, save_tiny_vlm
    from pipeline.tiny_model import build_flagworld_tokenizer_and_processor

    processor = build_flagworld_tokenizer_and_processor()
    path = tmp / "tiny-flagworld-untrained"
    save_tiny_vlm(build_tiny_llava(processor.tokenizer), processor, path, okedit_meta(processor))
    return str(path)


def timed(fn: Any, cfg: BuildConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = fn(cfg)
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="the demo's 40 by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="okedit-bench-orch-"))
    try:
        print(json.dumps(measure(args, tmp), indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model = validation_model(tmp)

    def config(name: str) -> BuildConfig:
        return BuildConfig(
            limit=args.items, out=tmp / name, cache_dir=tmp / "cache", validation={"model": model}
        )

    warm_s, _ = timed(build_direct, config("warm-up"))
    api_s = start_prefect_api()
    paths = {"direct": build_direct, "flow": build_flow, "flow_heartbeats": build_flow_heartbeats}
    times: dict[str, list[float]] = {path: [] for path in paths}
    counts = {}
    for r in range(args.repeats):
        for path, fn in paths.items():
            seconds, summary = timed(fn, config(f"{path}-{r}"))
            times[path].append(seconds)
            counts[path] = summary["counts"]
            print(f"run {r} {path:<15} {seconds:6.2f} s", file=sys.stderr)
    if len({json.dumps(c, sort_keys=True) for c in counts.values()}) != 1:
        raise SystemExit(f"the paths built different datasets: {counts}")
    median = {path: statistics.median(t) for path, t in times.items()}
    direct, flowed = median["direct"], median["flow"]
    return {
        "items": args.items,
        "chunks": -(-args.items // config("x").chunk_size),
        "model": "tiny-flagworld (shipped)" if model == TINY_MODEL else "tiny LLaVA, untrained",
        "counts": counts["flow"],
        "warm_up_s": round(warm_s, 2),
        "prefect_api_start_s": round(api_s, 2),
        **{f"{path}_s": [round(t, 2) for t in ts] for path, ts in times.items()},
        **{f"median_{path}_s": round(m, 2) for path, m in median.items()},
        "ratio": round(flowed / direct, 3),
        "overhead_s": round(flowed - direct, 2),
        "ratio_heartbeats": round(median["flow_heartbeats"] / direct, 3),
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
