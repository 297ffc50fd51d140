"""Edit speed: per-item validation time (edit + all probes) of the fast path vs the
straightforward loop, on the same random-weight models and the same items (issue 3 part 6).

* fast — one clean pass per item caches the wrapped module's input and the residual for every
  probe: each unique image through the vision tower once, the rows that show the same image
  share their common prefix (image tokens + template; computed once, its KV cache repeated
  over the rows, only the suffixes run), the other rows run as one batch; the 50 Adam steps
  and the edited probes run only the tail (`lm_head(norm(resid + copy(x)))`).
* slow — the straightforward loop: every training step is a full forward + backward, keys and
  probes run one full forward each, pre and post.

Greedy generation (`EditorConfig.generate_answers`) is off by default: the issue's fast/slow
definition is about the edit and the probes' logits. `--generate` turns it on in both paths, as
the validate stage runs by default: the fast path then decodes every probe's answer from its
capture's KV cache in batched steps (`editors.decoding`), the slow path calls `generate` per
probe (`bench/generation_speed.py` times generation alone).

Models (random weights, built from configs, nothing downloaded):
* tiny — the flagworld VLM's architecture (design §9): LLaVA, CLIP 2×128 at 64 px / patch 16,
  Llama 2×192 (~1.2 M parameters);
* blip2-opt300m — BLIP-2 with a ViT-B/16 vision tower at 224 px, a 2-layer Q-Former with 32
  queries, and OPT with 24 layers of width 1024 (~300 M parameters).

Each (model, path) runs in its own process (same seeds -> same weights and items) so that
peak memory (ru_maxrss) is per path. `--profile` adds, in the fast process, a per-stage
timing of one item with and without prefix sharing. Usage:

    .venv/bin/python bench/edit_speed.py --items-tiny 4 --items-blip2 2 --threads 1 --profile

`--batch-items N` (issue 17) instead times the fast path through the real validate stage
(`pipeline.validate.validate_records`) one item at a time and N items together, in one
process on the same model and items (alternating rounds, the fastest of each), and checks
that both give the same results (verdicts, answers, routing and check status exactly; floats
within 1e-5 relative or 1e-6 absolute).
The item check's sentence model is left out (the same per-item work either way):

    .venv/bin/python bench/edit_speed.py --models tiny --items-tiny 16 --batch-items 8 --generate
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = {
    "red": (200, 16, 46),
    "white": (245, 245, 245),
    "blue": (0, 56, 168),
    "green": (0, 146, 70),
    "yellow": (252, 209, 22),
    "black": (20, 20, 20),
    "orange": (255, 130, 0),
}
CITIES = ["paris", "lyon", "rome", "milan", "dublin", "cork", "berlin", "bonn", "oslo", "bergen"]
REPHRASES = [
    "which city is the capital of the country with this flag ?",
    "name the capital city of the country shown by this flag ?",
    "what city is the seat of government of this flag 's country ?",
    "the country with this flag has which capital ?",
    "tell me the capital of the nation whose flag this is ?",
    "what is the capital city of this flag 's nation ?",
    "which city serves as capital for the country of this flag ?",
    "identify the capital of the country this flag belongs to ?",
    "what is this flag 's country capital city ?",
    "the capital of the country flying this flag is which city ?",
    "in which city is the government of this flag 's country ?",
    "what city is capital of the state with this flag ?",
    "the flag shown belongs to a country whose capital is what ?",
]
QUESTION = "what is the capital of the country with this flag ?"
TEXT_NEGATIVES = [
    ("what is the currency of the country with this flag ?", "euro"),
    ("what is the language of the country with this flag ?", "french"),
]
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "family": "llava",
        "text_overrides": {
            "hidden_size": 192,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "vision_overrides": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        "config_overrides": {},
        "preset": "tiny-flagworld",
    },
    "blip2-opt300m": {
        "family": "blip2",
        "text_overrides": {
            "hidden_size": 1024,
            "ffn_dim": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        "vision_overrides": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        "config_overrides": {
            "num_query_tokens": 32,
            "qformer_config": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 2,
                "num_attention_heads": 12,
                "encoder_hidden_size": 768,
                "cross_attention_frequency": 1,
            },
        },
        "preset": "default",
    },
}


def flag(colours: list[str], seed: int, size: int = 96) -> bytes:
    """A tricolour, re-rendered with a random scale, shift, rotation and blur per seed."""
    rng = random.Random(seed)
    base = Image.new("RGB", (size * 3 // 2, size), COLOURS[colours[0]])
    for i, name in enumerate(colours):
        stripe = Image.new("RGB", (size // 2, size), COLOURS[name])
        base.paste(stripe, (i * size // 2, 0))
    canvas = Image.new("RGB", (size * 2, size * 2), (rng.randint(90, 160),) * 3)
    scale = rng.uniform(0.7, 1.0)
    small = base.resize((int(base.width * scale), int(base.height * scale)))
    small = small.rotate(rng.uniform(-8, 8), expand=True, fillcolor=canvas.getpixel((0, 0)))
    canvas.paste(small, (rng.randint(0, size // 3), rng.randint(0, size // 2)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def bench_adapter(model: str) -> Any:
    """The random model of `MODELS[model]` (its shapes, seed 0)."""
    from editors.adapters.random_models import random_adapter

    spec = MODELS[model]
    return random_adapter(
        spec["family"],
        corpus(),
        seed=0,
        text_overrides=spec["text_overrides"],
        vision_overrides=spec["vision_overrides"],
        config_overrides=spec["config_overrides"],
    )


def make_records(n: int, seed: int = 0) -> list[Any]:
    """OKEDIT-shaped items: 10 rephrases, 10 image rephrases, a near-miss locality image,
    a training near-miss, 2 text negatives."""
    from schemas.record import OkeditRecord, TextNegative

    rng = random.Random(seed)
    names = list(COLOURS)
    records = []
    for i in range(n):
        colours = rng.sample(names, 3)
        near = [colours[0], colours[1], rng.choice([c for c in names if c != colours[2]])]
        near_train = [rng.choice([c for c in names if c != colours[0]]), colours[1], colours[2]]
        answer, target, loc, loc_train = rng.sample(CITIES, 4)
        records.append(
            OkeditRecord(
                item_id=f"bench-{i}",
                source="bench",
                question_id=str(i),
                image_id=str(i),
                question_type="capital",
                image=flag(colours, seed * 1000 + i),
                question=QUESTION,
                answers=[answer] * 10,
                original_answer=answer,
                majority_answer=answer,
                image_object="a flag",
                target=target,
                counterfact_type="text",
                counterfact_votes=["text"] * 3,
                counterfact_reason="bench",
                rephrases=REPHRASES[:10],
                rephrases_train=REPHRASES[10:],
                image_rephrases=[
                    flag(colours, seed * 1000 + i + 7919 * (k + 1)) for k in range(10)
                ],
                locality_answer=loc,
                locality_image_object="a flag",
                locality_images=[flag(near, seed + i + 1)],
                locality_answer_train=loc_train,
                locality_image_train_object="a flag",
                locality_image_train=flag(near_train, seed + i + 2),
                text_negatives=[TextNegative(question=q, answer=a) for q, a in TEXT_NEGATIVES],
                provenance=[],
            )
        )
    return records


def corpus() -> list[str]:
    return [QUESTION, *REPHRASES, *CITIES, *(f"{q} {a}" for q, a in TEXT_NEGATIVES)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


PROFILED = {  # sub-modules timed by --profile, per family
    "blip2": {"vision tower": "vision_model", "Q-Former": "qformer"},
    "llava": {"vision tower": "model.vision_tower"},
}


def profile_item(adapter: Any, editor: Any, record: Any, shares_prefix: bool) -> dict[str, Any]:
    """Seconds per stage of one fast-path item: inputs, the clean capture (vision tower,
    Q-Former and each language-model forward, by shape, inside it), the edit, the pre and
    post logits."""
    from pipeline.scope import RADIUS_KINDS, build_probes

    times: dict[str, float] = {}
    forwards: list[dict[str, Any]] = []
    starts: dict[str, float] = {}

    def pre(name: str):
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            starts[name] = time.perf_counter()

        return hook

    def post(name: str):
        def hook(module: Any, args: Any, kwargs: Any, out: Any) -> None:
            elapsed = time.perf_counter() - starts[name]
            if name == "lm":
                ids = kwargs.get("input_ids")
                embeds = kwargs.get("inputs_embeds")
                shape = tuple((ids if ids is not None else embeds).shape[:2])
                forwards.append({"shape": shape, "seconds": elapsed})
            else:
                times[name] = times.get(name, 0.0) + elapsed

        return hook

    modules = {
        name: adapter.model.get_submodule(path)
        for name, path in PROFILED.get(adapter.family, {}).items()
    }
    modules["lm"] = adapter.text_model()
    hooks = []
    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        hooks.append(module.register_forward_hook(post(name), with_kwargs=True))
    adapter.shares_prefix = shares_prefix
    try:
        probes = build_probes(record, editor.config)
        start = time.perf_counter()
        batch = adapter.build_inputs(
            [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
        )
        times["build inputs"] = time.perf_counter() - start
        start = time.perf_counter()
        capture = adapter.capture(batch, editor.path)
        times["capture"] = time.perf_counter() - start
        kinds = [p.kind for p in probes]
        rows = [kinds.index(k) for k in RADIUS_KINDS if k in kinds]
        start = time.perf_counter()
        editor.edit_rows(batch, capture, [rows], [record.target])
        times["edit (50 tail steps)"] = time.perf_counter() - start
        start = time.perf_counter()
        editor.clean_target_logits(batch, capture)
        editor.evaluate(batch, capture)
        times["pre + post logits"] = time.perf_counter() - start
    finally:
        editor.restore()
        del adapter.shares_prefix  # back to the family default
        for hook in hooks:
            hook.remove()
    return {
        "shares_prefix": shares_prefix,
        "batch": list(batch.input_ids.shape),
        "real_tokens": int(batch.attention_mask.sum()),
        "unique_images": len(set(batch.image_index)),
        "groups": [[len(r), p] for r, p in adapter.prefix_groups(batch)] if shares_prefix else [],
        "stages": times,
        "lm_forwards": forwards,
    }


def run_path(
    model: str, fast: bool, items: int, threads: int, generate: bool = False, profile: bool = False
) -> dict[str, Any]:
    """Child process: build the model, validate `items` records on one path, report."""
    import torch

    torch.set_num_threads(threads)
    from editors.config import EditorConfig
    from pipeline.scope import make_editor, validate_record

    spec = MODELS[model]
    start = time.perf_counter()
    adapter = bench_adapter(model)
    build_s = time.perf_counter() - start
    records = make_records(items)
    config = EditorConfig.for_model(spec["preset"], fast=fast, generate_answers=generate)
    editor = make_editor(adapter, config)
    # Warm-up (untimed, both processes alike): one fast-path item with 2 training steps runs
    # every kind of kernel once (vision, LM forward, backward, Adam).
    warm = make_editor(adapter, config.model_copy(update={"steps": 2, "fast": True}))
    validate_record(make_records(1, seed=99)[0], warm, model)
    rss_ready = _rss_mb()
    validations = [validate_record(r, editor, model) for r in records]
    profiles = (
        [profile_item(adapter, editor, records[0], shares) for shares in (False, True)]
        if profile and fast
        else []
    )
    lm = adapter.text_model()
    return {
        "model": model,
        "path": "fast" if fast else "slow",
        "params_total_m": sum(p.numel() for p in adapter.model.parameters()) / 1e6,
        "params_lm_m": sum(p.numel() for p in lm.parameters()) / 1e6,
        "build_s": build_s,
        "seconds": [v.seconds for v in validations],
        "edit_seconds": [json.loads(v.edit_config)["edit_seconds"] for v in validations],
        "verdicts": [v.verdict for v in validations],
        "reasons": [v.reason for v in validations],
        "probes": [[p.model_dump() for p in v.probes] for v in validations],
        "edit_config": json.loads(validations[0].edit_config),
        "rss_ready_mb": rss_ready,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
        "generate_answers": generate,
        "profiles": profiles,
    }


def run_batched(
    model: str, items: int, threads: int, generate: bool, batch_items: int, repeats: int
) -> dict[str, Any]:
    """Child process: the fast path through `validate_records`, one item at a time and
    `batch_items` together, same model and items, `repeats` alternating rounds; the fastest
    round's seconds of each and whether the results agree."""
    import torch

    torch.set_num_threads(threads)
    from editors.config import EditorConfig, ModelConfig
    from pipeline.check import CheckConfig
    from pipeline.validate import validate_records

    spec = MODELS[model]
    adapter = bench_adapter(model)
    config = EditorConfig.for_model(spec["preset"], generate_answers=generate)
    records = make_records(items)
    check = CheckConfig(text_similarity=False)

    def validate(n: int, chosen: list[Any]) -> tuple[list[Any], float]:
        start = time.perf_counter()
        out = validate_records(
            chosen, config, ModelConfig(model=model), adapter, False, check, batch_items=n
        )
        return out, time.perf_counter() - start

    validate(batch_items, make_records(batch_items, seed=99))  # warm-up: every kernel once
    # Alternating rounds, the fastest of each: a shared machine's load comes and goes.
    one_s = together_s = math.inf
    for _ in range(repeats):
        one, seconds = validate(1, records)
        one_s = min(one_s, seconds)
        together, seconds = validate(batch_items, records)
        together_s = min(together_s, seconds)
    return {
        "model": model,
        "items": items,
        "batch_items": batch_items,
        "repeats": repeats,
        "threads": threads,
        "generate_answers": generate,
        "one_s_per_item": one_s / items,
        "batched_s_per_item": together_s / items,
        "speedup": one_s / together_s,
        **same_results(one, together),
        "verdicts": [r.validation.verdict for r in together],
    }


