"""Stability of the item check across render seeds and model seeds (issue 12, item 2).

The same flagworld items (one build: `--build-seed`, every item unless `--items`) are
validated with the default validation settings under every combination of

* a render seed of the image probes (`--render-seeds`, default 0 1 2): `image_rephrases` and
  `locality_images` re-drawn by the render backend with that seed, the annotations and the
  edit image unchanged (render seed = build seed is the build itself), and
* a model (`--models`): the shipped tiny flagworld VLM (seed 0) and independently trained
  ones (default: the seed-1 model in `.okedit-cache/tiny-flagworld-seed1`; train it with
  `okedit tiny-model train --seed 1 --out .okedit-cache/tiny-flagworld-seed1`).

Reported: agreement of `validation.check.status` over all runs (share of items with the
same status in every run), mean pairwise agreement, agreement across render seeds only
(per model) and across models only (per render seed); goal ≥ 0.95. Beside it the editor
outcome's spread over the same runs: verdict agreement, and per metric the mean over items
of the standard deviation across runs.

    .venv/bin/python bench/check_stability.py [--render-seeds 0 1 2] [--models shipped PATH]
        [--items N] [--threads 1] [--out docs/img/check_stability.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402
from defects import (  # noqa: E402
    build_flagworld,
    code_version,
    machine,
    model_config_for,
    validate,
)

from editors.adapters import load_model  # noqa: E402
from schemas.record import OkeditRecord  # noqa: E402

GOAL = 0.95  # issue 12, item 2
SHIPPED = "shipped"
DEFAULT_SEED1 = Path(".okedit-cache/tiny-flagworld-seed1")
METRICS = (
    "reliability",
    "text_generality",
    "image_generality",
    "locality_label",
    "locality_agreement",
    "text_locality_agreement",
    "hm",
)


def run_key(model: str, render_seed: int) -> str:
    return f"{model} / render {render_seed}"


def model_label(model: str) -> str:
    return "seed 0 (shipped)" if model == SHIPPED else Path(model).name


def validated_runs(
    models: list[str], render_seeds: list[int], build_seed: int, limit: int | None
) -> tuple[dict[str, dict[str, OkeditRecord]], dict[str, float]]:
    """Per run (model x render seed): item id -> validated record; and seconds per run."""
    builds = {r: build_flagworld(limit, build_seed, render_seed=r) for r in render_seeds}
    runs: dict[str, dict[str, OkeditRecord]] = {}
    seconds: dict[str, float] = {}
    for model in models:
        config = model_config_for(None if model == SHIPPED else Path(model))
        adapter = load_model(config)
        for r in render_seeds:
            start = time.perf_counter()
            validated = validate(builds[r], adapter, config)
            key = run_key(model, r)
            seconds[key] = round(time.perf_counter() - start, 1)
            runs[key] = {rec.item_id: rec for rec in validated}
            print(f"{key}: {seconds[key]} s", flush=True)
    return runs, seconds


def agreement(values: dict[str, dict[str, str]], keys: list[str], items: list[str]) -> float:
    """Share of `items` whose value is the same in every run of `keys`."""
    same = sum(len({values[k][i] for k in keys}) == 1 for i in items)
    return same / len(items) if items else float("nan")


def pairwise(values: dict[str, dict[str, str]], keys: list[str], items: list[str]) -> float:
    """Mean over run pairs of the share of items with the same value in both."""
    pairs = list(itertools.combinations(keys, 2))
    if not pairs or not items:
        return float("nan")
    return mean(sum(values[a][i] == values[b][i] for i in items) / len(items) for a, b in pairs)


def agreement_report(
    values: dict[str, dict[str, str]],
    models: list[str],
    render_seeds: list[int],
    items: list[str],
) -> dict[str, Any]:
    keys = [run_key(m, r) for m in models for r in render_seeds]
    return {
        "all_runs": agreement(values, keys, items),
        "pairwise": pairwise(values, keys, items),
        "across_render_seeds": {
            model_label(m): agreement(values, [run_key(m, r) for r in render_seeds], items)
            for m in models
        },
        "across_models": {
            f"render {r}": agreement(values, [run_key(m, r) for m in models], items)
            for r in render_seeds
        },
        "per_run": {k: dict(Counter(values[k][i] for i in items)) for k in keys},
    }


def reason_codes(record: OkeditRecord) -> str:
    """The item's check reasons as a sorted `code probe` list (dropped ones marked)."""
    return "; ".join(
        sorted(
            f"{r.code} {r.probe}".strip() + (" (dropped)" if r.dropped else "")
            for r in record.validation.check.reasons
        )
    )


def metric_spread(
    runs: dict[str, dict[str, OkeditRecord]], keys: list[str], items: list[str]
) -> dict[str, dict[str, float]]:
    """Per metric: the mean over items of the std across runs (items measured in every run),
    and the std across runs of the run means."""
    out: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        rows = [
            [getattr(runs[k][i].validation.metrics, metric) for k in keys]
            for i in items
            if all(getattr(runs[k][i].validation.metrics, metric) >= 0 for k in keys)
        ]
        if not rows:
            continue
        run_means = [mean(col) for col in zip(*rows, strict=True)]
        out[metric] = {
            "items": len(rows),
            "mean": mean(run_means),
            "item_std": mean(pstdev(row) for row in rows),
            "run_mean_std": pstdev(run_means),
            "run_mean_min": min(run_means),
            "run_mean_max": max(run_means),
        }
    return out


