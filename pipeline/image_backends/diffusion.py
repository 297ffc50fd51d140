"""The `diffusers` image backend: a local text-to-image pipeline (optional extra).

`pip install 'okedit[diffusion]'`. Default model SDXL-Turbo (`stabilityai/sdxl-turbo`), the
few-step distilled model recommended for full builds: 2 steps without classifier-free
guidance (guidance 0, as the model is distilled for) at 512², ≈ 0.023 s of an H200 per image
(docs/benchmarks.md). Any diffusers text-to-image pipeline folder works
(`AutoPipelineForText2Image`); the model id is `ImageSettings.model` and every image's
provenance names it.

Speed on a GPU:
- fp16 on CUDA by default (`dtype="bfloat16"` on request; fp32 on the CPU);
- PyTorch's scaled-dot-product attention (`AttnProcessor2_0`, diffusers' default): a
  pipeline whose processors were set to the plain one is switched back (`ensure_sdpa`);
- `torch.compile` of the UNet, off by default (`compile=True`; each batch shape compiles);
- prompts in batches: `batch_size` per pipeline call, or `"auto"` (the default here): as many
  as fit in `MEMORY_HEADROOM` of the device's free memory at the estimated activation memory
  per image (`activation_bytes`), at most `max_batch`; out of memory in auto mode halves the
  batch and tries again (a fixed batch size that does not fit is a settings error);
- PNG encoding runs in a thread pool while the GPU makes the next batch.

Each image has its own `torch.Generator` seeded with the job's seed, so an image depends on
its prompt and seed only, not on the batch it ran in. One lock per process serialises the
pipeline: chunks that the flow runs in threads take turns on the one GPU instead of
competing for memory.
"""

from __future__ import annotations

import io
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

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

BatchSize = int | Literal["auto"]
DType = Literal["auto", "float16", "bfloat16", "float32"]
MEMORY_HEADROOM = 0.8  # share of the free device memory an auto batch may plan to use
MAX_BATCH = {"cuda": 32, "cpu": 8}  # auto batch caps: the H200 is saturated at 8-16 images
# Activation memory per image, upper-bound estimates from the H200 check (docs/gpu: 8.8 GB
# peak with 5.1 GB of SDXL UNet weights, UNet batch 8 at 1024², VAE decode batch 4): bytes per
# latent position x first-level UNet channel (x2 with guidance), and per pixel x first-level
# VAE channel. The decode follows the denoising loop, so the larger of the two counts.
UNET_BYTES_FACTOR = 48
VAE_BYTES_FACTOR = 4


def _png(img: Any) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_pipeline(model: str, device: str, dtype: str = "auto") -> Any:
    """`AutoPipelineForText2Image` in `dtype` (auto: fp16 on CUDA with the repo's fp16 weights
    when it has them, fp32 on the CPU), on `device`, with SDPA attention."""
    try:
        import torch
        from diffusers import AutoPipelineForText2Image
    except ImportError:
        raise ImageConfigError(
            "the diffusers image backend needs the optional extra: pip install 'okedit[diffusion]'"
        ) from None
    wanted = torch_dtype(dtype, device)
    if wanted in (torch.float16, torch.bfloat16):
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                model, torch_dtype=wanted, variant="fp16"
            )
        except (OSError, ValueError):  # no fp16 variant files: cast the full weights
            pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=wanted)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=wanted)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensure_sdpa(pipe: Any) -> str:
    """Every attention processor of the pipeline's UNet and VAE on PyTorch's SDPA kernel
    (diffusers' default); a plain `AttnProcessor` is replaced. Returns the processors' names."""
    import torch.nn.functional as F

    names: set[str] = set()
    for part in ("unet", "vae"):
        module = getattr(pipe, part, None)
        processors = getattr(module, "attn_processors", None)
        if not processors:
            continue
        if hasattr(F, "scaled_dot_product_attention") and any(
            type(p).__name__ == "AttnProcessor" for p in processors.values()
        ):
            from diffusers.models.attention_processor import AttnProcessor2_0

            module.set_attn_processor(AttnProcessor2_0())
            processors = module.attn_processors
        names |= {type(p).__name__ for p in processors.values()}
    return ",".join(sorted(names)) or "unknown"


def activation_bytes(pipe: Any, size: int, guidance_scale: float) -> int:
    """Estimated peak activation memory of one image at `size`² (see the factors above)."""
    import torch

    unet_cfg = getattr(getattr(pipe, "unet", None), "config", None)
    vae = getattr(pipe, "vae", None)
    vae_cfg = getattr(vae, "config", None)
    vae_channels = list(getattr(vae_cfg, "block_out_channels", None) or [128, 256, 512, 512])
    scale = 2 ** (len(vae_channels) - 1)
    element = torch.tensor([], dtype=getattr(pipe, "dtype", torch.float32)).element_size()
    vae_element = 4 if getattr(vae_cfg, "force_upcast", False) else element
    unet_channels = int((getattr(unet_cfg, "block_out_channels", None) or [320])[0])
    guided = 2 if guidance_scale > 1 else 1  # diffusers runs guidance as a doubled batch
    unet = (size // scale) ** 2 * unet_channels * element * UNET_BYTES_FACTOR * guided
    decode = size * size * int(vae_channels[0]) * vae_element * VAE_BYTES_FACTOR
    return max(unet, decode, 1)


def free_memory(device: str) -> int:
    """Free bytes on the device: on CUDA the driver's count plus what PyTorch's allocator
    holds unused (the previous batch's activations stay reserved), on the CPU the available
    RAM."""
    import torch

    if device.startswith("cuda"):
        where = torch.device(device)
        cached = torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)
        return int(torch.cuda.mem_get_info(where)[0]) + max(0, int(cached))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not a POSIX system: the cap decides
        return 2**40