def same_results(one: list[Any], together: list[Any]) -> dict[str, Any]:
    """Whether two validations of the same records agree: exactly on verdicts, answers,
    routing and check status; the largest float difference elsewhere (wall times aside)."""
    worst = {"abs": 0.0, "rel": 0.0}
    exact = True

    def walk(a: Any, b: Any) -> None:
        nonlocal exact
        if isinstance(a, dict):
            for key in a:
                if key not in ("seconds", "edit_seconds"):
                    walk(a[key], b[key])
        elif isinstance(a, list | tuple):
            exact = exact and len(a) == len(b)
            for x, y in zip(a, b, strict=False):
                walk(x, y)
        elif isinstance(a, float) and math.isfinite(a):
            worst["abs"] = max(worst["abs"], abs(a - b))
            if abs(a - b) > 1e-6:  # relative error of values well away from 0
                worst["rel"] = max(worst["rel"], abs(a - b) / max(abs(a), abs(b)))
        elif isinstance(a, str) and a.startswith("{"):
            walk(json.loads(a), json.loads(b))
        else:
            exact = exact and a == b

    for a, b in zip(one, together, strict=True):
        walk(a.model_dump(), b.model_dump())
    return {
        "same_exact_fields": exact,
        "max_abs_float_diff": worst["abs"],
        "max_rel_float_diff": worst["rel"],
        "same_results": exact and worst["rel"] <= 1e-5,
    }


