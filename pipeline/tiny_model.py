"""The tiny flagworld VLM: a ~1.2 M parameter LLaVA trained on CPU to answer flagworld
questions (design §9), shipped in `editors/assets/tiny-flagworld-vlm`.

Recipe: pre-render a pool of augmented images per flag (plus the canonical render), sample
batches of (flag, relation, training template) questions and, for `text_share` of each
batch, image-free questions about named countries ("what is the capital of peru?") shown
with no image, the grey stand-in of image-free probes or a random flag; teacher-forced loss
on the answer's words (answers such as "mexico city" take several tokens) and on `</s>`
after them, so generation stops; AdamW with warm-up + cosine. Everything is seeded; the
step count (not the clock) defines the run, so the same seed gives the same weights.
Evaluation uses fresh renders from a different seed, with the training, held-out and
paraphrase templates, and the image-free questions in each way of showing them; it reports
accuracy (every word of the answer right) per look-alike group too.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import editors
from editors.tiny_vlm import (
    DEFAULT_PROMPT_TEMPLATE,
    IMAGE,
    build_processor,
    build_tiny_llava,
    build_word_tokenizer,
    count_parameters,
    load_tiny_vlm,
    okedit_meta,
    save_tiny_vlm,
    train_loop,
)
from pipeline.scope import image_free_image
from pipeline.sources import flagworld as fw

METRICS_FILE = "metrics.json"
EVAL_SEED = 12345  # fresh renders: never the training pool's stream (seeds 0..999)
IMAGE_SIZE = 64
TARGETS = {"train_templates": 0.95, "heldout_templates": 0.90}  # issue 3, part 4
# How an image-free question is shown: no image tokens at all (EasyEdit's `loc` batch), the
# grey stand-in the validate stage uses (`pipeline.scope.image_free_image`), or a random flag.
TEXT_IMAGE_MODES = ("none", "blank", "flag")


def default_model_dir() -> Path:
    """Where the shipped model lives: `editors/assets/tiny-flagworld-vlm`."""
    return Path(editors.__file__).resolve().parent / "assets" / "tiny-flagworld-vlm"


@dataclass(frozen=True)
class TinyVLMRecipe:
    """Hyper-parameters of `train_flagworld_vlm` (all recorded in metrics.json).

    Measured here (teacher-forced accuracy on fresh renders, training templates):
    - one lr for everything: 1.5e-3 (the design's prototype value) stalls at 0.60 after
      2000 steps; 3e-4 is better (0.93 after 2000 steps, 0.98 / 0.945 for seeds 0 / 1
      after 3000 steps with a 256-image pool);
    - the output head starts tiny (std 0.02) and learns far too slowly at the body's lr:
      20x for `lm_head` alone cut the loss after 400 steps from 1.31 to ~0.6; after 2500
      steps with a 384-image pool: seed 0 0.980 / 0.979 / 0.968 (training / held-out /
      paraphrase templates), seed 1 0.977 / 0.972 / 0.953. The same boost on the token
      embeddings learns the training templates as fast but breaks held-out phrasings
      (seed 1, "what nation uses this flag?": 0.67), so they keep the base lr.
    - flagworld 2 (issue 13: multi-word answers, a quarter of each batch image-free
      questions about named countries, paraphrases in frames never asked about a flag):
      3000 steps, one torch thread. Seed 0 (shipped): 0.978 / 0.979 / 0.948 (training /
      held-out / paraphrase templates), image-free questions 1.000; seed 1: 0.979 / 0.979 /
      0.955, image-free 1.000; `</s>` follows every answer (1.000)."""

    seed: int = 0
    steps: int = 3000
    budget_s: float | None = None  # optional safety net; `steps` defines the run
    lr: float = 3e-4
    lr_mult: dict[str, float] = field(default_factory=lambda: {"lm_head": 20.0})
    weight_decay: float = 0.01
    batch_size: int = 64
    pool_per_flag: int = 384  # augmented renders per flag (+ the canonical one)
    train_eos: bool = True
    # Share of each batch that asks image-free questions about named countries ("what is the
    # capital of peru?", `fw.TEXT_TRAIN_TEMPLATES`), each row with no image, the grey
    # stand-in of image-free probes or a random flag (`TEXT_IMAGE_MODES`, equally often).
    text_share: float = 0.25
    num_threads: int | None = None  # torch threads; None keeps torch's default
    model: dict[str, int] = field(default_factory=dict)  # build_tiny_llava overrides


# ---------------------------------------------------------------------------------- data


def _render_pool(codes: Sequence[str], per_flag: int, seed: int, canonical: bool) -> list[list]:
    """`per_flag` augmented renders per flag, each from its own seeded stream so a flag's
    renders do not depend on which other flags are rendered."""
    pool: list[list[Image.Image]] = []
    for i, code in enumerate(codes):
        rng = random.Random(seed * 1_000_003 + i)
        images = [fw.render_flag(code, size=IMAGE_SIZE)] if canonical else []
        images += [fw.render_variant(code, rng, size=IMAGE_SIZE) for _ in range(per_flag)]
        pool.append(images)
    return pool


def _pixels(processor: LlavaProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Images through the model's own (PIL) image processor, in chunks."""
    chunks = [
        processor.image_processor(images=list(images[i : i + 512]), return_tensors="pt")[
            "pixel_values"
        ]
        for i in range(0, len(images), 512)
    ]
    return torch.cat(chunks)


def _prompt_ids(processor: LlavaProcessor, question: str, template: str) -> list[int]:
    """Token ids of the prompt exactly as `LlavaProcessor` builds them (checked below)."""
    n_image = (processor.image_processor.size["height"] // processor.patch_size) ** 2
    text = template.format(question=question).replace(IMAGE, IMAGE * n_image)
    return processor.tokenizer(text).input_ids


def _text_prompt_ids(processor: LlavaProcessor, question: str) -> list[int]:
    """A prompt with no image at all: `<s>` and the question (what a text-only batch of a
    LLaVA model holds: no image tokens, no pixel values)."""
    return processor.tokenizer(question).input_ids


def _answer_ids(processor: LlavaProcessor, answer: str) -> list[int]:
    """The answer's word ids ("mexico city" -> 2 ids), every word known to the tokenizer."""
    ids = processor.tokenizer(answer, add_special_tokens=False).input_ids
    if not ids or processor.tokenizer.unk_token_id in ids:
        raise ValueError(f"answer {answer!r} has words unknown to the tokenizer: {ids}")
    return ids


@dataclass
class _Probe:
    image: int | None  # row in a pixel tensor; None = a text-only row (no image tokens)
    prompt: list[int]
    answer: list[int]


def _batch(
    probes: Sequence[_Probe], pixels: torch.Tensor, pad_id: int, eos_id: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded teacher-forced batch: prompt, answer words (and `eos_id`), loss on the
    answer (and eos) only. Returns it and each row's prompt length. Text-only rows carry
    no image tokens; `pixel_values` holds the images of the other rows, in row order."""
    extra = 1 if eos_id is not None else 0
    width = max(len(p.prompt) + len(p.answer) for p in probes) + extra
    ids = torch.full((len(probes), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    where = torch.empty(len(probes), dtype=torch.long)
    for row, p in enumerate(probes):
        n = len(p.prompt)
        seq = [*p.prompt, *p.answer] + ([eos_id] if eos_id is not None else [])
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, n : len(seq)] = ids[row, n : len(seq)]  # loss on answer (+ eos) only
        where[row] = n
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows = [p.image for p in probes if p.image is not None]
    if rows:
        batch["pixel_values"] = pixels[torch.tensor(rows)]
    return batch, where


@torch.no_grad()
def _predict(
    model: LlavaForConditionalGeneration,
    probes: Sequence[_Probe],
    pixels: torch.Tensor,
    pad_id: int,
    eos_id: int,
    batch_size: int = 256,
) -> list[tuple[int, ...]]:
    """Teacher-forced argmax at each probe's answer positions and at the position after
    the answer (where `eos_id` should come: generation stops)."""
    out: list[tuple[int, ...]] = []
    for i in range(0, len(probes), batch_size):
        chunk = probes[i : i + batch_size]
        batch, where = _batch(chunk, pixels, pad_id, eos_id)
        batch.pop("labels")
        argmax = model(**batch).logits.argmax(-1)
        for row, (p, n) in enumerate(zip(chunk, where.tolist(), strict=True)):
            out.append(tuple(argmax[row, n - 1 : n + len(p.answer)].tolist()))
    return out


# ------------------------------------------------------------------------------ training


def build_flagworld_tokenizer_and_processor() -> LlavaProcessor:
    """Word-level tokenizer over the world's vocabulary, wrapped in a LLaVA processor."""
    tokenizer = build_word_tokenizer(fw.vocabulary())
    return build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=16)


def train_flagworld_vlm(
    out_dir: str | Path | None = None,
    seed: int = 0,
    budget_s: float | None = None,
    *,
    steps: int = TinyVLMRecipe.steps,
    lr: float = TinyVLMRecipe.lr,
    batch_size: int = TinyVLMRecipe.batch_size,
    pool_per_flag: int = TinyVLMRecipe.pool_per_flag,
    lr_mult: dict[str, float] | None = None,
    text_share: float = TinyVLMRecipe.text_share,
    num_threads: int | None = None,
    evaluate: bool = True,
    eval_renders_per_flag: int = 8,
    log: Callable[[str], None] = print,
    log_every: int = 250,
) -> dict[str, Any]:
    """Train the tiny flagworld VLM, evaluate it on fresh renders, save it (model,
    processor, okedit.json, metrics.json) to `out_dir` (default: `default_model_dir()`).

    Returns the metrics. `steps` defines the run, so a seed gives the same weights on the
    same machine and thread count. A clock budget would not: on this shared 2-core machine
    a step took 0.09-0.55 s depending on load. `budget_s` is therefore only a safety net
    that stops early (cutting the cosine schedule); metrics then say `stopped_by_budget`."""
    recipe = TinyVLMRecipe(
        seed=seed,
        steps=steps,
        budget_s=budget_s,
        lr=lr,
        batch_size=batch_size,
        pool_per_flag=pool_per_flag,
        text_share=text_share,
        num_threads=num_threads,
        **({"lr_mult": dict(lr_mult)} if lr_mult is not None else {}),
    )
    wall = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        model, processor, info = _train(recipe, log=log, log_every=log_every)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    if info["stopped_by_budget"]:
        log(f"warning: budget {budget_s}s hit after {info['steps']}/{steps} steps")
    metrics: dict[str, Any] = {
        "recipe": asdict(recipe),
        "seed": seed,
        "params": count_parameters(model),
        **info,
    }
    if evaluate:
        t = time.perf_counter()
        metrics["eval"] = evaluate_model(
            model, processor, seed=EVAL_SEED, renders_per_flag=eval_renders_per_flag
        )
        metrics["eval_seconds"] = round(time.perf_counter() - t, 2)
        metrics["targets"] = TARGETS
        metrics["meets_targets"] = all(metrics["eval"][k] >= v for k, v in TARGETS.items())
        log(
            "fresh renders: train templates {train_templates}, held-out {heldout_templates}, "
            "paraphrases {paraphrase_templates}; image-free questions {text_train_templates} "
            "(held-out opener {text_heldout_templates})".format(**metrics["eval"])
        )
    metrics["total_seconds"] = round(time.perf_counter() - wall, 2)
    metrics["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": used_threads,
    }
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    meta = okedit_meta(
        processor,
        DEFAULT_PROMPT_TEMPLATE,
        world="flagworld",
        answer_tokens=max(len(a) for a in _all_answer_ids(processor)),
        max_new_tokens=max(len(a) for a in _all_answer_ids(processor)) + 1,
        eos_after_answer=recipe.train_eos,
        relations=list(fw.RELATIONS),
        templates_version=getattr(fw, "TEMPLATES_VERSION", None),
        reproduce=(
            f"python -c 'from pipeline.tiny_model import train_flagworld_vlm; "
            f"train_flagworld_vlm(seed={seed}, steps={steps})'"
        ),
    )
    save_tiny_vlm(model, processor, out, meta)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _all_answer_ids(processor: LlavaProcessor) -> list[list[int]]:
    """Every answer and counterfactual city of the world, as word ids."""
    texts = {fw.answer(c.code, r) for c in fw.COUNTRIES for r in fw.RELATIONS}
    texts |= set(fw.COUNTERFACTUAL_CITIES)
    return [_answer_ids(processor, t) for t in sorted(texts)]


def _text_rows(processor: LlavaProcessor, templates: dict[str, Sequence[str]]) -> list[tuple]:
    """(code, relation, prompt ids with the image slot, prompt ids without it, answer ids)
    of every named-country question of `templates`."""
    rows = []
    for rel in fw.ITEM_RELATIONS:
        for code, question, answer in fw.text_questions(rel, templates):  # type: ignore[arg-type]
            rows.append(
                (
                    code,
                    rel,
                    _prompt_ids(processor, question, DEFAULT_PROMPT_TEMPLATE),
                    _text_prompt_ids(processor, question),
                    _answer_ids(processor, answer),
                )
            )
    return rows


def _train(
    recipe: TinyVLMRecipe, log: Callable[[str], None], log_every: int
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict[str, Any]]:
    t = time.perf_counter()
    processor = build_flagworld_tokenizer_and_processor()
    tok = processor.tokenizer
    model = build_tiny_llava(tok, image_size=IMAGE_SIZE, seed=recipe.seed, **recipe.model)
    codes = [c.code for c in fw.COUNTRIES]
    pool = _render_pool(codes, recipe.pool_per_flag, recipe.seed, canonical=True)
    per_flag = len(pool[0])
    blank = image_free_image((IMAGE_SIZE, IMAGE_SIZE))
    pixels = _pixels(processor, [im for images in pool for im in images] + [blank])
    blank_row = len(codes) * per_flag  # the last pixel row
    prompts = {
        rel: [_prompt_ids(processor, q, DEFAULT_PROMPT_TEMPLATE) for q in fw.TRAIN_TEMPLATES[rel]]
        for rel in fw.RELATIONS
    }
    _check_against_processor(processor, pool[0][0], fw.TRAIN_TEMPLATES[fw.RELATIONS[0]][0])
    del pool  # the PIL copies; training reads the pixel tensor
    answers = [[_answer_ids(processor, fw.answer(c, rel)) for rel in fw.RELATIONS] for c in codes]
    text_rows = _text_rows(processor, fw.TEXT_TRAIN_TEMPLATES)
    prep_s = time.perf_counter() - t
    log(
        f"prepared {len(codes)} flags x {per_flag} images and {len(text_rows)} image-free "
        f"questions in {prep_s:.1f}s"
    )

    gen = torch.Generator().manual_seed(recipe.seed)  # the batch stream, independent of init
    n_rel = len(fw.RELATIONS)
    eos = tok.eos_token_id if recipe.train_eos else None
    n_text = round(recipe.batch_size * recipe.text_share)

    def batch_at(_step: int) -> dict[str, torch.Tensor]:
        b = recipe.batch_size - n_text
        flag = torch.randint(len(codes), (b,), generator=gen).tolist()
        img = torch.randint(per_flag, (b,), generator=gen).tolist()
        rel = torch.randint(n_rel, (b,), generator=gen).tolist()
        tmpl = torch.randint(1 << 30, (b,), generator=gen).tolist()
        probes = []
        for f, i, r, q in zip(flag, img, rel, tmpl, strict=True):
            options = prompts[fw.RELATIONS[r]]
            probes.append(_Probe(f * per_flag + i, options[q % len(options)], answers[f][r]))
        text = torch.randint(len(text_rows), (n_text,), generator=gen).tolist()
        mode = torch.randint(len(TEXT_IMAGE_MODES), (n_text,), generator=gen).tolist()
        shown = torch.randint(len(codes) * per_flag, (n_text,), generator=gen).tolist()
        for k, m, im in zip(text, mode, shown, strict=True):
            _, _, with_image, no_image, answer = text_rows[k]
            if TEXT_IMAGE_MODES[m] == "none":
                probes.append(_Probe(None, no_image, answer))
            else:
                row = blank_row if TEXT_IMAGE_MODES[m] == "blank" else im
                probes.append(_Probe(row, with_image, answer))
        return _batch(probes, pixels, tok.pad_token_id, eos)[0]

    stats = train_loop(
        model,
        batch_at,
        steps=recipe.steps,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        seed=recipe.seed,
        budget_s=recipe.budget_s,
        log_every=log_every,
        log=log,
        lr_mult=dict(recipe.lr_mult),
    )
    stats["prep_seconds"] = round(prep_s, 2)
    stats["train_seconds"] = stats.pop("seconds")
    return model, processor, stats


def _check_against_processor(processor: LlavaProcessor, image: Image.Image, q: str) -> None:
    """Training must see exactly what the standard LLaVA path feeds the model."""
    text = DEFAULT_PROMPT_TEMPLATE.format(question=q)
    ref = processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    mine = _prompt_ids(processor, q, DEFAULT_PROMPT_TEMPLATE)
    if ref != mine:
        raise RuntimeError(f"prompt tokenisation differs from LlavaProcessor: {mine} != {ref}")


# ---------------------------------------------------------------------------- evaluation


def _groups() -> list[tuple[str, ...]]:
    groups = fw.LOOKALIKE_GROUPS
    values: Iterable[Any] = groups.values() if isinstance(groups, dict) else groups
    return [tuple(g) for g in values]


def evaluate_model(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    seed: int = EVAL_SEED,
    renders_per_flag: int = 8,
) -> dict[str, Any]:
    """Teacher-forced answer accuracy (every word of the answer right) on fresh renders
    (`seed` ≠ the training pool's) and on the canonical render, per template set, relation
    and look-alike group; the same for the image-free named-country questions in each
    `TEXT_IMAGE_MODES`; and how often `</s>` follows the answer (generation stops)."""
    tok = processor.tokenizer
    eos = tok.eos_token_id
    codes = [c.code for c in fw.COUNTRIES]
    pool = _render_pool(codes, renders_per_flag, seed, canonical=False)
    fresh = _pixels(processor, [im for images in pool for im in images])
    canon = _pixels(processor, [fw.render_flag(c, size=IMAGE_SIZE) for c in codes])
    sets = {"train": fw.TRAIN_TEMPLATES, "heldout": fw.HELDOUT_TEMPLATES}
    paraphrases = getattr(fw, "PARAPHRASE_TEMPLATES", None)
    if isinstance(paraphrases, dict) and paraphrases:
        sets["paraphrase"] = paraphrases

    def probes_for(
        templates: dict[str, Sequence[str]], stride: int, use: int
    ) -> list[tuple[str, str, _Probe]]:
        rows = []
        for f, code in enumerate(codes):
            for rel in fw.RELATIONS:
                answer = _answer_ids(processor, fw.answer(code, rel))
                for q in templates.get(rel, ()):
                    prompt = _prompt_ids(processor, q, DEFAULT_PROMPT_TEMPLATE)
                    for i in range(use):
                        rows.append((code, rel, _Probe(f * stride + i, prompt, answer)))
        return rows

    def scored(probes: Sequence[_Probe], pixels: torch.Tensor) -> tuple[list[bool], list]:
        pred = _predict(model, probes, pixels, tok.pad_token_id, eos)
        right = [list(p[:-1]) == r.answer for p, r in zip(pred, probes, strict=True)]
        return right, pred

    result: dict[str, Any] = {"eval_seed": seed, "renders_per_flag": renders_per_flag}
    by_code_rel: dict[tuple[str, str], list[bool]] = {}
    country_pred: dict[str, list[bool]] = {}
    for name, templates in sets.items():
        # 22 paraphrase templates: 2 renders per flag are plenty (and 4x cheaper).
        use = min(2, renders_per_flag) if name == "paraphrase" else renders_per_flag
        views = (("", fresh, renders_per_flag, use), ("canonical_", canon, 1, 1))
        for label, pixels, stride, n in views:
            rows = probes_for(templates, stride, n)
            ok, pred = scored([r[2] for r in rows], pixels)
            result[f"{label}{name}_templates"] = _share(ok)
            result[f"{label}{name}_probes"] = len(ok)
            if not label:
                result[f"{name}_stops_after_answer"] = _share(p[-1] == eos for p in pred)
                result[f"{name}_per_relation"] = {
                    rel: _share(g for (_, r, _), g in zip(rows, ok, strict=True) if r == rel)
                    for rel in fw.RELATIONS
                }
            if label or name == "paraphrase":
                continue
            for (code, rel, _), good in zip(rows, ok, strict=True):
                by_code_rel.setdefault((code, rel), []).append(good)
            # which flags the country question mistakes for a look-alike
            country_rows = [(r[0], p) for r, p in zip(rows, pred, strict=True) if r[1] == "country"]
            for code, p in country_rows:
                others = {tuple(_answer_ids(processor, fw.answer(o, "country")))
                          for o in fw.lookalikes(code)}  # fmt: skip
                country_pred.setdefault(code, []).append(tuple(p[:-1]) in others)
    result.update(_evaluate_text(model, processor, fresh, renders_per_flag))

    def acc(keys: Iterable[tuple[str, str]]) -> float:
        return _share(g for k in keys for g in by_code_rel.get(k, []))

    result["per_relation"] = {rel: acc((c, rel) for c in codes) for rel in fw.RELATIONS}
    groups = {}
    for group in _groups():
        confused = [x for c in group for x in country_pred.get(c, [])]
        groups["/".join(group)] = {
            "all": acc((c, rel) for c in group for rel in fw.RELATIONS),
            "country": acc((c, "country") for c in group),
            "country_confused_within_group": _share(confused),
        }
    result["lookalike_groups"] = groups
    result["per_flag"] = {c: acc((c, rel) for rel in fw.RELATIONS) for c in codes}
    return result


def _share(values: Iterable[bool]) -> float:
    values = list(values)
    return round(sum(values) / max(1, len(values)), 4)


def _evaluate_text(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    fresh: torch.Tensor,
    renders_per_flag: int,
) -> dict[str, Any]:
    """Image-free named-country questions, training templates and the held-out opener, in
    every `TEXT_IMAGE_MODES` (a flag: a fresh render of another, random flag)."""
    tok = processor.tokenizer
    pixels = torch.cat([fresh, _pixels(processor, [image_free_image((IMAGE_SIZE,) * 2)])])
    blank_row = len(fresh)
    rng = random.Random(f"text-eval:{EVAL_SEED}")
    out: dict[str, Any] = {}
    for name, templates in (
        ("train", fw.TEXT_TRAIN_TEMPLATES),
        ("heldout", fw.TEXT_HELDOUT_TEMPLATES),
    ):
        rows = _text_rows(processor, templates)
        per_mode = {}
        all_ok = []
        for mode in TEXT_IMAGE_MODES:
            probes = []
            for code, _, with_image, no_image, answer in rows:
                if mode == "none":
                    probes.append(_Probe(None, no_image, answer))
                elif mode == "blank":
                    probes.append(_Probe(blank_row, with_image, answer))
                else:
                    other = rng.choice([c.code for c in fw.COUNTRIES if c.code != code])
                    index = [c.code for c in fw.COUNTRIES].index(other)
                    render = rng.randrange(renders_per_flag)
                    probes.append(_Probe(index * renders_per_flag + render, with_image, answer))
            pred = _predict(model, probes, pixels, tok.pad_token_id, tok.eos_token_id)
            ok = [list(p[:-1]) == r.answer for p, r in zip(pred, probes, strict=True)]
            per_mode[mode] = _share(ok)
            all_ok += ok
        out[f"text_{name}_templates"] = _share(all_ok)
        out[f"text_{name}_probes"] = len(all_ok)
        out[f"text_{name}_per_image_mode"] = per_mode
    return out


def evaluate_flagworld_vlm(
    model_dir: str | Path | None = None, seed: int = EVAL_SEED, renders_per_flag: int = 8
) -> dict[str, Any]:
    """Load a saved tiny VLM (default: the shipped one) and evaluate it (see
    `evaluate_model`)."""
    model, processor, _ = load_tiny_vlm(model_dir if model_dir is not None else default_model_dir())
    return evaluate_model(model, processor, seed=seed, renders_per_flag=renders_per_flag)


def teacher_forced_accuracy(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    probes: Sequence[tuple[Image.Image, str, str]],
) -> float:
    """Fraction of (image, question, answer) probes whose answer words are all the argmax
    after the prompt, through the standard processor path."""
    tok = processor.tokenizer
    pixels = _pixels(processor, [p[0] for p in probes])
    rows = [
        _Probe(i, _prompt_ids(processor, q, DEFAULT_PROMPT_TEMPLATE), _answer_ids(processor, a))
        for i, (_, q, a) in enumerate(probes)
    ]
    pred = _predict(model, rows, pixels, tok.pad_token_id, tok.eos_token_id)
    right = [list(p[:-1]) == r.answer for p, r in zip(pred, rows, strict=True)]
    return sum(right) / max(1, len(rows))
