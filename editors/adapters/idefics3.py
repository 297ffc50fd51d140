"""Idefics3 and SmolVLM: SigLIP + pixel-shuffle connector + a Llama-family text model.

`SmolVLMProcessor` cannot be built without torchvision (design §11); inputs come from the
PIL image processor (image splitting off: one global image per row) + the tokenizer:
`<fake_token_around_image><global-img>` + `image_seq_len` `<image>` tokens +
`<fake_token_around_image>`, with `image_seq_len = (image_size / patch)² / scale_factor²`.
Layers `model.text_model.layers`, default module `…layers[-1].mlp.down_proj`.
"""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from editors.adapters.base import VLMAdapter

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"
    model_types = ("idefics3",)
    default_template = "<|begin_of_text|>User:{image}{question}<end_of_utterance>\nAssistant:"
    layers_path = "model.text_model.layers"
    final_norm_path = "model.text_model.norm"

    def process_images(self, images: list[Image.Image]) -> dict[str, Tensor]:
        out = self.image_processor(
            [[im] for im in images], do_image_splitting=False, return_tensors="pt"
        )
        return {k: out[k] for k in ("pixel_values", "pixel_attention_mask")}

    def image_placeholder(self, pixel: dict[str, Tensor], index: int) -> list[int]:
        config = self.model.config
        vision = config.vision_config
        count = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
        fake, glob = (self._special_id(t) for t in (FAKE_TOKEN, GLOBAL_TOKEN))
        return [fake, glob] + [self.image_token_id] * count + [fake]

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the {self.family} tokenizer has no {token!r} token")
        return int(token_id)

    def image_features(self, pixel: dict[str, Tensor]) -> list[Tensor]:
        out = self.model.model.get_image_features(
            pixel["pixel_values"], pixel["pixel_attention_mask"], return_dict=True
        )
        return [f.unsqueeze(0) for f in out.pooler_output]


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_class = "SmolVLMForConditionalGeneration"
    model_types = ("smolvlm",)
    default_template = "<|im_start|>User:{image}{question}<end_of_utterance>\nAssistant:"
