"""GPU check (issue 3 part 7), one prepared script for a session that is lent a GPU machine.

1. tiny flagworld VLM: validate N flagworld capital edits with the validate stage's defaults on
   `--device` and on the CPU; verdict agreement, max |Δ distance|, s/item on each;
2. fast path on a BLIP-2 with random weights in `--dtype`, shaped like
   Salesforce/blip2-opt-2.7b (ViT-g 39 × 1408 at 224 px / patch 14, Q-Former 12 × 768 with 32
   queries, OPT 32 × 2560): s/item (edit + every probe, no generation), peak GPU memory.
   Goal (issue 3): ≤ 0.3 s/item and ≤ 12 GB. Then the same with greedy answers (decoded
   from the capture's KV cache, the validate stage's default);
3. the fast/slow ratio of `bench/edit_speed.py` on its 300 M BLIP-2 (fp32) on `--device`,
   without and with generation (goal: ≥ 10× without).

On the GPU machine (no internet; see the device README for carrying wheels):

    python bench/gpu_check.py --json $OUT/gpu_check.json

Smoke test on a CPU (small shape, fp32):

    .venv/bin/python bench/gpu_check.py --device cpu --shape opt300m --dtype float32 \\
        --items-tiny 2 --items-blip2 1 --items-ratio 1 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.edit_speed import MODELS, corpus, make_records  # noqa: E402
from bench.tradeoff import flagworld_records  # noqa: E402
from editors.adapters import load_model  # noqa: E402
from editors.adapters.random_models import random_adapter  # noqa: E402
from editors.config import EditorConfig  # noqa: E402
from editors.scope import make_editor, validate_record  # noqa: E402
from pipeline.config import ValidateSettings  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "opt2.7b": {
        "text_overrides": {
            "hidden_size": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        },
        "vision_overrides": {
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        "config_overrides": {
            "num_query_tokens": 32,
            "qformer_config": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "encoder_hidden_size": 1408,
                "cross_attention_frequency": 2,
            },
        },
    },
    "opt300m": {k: MODELS["blip2-opt300m"][k] for k in MODELS["blip2-opt300m"] if "overrides" in k},
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _validate_all(device: str, editor, records: list) -> tuple[list, float]:
    """Validate records[1:] after an untimed warm-up on records[0] (kernels, caches)."""
    validate_record(records[0], editor)
    return _timed(device, lambda: [validate_record(r, editor) for r in records[1:]])


def tiny_flagworld(device: str, n: int) -> dict[str, Any]:
    """The validate stage's defaults on `device` and on the CPU, same items."""
    records = flagworld_records(n + 1, 0)
    runs = {}
    for where in dict.fromkeys([device, "cpu"]):
        settings = ValidateSettings(device=where)
        adapter = load_model(settings.model_settings())
        editor = make_editor(adapter, settings.editor_settings())
        validations, seconds = _validate_all(where, editor, records)
        runs[where] = {"validations": validations, "s_per_item": seconds / n}
    result: dict[str, Any] = {"items": n}
    for where, run in runs.items():
        result[where] = {
            "s_per_item": round(run["s_per_item"], 4),
            "verdicts": dict(collections.Counter(v.verdict for v in run["validations"])),
        }
    if device != "cpu":
        ours, ref = runs[device]["validations"], runs["cpu"]["validations"]
        pairs = list(zip(ours, ref, strict=True))
        result["verdict_agreement"] = sum(a.verdict == b.verdict for a, b in pairs) / n
        result["max_distance_delta"] = max(
            abs(p.distance - q.distance)
            for a, b in pairs
            for p, q in zip(a.probes, b.probes, strict=True)
        )
    return result


def blip2_fast_path(device: str, dtype: torch.dtype, shape: str, n: int) -> dict[str, Any]:
    """Fast-path validation time per item on a random-weight BLIP-2 of `shape`."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    (adapter, build_s) = _timed(
        device,
        lambda: random_adapter("blip2", corpus(), **SHAPES[shape], device=device, dtype=dtype),
    )
    params = sum(p.numel() for p in adapter.model.parameters())
    editor = make_editor(adapter, EditorConfig.for_model("blip2-random", generate_answers=False))
    records = make_records(n + 1)
    validations, seconds = _validate_all(device, editor, records)
    answering = make_editor(adapter, _answering("blip2-random"))
    _, answered_s = _validate_all(device, answering, records)
    result = {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "params_m": round(params / 1e6, 1),
        "build_s": round(build_s, 1),
        "items": n,
        "s_per_item": round(seconds / n, 4),
        "s_per_item_with_answers": round(answered_s / n, 4),
        "verdicts": dict(collections.Counter(v.verdict for v in validations)),
        "module": editor.path,
    }
    if device.startswith("cuda"):
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _answering(preset: str, **overrides: Any) -> EditorConfig:
    """The validate stage's editor settings (greedy answers, last-prompt key, EOS trained)."""
    return EditorConfig.for_model(
        preset, generate_answers=True, key_variant="last_prompt", edit_eos=True, **overrides
    )


def fast_slow_ratio(device: str, n: int) -> dict[str, Any]:
    """`bench/edit_speed.py`'s comparison on `device`: its 300 M BLIP-2 in fp32, same items,
    fast vs slow path, without and with greedy answers."""
    spec = MODELS["blip2-opt300m"]
    adapter = random_adapter("blip2", corpus(), **SHAPES["opt300m"], device=device)
    records = make_records(n + 1)
    result: dict[str, Any] = {"items": n}
    for answers in (False, True):
        seconds = {}
        for fast in (True, False):
            config = (
                _answering(spec["preset"], fast=fast)
                if answers
                else EditorConfig.for_model(spec["preset"], fast=fast, generate_answers=False)
            )
            _, elapsed = _validate_all(device, make_editor(adapter, config), records)
            seconds[fast] = elapsed / n
        result["with_answers" if answers else "edit_and_probes"] = {
            "fast_s_per_item": round(seconds[True], 4),
            "slow_s_per_item": round(seconds[False], 4),
            "ratio": round(seconds[False] / seconds[True], 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--shape", default="opt2.7b", choices=tuple(SHAPES))
    parser.add_argument("--items-tiny", type=int, default=20)
    parser.add_argument("--items-blip2", type=int, default=5)
    parser.add_argument("--items-ratio", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parts", default="tiny_flagworld,blip2,fast_slow_300m")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    args = parser.parse_args()
    if args.threads:  # on a small shared CPU, more threads than free cores slow everything
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    import transformers

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "tiny_flagworld": lambda: tiny_flagworld(args.device, args.items_tiny),
        "blip2": lambda: blip2_fast_path(
            args.device, getattr(torch, args.dtype), args.shape, args.items_blip2
        ),
        "fast_slow_300m": lambda: fast_slow_ratio(args.device, args.items_ratio),
    }
    for name in args.parts.split(","):
        report[name] = _attempt(parts[name], args.device)
        print(json.dumps({name: report[name]}, indent=2), flush=True)
        if args.json:  # after every part: a later failure or timeout keeps what was measured
            args.json.write_text(json.dumps(report, indent=2))


def _attempt(part: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """Run one part; an error (say out of GPU memory) is reported and the next part runs."""
    try:
        return part()
    except Exception as exc:  # noqa: BLE001 - a one-shot run must report, not stop
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