def compare(fast: dict[str, Any], slow: dict[str, Any]) -> dict[str, Any]:
    d_dist = d_acc = 0.0
    for pf, ps in zip(fast["probes"], slow["probes"], strict=True):
        for a, b in zip(pf, ps, strict=True):
            d_dist = max(d_dist, abs(a["distance"] - b["distance"]))
            d_acc = max(d_acc, abs(a["post_accuracy"] - b["post_accuracy"]))
    fast_s, slow_s = statistics.mean(fast["seconds"]), statistics.mean(slow["seconds"])
    fast_edit, slow_edit = (
        statistics.mean(fast["edit_seconds"]),
        statistics.mean(slow["edit_seconds"]),
    )
    return {
        "fast_s_per_item": fast_s,
        "slow_s_per_item": slow_s,
        "ratio": slow_s / fast_s,
        "fast_edit_s": fast_edit,
        "slow_edit_s": slow_edit,
        "edit_ratio": slow_edit / fast_edit,
        "same_verdicts": fast["verdicts"] == slow["verdicts"],
        "same_answers": _answers(fast) == _answers(slow),
        "max_abs_distance_diff": d_dist,
        "max_abs_post_accuracy_diff": d_acc,
    }


def _answers(run: dict[str, Any]) -> list[tuple[str, str]]:
    """Every probe's greedy answers (pre, post); empty strings when generation is off."""
    return [(p["pre_answer"], p["post_answer"]) for probes in run["probes"] for p in probes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items-tiny", type=int, default=4)
    parser.add_argument("--items-blip2", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--models", default="tiny,blip2-opt300m")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--generate", action="store_true", help="greedy answers too (both paths)")
    parser.add_argument(
        "--profile", action="store_true", help="fast-path stage timings, with and without sharing"
    )
    parser.add_argument(
        "--batch-items",
        type=int,
        default=1,
        help="> 1: time N items validated together against one at a time (fast path)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --batch-items")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = {"tiny": args.items_tiny, "blip2-opt300m": args.items_blip2}
    results = []
    context = get_context("spawn")
    if args.batch_items > 1:
        for model in args.models.split(","):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(
                    run_batched,
                    model,
                    counts[model],
                    args.threads,
                    args.generate,
                    args.batch_items,
                    args.repeats,
                ).result()
            results.append(result)
            print(json.dumps(result), flush=True)
        print()
        print(batched_markdown(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    for model in args.models.split(","):
        runs = {}
        for fast in (True, False):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                runs[fast] = pool.submit(
                    run_path, model, fast, counts[model], args.threads, args.generate, args.profile
                ).result()
            run = runs[fast]
            print(
                f"{model} {run['path']}: {statistics.mean(run['seconds']):.3f} s/item "
                f"{[round(s, 3) for s in run['seconds']]} peak RSS {run['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        summary = {"model": model, **compare(runs[True], runs[False]), "runs": runs}
        results.append(summary)
        print(
            f"{model}: ratio {summary['ratio']:.1f}x, same verdicts {summary['same_verdicts']}, "
            f"same answers {summary['same_answers']}, "
            f"max |d_fast - d_slow| {summary['max_abs_distance_diff']:.2e}",
            flush=True,
        )
    print()
    print(markdown(results, args))
    for r in results:
        for profile in r["runs"][True]["profiles"]:
            print()
            print(profile_markdown(r["model"], profile))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def profile_markdown(model: str, profile: dict[str, Any]) -> str:
    """One profiled fast-path item as a small table (seconds)."""
    stages = dict(profile["stages"])
    inside = {k: stages.pop(k) for k in ("vision tower", "Q-Former") if k in stages}
    lm = profile["lm_forwards"]
    lm_s = sum(f["seconds"] for f in lm)
    capture = stages.pop("capture")
    sharing = (
        f"prefix sharing on, groups (rows, prefix) {profile['groups']}"
        if profile["shares_prefix"]
        else "prefix sharing off (one plain batched forward)"
    )
    lines = [
        f"Fast-path profile, {model}, one item: batch {profile['batch']} "
        f"({profile['real_tokens']} real tokens, {profile['unique_images']} unique images), "
        f"{sharing}.",
        "",
        "| stage | s |",
        "|---|---|",
        f"| build inputs | {stages.pop('build inputs'):.3f} |",
        f"| capture | {capture:.3f} |",
        *(f"| — {name} | {seconds:.3f} |" for name, seconds in inside.items()),
        *(f"| — LM forward {tuple(f['shape'])} | {f['seconds']:.3f} |" for f in lm),
        f"| — rest (embedding, cache, assembly) | {capture - lm_s - sum(inside.values()):.3f} |",
        *(f"| {name} | {seconds:.3f} |" for name, seconds in stages.items()),
        f"| **total** | {capture + sum(profile['stages'][k] for k in stages):.3f} |",
    ]
    return "\n".join(lines)


def batched_markdown(results: list[dict[str, Any]]) -> str:
    """The --batch-items comparison as a small table."""
    lines = [
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}.",
        "",
        "| model | items | answers | threads | one at a time s/item | batched (N) s/item "
        "| speedup | same results | max rel / abs float diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['items']} | {'yes' if r['generate_answers'] else 'no'} "
            f"| {r['threads']} | {r['one_s_per_item']:.3f} "
            f"| {r['batched_s_per_item']:.3f} ({r['batch_items']}) | {r['speedup']:.2f}× "
            f"| {r['same_results']} | {r['max_rel_float_diff']:.1e} / "
            f"{r['max_abs_float_diff']:.1e} |"
        )
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"torch threads {args.threads}, Python {platform.python_version()}.",
        "",
        "| model | params (LM) | items | fast s/item | slow s/item | ratio | edit alone: fast / "
        "slow s (ratio) | peak RSS fast / slow | same verdicts | max Δd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fast, slow = r["runs"][True], r["runs"][False]
        lines.append(
            f"| {r['model']} | {fast['params_total_m']:.1f} M ({fast['params_lm_m']:.1f} M) "
            f"| {len(fast['seconds'])} | {r['fast_s_per_item']:.3f} | {r['slow_s_per_item']:.3f} "
            f"| {r['ratio']:.1f}× | {r['fast_edit_s']:.3f} / {r['slow_edit_s']:.3f} "
            f"({r['edit_ratio']:.0f}×) | {fast['peak_rss_mb']:.0f} / {slow['peak_rss_mb']:.0f} MB "
            f"| {r['same_verdicts']} | {r['max_abs_distance_diff']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
