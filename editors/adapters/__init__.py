"""Model adapters: one per VLM family, plus loading by Hub id or local path.

adapter = load_model(ModelConfig(model="llava-hf/llava-1.5-7b-hf"))
batch = adapter.build_inputs([image], ["What is shown?"], ["a cat"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from editors.adapters.base import (
    Batch,
    Capture,
    ModulePathError,
    TargetEncodingError,
    VLMAdapter,
    resolve_module_path,
    to_pil,
)
from editors.adapters.blip2 import Blip2Adapter
from editors.adapters.idefics3 import Idefics3Adapter, SmolVLMAdapter
from editors.adapters.llava import LlavaAdapter
from editors.adapters.qwen2_vl import Qwen2VLAdapter
from editors.config import ModelConfig

META_FILE = "okedit.json"
ADAPTERS: dict[str, type[VLMAdapter]] = {
    cls.family: cls
    for cls in (LlavaAdapter, Blip2Adapter, Qwen2VLAdapter, Idefics3Adapter, SmolVLMAdapter)
}


class UnsupportedModelError(ValueError):
    """A model family without an adapter."""


def family_of(model_type: str) -> str:
    """The adapter family for a transformers `config.model_type`."""
    for family, cls in ADAPTERS.items():
        if model_type in cls.model_types:
            return family
    supported = ", ".join(t for cls in ADAPTERS.values() for t in cls.model_types)
    raise UnsupportedModelError(
        f"no adapter for model_type {model_type!r}; supported: {supported}. "
        "Add an adapter in editors/adapters/ or pick a supported VLM."
    )


def make_adapter(
    model: nn.Module,
    tokenizer: Any,
    image_processor: Any,
    family: str = "auto",
    prompt_template: str | None = None,
) -> VLMAdapter:
    """Wrap an already-built model (e.g. a tiny one built from a config)."""
    family = family_of(model.config.model_type) if family == "auto" else family
    if family not in ADAPTERS:
        raise UnsupportedModelError(f"unknown family {family!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[family](model, tokenizer, image_processor, prompt_template)


def read_meta(model: str) -> dict[str, Any]:
    """`okedit.json` beside a local model (prompt template, family), or {}."""
    path = Path(model) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(config: ModelConfig) -> VLMAdapter:
    """Load model, tokenizer and (PIL) image processor by Hub id or local path.

    The family comes from `config.family`, else `okedit.json`, else `config.model_type`;
    the prompt template from `config.prompt_template`, else `okedit.json`, else the
    family's chat format.
    """
    import transformers

    device = config.torch_device()
    dtype = config.torch_dtype(device)
    meta = read_meta(config.model)
    model_config = transformers.AutoConfig.from_pretrained(config.model)
    family = config.family if config.family != "auto" else meta.get("family", "auto")
    family = family_of(model_config.model_type) if family == "auto" else family
    if family not in ADAPTERS:
        raise UnsupportedModelError(f"unknown family {family!r}; known: {', '.join(ADAPTERS)}")
    model_class = getattr(transformers, ADAPTERS[family].model_class)
    model = model_class.from_pretrained(config.model, dtype=dtype).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
    image_processor = transformers.AutoImageProcessor.from_pretrained(config.model, backend="pil")
    template = config.prompt_template or meta.get("prompt_template")
    adapter = make_adapter(model, tokenizer, image_processor, family, template)
    adapter.text_bos = config.text_bos
    return adapter


__all__ = [
    "ADAPTERS",
    "Batch",
    "Blip2Adapter",
    "Capture",
    "Idefics3Adapter",
    "LlavaAdapter",
    "ModulePathError",
    "Qwen2VLAdapter",
    "SmolVLMAdapter",
    "TargetEncodingError",
    "UnsupportedModelError",
    "VLMAdapter",
    "family_of",
    "load_model",
    "make_adapter",
    "read_meta",
    "resolve_module_path",
    "to_pil",
]