def run(
    models: list[str], render_seeds: list[int], build_seed: int, limit: int | None
) -> dict[str, Any]:
    runs, seconds = validated_runs(models, render_seeds, build_seed, limit)
    keys = list(runs)
    items = sorted(set.intersection(*(set(r) for r in runs.values())))
    status = {k: {i: runs[k][i].validation.check.status for i in items} for k in keys}
    reasons = {k: {i: reason_codes(runs[k][i]) for i in items} for k in keys}
    verdicts = {k: {i: runs[k][i].validation.verdict for i in items} for k in keys}
    unstable = [
        {
            "item_id": i,
            "status": {k: status[k][i] for k in keys},
            "reasons": {k: reasons[k][i] for k in keys},
        }
        for i in items
        if len({status[k][i] for k in keys}) > 1
    ]
    return {
        "models": models,
        "render_seeds": render_seeds,
        "build_seed": build_seed,
        "items": len(items),
        "run_seconds": seconds,
        "goal": GOAL,
        "check": agreement_report(status, models, render_seeds, items),
        "check_reasons": agreement_report(reasons, models, render_seeds, items),
        "verdict": agreement_report(verdicts, models, render_seeds, items),
        "metrics": metric_spread(runs, keys, items),
        "unstable_items": unstable,
    }


# ---------------------------------------------------------------------------- report


def _f(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    models, seeds = report["models"], report["render_seeds"]
    n_runs = len(models) * len(seeds)
    lines = [
        f"| outcome | all {n_runs} runs agree | pairwise | across render seeds "
        "(per model) | across models (per render seed) |",
        "|---|---:|---:|---|---|",
    ]
    for name, key in (
        ("check status", "check"),
        ("check reasons (codes + probes)", "check_reasons"),
        ("editor verdict", "verdict"),
    ):
        block = report[key]
        render = " / ".join(_f(v) for v in block["across_render_seeds"].values())
        model = " / ".join(_f(v) for v in block["across_models"].values())
        lines.append(
            f"| {name} | {_f(block['all_runs'])} | {_f(block['pairwise'])} | {render} | {model} |"
        )
    lines += ["", "| run | " + " | ".join(("sound", "unsound", "model_gap", "not_run")) + " |"]
    lines.append("|---|" + "---:|" * 4)
    for key, counts in report["check"]["per_run"].items():
        cells = [str(counts.get(s, 0)) for s in ("sound", "unsound", "model_gap", "not_run")]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| editor metric | mean | std across runs, per item (mean) | run means: std | min – max |",
        "|---|---:|---:|---:|---|",
    ]
    for metric, stats in report["metrics"].items():
        lines.append(
            f"| {metric} | {_f(stats['mean'])} | {_f(stats['item_std'])} | "
            f"{_f(stats['run_mean_std'])} | {_f(stats['run_mean_min'])} – "
            f"{_f(stats['run_mean_max'])} |"
        )
    verdicts = report["verdict"]["per_run"]
    lines += [
        "",
        "Editor verdicts per run: "
        + "; ".join(
            f"{k}: " + ", ".join(f"{v} {n}" for v, n in sorted(c.items()))
            for k, c in verdicts.items()
        ),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[SHIPPED, str(DEFAULT_SEED1)],
        help=f"'{SHIPPED}' or a model folder",
    )
    parser.add_argument("--build-seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=None, help="items of the build (all: 184)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/img/check_stability.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for model in args.models:
        if model != SHIPPED and not (Path(model) / "config.json").exists():
            raise SystemExit(
                f"no model at {model}: train it with `okedit tiny-model train --seed 1 --out "
                f"{model}` or pass --models {SHIPPED} PATH"
            )
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    report = run(args.models, args.render_seeds, args.build_seed, args.items)
    report |= {
        "wall_s": round(time.perf_counter() - wall, 1),
        "command": " ".join(
            [".venv/bin/python", "bench/check_stability.py", *(argv or sys.argv[1:])]
        ),
        "code": code_version(),
        "machine": machine(args.threads),
        "model_accuracy": {m: model_accuracy(m) for m in args.models},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    for item in report["unstable_items"]:
        print(f"unstable {item['item_id']}: {item['status']}")
    print(f"\nwall {report['wall_s']:.0f} s; wrote {args.out}")
    return report


def model_accuracy(model: str) -> dict[str, Any]:
    """The model's recorded accuracy on fresh renders (its metrics.json)."""
    from pipeline.tiny_model import METRICS_FILE, default_model_dir

    path = default_model_dir() if model == SHIPPED else Path(model)
    metrics = json.loads((path / METRICS_FILE).read_text())
    keys = ("train_templates", "heldout_templates", "paraphrase_templates")
    return {"seed": metrics.get("seed"), **{k: metrics["eval"].get(k) for k in keys}}


if __name__ == "__main__":
    main()
