"""LLaVA(-1.5): CLIP/SigLIP vision tower + projector + a Llama-family language model.

Layers `model.language_model.layers`, default module `…layers[-1].mlp.down_proj`. One image
becomes `patches (+1 CLS with the "full" feature strategy)` `<image>` tokens.
"""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from editors.adapters.base import VLMAdapter


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    model_types = ("llava",)
    default_template = "USER: {image}\n{question} ASSISTANT:"
    layers_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"

    def process_images(self, images: list[Image.Image]) -> dict[str, Tensor]:
        return dict(self.image_processor(images, return_tensors="pt"))

    def image_placeholder(self, pixel: dict[str, Tensor], index: int) -> list[int]:
        config = self.model.config
        height, width = pixel["pixel_values"].shape[-2:]
        patch = config.vision_config.patch_size
        has_cls = config.vision_config.model_type == "clip_vision_model"
        count = (height // patch) * (width // patch) + int(has_cls)
        if config.vision_feature_select_strategy == "default":
            count -= 1
        return [self.image_token_id] * count

    def image_features(self, pixel: dict[str, Tensor]) -> list[Tensor]:
        out = self.model.get_image_features(pixel_values=pixel["pixel_values"], return_dict=True)
        return list(out.pooler_output)
