"""The `diffusers` image backend: a local text-to-image pipeline (optional extra).

`pip install 'okedit[diffusion]'`. Default model SDXL-Turbo (`stabilityai/sdxl-turbo`),
1-4 steps without classifier-free guidance (guidance 0, as the model is distilled for),
fp16 on a GPU, fp32 on the CPU. Any diffusers text-to-image pipeline folder works
(`AutoPipelineForText2Image`). Prompts are batched (`batch_size` per call); each image has
its own `torch.Generator` seeded with the job's seed, so an image depends on its prompt and
seed only, not on the batch it ran in. One lock per process serialises the pipeline: chunks
that the flow runs in threads take turns on the one GPU instead of competing for memory.
"""

from __future__ import annotations

import io
import threading
from typing import Any

from pipeline.image_backends.core import (
    Failed,
    ImageConfigError,
    Job,
    Produced,
    Result,
    Stats,
    now,
)

DEFAULT_MODEL = "stabilityai/sdxl-turbo"
_GPU_LOCK = threading.Lock()


def _png(img: Any) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load_pipeline(model: str, device: str) -> Any:
    """`AutoPipelineForText2Image` in fp16 (fp16 weights when the repo has them) on CUDA."""
    try:
        import torch
        from diffusers import AutoPipelineForText2Image
    except ImportError:
        raise ImageConfigError(
            "the diffusers image backend needs the optional extra: pip install 'okedit[diffusion]'"
        ) from None
    if device == "cuda":
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                model, torch_dtype=torch.float16, variant="fp16"
            )
        except (OSError, ValueError):  # no fp16 variant files: cast the full weights
            pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float16)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float32)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DiffusersImages:
    name = "diffusers"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        steps: int = 2,
        size: int = 512,
        guidance_scale: float = 0.0,
        batch_size: int = 4,
        device: str = "auto",
        pipeline: Any | None = None,
    ) -> None:
        if not 1 <= steps <= 50:
            raise ValueError(f"steps must be 1-50, got {steps}")
        self.model = model
        self.steps = steps
        self.size = size
        self.guidance_scale = guidance_scale
        self.batch_size = max(1, batch_size)
        self.device = resolve_device(device)
        self._pipe = pipeline  # injected (tests) or loaded on first use
        self._load_lock = threading.Lock()
        self.stats = Stats()

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": self.size,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }

    @property
    def pipe(self) -> Any:
        with self._load_lock:
            if self._pipe is None:
                self._pipe = load_pipeline(self.model, self.device)
            return self._pipe

    def generate(self, jobs: list[Job]) -> list[Result]:
        results: list[Result] = []
        for start in range(0, len(jobs), self.batch_size):
            results += self._batch(jobs[start : start + self.batch_size])
        return results

    def _batch(self, jobs: list[Job]) -> list[Result]:
        import torch

        pipe = self.pipe
        device = str(getattr(pipe, "device", self.device))
        generators = [torch.Generator(device=device).manual_seed(job.seed) for job in jobs]
        try:
            with _GPU_LOCK:
                output = pipe(
                    prompt=[job.slot.prompt for job in jobs],
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale,
                    height=self.size,
                    width=self.size,
                    generator=generators,
                    output_type="pil",
                )
        except torch.cuda.OutOfMemoryError:
            raise  # a smaller batch_size is a settings change, not a per-image failure
        except (RuntimeError, ValueError) as exc:
            self.stats.add("errors", len(jobs))
            return [Failed("pipeline_error", f"{type(exc).__name__}: {exc}"[:300]) for _ in jobs]
        self.stats.add("images", len(jobs))
        dtype = str(getattr(pipe, "dtype", "")).replace("torch.", "")
        stamp = now()
        return [
            Produced(
                data=_png(img),
                backend=self.name,
                model=self.model,
                seed=job.seed,
                params={
                    "size": self.size,
                    "steps": self.steps,
                    "guidance_scale": self.guidance_scale,
                    "dtype": dtype,
                    "device": device.split(":")[0],
                },
                timestamp=stamp,
            )
            for job, img in zip(jobs, output.images, strict=True)
        ]
