"""The key-variant experiment over several independently trained tiny VLMs (issue 3).

The validate stage routes with `last_prompt` (`pipeline/config.py::VALIDATION_KEY_VARIANT`),
a choice measured on the shipped tiny flagworld VLM (seed 0) alone. This runs the key-variant
experiment of `bench/tradeoff.py` (every key variant x {near-miss, black} image negative on
the flagworld capital edits, the same records for every model) on one tiny VLM per seed:
seed 0 is the shipped model, the others are trained with the shipped recipe into
`--models-dir` (a model already there is reused, so reruns only re-run the experiment).

Writes `--out` (default `docs/img/key_seeds.json`: per seed, each model's accuracy and the
per-variant metrics) and prints, per negative, each variant's mean ± sd and min over seeds of
I-Gen, near Loc, text Loc (agreement), HM5 and % ok, and how many seeds rank it best by HM5.

    .venv/bin/python bench/key_seeds.py [--seeds 0 1 2 3 4] [--models-dir DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402
import transformers  # noqa: E402
from tradeoff import NEGATIVES, VARIANTS, run  # noqa: E402

from pipeline.tiny_model import (  # noqa: E402
    METRICS_FILE,
    TARGETS,
    TinyVLMRecipe,
    default_model_dir,
    train_flagworld_vlm,
)

SHIPPED_SEED = 0
ACCURACY_KEYS = ("train_templates", "heldout_templates", "paraphrase_templates")
# Reported per variant: (column name, key in bench/tradeoff.py's summary).
METRICS = (
    ("I-Gen", "I-Gen"),
    ("near Loc", "Loc near (agree)"),
    ("text Loc", "Loc text (agree)"),
    ("HM5", "HM5"),
    ("% ok", "ok"),
)
TIE = 1e-9  # HM5 values this close count as a shared best


def default_models_dir() -> Path:
    return Path(tempfile.gettempdir()) / "okedit-key-seeds"


# ------------------------------------------------------------------------------ models


def is_trained(path: Path, seed: int) -> bool:
    """A finished model of the shipped recipe for `seed` (weights and metrics on disk)."""
    metrics_path = path / METRICS_FILE
    if not (path / "model.safetensors").exists() or not metrics_path.exists():
        return False
    metrics = json.loads(metrics_path.read_text())
    return (
        metrics.get("seed") == seed
        and metrics.get("steps") == TinyVLMRecipe.steps
        and not metrics.get("stopped_by_budget", False)
        and "eval" in metrics
    )


def model_for_seed(seed: int, models_dir: Path, threads: int) -> tuple[Path, bool]:
    """The model of `seed`: the shipped one for seed 0, else trained into `models_dir` (or
    reused from there). Returns the path and whether it was trained by this run."""
    if seed == SHIPPED_SEED:
        return default_model_dir(), False
    path = models_dir / f"seed-{seed}"
    if is_trained(path, seed):
        print(f"seed {seed}: reusing {path}", flush=True)
        return path, False
    print(f"seed {seed}: training into {path}", flush=True)
    train_flagworld_vlm(path, seed=seed, num_threads=threads)
    return path, True


def model_accuracy(path: Path) -> dict[str, Any]:
    """Teacher-forced accuracy on fresh renders, as recorded by the training run."""
    metrics = json.loads((path / METRICS_FILE).read_text())
    accuracy: dict[str, Any] = {k: metrics["eval"][k] for k in ACCURACY_KEYS}
    accuracy["meets_targets"] = all(metrics["eval"][k] >= v for k, v in TARGETS.items())
    accuracy["train_seconds"] = metrics.get("train_seconds")
    accuracy["torch_threads"] = metrics.get("versions", {}).get("torch_threads")
    return accuracy


# -------------------------------------------------------------------------- experiment


def run_seed(
    seed: int, models_dir: Path, threads: int, limit: int, data_seed: int
) -> dict[str, Any]:
    """Model of `seed` (trained if needed), its accuracy and its key-variant table."""
    start = time.perf_counter()
    path, trained = model_for_seed(seed, models_dir, threads)
    train_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    start = time.perf_counter()
    report = run(limit, data_seed, path, ("key_variants",))
    return {
        "model": str(path),
        "trained_here": trained,
        "train_wall_s": round(train_s, 1),
        "experiment_wall_s": round(time.perf_counter() - start, 1),
        "accuracy": model_accuracy(path),
        "items": report["items"],
        "key_variants": report["key_variants"],
        "key_variant_routing": report["key_variant_routing"],
        "key_geometry": report["key_geometry"],
    }


# ----------------------------------------------------------------------------- summary


def best_variants(rows: dict[str, dict[str, float]], negative: str) -> list[str]:
    """The variants with the highest HM5 for `negative` (several when tied)."""
    hm = {v: rows[f"{v} / {negative}"]["HM5"] for v in VARIANTS}
    top = max(hm.values())
    return [v for v, h in hm.items() if h >= top - TIE]


def aggregate(per_seed: dict[str, dict[str, Any]], negative: str) -> dict[str, dict[str, Any]]:
    """Per variant: mean, sd and min over seeds of each reported metric, and the number of
    seeds where it has the best HM5 (ties count for every tied variant)."""
    wins = {v: 0 for v in VARIANTS}
    for result in per_seed.values():
        for v in best_variants(result["key_variants"], negative):
            wins[v] += 1
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        rows = [r["key_variants"][f"{variant} / {negative}"] for r in per_seed.values()]
        stats: dict[str, Any] = {}
        for name, key in METRICS:
            values = [row[key] for row in rows]
            stats[name] = {
                "mean": mean(values),
                "sd": stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
            }
        stats["best HM5 (seeds)"] = wins[variant]
        out[variant] = stats
    return out


def _cell(stats: dict[str, float], scale: float) -> str:
    digits = 1 if scale != 1 else 3
    mean_, sd, low = (stats[k] * scale for k in ("mean", "sd", "min"))
    return f"{mean_:.{digits}f} ± {sd:.{digits}f} ({low:.{digits}f})"


def markdown_summary(summary: dict[str, dict[str, Any]], n_seeds: int) -> str:
    """Mean ± sd (min) over seeds per variant; % ok in percent."""
    names = [name for name, _ in METRICS]
    lines = [
        "| variant | " + " | ".join(names) + f" | best HM5 (of {n_seeds} seeds) |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for variant, stats in summary.items():
        cells = [_cell(stats[n], 100 if n == "% ok" else 1) for n in names]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {stats['best HM5 (seeds)']} |")
    return "\n".join(lines)


def markdown_per_seed(per_seed: dict[str, dict[str, Any]], negative: str) -> str:
    """HM5 (I-Gen / near Loc / text Loc) of every variant on every seed."""
    seeds = list(per_seed)
    lines = [
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for variant in VARIANTS:
        cells = []
        for s in seeds:
            row = per_seed[s]["key_variants"][f"{variant} / {negative}"]
            cells.append(
                f"{row['HM5']:.3f} ({row['I-Gen']:.2f} / {row['Loc near (agree)']:.2f} / "
                f"{row['Loc text (agree)']:.2f})"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_accuracy(per_seed: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| seed | training templates | held-out templates | paraphrase templates | "
        "meets 0.95 / 0.90 | train s (threads) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for s, result in per_seed.items():
        acc = result["accuracy"]
        flag = "yes" if acc["meets_targets"] else "**no**"
        label = f"{s} (shipped)" if int(s) == SHIPPED_SEED else s
        lines.append(
            f"| {label} | {acc['train_templates']:.3f} | {acc['heldout_templates']:.3f} | "
            f"{acc['paraphrase_templates']:.3f} | {flag} | "
            f"{acc['train_seconds']:.0f} ({acc['torch_threads']}) |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    per_seed = report["per_seed"]
    n = len(per_seed)
    parts = []
    for negative in NEGATIVES:
        parts += [
            f"Negative `{negative}`: mean ± sd (min) over {n} seeds; near/text Loc = agreement,"
            " % ok in percent:",
            "",
            markdown_summary(report["summary"][negative], n),
            "",
            f"Per seed, negative `{negative}`: HM5 (I-Gen / near Loc / text Loc):",
            "",
            markdown_per_seed(per_seed, negative),
            "",
        ]
    parts += ["Model accuracy (teacher-forced, fresh renders):", "", markdown_accuracy(per_seed)]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=46, help="capital edits (all: 46)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the edit records")
    parser.add_argument("--out", type=Path, default=Path("docs/img/key_seeds.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    per_seed = {
        str(seed): run_seed(seed, args.models_dir, args.threads, args.limit, args.data_seed)
        for seed in args.seeds
    }
    report = {
        "seeds": args.seeds,
        "data_seed": args.data_seed,
        "limit": args.limit,
        "variants": list(VARIANTS),
        "negatives": list(NEGATIVES),
        "metrics": dict(METRICS),
        "wall_s": round(time.perf_counter() - wall, 1),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": args.threads,
        },
        "summary": {neg: aggregate(per_seed, neg) for neg in NEGATIVES},
        "per_seed": per_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwall {report['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
