"""Annotation throughput: LLMAnnotator against the fake OpenAI-compatible server.

Every request waits `--latency` seconds at the server (200 ms by default, a fast hosted
model). Measures items/min at concurrency 1 and at concurrency 32 (one run each, fresh
caches), then re-runs the concurrency-32 items on the now warm cache and counts the
requests that reach the server (must be 0).

    .venv/bin/python bench/annotate_throughput.py [--latency 0.2] [--items-1 6] [--items-32 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.annotate import make_annotator  # noqa: E402
from schemas.record import Annotation, SourceItem  # noqa: E402
from tests.fixtures_servers import FakeOpenAIServer  # noqa: E402


def items(n: int, tag: str) -> list[SourceItem]:
    return [
        SourceItem(
            item_id=f"bench-{tag}-{i}",
            source="bench",
            question_id=str(i),
            image_id=str(i),
            question_type="other",
            question=f"What brand is the computer in picture {tag}-{i}?",
            answers=["dell"] * 10,
            image=b"",
        )
        for i in range(n)
    ]


def run(
    server: FakeOpenAIServer, cache: Path, batch: list[SourceItem], concurrency: int
) -> dict[str, Any]:
    annotator = make_annotator(
        {
            "llm": {
                "base_url": server.url,
                "model": "bench-model",
                "api_key": "sk-bench",
                "cache_path": str(cache),
                "concurrency": concurrency,
                "timeout_s": 30,
            }
        }
    )
    before = server.log.requests
    start = time.perf_counter()
    results = annotator.annotate(batch)
    seconds = time.perf_counter() - start
    annotator.client.close()
    kept = sum(isinstance(r, Annotation) for r in results)
    return {
        "concurrency": concurrency,
        "items": len(batch),
        "kept": kept,
        "seconds": round(seconds, 2),
        "items_per_min": round(len(batch) / seconds * 60, 1),
        "requests_sent": server.log.requests - before,
        "requests_per_s": round((server.log.requests - before) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--items-1", type=int, default=6)
    parser.add_argument("--items-32", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(latency_s=args.latency) as server:
        root = Path(tmp)
        one = run(server, root / "c1.sqlite", items(args.items_1, "c1"), 1)
        many = run(server, root / "c32.sqlite", items(args.items_32, "c32"), 32)
        warm = run(server, root / "c32.sqlite", items(args.items_32, "c32"), 32)
    report = {
        "latency_s": args.latency,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "runs": {"concurrency_1": one, "concurrency_32": many, "warm_cache_32": warm},
        "speedup_32_vs_1": round(many["items_per_min"] / one["items_per_min"], 1),
    }
    print(json.dumps(report, indent=2))
    print()
    print("| run | items | seconds | items/min | requests sent |")
    print("|---|---:|---:|---:|---:|")
    for name, r in report["runs"].items():
        cells = [name, r["items"], r["seconds"], r["items_per_min"], r["requests_sent"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nspeed-up concurrency 32 vs 1: {report['speedup_32_vs_1']}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if warm["requests_sent"] != 0:
        sys.exit("warm-cache re-run sent requests")


if __name__ == "__main__":
    main()
