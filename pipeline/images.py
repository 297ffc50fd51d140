"""The images stage (design §6): image backends behind one interface, and image checks.

A backend turns (SourceItem, Annotation) pairs into `ItemImages`: 10 image rephrases of
`image_object` (image generality probes), near-miss `locality_images` of
`locality_image_object`, and the editor's training negative of
`locality_image_train_object`. Every image is stored as encoded bytes and has one
`FieldProvenance` (field `image_rephrases[3]`, `locality_images[0]`, `locality_image_train`).

Backends: `render` (the flagworld renderer, here); `openai`, `diffusers` and `retrieve` plug
into the same `ImageBackend` protocol.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any, Protocol, runtime_checkable

from PIL import Image, UnidentifiedImageError

from pipeline.sources import flagworld as fw
from schemas.record import Annotation, FieldProvenance, ItemImages, Rejection, SourceItem


@runtime_checkable
class ImageBackend(Protocol):
    """Makes the images of annotated items; one result (or rejection) per pair, in order."""

    name: str

    def make_images(
        self, pairs: list[tuple[SourceItem, Annotation]]
    ) -> list[ItemImages | Rejection]: ...


class ImageError(ValueError):
    """An item whose images cannot be made; the message is the reason."""


def check_image(data: bytes, min_size: int = 32) -> str | None:
    """Why `data` is not a usable image (no decode, smaller than `min_size`, no RGB), or None."""
    if not data:
        return "empty image bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully: a truncated file fails here, not later
            if min(img.size) < min_size:
                return f"image is {img.width}x{img.height}, smaller than {min_size} px"
            try:
                img.convert("RGB")
            except (OSError, ValueError) as exc:
                return f"image mode {img.mode} does not convert to RGB: {exc}"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"image does not decode: {exc}"
    return None


# Augmentation ranges of `flagworld.render_variant`, recorded in every image's provenance.
RENDER_AUGMENTATION: dict[str, Any] = {
    "scale": [0.6, 1.0],
    "rotation_deg": [-10, 10],
    "offcanvas_frac": 0.1,
    "margin": "grey or colour",
    "brightness": [0.85, 1.15],
    "noise_sigma": [2, 8],
}


class RenderBackend:
    """Renders flagworld flags: re-rendered variants as positives, look-alikes as negatives.

    `locality_images[0]` is the clean look-alike flag and the rest are variants, so the
    near-miss negatives cover the same augmentations as the image rephrases. The training
    negative is the clean flag of `locality_image_train_object`, like the item's own image.
    Each image's rng is seeded by (seed, item id, field, index): deterministic and
    independent of batching.
    """

    name = "render"

    def __init__(
        self, seed: int = 0, size: int = 64, n_rephrases: int = 10, n_locality: int = 3
    ) -> None:
        if n_rephrases < 1 or n_locality < 1:
            raise ValueError("RenderBackend needs n_rephrases >= 1 and n_locality >= 1")
        self.seed = seed
        self.size = size
        self.n_rephrases = n_rephrases
        self.n_locality = n_locality

    def make_images(
        self, pairs: list[tuple[SourceItem, Annotation]]
    ) -> list[ItemImages | Rejection]:
        out: list[ItemImages | Rejection] = []
        for item, annotation in pairs:
            try:
                out.append(self.make_item_images(item, annotation))
            except ImageError as exc:
                out.append(Rejection(item_id=item.item_id, stage="images", reason=str(exc)))
        return out

    def make_item_images(self, item: SourceItem, annotation: Annotation) -> ItemImages:
        """The images of one item; raises `ImageError` with a reason."""
        own = _country(annotation.image_object, "image_object")
        near = _country(annotation.locality_image_object, "locality_image_object")
        train = _country(annotation.locality_image_train_object, "locality_image_train_object")
        provenance: list[FieldProvenance] = []
        rephrases = [
            self._image(item, "image_rephrases", i, own, provenance, clean=False)
            for i in range(self.n_rephrases)
        ]
        locality = [
            self._image(item, "locality_images", i, near, provenance, clean=i == 0)
            for i in range(self.n_locality)
        ]
        train_image = self._image(item, "locality_image_train", None, train, provenance, True)
        return ItemImages(
            item_id=item.item_id,
            image_rephrases=rephrases,
            locality_images=locality,
            locality_image_train=train_image,
            provenance=provenance,
        )

    def _image(
        self,
        item: SourceItem,
        field: str,
        index: int | None,
        code: str,
        provenance: list[FieldProvenance],
        clean: bool,
    ) -> bytes:
        name = field if index is None else f"{field}[{index}]"
        rng_key = f"render:{self.seed}:{item.item_id}:{name}"
        if clean:
            img = fw.render_flag(code, self.size)
        else:
            img = fw.render_variant(code, random.Random(rng_key), self.size)
        data = fw.to_png(img)
        problem = check_image(data)
        if problem:
            raise ImageError(f"{name}: {problem}")
        params: dict[str, Any] = {"size": self.size, "country": code, "clean": clean}
        if not clean:
            params |= {"rng_key": rng_key, "augmentation": RENDER_AUGMENTATION}
        provenance.append(
            FieldProvenance(
                field=name,
                backend=self.name,
                template_id="flagworld/render",
                template_version=fw.TEMPLATES_VERSION,
                seed=self.seed,
                params=json.dumps(params, sort_keys=True),
            )
        )
        return data


def _country(object_text: str, field: str) -> str:
    try:
        return fw.country_for_object(object_text)
    except KeyError:
        raise ImageError(
            f"{field} {object_text!r} is not a flagworld flag; the render backend only "
            "draws flagworld flags (use another image backend for other sources)"
        ) from None
