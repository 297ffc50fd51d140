"""Generation speed: greedy answers to every probe of an item, clean and edited, decoded from
the fast path's capture (`editors.decoding`: one batched step per token on the capture's KV
cache) vs `generate` one probe at a time (the slow path's way), same model, same items, same
process, one run; the answers must be identical.

Timed per item: *decode* = `greedy_answers` clean + edited, plus what keeping the KV cache adds
to the capture (capture with `keep_kv` minus capture without); *row by row* =
`adapter.generate` (clean) + `editor.generate` (edited) on every probe. Both run after the
same BalancEdit edit. Models are `bench/edit_speed.py`'s (random weights: their greedy answers
never stop early, so every row decodes `max_new_tokens` tokens, the worst case for both), and
the shipped tiny flagworld VLM on flagworld capital edits (answers that stop).

    .venv/bin/python bench/generation_speed.py --items 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def time_item(editor: Any, record: Any) -> dict[str, Any]:
    """Both ways of answering every probe of one item, before and after its edit."""
    from editors.decoding import greedy_answers
    from pipeline.scope import answer_tokens, build_probes, edit_request

    adapter, config = editor.adapter, editor.config
    probes = build_probes(record, config)
    batch = adapter.build_inputs(
        [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
    )
    tokens = answer_tokens(config, batch)
    _, plain_s = _timed(lambda: adapter.capture(batch, editor.path))
    capture, kept_s = _timed(lambda: adapter.capture(batch, editor.path, keep_kv=True))
    pre_fast, pre_fast_s = _timed(lambda: greedy_answers(editor, batch, capture, False, tokens))
    pre_rows, pre_rows_s = _timed(lambda: adapter.generate(batch, tokens))
    editor.edit(edit_request(record, config))
    try:
        post_fast, post_fast_s = _timed(
            lambda: greedy_answers(editor, batch, capture, True, tokens)
        )
        post_rows, post_rows_s = _timed(lambda: editor.generate(batch, tokens))
    finally:
        editor.restore()
    return {
        "rows": batch.size,
        "max_new_tokens": tokens,
        "kv_extra_s": kept_s - plain_s,
        "decode_s": pre_fast_s + post_fast_s + max(kept_s - plain_s, 0.0),
        "row_by_row_s": pre_rows_s + post_rows_s,
        "same_answers": pre_fast == pre_rows and post_fast == post_rows,
        "changed_by_edit": sum(a != b for a, b in zip(pre_fast, post_fast, strict=True)),
    }


def bench_model(name: str, items: int) -> dict[str, Any]:
    from pipeline.scope import make_editor

    if name == "tiny-flagworld":
        adapter, records, config = _flagworld(items)
    else:
        adapter, records, config = _random(name, items)
    editor = make_editor(adapter, config)
    time_item(editor, records[0])  # warm-up, untimed
    runs = [time_item(editor, r) for r in records[1:]]
    decode = statistics.mean(r["decode_s"] for r in runs)
    rows = statistics.mean(r["row_by_row_s"] for r in runs)
    return {
        "model": name,
        "items": len(runs),
        "decode_s": decode,
        "row_by_row_s": rows,
        "ratio": rows / decode,
        "runs": runs,
    }


def _random(name: str, items: int) -> tuple[Any, list[Any], Any]:
    from bench.edit_speed import MODELS, corpus, make_records
    from editors.adapters.random_models import random_adapter
    from editors.config import EditorConfig

    spec = MODELS[name]
    adapter = random_adapter(
        spec["family"],
        corpus(),
        text_overrides=spec["text_overrides"],
        vision_overrides=spec["vision_overrides"],
        config_overrides=spec["config_overrides"],
    )
    config = EditorConfig.for_model(spec["preset"], key_variant="last_prompt", edit_eos=True)
    return adapter, make_records(items + 1), config


def _flagworld(items: int) -> tuple[Any, list[Any], Any]:
    from bench.tradeoff import flagworld_records
    from editors.adapters import load_model
    from pipeline.config import ValidateSettings, resolve_validation

    settings = resolve_validation(ValidateSettings())  # the validate stage's defaults
    records = flagworld_records(items + 1, seed=0)
    return load_model(settings.model), records, settings.editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2, help="timed items per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="tiny-flagworld,tiny,blip2-opt300m")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"torch threads {args.threads}, Python {platform.python_version()}.\n"
    )
    print(
        "| model | items | probes | new tokens | decode s/item (KV kept) | row by row s/item "
        "| ratio | same answers | answers changed by the edit |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = bench_model(name, args.items)
        runs = r["runs"]
        print(
            f"| {name} | {r['items']} | {runs[0]['rows']} | {runs[0]['max_new_tokens']} "
            f"| {r['decode_s']:.3f} ({statistics.mean(x['kv_extra_s'] for x in runs):+.3f}) "
            f"| {r['row_by_row_s']:.3f} | {r['ratio']:.1f}× "
            f"| {all(x['same_answers'] for x in runs)} "
            f"| {sum(x['changed_by_edit'] for x in runs)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
