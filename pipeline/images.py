"""The images stage (design §6): image backends behind one interface, and image checks.

A backend turns (SourceItem, Annotation) pairs into `ItemImages`: 10 image rephrases of
`image_object` (image generality probes), near-miss `locality_images` of
`locality_image_object`, and the editor's training negative of
`locality_image_train_object`. Every image is stored as encoded bytes and has one
`FieldProvenance` (field `image_rephrases[3]`, `locality_images[0]`, `locality_image_train`;
backend, model, seed, and in `params` the prompt, size, steps, score, attempt, ...).

Backends (`ImageSettings.backend`), all checked the same way (`image_backends.checks`):
- `render`: the flagworld renderer (here);
- `openai`: the Images API (`image_backends.openai_api`);
- `diffusers`: a local text-to-image pipeline (`image_backends.diffusion`, optional extra);
- `retrieve`: real photos from a local pool by CLIP similarity (`image_backends.retrieve`).
`make_image_backend(settings, seed=..., cache_dir=...)` is the one entry point.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pipeline.image_backends.checks import ImageChecker, NearDuplicateRule, check_image
from pipeline.image_backends.core import (
    Failed,
    ImageConfigError,
    ImageFatalError,
    ImageGenerator,
    ImageMaker,
    Job,
    Produced,
    Result,
    Scorer,
    WithFallback,
)
from pipeline.sources import flagworld as fw
from schemas.record import Annotation, ItemImages, Rejection, SourceItem

if TYPE_CHECKING:
    from pipeline.config import ImageSettings

__all__ = [
    "ImageBackend",
    "ImageConfigError",
    "ImageError",
    "ImageFatalError",
    "ImageMaker",
    "RenderBackend",
    "check_image",
    "make_image_backend",
]


@runtime_checkable
class ImageBackend(Protocol):
    """Makes the images of annotated items; one result (or rejection) per pair, in order."""

    name: str

    def make_images(
        self, pairs: list[tuple[SourceItem, Annotation]]
    ) -> list[ItemImages | Rejection]: ...


class ImageError(ValueError):
    """An item whose images cannot be made; the message is the reason."""


# Augmentation ranges of `flagworld.render_variant`, recorded in every image's provenance.
RENDER_AUGMENTATION: dict[str, Any] = {
    "scale": [0.6, 1.0],
    "rotation_deg": [-10, 10],
    "offcanvas_frac": 0.1,
    "margin": "grey or colour",
    "brightness": [0.85, 1.15],
    "noise_sigma": [2, 8],
}


class RenderGenerator:
    """Flagworld flags: re-rendered variants as positives, clean look-alikes as negatives.

    `locality_images[0]` and the training negative are clean flags (like the item's own
    image); every other image is a variant whose rng is seeded by (seed, item id, field),
    plus the attempt number for replacements: deterministic and independent of batching.
    """

    name = "render"

    def __init__(self, seed: int = 0, size: int = 64) -> None:
        self.seed = seed
        self.size = size

    def generate(self, jobs: list[Job]) -> list[Result]:
        return [self._one(job) for job in jobs]

    def _one(self, job: Job) -> Result:
        slot = job.slot
        try:
            code = fw.country_for_object(slot.prompt)
        except KeyError:
            return Failed(
                "unsupported",
                f"{slot.source_field} {slot.prompt!r} is not a flagworld flag; the render "
                "backend only draws flagworld flags (use another image backend for other "
                "sources)",
                retry=False,
            )
        clean = slot.role == "train" or (slot.role == "locality" and slot.position == 0)
        rng_key = f"render:{self.seed}:{job.context.item.item_id}:{slot.field}"
        if job.attempt:
            rng_key += f":{job.attempt}"
        if clean:
            img = fw.render_flag(code, self.size)
        else:
            img = fw.render_variant(code, random.Random(rng_key), self.size)
        params: dict[str, Any] = {"size": self.size, "country": code, "clean": clean}
        if not clean:
            params |= {"rng_key": rng_key, "augmentation": RENDER_AUGMENTATION}
        return Produced(
            data=fw.to_png(img),
            backend=self.name,
            seed=self.seed,
            params=params,
            template_id="flagworld/render",
            template_version=fw.TEMPLATES_VERSION,
        )


class RenderBackend(ImageMaker):
    """The flagworld renderer behind the common checks (design §9)."""

    def __init__(
        self,
        seed: int = 0,
        size: int = 64,
        n_rephrases: int = 10,
        n_locality: int = 3,
        *,
        max_attempts: int = 3,
        checker: ImageChecker | None = None,
        scorer: Scorer | None = None,
        clip_threshold: float | None = None,
    ) -> None:
        if n_rephrases < 1 or n_locality < 1:
            raise ValueError("RenderBackend needs n_rephrases >= 1 and n_locality >= 1")
        super().__init__(
            RenderGenerator(seed, size),
            seed=seed,
            n_rephrases=n_rephrases,
            n_locality=n_locality,
            max_attempts=max_attempts,
            checker=checker,
            scorer=scorer,
            clip_threshold=clip_threshold,
        )
        self.size = size

    def make_item_images(self, item: SourceItem, annotation: Annotation) -> ItemImages:
        """The images of one item; raises `ImageError` with the reason."""
        (result,) = self.make_images([(item, annotation)])
        if isinstance(result, Rejection):
            raise ImageError(result.reason)
        return result


# --------------------------------------------------------------------------- factory

DEFAULT_SIZES = {"render": 64, "openai": 256, "diffusers": 512, "retrieve": 512}


def _clip_scorer(model_id: str, device: str) -> Scorer:
    """A scorer that loads CLIP on its first use only."""

    def score(images: list[bytes], prompts: list[str]) -> list[float]:
        from pipeline.image_backends.clip import load_clip

        return load_clip(model_id, device).scores(images, prompts)

    return score


def _generator(
    backend: str, settings: ImageSettings, seed: int, cache_dir: Path | None, primary: bool
) -> ImageGenerator:
    """One generator; `settings.model` and `settings.size` apply to the primary backend,
    a fallback uses its own defaults."""
    model = settings.model if primary else ""
    size = (settings.size if primary else None) or DEFAULT_SIZES[backend]
    if backend == "openai" and model not in ("", "dall-e-2") and size < 1024:
        size = settings.size if primary and settings.size else 1024  # dall-e-3, gpt-image-*
    images_cache = Path(cache_dir) / "images" if cache_dir is not None else None
    if backend == "render":
        return RenderGenerator(seed, size)
    if backend == "retrieve":
        from pipeline.image_backends.retrieve import RetrieveImages

        if settings.pool_dir is None or not Path(settings.pool_dir).is_dir():
            raise ImageConfigError(
                f"the retrieve image backend needs an image pool folder (--image-pool); "
                f"got {settings.pool_dir}"
            )
        clip_id = model or settings.clip_model
        return RetrieveImages(
            settings.pool_dir,
            _LazyClip(clip_id, settings.device),
            model_id=clip_id,
            cache_root=images_cache / "pool-index" if images_cache and settings.cache else None,
            max_side=size,
            min_size=settings.min_size,
            negative_margin=settings.negative_margin,
            rule=_rule(settings),
        )
    if backend == "openai":
        from pipeline.image_backends.openai_api import DEFAULT_MODEL, OpenAIImages

        inner: Any = OpenAIImages(
            model or DEFAULT_MODEL,
            size,
            settings.quality,
            base_url=settings.api_base_url,
            concurrency=settings.concurrency,
        )
    elif backend == "diffusers":
        from pipeline.image_backends.diffusion import DEFAULT_MODEL, DiffusersImages

        inner = DiffusersImages(
            model or DEFAULT_MODEL,
            steps=settings.steps,
            size=size,
            guidance_scale=settings.guidance_scale,
            batch_size=settings.batch_size,
            device=settings.device,
        )
    else:
        raise ImageConfigError(f"unknown image backend {backend!r}")
    if images_cache is None or not settings.cache:
        return inner
    from pipeline.image_backends.cache import CachedGenerator, ImageCache

    return CachedGenerator(inner, ImageCache(images_cache / "generated"), inner.stats)


class _LazyClip:
    """Loads CLIP on first use, so building a backend (and a cached pool index) is cheap."""

    def __init__(self, model_id: str, device: str) -> None:
        self.model_id = model_id
        self.device = device

    def _clip(self) -> Any:
        from pipeline.image_backends.clip import load_clip

        return load_clip(self.model_id, self.device)

    def embed_texts(self, texts: list[str]) -> Any:
        return self._clip().embed_texts(texts)

    def embed_images(self, images: list[Any]) -> Any:
        return self._clip().embed_images(images)


def _rule(settings: ImageSettings) -> NearDuplicateRule:
    return NearDuplicateRule(settings.near_duplicate_bits, settings.near_duplicate_colour)


def make_image_backend(
    settings: ImageSettings, *, seed: int = 0, cache_dir: Path | None = None
) -> ImageMaker:
    """The images stage for these settings: the backend (cached under
    `cache_dir/images/` when `settings.cache`), its fallback, the checks and the retries."""
    checker = ImageChecker(settings.min_size, _rule(settings))
    scorer = (
        _clip_scorer(settings.clip_model, settings.device)
        if settings.clip_threshold is not None
        else None
    )
    common: dict[str, Any] = {
        "max_attempts": settings.max_attempts,
        "checker": checker,
        "scorer": scorer,
        "clip_threshold": settings.clip_threshold,
    }
    if settings.backend == "render" and settings.fallback is None:
        size = settings.size or DEFAULT_SIZES["render"]
        return RenderBackend(seed, size, settings.n_rephrases, settings.n_locality, **common)
    generator = _generator(settings.backend, settings, seed, cache_dir, primary=True)
    if settings.fallback is not None:
        fallback = _generator(settings.fallback, settings, seed, cache_dir, primary=False)
        generator = WithFallback(generator, fallback)
    return ImageMaker(
        generator,
        seed=seed,
        n_rephrases=settings.n_rephrases,
        n_locality=settings.n_locality,
        **common,
    )
