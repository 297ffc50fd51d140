"""BLIP-2 with an OPT language model: ViT + Q-Former + projection + OPT.

The `num_query_tokens` image tokens come first, before OPT's BOS (as `Blip2Processor` does).
Layers `language_model.model.decoder.layers`, default module `…layers[-1].fc2`. OPT's fc1/fc2
see a flattened `(batch·tokens, hidden)` input; the editors record `(batch, tokens)` with a
pre-hook on the decoder layer. The fast path needs pre-LayerNorm OPT (`do_layer_norm_before`,
true for OPT-1.3B and larger, the BLIP-2 ones included).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from editors.adapters.base import Batch, VLMAdapter


class Blip2Adapter(VLMAdapter):
    family = "blip2"
    model_class = "Blip2ForConditionalGeneration"
    model_types = ("blip-2",)
    default_template = "{image}Question: {question} Answer:"
    layers_path = "language_model.model.decoder.layers"
    final_norm_path = "language_model.model.decoder.final_layer_norm"
    project_out_path = "language_model.model.decoder.project_out"
    lm_head_path = "language_model.lm_head"
    mlp_writer = "fc2"
    residual_input = "final_layer_norm"
    image_before_bos = True

    def process_images(self, images: list[Image.Image]) -> dict[str, Tensor]:
        return dict(self.image_processor(images, return_tensors="pt"))

    def image_placeholder(self, pixel: dict[str, Tensor], index: int) -> list[int]:
        return [self.image_token_id] * int(self.model.config.num_query_tokens)

    def supports_tail(self, canonical: str) -> bool:
        text = self.model.config.text_config
        return super().supports_tail(canonical) and bool(text.do_layer_norm_before)

    def head(self, hidden: Tensor) -> Tensor:
        decoder = self.model.language_model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.model.language_model.lm_head(hidden)

    def image_features(self, pixel: dict[str, Tensor]) -> list[Tensor]:
        out = self.model.get_image_features(pixel["pixel_values"], return_dict=True)
        return list(out.pooler_output)

    def encoder_inputs(self, features: list[Tensor], batch: Batch) -> dict:
        from transformers.models.blip_2.modeling_blip_2 import (
            BaseModelOutputWithVisionQformerOutputs,
        )

        output = BaseModelOutputWithVisionQformerOutputs(pooler_output=torch.stack(features))
        return {"pixel_values": None, "mm_encoder_outputs": {"image": output}}
