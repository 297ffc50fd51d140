"""Tiny random-weight VLMs of every supported family, built from configs (no download).

For tests, benchmarks and demos: a word-level tokenizer is trained on the spot with
`tokenizers` on the given corpus (plus the family's special tokens), the model is built from
a transformers config with small sizes, and the PIL image processor is configured to match.
`text_overrides`/`vision_overrides` scale a model up (e.g. a ~300 M parameter OPT for the
edit-speed benchmark).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from editors.adapters import make_adapter
from editors.adapters.base import VLMAdapter

SPECIALS = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<fake_token_around_image>",
    "<global-img>",
]
TEMPLATE = "{image} question : {question} answer :"
IMAGE_SIZE = 32


def word_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `corpus`; unknown words map to `<unk>`."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )


def _llama_text(vocab: int, tok: PreTrainedTokenizerFast, **overrides: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **overrides,
    }


def _vision(**overrides: Any) -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        **overrides,
    }


def _llava(tok: PreTrainedTokenizerFast, text: dict, vision: dict, top: dict) -> tuple[Any, Any]:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = vision.get("image_size", IMAGE_SIZE)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_vision(**vision)),
        text_config=transformers.LlamaConfig(**_llama_text(len(tok), tok, **text)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **top,
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return transformers.LlavaForConditionalGeneration(config), processor


def _blip2(tok: PreTrainedTokenizerFast, text: dict, vision: dict, top: dict) -> tuple[Any, Any]:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vision_cfg = _vision(**vision)
    opt = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": text.get("hidden_size", 32),
        "max_position_embeddings": 512,
        "do_layer_norm_before": True,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **text,
    }
    top = dict(top)
    qformer = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "encoder_hidden_size": vision_cfg["hidden_size"],
        "vocab_size": len(tok),
        **top.pop("qformer_config", {}),
    }
    config = transformers.Blip2Config(
        vision_config=vision_cfg,
        qformer_config=qformer,
        text_config=transformers.OPTConfig(**opt).to_dict(),
        **{"num_query_tokens": 8, **top},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    size = vision_cfg["image_size"]
    processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return transformers.Blip2ForConditionalGeneration(config), processor


def _qwen2_vl(tok: PreTrainedTokenizerFast, text: dict, vision: dict, top: dict) -> tuple[Any, Any]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_cfg = _llama_text(len(tok), tok, **text)
    text_cfg.pop("model_type")
    text_cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1]}
    config = transformers.Qwen2VLConfig(
        text_config=text_cfg,
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": text_cfg["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **top,
    )
    pixels = 28 * 28 * 4  # 56×56: a 4×4 patch grid, 4 image tokens after 2×2 merging
    processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return transformers.Qwen2VLForConditionalGeneration(config), processor


def _idefics(
    family: str, tok: PreTrainedTokenizerFast, text: dict, vision: dict, top: dict
) -> tuple[Any, Any]:
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    config_cls, model_cls, processor_cls = {
        "idefics3": (
            transformers.Idefics3Config,
            transformers.Idefics3ForConditionalGeneration,
            Idefics3ImageProcessorPil,
        ),
        "smolvlm": (
            transformers.SmolVLMConfig,
            transformers.SmolVLMForConditionalGeneration,
            SmolVLMImageProcessorPil,
        ),
    }[family]
    vision_cfg = _vision(**vision)
    config = config_cls(
        vision_config=vision_cfg,
        text_config=_llama_text(len(tok), tok, **text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        **{"scale_factor": 2, **top},
    )
    size = vision_cfg["image_size"]
    processor = processor_cls(
        do_image_splitting=False,
        size={"longest_edge": size},
        max_image_size={"longest_edge": size},
    )
    return model_cls(config), processor


def random_adapter(
    family: str,
    corpus: list[str],
    seed: int = 0,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    prompt_template: str = TEMPLATE,
    config_overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VLMAdapter:
    """A tiny random model of `family` (llava, blip2, qwen2_vl, idefics3, smolvlm) in eval
    mode, with a word-level tokenizer trained on `corpus`. `config_overrides` set top-level
    config fields (e.g. BLIP-2's `num_query_tokens`). The weights are created directly on
    `device` in `dtype` (a multi-billion-parameter shape never exists in CPU fp32)."""
    tok = word_tokenizer(
        corpus + [prompt_template.replace("{image}", " ").replace("{question}", " ")]
    )
    text, vision = dict(text_overrides or {}), dict(vision_overrides or {})
    torch.manual_seed(seed)
    top = dict(config_overrides or {})
    builders = {"llava": _llava, "blip2": _blip2, "qwen2_vl": _qwen2_vl}
    if family not in (*builders, "idefics3", "smolvlm"):
        raise ValueError(f"no random builder for family {family!r}")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family in builders:
                model, processor = builders[family](tok, text, vision, top)
            else:
                model, processor = _idefics(family, tok, text, vision, top)
    finally:
        torch.set_default_dtype(default_dtype)
    return make_adapter(model.eval(), tok, processor, family, prompt_template)
