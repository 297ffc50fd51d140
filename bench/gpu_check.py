"""GPU check (issue 3 part 7), one prepared script for a session that is lent a GPU machine.

1. tiny flagworld VLM: validate N flagworld capital edits with the validate stage's defaults on
   `--device` and on the CPU; verdict agreement, max |Δ distance|, s/item on each;
2. fast path on a BLIP-2 with random weights in `--dtype`, shaped like
   Salesforce/blip2-opt-2.7b (ViT-g 39 × 1408 at 224 px / patch 14, Q-Former 12 × 768 with 32
   queries, OPT 32 × 2560): s/item (edit + every probe, no generation), peak GPU memory.
   Goal (issue 3): ≤ 0.3 s/item and ≤ 12 GB. Then the same with greedy answers (decoded
   from the capture's KV cache, the validate stage's default);
2b. `batched` (issue 17): the same BLIP-2 through the real validate stage
   (`validate_records`) with `batch_items` 1, 8, 16, 32 (`--batch-sizes`) on `--items-batched`
   items, greedy answers on: s/item, peak GPU memory, and whether each size's results equal
   batch 1's (goal: ≤ 0.05 s/item with answers);
3. the fast/slow ratio of `bench/edit_speed.py` on its 300 M BLIP-2 (fp32) on `--device`,
   without and with generation (goal: ≥ 10× without);
4. `images` (issue 17): the images stage (`pipeline.images`, checks included, no cache) with
   the `diffusers` backend on a random-weight pipeline built on `--device` from configs
   (`--image-shape`: SDXL-Turbo's shape at 512², 2 steps, no guidance, the full-build
   default; SD-1.5's at 512²; or a tiny one), batched (`batch_size="auto"`) against one image
   per pipeline call on the same pipeline and items: images/s, stage seconds per image, the
   batch sizes chosen, attention processor, peak GPU memory, and what that rate makes of the
   70,644 images of OK-VQA val (5,046 items x 14). Needs the `diffusers` wheel.

On the GPU machine (no internet; see the device README for carrying wheels):

    python bench/gpu_check.py --json $OUT/gpu_check.json

Smoke test on a CPU (small shape, fp32):

    .venv/bin/python bench/gpu_check.py --device cpu --shape opt300m --dtype float32 \\
        --items-tiny 2 --items-blip2 1 --items-ratio 1 --threads 1

of the batched part:

    .venv/bin/python bench/gpu_check.py --device cpu --shape tiny --dtype float32 \\
        --parts batched --items-batched 4 --batch-sizes 1,2,4 --threads 1

and of the images part (`--shape tiny` picks the tiny diffusion shape too):

    .venv/bin/python bench/gpu_check.py --device cpu --shape tiny --dtype float32 \\
        --parts images --items-images 2 --threads 1
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

from bench.edit_speed import MODELS, corpus, make_records, same_results  # noqa: E402
from bench.tradeoff import flagworld_records  # noqa: E402
from editors.adapters import load_model  # noqa: E402
from editors.adapters.random_models import random_adapter  # noqa: E402
from editors.config import EditorConfig, ModelConfig  # noqa: E402
from pipeline.check import CheckConfig  # noqa: E402
from pipeline.config import ValidateSettings, resolve_validation  # noqa: E402
from pipeline.scope import make_editor, validate_record  # noqa: E402
from pipeline.validate import validate_records  # noqa: E402

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
    "tiny": {  # smoke runs only
        "text_overrides": {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vision_overrides": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "config_overrides": {
            "num_query_tokens": 4,
            "qformer_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "encoder_hidden_size": 32,
                "cross_attention_frequency": 1,
            },
        },
    },
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
        resolved = resolve_validation(ValidateSettings(device=where))
        adapter = load_model(resolved.model)
        editor = make_editor(adapter, resolved.editor)
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


def batched_validation(
    device: str, dtype: torch.dtype, shape: str, n: int, sizes: list[int]
) -> dict[str, Any]:
    """Batched validation (issue 17 part 3) through the real stage, `validate_records` with
    `batch_items` = each of `sizes`, on a random-weight BLIP-2 of `shape` with the validate
    stage's editor settings (greedy answers): s/item, peak GPU memory, and whether the results
    equal those of one item at a time (`bench.edit_speed.same_results`). The item check's
    sentence model is left out (the same per-item work at every size)."""
    adapter = random_adapter("blip2", corpus(), **SHAPES[shape], device=device, dtype=dtype)
    config = _answering("blip2-random")
    records = make_records(n)
    check = CheckConfig(text_similarity=False)

    def validate(size: int, chosen: list) -> list:
        model = ModelConfig(model=f"blip2-{shape}-random")
        return validate_records(chosen, config, model, adapter, False, check, batch_items=size)

    validate(max(sizes), make_records(max(sizes), seed=99))  # warm-up: kernels, allocator
    result: dict[str, Any] = {"shape": shape, "dtype": str(dtype).removeprefix("torch.")}
    result.update({"items": n, "module": make_editor(adapter, config).path, "sizes": {}})
    reference = None
    for size in sizes:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        validated, seconds = _timed(device, lambda size=size: validate(size, records))
        run: dict[str, Any] = {"s_per_item": round(seconds / n, 4)}
        if device.startswith("cuda"):
            run["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if reference is None:
            reference = validated
            run["verdicts"] = dict(collections.Counter(r.validation.verdict for r in validated))
        else:
            run.update(same_results(reference, validated))
        result["sizes"][str(size)] = run
        print(json.dumps({"batched size": size, **run}), flush=True)
    return result


# --------------------------------------------------------------------------- images (issue 17)

# Random-weight diffusion pipelines at real shapes: SDXL (the UNet of SDXL base and
# SDXL-Turbo, 2,568 M; CLIP-L and OpenCLIP-bigG text encoders) and SD-1.5 (860 M UNet, CLIP-L);
# the SD/SDXL VAE. "tiny" is the test suite's shape (32 px), for smoke runs.
IMAGE_SHAPES: dict[str, dict[str, Any]] = {
    "sdxl-turbo": {"kind": "sdxl", "size": 512, "steps": 2, "guidance_scale": 0.0},
    "sd15": {"kind": "sd15", "size": 512, "steps": 4, "guidance_scale": 0.0},
    "tiny": {"kind": "tiny", "size": 32, "steps": 2, "guidance_scale": 0.0},
}
OKVQA_VAL_IMAGES = 5046 * 14  # items x (10 rephrases + 3 near-miss + 1 training negative)
OBJECTS = [
    "a red double-decker bus on a city street",
    "a plate of sushi on a wooden table",
    "a golden retriever catching a frisbee",
    "a snowboarder in mid-air",
    "a bowl of ramen",
    "a vintage steam locomotive",
    "a giraffe eating leaves from a tall tree",
    "a surfer riding a large wave",
    "a slice of pepperoni pizza",
    "a lighthouse at sunset",
    "a tennis player serving",
    "a laptop computer on a desk",
    "a fire hydrant on a sidewalk",
    "a sailboat on a calm lake",
    "a chocolate birthday cake with candles",
]


def _diffusion_pipeline(kind: str, device: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """A text-to-image pipeline of `kind` with random weights, built on `device` from configs
    (no download), with a word-level tokenizer over the prompts below."""
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editors.adapters.random_models import word_tokenizer

    tok = word_tokenizer(OBJECTS + ["a photo of"])
    tok.model_max_length = 77

    def text(hidden: int, layers: int, heads: int, **extra: Any) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=extra.pop("intermediate_size", 4 * hidden),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act="gelu",
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **extra,
        )

    vae_blocks = {
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    with torch.device(device):
        if kind == "sdxl":
            unet = UNet2DConditionModel(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=1024,
                scaling_factor=0.13025,
                force_upcast=True,
                **vae_blocks,
            )
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=CLIPTextModel(text(768, 12, 12)),
                text_encoder_2=CLIPTextModelWithProjection(text(1280, 32, 20, projection_dim=1280)),
                tokenizer=tok,
                tokenizer_2=tok,
                unet=unet,
                scheduler=scheduler,
            )
        elif kind == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64, cross_attention_dim=768, attention_head_dim=8
            )
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
                **vae_blocks,
            )
            pipe = _sd_pipeline(
                StableDiffusionPipeline, unet, vae, CLIPTextModel(text(768, 12, 12)), tok, scheduler
            )
        else:  # the test suite's tiny pipeline (tests/fixtures_images_api.py)
            unet = UNet2DConditionModel(
                block_out_channels=(8, 16),
                layers_per_block=1,
                sample_size=16,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=16,
                attention_head_dim=2,
                norm_num_groups=4,
            )
            vae = AutoencoderKL(
                block_out_channels=(8, 16),
                latent_channels=4,
                norm_num_groups=4,
                sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
            )
            encoder = CLIPTextModel(text(16, 1, 2, intermediate_size=32))
            pipe = _sd_pipeline(StableDiffusionPipeline, unet, vae, encoder, tok, scheduler)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    info = {"unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}
    return pipe, info


def _sd_pipeline(cls: Any, unet: Any, vae: Any, encoder: Any, tok: Any, scheduler: Any) -> Any:
    return cls(
        unet=unet,
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _image_pairs(n: int) -> list[tuple[Any, Any]]:
    """n OK-VQA-like items (an original photo stand-in and the prompts the stage draws)."""
    import io

    from PIL import Image

    from schemas.record import Annotation, SourceItem, TextNegative

    pairs = []
    for i in range(n):
        original = Image.new("RGB", (160, 120), ((37 * i) % 256, (91 * i) % 256, 120))
        buffer = io.BytesIO()
        original.save(buffer, format="JPEG")
        item = SourceItem(
            item_id=f"gpu-check-{i}",
            source="okvqa/val2014",
            question_id=str(i),
            image_id=str(i),
            question_type="other",
            question="What is this?",
            answers=["thing"] * 10,
            image=buffer.getvalue(),
        )
        ann = Annotation(
            item_id=item.item_id,
            image_object=OBJECTS[i % len(OBJECTS)],
            target="other",
            counterfact_type="image-text",
            counterfact_votes=["image-text"] * 3,
            counterfact_reason="r",
            rephrases=[f"What is this, variant {k}?" for k in range(10)],
            rephrases_train=[f"What is it, training {k}?" for k in range(3)],
            locality_answer="c",
            locality_image_object=OBJECTS[(i + 5) % len(OBJECTS)],
            locality_answer_train="d",
            locality_image_train_object=OBJECTS[(i + 10) % len(OBJECTS)],
            text_negatives=[TextNegative(question="How old is it?", answer="old")],
        )
        pairs.append((item, ann))
    return pairs


def images_stage(device: str, dtype: torch.dtype, shape: str, n: int) -> dict[str, Any]:
    """The images stage with the diffusers backend, batched vs one image per call."""
    try:
        import diffusers
    except ImportError:
        return {"error": "diffusers is not installed: carry its wheel (bench/gpu_wheels.sh)"}
    from pipeline.config import ImageSettings
    from pipeline.images import make_image_backend

    spec = IMAGE_SHAPES[shape]
    if not device.startswith("cuda"):
        dtype = torch.float32  # half precision on the CPU is neither fast nor the real setting
    (pipe, info), build_s = _timed(device, lambda: _diffusion_pipeline(spec["kind"], device, dtype))
    result: dict[str, Any] = {
        "shape": shape,
        **{k: spec[k] for k in ("size", "steps", "guidance_scale")},
        "dtype": str(dtype).removeprefix("torch."),
        "diffusers": diffusers.__version__,
        **info,
        "build_s": round(build_s, 1),
        "items": n,
    }
    pairs = _image_pairs(n + 1)  # the first item warms up each run, untimed
    made_images: dict[str, dict[str, list[bytes]]] = {}
    for name, batch_size in (("batched", "auto"), ("one_at_a_time", 1)):
        settings = ImageSettings(
            backend="diffusers",
            model=f"random-{shape}",
            device=device,
            cache=False,
            size=spec["size"],
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            batch_size=batch_size,
            max_attempts=1,
        )
        maker = make_image_backend(settings, seed=0)
        generator = maker.generator
        generator._pipe = pipe  # built here, not loaded: the same pipeline for both runs
        maker.make_images(pairs[:1])
        generator.batches.clear()
        before = generator.stats.snapshot().get("images", 0)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        outcomes, seconds = _timed(device, lambda m=maker: m.make_images(pairs[1:]))
        made = generator.stats.snapshot().get("images", 0) - before
        run = {
            "batch_size": batch_size,
            "batches": dict(sorted(generator.batches.items())),
            "images": made,
            "seconds": round(seconds, 2),
            "images_per_s": round(made / seconds, 2),
            "stage_s_per_image": round(seconds / made, 4),
            "items_accepted": sum(type(o).__name__ == "ItemImages" for o in outcomes),
        }
        if device.startswith("cuda"):
            run["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result[name] = run
        result["attention"] = generator.attention  # the processors the pipeline ran with
        made_images[name] = {
            o.item_id: [*o.image_rephrases, *o.locality_images, o.locality_image_train]
            for o in outcomes
            if type(o).__name__ == "ItemImages"
        }
    result["same_images"] = _compare_images(made_images["batched"], made_images["one_at_a_time"])
    batched, single = result["batched"], result["one_at_a_time"]
    result["speedup"] = round(batched["images_per_s"] / single["images_per_s"], 2)
    result["okvqa_val_images_h"] = round(OKVQA_VAL_IMAGES * batched["stage_s_per_image"] / 3600, 2)
    return result


def _compare_images(first: dict[str, list[bytes]], second: dict[str, list[bytes]]) -> dict:
    """Batched against one at a time, image by image (the items both runs accepted)."""
    import io

    import numpy as np
    from PIL import Image

    pairs = [
        (a, b)
        for item in sorted(first.keys() & second.keys())
        for a, b in zip(first[item], second[item], strict=True)
    ]
    if not pairs:
        return {"compared": 0}
    deltas = [
        int(
            np.abs(
                np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
                - np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
            ).max()
        )
        for a, b in pairs
    ]
    return {
        "compared": len(pairs),
        "identical": sum(a == b for a, b in pairs),
        "max_pixel_delta": max(deltas),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--shape", default="opt2.7b", choices=tuple(SHAPES))
    parser.add_argument("--items-tiny", type=int, default=20)
    parser.add_argument("--items-blip2", type=int, default=5)
    parser.add_argument("--items-ratio", type=int, default=2)
    parser.add_argument("--items-images", type=int, default=8, help="items (14 images each)")
    parser.add_argument(
        "--image-shape",
        choices=tuple(IMAGE_SHAPES),
        default=None,
        help="diffusion shape of the images part (default sdxl-turbo; tiny with --shape tiny)",
    )
    parser.add_argument("--items-batched", type=int, default=32)
    parser.add_argument(
        "--batch-sizes", default="1,8,16,32", help="batch_items of the batched part (1 first)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parts", default="tiny_flagworld,blip2,batched,fast_slow_300m,images")
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
        "batched": lambda: batched_validation(
            args.device,
            getattr(torch, args.dtype),
            args.shape,
            args.items_batched,
            [int(size) for size in args.batch_sizes.split(",")],
        ),
        "fast_slow_300m": lambda: fast_slow_ratio(args.device, args.items_ratio),
        "images": lambda: images_stage(
            args.device,
            getattr(torch, args.dtype),
            args.image_shape or ("tiny" if args.shape == "tiny" else "sdxl-turbo"),
            args.items_images,
        ),
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