def auto_batch_size(free_bytes: int, per_image_bytes: int, cap: int) -> int:
    """As many images as fit in `MEMORY_HEADROOM` of the free memory, 1 to `cap`."""
    fit = int(free_bytes * MEMORY_HEADROOM) // max(1, per_image_bytes)
    return max(1, min(cap, fit))


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
        batch_size: BatchSize = "auto",
        device: str = "auto",
        dtype: DType = "auto",
        max_batch: int | None = None,
        compile: bool = False,
        pipeline: Any | None = None,
        memory_probe: Callable[[], int] | None = None,
        encode_workers: int | None = None,
    ) -> None:
        if not 1 <= steps <= 50:
            raise ValueError(f"steps must be 1-50, got {steps}")
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive number or 'auto', got {batch_size!r}")
        self.model = model
        self.steps = steps
        self.size = size
        self.guidance_scale = guidance_scale
        self.batch_size: BatchSize = batch_size
        self.device = resolve_device(device)
        self.dtype = dtype
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        self.max_batch = max(1, max_batch or MAX_BATCH[kind])
        self.compile = compile
        self._pipe = pipeline  # injected (tests) or loaded on first use
        self._memory_probe = memory_probe or (lambda: free_memory(self.device))
        self._encode_workers = max(1, encode_workers or min(8, os.cpu_count() or 1))
        self._load_lock = threading.Lock()
        self._oom_cap: int | None = None  # an auto batch that ran out of memory caps the next
        self.attention = ""
        self.batches: Counter[int] = Counter()  # pipeline calls by batch size
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
                self._pipe = load_pipeline(self.model, self.device, self.dtype)
            if not self.attention:
                self.attention = ensure_sdpa(self._pipe)
                if self.compile:
                    import torch

                    self._pipe.unet = torch.compile(self._pipe.unet)
            return self._pipe

    def runtime(self) -> dict[str, Any]:
        """How the pipeline runs (not part of the cache key or the provenance)."""
        return {
            "attention": self.attention,
            "dtype": str(getattr(self._pipe, "dtype", "")).replace("torch.", ""),
            "compiled": self.compile,
            "batch_size": self.batch_size,
            "batches": dict(sorted(self.batches.items())),
        }

    def planned_batch_size(self) -> int:
        """The batch size of the next pipeline call."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        per_image = activation_bytes(self.pipe, self.size, self.guidance_scale)
        size = auto_batch_size(self._memory_probe(), per_image, self.max_batch)
        return min(size, self._oom_cap) if self._oom_cap else size

    def generate(self, jobs: list[Job]) -> list[Result]:
        done: list[Failed | tuple[Job, Future[bytes], dict[str, Any], str]] = []
        with ThreadPoolExecutor(self._encode_workers) as pool:
            start = 0
            while start < len(jobs):
                batch = jobs[start : start + self.planned_batch_size()]
                outcome = self._batch(batch)
                if outcome is None:
                    continue  # out of memory: the same jobs again, fewer at a time
                start += len(batch)
                if isinstance(outcome, Failed):
                    done += [outcome] * len(batch)
                    continue
                images, params, stamp = outcome
                for job, img in zip(batch, images, strict=True):  # encoded beside the GPU
                    done.append((job, pool.submit(_png, img), params, stamp))
            return [self._produced(entry) for entry in done]

    def _produced(self, entry: Failed | tuple[Job, Future[bytes], dict[str, Any], str]) -> Result:
        if isinstance(entry, Failed):
            return entry
        job, png, params, stamp = entry
        return Produced(
            data=png.result(),
            backend=self.name,
            model=self.model,
            seed=job.seed,
            params=dict(params),
            timestamp=stamp,
        )

    def _batch(self, jobs: list[Job]) -> tuple[list[Any], dict[str, Any], str] | Failed | None:
        """The batch's images with their params, one `Failed` for all of them, or None when
        an auto batch ran out of memory (the cap is halved)."""
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
            if self.batch_size != "auto" or len(jobs) == 1:
                raise  # a smaller batch_size is a settings change, not a per-image failure
            self._oom_cap = max(1, len(jobs) // 2)
            self.stats.add("oom_retries")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        except (RuntimeError, ValueError) as exc:
            self.stats.add("errors", len(jobs))
            return Failed("pipeline_error", f"{type(exc).__name__}: {exc}"[:300])
        self.stats.add("images", len(jobs))
        self.batches[len(jobs)] += 1
        dtype = str(getattr(pipe, "dtype", "")).replace("torch.", "")
        params = {
            "size": self.size,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "dtype": dtype,
            "device": device.split(":")[0],
        }
        images = list(output.images)
        if len(images) != len(jobs):
            raise RuntimeError(f"the pipeline made {len(images)} images for {len(jobs)} prompts")
        return images, params, now()
