"""Orchestration overhead: the demo build through the `build-okedit` Prefect flow against the
same stage functions called directly (no Prefect), in one process and one run.

Both paths do identical work: flagworld, offline annotator, rendered images (warm image
cache), tiny VLM validation, local publish; chunks of the first four stages in 8 threads,
validation chunk after chunk. An untimed warm-up build loads the model and fills the caches
first, and the Prefect API is started (and timed) before the flow runs, so the ratio is
what Prefect adds per build: task runs, state updates, cache keys, artifacts. Runs
alternate direct / flow / flow with Prefect's default heartbeats, each into a fresh folder;
the medians give the ratio (target ≤ 1.15), and every path must publish the same dataset
(counts, per-stage counts, rejections, EasyEdit export and card).

Per run it also reads the CPU time of this process and of the embedded API's server process
(Linux /proc), which is where most of Prefect's cost goes: the server records every task-run
state event, artifact and log. `--breakdown` adds, per path, where the wall time goes:
from the start of the run to the first chunk, each stage (first chunk start to last chunk
end, over the stage functions' own calls), the time between stages and after publishing.

    .venv/bin/python bench/orchestration_overhead.py [--items 40] [--repeats 3] [--threads 1]
        [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pipeline import stages  # noqa: E402
from pipeline.config import TINY_MODEL, BuildConfig, resolve  # noqa: E402
from pipeline.work import WorkDir  # noqa: E402


def build_direct(cfg: BuildConfig) -> dict:
    """The flow's work without Prefect: same chunk groups, same threads, same order."""
    build = resolve(cfg)
    work = WorkDir(cfg.out)
    work.claim(build.fingerprint, build.described, build.inputs)
    with work.lock():
        indices = range(len(stages.chunk_ids(build)))
        prepare = [name for name in stages.STAGE_NAMES if name != "validate"]
        with ThreadPoolExecutor(max_workers=8) as pool:  # the flow's ThreadPoolTaskRunner(8)
            reports = list(pool.map(lambda i: stages.run_chunk_stages(build, prepare, i), indices))
        reports += [stages.run_chunk_stages(build, ["validate"], i) for i in indices]
        return stages.finalize(build, reports)


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


def dataset_digest(cfg: BuildConfig, summary: dict) -> str:
    """What must not depend on the path: counts, per-stage counts and the published files
    that hold no timings or timestamps (rejections, EasyEdit export, card)."""
    digest = hashlib.sha256(json.dumps([summary["counts"], summary["stages"]]).encode())
    for name in ("rejected.jsonl", "easyedit/okedit.json"):
        digest.update((cfg.out / name).read_bytes())
    card = (cfg.out / "README.md").read_text().splitlines()
    digest.update("\n".join(line for line in card if "| seconds |" not in line).encode())
    return digest.hexdigest()[:16]


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU time of a process (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_server_pid() -> int | None:
    """The embedded API's server process (Prefect runs it as a subprocess)."""
    from prefect.server.api.server import SubprocessASGIServer

    for server in SubprocessASGIServer._instances.values():
        if server.server_process is not None:
            return server.server_process.pid
    return None


class StageClock:
    """Start and end of every stage-chunk run and of publishing, on both paths alike
    (`--breakdown`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []
        run_chunk, finalize = stages.run_chunk, stages.finalize

        def timed_run_chunk(build: Any, stage: str, index: int) -> Any:
            with self._timed(stage):
                return run_chunk(build, stage, index)

        def timed_finalize(*args: Any, **kwargs: Any) -> Any:
            with self._timed("finalize"):
                return finalize(*args, **kwargs)

        stages.run_chunk, stages.finalize = timed_run_chunk, timed_finalize

    @contextlib.contextmanager
    def _timed(self, name: str) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.calls.append((name, start, time.perf_counter()))

    def split(self, start: float, end: float) -> dict[str, float]:
        """Wall seconds: to the first chunk, per stage, between stages, after publishing."""
        spans: dict[str, list[float]] = {}
        for name, a, b in self.calls:
            span = spans.setdefault(name, [a, b])
            span[0], span[1] = min(span[0], a), max(span[1], b)
        ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
        out = {"to_first_chunk": ordered[0][1][0] - start}
        out |= {name: b - a for name, (a, b) in ordered}
        out["between_stages"] = sum(n[1][0] - p[1][1] for p, n in pairwise(ordered))
        out["after_publish"] = end - ordered[-1][1][1]
        self.calls.clear()
        return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="the demo's 40 by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--breakdown", action="store_true", help="wall time per stage and path")
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
    server = api_server_pid()
    clock = StageClock() if args.breakdown else None
    paths = {"direct": build_direct, "flow": build_flow, "flow_heartbeats": build_flow_heartbeats}
    times: dict[str, list[float]] = {path: [] for path in paths}
    cpu: dict[str, list[tuple]] = {path: [] for path in paths}
    splits: dict[str, list[dict]] = {path: [] for path in paths}
    digests: dict[str, set[str]] = {path: set() for path in paths}
    counts = {}
    for r in range(args.repeats):
        for path, fn in paths.items():
            cfg = config(f"{path}-{r}")
            cpu0 = (cpu_seconds(), cpu_seconds(server) if server else None)
            start = time.perf_counter()
            seconds, summary = timed(fn, cfg)
            if clock:
                splits[path].append(clock.split(start, start + seconds))
            time.sleep(1.0)  # the server records the last events after the run returns
            cpu1 = (cpu_seconds(), cpu_seconds(server) if server else None)
            cpu[path].append(
                tuple(b - a if a is not None else None for a, b in zip(cpu0, cpu1, strict=True))
            )
            times[path].append(seconds)
            counts[path] = summary["counts"]
            digests[path].add(dataset_digest(cfg, summary))
            print(f"run {r} {path:<15} {seconds:6.2f} s", file=sys.stderr)
    if len(set().union(*digests.values())) != 1:
        raise SystemExit(f"the paths built different datasets: {counts} {digests}")
    median = {path: statistics.median(t) for path, t in times.items()}
    direct, flowed = median["direct"], median["flow"]
    paired = [f - d for d, f in zip(times["direct"], times["flow"], strict=True)]

    def median_cpu(path: str, which: int) -> float | None:
        values = [c[which] for c in cpu[path] if c[which] is not None]
        return round(statistics.median(values), 2) if values else None

    def median_split(path: str) -> dict[str, float]:
        keys = splits[path][0].keys()
        return {k: round(statistics.median(s[k] for s in splits[path]), 3) for k in keys}

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
        "paired_overhead_s": round(statistics.median(paired), 2),  # median of flow - direct
        "ratio_heartbeats": round(median["flow_heartbeats"] / direct, 3),
        # CPU seconds per run (median), including 1 s after it for the server's backlog
        "cpu_s": {p: {"client": median_cpu(p, 0), "api_server": median_cpu(p, 1)} for p in paths},
        **({"breakdown_s": {p: median_split(p) for p in paths}} if clock else {}),
        "dataset_digest": digests["flow"].pop(),
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
