"""The image stage: `check_image` and the flagworld render backend."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline.images import ImageBackend, RenderBackend, check_image
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.sources import flagworld as fw
from schemas.record import Annotation, ItemImages, Rejection, SourceItem


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pairs() -> list[tuple[SourceItem, Annotation]]:
    ids = ["flagworld-FR-capital", "flagworld-JP-currency", "flagworld-TD-language"]
    items = fw.FlagworldSource().load_items(ids)
    annotations = FlagworldAnnotator(seed=0).annotate(items)  # type: ignore[arg-type]
    out = list(zip(items, annotations, strict=True))
    assert all(isinstance(a, Annotation) for _, a in out)
    return out  # type: ignore[return-value]


def test_check_image_accepts_usable_images() -> None:
    assert check_image(_encode(Image.new("RGB", (64, 48), (1, 2, 3)))) is None
    assert check_image(_encode(Image.new("L", (40, 40)))) is None
    assert check_image(_encode(Image.new("P", (40, 40)))) is None
    assert check_image(_encode(Image.new("CMYK", (40, 40)), "JPEG")) is None
    assert check_image(_encode(Image.new("RGB", (20, 20))), min_size=16) is None


def test_check_image_gives_reasons() -> None:
    assert "empty" in check_image(b"")
    assert "decode" in check_image(b"not an image at all")
    truncated = _encode(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    assert "decode" in check_image(truncated)
    assert "smaller than 32" in check_image(_encode(Image.new("RGB", (64, 20))))


def test_render_backend_makes_every_image(pairs) -> None:
    backend = RenderBackend(seed=0)
    assert isinstance(backend, ImageBackend) and backend.name == "render"
    results = backend.make_images(pairs)
    assert [r.item_id for r in results] == [i.item_id for i, _ in pairs]
    for (_, ann), images in zip(pairs, results, strict=True):
        assert isinstance(images, ItemImages)
        assert len(images.image_rephrases) == 10
        assert len(set(images.image_rephrases)) == 10
        assert len(images.locality_images) >= 1
        every = [*images.image_rephrases, *images.locality_images, images.locality_image_train]
        assert all(check_image(data) is None for data in every)
        near = fw.country_for_object(ann.locality_image_object)
        train = fw.country_for_object(ann.locality_image_train_object)
        assert images.locality_images[0] == fw.to_png(fw.render_flag(near))
        assert images.locality_image_train == fw.to_png(fw.render_flag(train))


def test_render_backend_provenance_one_per_image(pairs) -> None:
    (images,) = RenderBackend(seed=3, n_locality=2).make_images(pairs[:1])
    assert isinstance(images, ItemImages)
    fields = [p.field for p in images.provenance]
    expected = [f"image_rephrases[{i}]" for i in range(10)]
    expected += ["locality_images[0]", "locality_images[1]", "locality_image_train"]
    assert fields == expected
    for p in images.provenance:
        assert p.backend == "render" and p.seed == 3
        params = json.loads(p.params)
        assert params["size"] == 64 and params["country"] in fw.COUNTRY_BY_CODE
    variant = json.loads(images.provenance[0].params)
    assert variant["augmentation"]["scale"] == [0.6, 1.0] and not variant["clean"]


def test_render_backend_is_deterministic_by_seed(pairs) -> None:
    a = RenderBackend(seed=0).make_images(pairs)
    b = RenderBackend(seed=0).make_images(list(reversed(pairs)))
    assert a == list(reversed(b))
    c = RenderBackend(seed=1).make_images(pairs)
    assert a[0].image_rephrases != c[0].image_rephrases


def test_render_backend_rejects_objects_it_cannot_draw(pairs) -> None:
    item, ann = pairs[0]
    odd = ann.model_copy(update={"locality_image_object": "a red double-decker bus"})
    (result,) = RenderBackend().make_images([(item, odd)])
    assert isinstance(result, Rejection) and result.stage == "images"
    assert "double-decker" in result.reason and "locality_image_object" in result.reason
    with pytest.raises(ValueError):
        RenderBackend(n_rephrases=0)
