"""Building blocks for tiny LLaVA-style VLMs trained from scratch on CPU.

Nothing here knows about flagworld (editors never import pipeline): a word-level tokenizer
built with `tokenizers`, a `LlavaForConditionalGeneration` built from a config, a
torchvision-free `LlavaProcessor`, save/load helpers that also write `okedit.json` (how the
LLaVA adapter formats prompts for this model), and a small seeded training loop.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
OKEDIT_META_FILE = "okedit.json"
DEFAULT_PROMPT_TEMPLATE = f"{IMAGE} {{question}}"

# Words are whitespace-separated; sentence punctuation (`?`, `!`, `,`, `;`, `:` and a
# word-final `.`) becomes its own token so "flag?" and "flag" share an id. Underscores and
# apostrophes stay inside words, so answers like `Mexico_City` are one token.
_PUNCT = Regex(r"[?!,;:]|\.$")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(_PUNCT, behavior="isolated")]
    )


def build_word_tokenizer(vocab: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab` (words or phrases; they are pre-tokenized the
    same way as text so every word in them gets an id). Special tokens: `<pad>` `<s>`
    `</s>` `<unk>` `<image>`; encoding prepends `<s>` like Llama tokenizers do."""
    pre = _pre_tokenizer()
    words: list[str] = []
    seen = set(SPECIAL_TOKENS)
    for entry in vocab:
        for word, _ in pre.pre_tokenize_str(entry):
            if word not in seen:
                seen.add(word)
                words.append(word)
    # Sorted for a vocab that does not depend on the caller's order (stable ids).
    ids = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, ids[BOS])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "flag ?" -> "flag?"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",  # right padding keeps teacher-forced positions exact
        model_max_length=512,
    )


def build_image_processor(image_size: int = 64) -> CLIPImageProcessorPil:
    """CLIP normalisation at `image_size`², PIL backend (no torchvision, design §11)."""
    square = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False)


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 64, patch_size: int = 16
) -> LlavaProcessor:
    """`LlavaProcessor` that expands `<image>` into (image_size/patch_size)² tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # CLS dropped ...
        num_additional_image_tokens=1,  # ... after being counted: 16 + 1 - 1 = 16 tokens
        image_token=IMAGE,
    )


def build_tiny_llava(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    vision_width: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_mlp: int = 512,
    text_width: int = 192,
    text_layers: int = 2,
    text_heads: int = 4,
    text_mlp: int = 256,
    vision_feature_layer: int = -1,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA (CLIP vision tower + Llama LM), ~1.2 M parameters
    at the defaults. Initialisation is seeded so a recipe is reproducible end to end."""
    n_image_tokens = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=text_mlp,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_image_tokens,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def okedit_meta(
    processor: LlavaProcessor, prompt_template: str = DEFAULT_PROMPT_TEMPLATE, **extra: Any
) -> dict[str, Any]:
    """What the LLaVA adapter needs to drive this model (written as `okedit.json`)."""
    return {
        "family": "llava",
        "prompt_template": prompt_template,
        # Teacher forcing: prompt + " " + target; loss/accuracy on the target tokens only.
        "target_separator": " ",
        "image_token": IMAGE,
        "image_tokens": _n_image_tokens(processor),
        "image_size": processor.image_processor.size["height"],
        "edit_module": "model.language_model.layers[-1].mlp.down_proj",
        "padding_side": "right",  # teacher forcing: positions as unpadded
        "generation_padding_side": "left",  # batched generate() needs left padding
        **extra,
    }


def _n_image_tokens(processor: LlavaProcessor) -> int:
    side = processor.image_processor.size["height"] // processor.patch_size
    n = side * side + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def save_tiny_vlm(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """`save_pretrained` for model and processor, plus `okedit.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = dict(meta) if meta is not None else okedit_meta(processor)
    (out / OKEDIT_META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_tiny_vlm(
    model_dir: str | Path,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict[str, Any]]:
    """Load a saved tiny VLM offline (local files only), in eval mode, fp32 on CPU."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model in {path} (config.json missing); train one first, e.g. "
            "`okedit tiny-model train`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    meta_file = path / OKEDIT_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else okedit_meta(processor)
    return model.eval(), processor, meta


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0, as a multiplier of the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_loop(
    model: torch.nn.Module,
    batches: Callable[[int], Mapping[str, torch.Tensor]] | Iterable[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1.5e-3,
    weight_decay: float = 0.01,
    warmup: int | None = None,
    seed: int = 0,
    budget_s: float | None = None,
    grad_clip: float = 1.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    lr_mult: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """AdamW + warm-up/cosine over `steps`; each batch goes to `model(**batch)` and its
    `.loss` is minimised (HF `labels` with -100 where no loss is wanted).
    `lr_mult` scales the lr of parameters whose name contains a key (last match wins).

    `batches` is either a function `step -> batch` or an iterable. The schedule is fixed by
    `steps` (deterministic for a seed); `budget_s` only stops early as a safety net and is
    reported (`stopped_by_budget`)."""
    seed_everything(seed)
    warmup = max(1, steps // 30) if warmup is None else warmup
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # No weight decay on norms/biases (1-d tensors): standard, and it helps tiny models.
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in named:
        mult = 1.0
        for key, value in (lr_mult or {}).items():
            if key in name:
                mult = value
        buckets.setdefault((mult, p.ndim >= 2), []).append(p)
    groups = [
        {"params": ps, "lr": lr * mult, "weight_decay": weight_decay if decay else 0.0}
        for (mult, decay), ps in buckets.items()
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    source: Callable[[int], Mapping[str, torch.Tensor]]
    if callable(batches):
        source = batches
    else:
        it: Iterator[Mapping[str, torch.Tensor]] = iter(batches)
        source = lambda _step: next(it)  # noqa: E731

    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    done = 0
    stopped = False
    for step in range(steps):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            stopped = True
            break
        loss = model(**source(step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if log_every and done % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"step {done}/{steps} loss {recent:.4f} {time.perf_counter() - start:.0f}s")
    model.eval()
    return {
        "steps": done,
        "planned_steps": steps,
        "stopped_by_budget": stopped,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "lr": lr,
        "lr_mult": dict(lr_mult or {}),
        "seed": seed,
    }
