"""Qwen2-VL: a ViT with 2×2 patch merging + a Qwen2 language model with multimodal RoPE.

`Qwen2VLProcessor` cannot be built without torchvision (design §11), so inputs come from the
PIL image processor + the tokenizer: `<|vision_start|>` + `grid_t·grid_h·grid_w / merge²`
`<|image_pad|>` tokens + `<|vision_end|>`, and `mm_token_type_ids` (1 on image tokens) for
M-RoPE. Layers `model.language_model.layers`, default module `…layers[-1].mlp.down_proj`.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from editors.adapters.base import Batch, VLMAdapter


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    model_types = ("qwen2_vl",)
    default_template = "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
    layers_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"
    # M-RoPE: an image takes fewer positions than tokens; suffixes on a shared prefix and
    # decoded tokens continue from the positions the model used (`_prefix_shift`,
    # `Capture.position_shift`).

    def process_images(self, images: list[Image.Image]) -> dict[str, Tensor]:
        return dict(self.image_processor(images, return_tensors="pt"))

    def _merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def image_placeholder(self, pixel: dict[str, Tensor], index: int) -> list[int]:
        count = int(pixel["image_grid_thw"][index].prod()) // self._merge() ** 2
        config = self.model.config
        return (
            [config.vision_start_token_id]
            + [self.image_token_id] * count
            + [config.vision_end_token_id]
        )

    def extra_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int() * attention_mask}

    def expand_pixels(self, pixel: dict[str, Tensor], index: list[int]) -> dict[str, Tensor]:
        grid = pixel["image_grid_thw"]
        patches = torch.split(pixel["pixel_values"], grid.prod(dim=-1).tolist())
        return {
            "pixel_values": torch.cat([patches[i] for i in index]),
            "image_grid_thw": grid[index],
        }

    def image_features(self, pixel: dict[str, Tensor]) -> list[Tensor]:
        out = self.model.get_image_features(
            pixel["pixel_values"], pixel["image_grid_thw"], return_dict=True
        )
        return list(out.pooler_output)

    def encoder_inputs(self, features: list[Tensor], batch: Batch) -> dict:
        inputs = super().encoder_inputs(features, batch)
        inputs["image_grid_thw"] = batch.pixel["image_grid_thw"][batch.image_index]
        return inputs
