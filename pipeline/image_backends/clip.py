"""CLIP text and image embeddings (transformers `CLIPModel`), for retrieval and scores.

Loaded from a Hub id or a local folder holding the model, its tokenizer and its image
processor. The processor is the Pillow one (`CLIPImageProcessorPil`): torchvision does not
import beside this torch (design §11). Embeddings are L2-normalised, so a dot product is
the cosine similarity ("CLIP score" here is that cosine, not the x100 logit).
"""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _features(output: Any) -> Any:
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return output if hasattr(output, "shape") else output.pooler_output


class ClipEmbedder:
    """Thread-safe CLIP embedder; batches texts and images."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str = "auto", batch_size: int = 32):
        import torch
        from transformers import AutoTokenizer, CLIPModel
        from transformers.models.clip import CLIPImageProcessorPil

        self.model_id = model_id
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        if self.device == "auto":
            self.device = "cpu"
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.processor = CLIPImageProcessorPil.from_pretrained(model_id)
        self.model = CLIPModel.from_pretrained(model_id).to(self.device).eval()
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._lock = threading.Lock()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with self._lock, torch.inference_mode():
                out = self.model.get_text_features(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                )
            chunks.append(_features(out).float().cpu().numpy())
        return _normalise(np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            with self._lock, torch.inference_mode():
                out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            chunks.append(_features(out).float().cpu().numpy())
        return _normalise(np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32))

    def scores(self, images: list[bytes], prompts: list[str]) -> list[float]:
        """Cosine similarity of each image to its prompt."""
        if not images:
            return []
        decoded = [Image.open(io.BytesIO(data)) for data in images]
        img = self.embed_images(decoded)
        txt = self.embed_texts(prompts)
        return [float(x) for x in (img * txt).sum(axis=1)]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if x.size == 0:
        return x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


_LOAD_LOCK = threading.Lock()


def load_clip(model_id: str = DEFAULT_CLIP, device: str = "auto") -> ClipEmbedder:
    """One embedder per (model, device) per process, also when chunks run in threads."""
    with _LOAD_LOCK:
        return _load_clip(model_id, device)


@lru_cache(maxsize=2)
def _load_clip(model_id: str, device: str) -> ClipEmbedder:
    return ClipEmbedder(model_id, device)
