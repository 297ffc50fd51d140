"""Image backends offline: checks on crafted images, the check-and-replace driver, the
`openai` backend against a loopback Images API, `diffusers` with a tiny random pipeline,
`retrieve` with a tiny random CLIP over a local pool (mechanics, exclusion, caching)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline.config import BuildConfig, ImageSettings
from pipeline.image_backends.checks import (
    Checked,
    ImageChecker,
    NearDuplicateRule,
    fingerprint,
)
from pipeline.image_backends.core import Failed, ImageMaker, Job, Produced, Result
from pipeline.image_backends.diffusion import DiffusersImages
from pipeline.images import (
    ImageConfigError,
    ImageFatalError,
    check_image,
    make_image_backend,
)
from pipeline.sources import flagworld as fw
from pipeline.stages import ConfigError
from pipeline.stages import make_image_backend as stage_backend
from schemas.record import Annotation, ItemImages, Rejection, SourceItem, TextNegative
from tests.fixtures_images_api import (
    GOOD_KEY,
    FakeImagesAPI,
    blocky_png,
    render_pool,
    tiny_clip,
    tiny_diffusers,
)

N_IMAGES = 10 + 3 + 1  # rephrases + locality + training negative per item


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: one thread avoids OpenMP spin-waits (70x faster)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


PHOTOS = [Image.fromarray(a) for a in load_sample_images().images]  # china, flower
ORIGINAL = encode(PHOTOS[0].resize((160, 120)), "JPEG", quality=92)


def make_pair(
    item_id: str = "okvqa-val-1",
    image: bytes = ORIGINAL,
    obj: str = "a photo of a temple",
    near: str = "a photo of a flower",
    train: str = "a photo of a violin",
) -> tuple[SourceItem, Annotation]:
    item = SourceItem(
        item_id=item_id,
        source="okvqa/val2014",
        question_id=item_id.rsplit("-", 1)[-1],
        image_id="1",
        question_type="other",
        question="What kind of building is this?",
        answers=["temple"] * 10,
        image=image,
    )
    ann = Annotation(
        item_id=item_id,
        image_object=obj,
        target="church",
        counterfact_type="image-text",
        counterfact_votes=["image-text"] * 3,
        counterfact_reason="r",
        rephrases=[f"What building is shown, variant {i}?" for i in range(10)],
        rephrases_train=[f"Which building is it, training {i}?" for i in range(3)],
        locality_answer="rose",
        locality_image_object=near,
        locality_answer_train="violin",
        locality_image_train_object=train,
        text_negatives=[TextNegative(question="How old is it?", answer="old")],
    )
    return item, ann


def params_of(images: ItemImages) -> dict[str, dict[str, Any]]:
    return {p.field: json.loads(p.params) for p in images.provenance}


# --------------------------------------------------------------------------- checks


def test_checks_on_crafted_bad_images() -> None:
    checker = ImageChecker(min_size=32)
    original = fingerprint(ORIGINAL)
    truncated = encode(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    assert "empty" in checker.check(b"", original, [])
    assert "decode" in checker.check(b"not an image", original, [])
    assert "decode" in checker.check(truncated, original, [])
    assert "smaller than 32" in checker.check(encode(Image.new("RGB", (64, 20))), original, [])
    for mode, fmt in (("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG")):
        ok = checker.check(encode(Image.new(mode, (40, 40)), fmt), original, [])
        assert isinstance(ok, Checked) and ok.converted_from == mode
        assert Image.open(io.BytesIO(ok.data)).mode == "RGB"
    # copies of the original: same bytes, re-encoded at half size and JPEG q60
    assert "original" in checker.check(ORIGINAL, original, [])
    copy = encode(PHOTOS[0].resize((80, 60)), "JPEG", quality=60)
    assert "near-duplicate of the item's original" in checker.check(copy, original, [])
    other = checker.check(encode(PHOTOS[1].resize((160, 120))), original, [])
    assert isinstance(other, Checked) and other.converted_from == ""
    again = encode(PHOTOS[1].resize((100, 75)), "JPEG", quality=70)
    assert "another image of this item" in checker.check(again, original, [other.fingerprint])


def test_near_duplicate_rule_separates_lookalike_flags_from_copies() -> None:
    rule = NearDuplicateRule()
    chad, romania = (fingerprint(fw.to_png(fw.render_flag(c))) for c in ("TD", "RO"))
    assert not rule.same(chad, romania)  # same grey structure, different colours
    import random

    variant = fingerprint(fw.to_png(fw.render_variant("TD", random.Random(0))))
    assert not rule.same(chad, variant)
    assert rule.same(chad, chad)


# --------------------------------------------------------------------------- driver


class Scripted:
    """A generator that answers each job with `script(job)` and remembers every call."""

    name = "scripted"

    def __init__(self, script: Callable[[Job], Result]) -> None:
        self.script = script
        self.calls: list[list[Job]] = []

    def generate(self, jobs: list[Job]) -> list[Result]:
        self.calls.append(jobs)
        return [self.script(job) for job in jobs]


def good(job: Job) -> Produced:
    return Produced(blocky_png(job.seed, 48), "scripted", "m", job.seed, {"size": 48})


def test_failed_images_are_replaced_then_the_item_is_rejected_with_the_reason() -> None:
    def script(job: Job) -> Result:
        item = job.context.item.item_id
        if job.slot.field == "image_rephrases[2]" and job.attempt == 0:
            return Produced(ORIGINAL, "scripted", "m", job.seed)  # the original: replaced
        if item == "okvqa-val-2" and job.slot.field == "locality_images[1]":
            return Produced(blocky_png(job.seed, 8), "scripted", "m", job.seed)  # too small
        return good(job)

    gen = Scripted(script)
    ok, bad = ImageMaker(gen, seed=5, max_attempts=3).make_images(
        [make_pair("okvqa-val-1"), make_pair("okvqa-val-2")]
    )
    assert isinstance(ok, ItemImages) and isinstance(bad, Rejection)
    assert bad.stage == "images"
    assert bad.reason.startswith("locality_images[1]: check: image is 8x8")
    assert "(after 3 attempts)" in bad.reason
    # one batch per round: both originals and the 8x8 image, then the 8x8 image alone
    assert [len(c) for c in gen.calls] == [2 * N_IMAGES, 3, 1]
    assert len(ok.image_rephrases) == 10 and len(ok.locality_images) == 3
    fields = [p.field for p in ok.provenance]
    assert fields[:2] == ["image_rephrases[0]", "image_rephrases[1]"]
    assert fields[-1] == "locality_image_train" and len(fields) == N_IMAGES
    replaced = params_of(ok)["image_rephrases[2]"]
    assert replaced["attempt"] == 1 and replaced["prompt"] == "a photo of a temple"
    seeds = {p.seed for p in ok.provenance}
    assert len(seeds) == N_IMAGES  # one seed per field (and per attempt)


def test_a_refusal_rejects_at_once_and_a_clip_threshold_replaces_low_scores() -> None:
    def script(job: Job) -> Result:
        if job.context.item.item_id == "okvqa-val-2" and job.slot.role == "train":
            return Failed("refusal", "the API refused the prompt", retry=False)
        return good(job)

    low = {blocky_png(s, 48) for s in range(0)}  # filled below
    first_round: set[bytes] = set()

    def scorer(images: list[bytes], prompts: list[str]) -> list[float]:
        if not first_round:
            first_round.update(images)
            low.add(images[3])  # one image of the first round scores low
        return [0.1 if data in low else 0.8 for data in images]

    gen = Scripted(script)
    maker = ImageMaker(gen, scorer=scorer, clip_threshold=0.5)
    ok, refused = maker.make_images([make_pair("okvqa-val-1"), make_pair("okvqa-val-2")])
    assert isinstance(refused, Rejection)
    assert refused.reason == "locality_image_train: refusal: the API refused the prompt"
    assert isinstance(ok, ItemImages)
    assert [len(c) for c in gen.calls] == [2 * N_IMAGES, 1]  # the refused item is not retried
    p = params_of(ok)["image_rephrases[3]"]
    assert p["attempt"] == 1 and p["score"] == 0.8
    assert maker.report()["check_failed"] == 1
    with pytest.raises(ValueError):
        ImageMaker(gen, clip_threshold=0.5)  # a threshold needs a scorer


# --------------------------------------------------------------------------- openai


@pytest.fixture()
def images_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeImagesAPI]:
    monkeypatch.setenv("OPENAI_API_KEY", GOOD_KEY)
    with FakeImagesAPI(latency_s=0.02) as api:
        yield api


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = render_pool(tmp_path_factory.mktemp("pool") / "pool", sorted(fw.COUNTRY_BY_CODE)[:30])
    (root / "own.jpg").write_bytes(ORIGINAL)  # the item's own image is in the pool...
    (root / "own_small.jpg").write_bytes(encode(PHOTOS[0].resize((96, 72)), "JPEG"))  # ...twice
    return root


def openai_settings(api: FakeImagesAPI, **kw: Any) -> ImageSettings:
    return ImageSettings(backend="openai", api_base_url=api.url, concurrency=4, **kw)


def test_openai_backend_b64_concurrency_cache_and_no_key_leak(
    images_api: FakeImagesAPI, tmp_path: Path
) -> None:
    pairs = [make_pair("okvqa-val-1", obj="tiny-once temple"), make_pair("okvqa-val-2")]
    backend = make_image_backend(openai_settings(images_api), seed=1, cache_dir=tmp_path)
    first = backend.make_images(pairs)
    assert all(isinstance(r, ItemImages) for r in first)
    assert images_api.requests == 2 * N_IMAGES + 1  # the 8x8 answer was replaced once
    assert images_api.max_in_flight > 1
    body = images_api.bodies[0]
    assert body["n"] == 1 and body["size"] == "256x256" and body["response_format"] == "b64_json"
    assert images_api.auth_headers == {f"Bearer {GOOD_KEY}"}
    images = first[0]
    assert isinstance(images, ItemImages)
    assert all(check_image(d) is None for d in images.image_rephrases)
    assert Image.open(io.BytesIO(images.locality_image_train)).size == (256, 256)
    prov = images.provenance[0]
    assert prov.backend == "openai" and prov.model == "dall-e-2" and len(prov.request_hash) == 64
    p = json.loads(prov.params)
    assert p["seed_sent"] is False and p["revised_prompt"].endswith("(revised)")
    assert params_of(images)["image_rephrases[0]"]["attempt"] in (0, 1)

    again = make_image_backend(openai_settings(images_api), seed=1, cache_dir=tmp_path)
    assert again.make_images(pairs) == first  # a re-run costs nothing and changes nothing
    assert images_api.requests == 2 * N_IMAGES + 1
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert GOOD_KEY.encode() not in stored
    provenance = [p.model_dump() for r in first if isinstance(r, ItemImages) for p in r.provenance]
    assert GOOD_KEY not in json.dumps(provenance)


def test_openai_refusal_and_server_error_reject_with_reasons(
    images_api: FakeImagesAPI, tmp_path: Path
) -> None:
    settings = openai_settings(images_api, max_attempts=2)
    pairs = [
        make_pair("okvqa-val-1", near="refuse: a flower"),
        make_pair("okvqa-val-2", train="broken violin"),
    ]
    refused, broken = make_image_backend(settings, cache_dir=tmp_path).make_images(pairs)
    assert isinstance(refused, Rejection) and isinstance(broken, Rejection)
    assert refused.reason.startswith("locality_images[0]: refusal: the API refused the prompt")
    assert "content_policy_violation" in refused.reason and "safety system" in refused.reason
    assert broken.reason == (
        "locality_image_train: server_error: HTTP 500 after all retries (after 2 attempts)"
    )
    assert images_api.prompts["broken violin"] == 2 * 4  # 2 attempts x (1 + 3 client retries)
    sent = images_api.requests
    make_image_backend(settings, cache_dir=tmp_path).make_images(pairs[:1])
    assert images_api.requests == sent  # the refusal is cached: not asked again


def test_openai_falls_back_to_retrieval_with_the_reason_stored(
    images_api: FakeImagesAPI, tmp_path: Path, clip_dir: Path, pool: Path
) -> None:
    settings = openai_settings(
        images_api, max_attempts=1, fallback="retrieve", pool_dir=pool, clip_model=str(clip_dir)
    )
    pairs = [make_pair(near="refuse: a flower", train="broken violin")]
    (images,) = make_image_backend(settings, cache_dir=tmp_path).make_images(pairs)
    assert isinstance(images, ItemImages)
    by_field = {p.field: p for p in images.provenance}
    assert by_field["image_rephrases[0]"].backend == "openai"
    loc = by_field["locality_images[0]"]
    assert loc.backend == "retrieve" and loc.model == str(clip_dir)
    p = json.loads(loc.params)
    assert p["fallback_from"] == "openai" and p["fallback_reason"].startswith("refusal:")
    train = json.loads(by_field["locality_image_train"].params)
    assert train["fallback_reason"].startswith("server_error: HTTP 500")


def test_openai_bad_key_stops_and_missing_key_is_a_config_error(
    images_api: FakeImagesAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    backend = make_image_backend(openai_settings(images_api), cache_dir=tmp_path)
    with pytest.raises(ImageFatalError, match="rejected the credentials"):
        backend.make_images([make_pair()])
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = BuildConfig(source={"name": "okvqa-files"}, images={"backend": "openai"})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        stage_backend(cfg)
    with pytest.raises(ConfigError, match="flagworld flags only"):
        stage_backend(BuildConfig(source={"name": "okvqa-files"}))
    with pytest.raises(ValueError, match="pool_dir"):
        ImageSettings(backend="retrieve")
    nowhere = {"backend": "retrieve", "pool_dir": tmp_path / "nope"}
    with pytest.raises(ConfigError, match="needs an image pool folder"):
        stage_backend(BuildConfig(source={"name": "okvqa-files"}, images=nowhere))
    with pytest.raises(ImageConfigError, match="holds no usable image"):
        make_image_backend(ImageSettings(**{**nowhere, "pool_dir": tmp_path})).make_images(
            [make_pair()]
        )


# --------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers", reason="the optional extra: pip install -e '.[diffusion]'")
    return tiny_diffusers(tmp_path_factory.mktemp("sd") / "tiny-sd")


def diffusers_settings(model: Path, **kw: Any) -> ImageSettings:
    kw = {"batch_size": 8, **kw}
    return ImageSettings(
        backend="diffusers", model=str(model), size=32, steps=2, device="cpu", **kw
    )


def test_diffusers_tiny_pipeline_batches_seeds_and_caches(
    pipeline_dir: Path, tmp_path: Path
) -> None:
    backend = make_image_backend(diffusers_settings(pipeline_dir), seed=3, cache_dir=tmp_path)
    (images,) = backend.make_images([make_pair()])
    assert isinstance(images, ItemImages), images
    every = [*images.image_rephrases, *images.locality_images, images.locality_image_train]
    assert all(Image.open(io.BytesIO(d)).size == (32, 32) for d in every)
    prov = images.provenance[0]
    assert prov.backend == "diffusers" and prov.model == str(pipeline_dir)
    p = json.loads(prov.params)
    assert (p["steps"], p["size"], p["dtype"], p["device"]) == (2, 32, "float32", "cpu")
    assert p["guidance_scale"] == 0.0 and p["prompt"] == "a photo of a temple"

    # an image depends on its prompt and seed only, not on its batch
    gen = backend.generator.inner
    assert isinstance(gen, DiffusersImages)
    jobs = [backend._job(ctx, slot, 0) for ctx, slot in _contexts(backend)]
    batch = gen.generate(jobs[:5])
    alone = gen.generate(jobs[4:5])
    assert isinstance(batch[4], Produced) and isinstance(alone[0], Produced)
    assert batch[4].data == alone[0].data

    again = make_image_backend(diffusers_settings(pipeline_dir), seed=3, cache_dir=tmp_path)
    assert again.make_images([make_pair()]) == [images]
    assert again.generator.inner._pipe is None  # every image came from the cache
    assert again.report() == {"images": N_IMAGES}
    assert again.generator.stats.snapshot()["cache_hits"] == N_IMAGES


def test_clip_score_check_with_a_tiny_clip(
    pipeline_dir: Path, clip_dir: Path, tmp_path: Path
) -> None:
    def settings(threshold: float) -> ImageSettings:
        return diffusers_settings(
            pipeline_dir, clip_model=str(clip_dir), clip_threshold=threshold, max_attempts=1
        )

    (scored,) = make_image_backend(settings(-1.0), cache_dir=tmp_path).make_images([make_pair()])
    assert isinstance(scored, ItemImages)
    scores = [p["score"] for p in params_of(scored).values()]
    assert all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    (low,) = make_image_backend(settings(0.99), cache_dir=tmp_path).make_images([make_pair()])
    assert isinstance(low, Rejection)
    assert "check: CLIP score" in low.reason and "< threshold 0.99" in low.reason


def _diffusers_jobs(pipeline_dir: Path, **kw: Any) -> tuple[DiffusersImages, list[Job]]:
    """The generator of a diffusers images stage (no cache) and the 14 jobs of one item."""
    backend = make_image_backend(diffusers_settings(pipeline_dir, cache=False, **kw), seed=3)
    gen = backend.generator
    assert isinstance(gen, DiffusersImages)
    return gen, [backend._job(ctx, slot, 0) for ctx, slot in _contexts(backend)]


def _pngs(results: list[Result]) -> list[bytes]:
    assert all(isinstance(r, Produced) for r in results), results
    return [r.data for r in results if isinstance(r, Produced)]


def assert_same_images(got: list[bytes], want: list[bytes]) -> None:
    """The same images up to float rounding: a batch of another shape may round one pixel
    value of a few images the other way (measured: 1 of 3,072 values, by 1 level); a seed
    given to the wrong image, or one generator shared by the batch, changes every pixel."""
    import numpy as np

    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        x = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
        y = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
        diff = np.abs(x - y)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.002, (i, diff.max(), (diff > 0).mean())


def test_diffusers_auto_batch_fits_free_memory_and_equals_one_at_a_time(
    pipeline_dir: Path,
) -> None:
    from pipeline.image_backends.diffusion import MEMORY_HEADROOM, activation_bytes

    single, jobs = _diffusers_jobs(pipeline_dir, batch_size=1)
    alone = _pngs(single.generate(jobs))
    assert single.batches == {1: N_IMAGES}
    assert len(set(alone)) == N_IMAGES  # one seed per image: 14 different images

    gen, _ = _diffusers_jobs(pipeline_dir, batch_size="auto")
    assert gen.batch_size == "auto"
    per_image = activation_bytes(gen.pipe, 32, 0.0)
    free = {"bytes": int(3.5 * per_image / MEMORY_HEADROOM)}  # room for 3 images
    gen._memory_probe = lambda: free["bytes"]
    assert_same_images(_pngs(gen.generate(jobs)), alone)  # same seeds, same images
    assert gen.batches == {3: 4, 2: 1}

    gen.batches.clear()
    free["bytes"] = 10**15  # plenty: the cap decides
    gen.max_batch = 5
    assert_same_images(_pngs(gen.generate(jobs)), alone)
    assert gen.batches == {5: 2, 4: 1}

    gen.batches.clear()
    free["bytes"] = per_image  # less than one image's estimate: still one at a time
    assert _pngs(gen.generate(jobs[:2])) == alone[:2]  # one at a time: bit for bit
    assert gen.batches == {1: 2}


def test_diffusers_auto_batch_halves_on_out_of_memory(pipeline_dir: Path) -> None:
    import torch

    class SmallGPU:
        """The tiny pipeline, out of memory above two prompts per call."""

        def __init__(self, pipe: Any) -> None:
            self.inner = pipe
            self.calls: list[int] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def __call__(self, prompt: list[str], **kw: Any) -> Any:
            self.calls.append(len(prompt))
            if len(prompt) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(prompt=prompt, **kw)

    single, jobs = _diffusers_jobs(pipeline_dir, batch_size=1)
    alone = _pngs(single.generate(jobs[:8]))
    small = SmallGPU(single.pipe)
    auto = DiffusersImages(
        str(pipeline_dir),
        size=32,
        device="cpu",
        pipeline=small,
        memory_probe=lambda: 10**15,
        max_batch=8,
    )
    assert_same_images(_pngs(auto.generate(jobs[:8])), alone)
    assert small.calls == [8, 4, 2, 2, 2, 2]  # halved until it fits, then kept
    assert auto.stats.snapshot()["oom_retries"] == 2 and auto.batches == {2: 4}

    fixed = DiffusersImages(str(pipeline_dir), size=32, device="cpu", pipeline=small, batch_size=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a fixed size is the user's setting
        fixed.generate(jobs[:8])


def test_diffusers_keeps_sdpa_attention_and_defaults_to_a_few_step_model(
    pipeline_dir: Path,
) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    from pipeline.image_backends import diffusion

    gen, jobs = _diffusers_jobs(pipeline_dir)
    assert gen.pipe is not None and gen.runtime()["attention"] == "AttnProcessor2_0"
    assert gen.runtime()["dtype"] == "float32" and gen.runtime()["compiled"] is False

    plain = diffusion.load_pipeline(str(pipeline_dir), "cpu")
    plain.unet.set_attn_processor(AttnProcessor())  # something switched SDPA off
    switched = DiffusersImages(str(pipeline_dir), size=32, device="cpu", pipeline=plain)
    switched.generate(jobs[:1])
    assert {type(p).__name__ for p in plain.unet.attn_processors.values()} == {"AttnProcessor2_0"}

    # the documented full-build default: a distilled model, 2 steps, no guidance
    defaults = ImageSettings(backend="diffusers")
    assert diffusion.DEFAULT_MODEL == "stabilityai/sdxl-turbo"
    assert (defaults.steps, defaults.guidance_scale) == (2, 0.0)
    assert DiffusersImages().batch_size == "auto"


def _contexts(backend: ImageMaker) -> list[tuple[Any, Any]]:
    from pipeline.image_backends.core import ItemContext, item_slots

    item, ann = make_pair()
    ctx = ItemContext(item, ann, fingerprint(item.image))
    return [(ctx, slot) for slot in item_slots(ann, 10, 3)]


# --------------------------------------------------------------------------- retrieve


def retrieve_settings(pool: Path, clip_dir: Path, **kw: Any) -> ImageSettings:
    return ImageSettings(
        backend="retrieve", pool_dir=pool, model=str(clip_dir), size=64, device="cpu", **kw
    )


def test_retrieve_excludes_the_original_and_keeps_negatives_away_from_it(
    pool: Path, clip_dir: Path, tmp_path: Path
) -> None:
    backend = make_image_backend(retrieve_settings(pool, clip_dir), cache_dir=tmp_path)
    (images,) = backend.make_images([make_pair()])
    assert isinstance(images, ItemImages), images
    params = params_of(images)
    files = [p["pool_file"] for p in params.values()]
    assert len(set(files)) == N_IMAGES
    assert not {"own.jpg", "own_small.jpg", "photos/photo_0.jpg"} & set(files)
    for field, p in params.items():
        assert p["pool_size"] == 34 and isinstance(p["score"], float)
        if not field.startswith("image_rephrases"):
            assert p["margin_vs_image_object"] >= 0.0
    big = params["image_rephrases[0]"]
    assert max(Image.open(io.BytesIO(images.image_rephrases[0])).size) <= 64
    assert big["size"][0] <= 64
    prov = images.provenance[0]
    assert prov.backend == "retrieve" and prov.model == str(clip_dir) and prov.seed is None

    cached = make_image_backend(retrieve_settings(pool, clip_dir), cache_dir=tmp_path)
    assert cached.make_images([make_pair()]) == [images]
    assert cached.generator.stats.snapshot()["index_cached"] == 1
    assert len(list((tmp_path / "images" / "pool-index").glob("*.npz"))) == 1


def test_retrieve_takes_the_next_neighbour_reindexes_and_exhausts(
    pool: Path, clip_dir: Path, tmp_path: Path
) -> None:
    import shutil

    mine = tmp_path / "pool"
    shutil.copytree(pool, mine)
    backend = make_image_backend(retrieve_settings(mine, clip_dir), cache_dir=tmp_path)
    (first,) = backend.make_images([make_pair()])
    assert isinstance(first, ItemImages)
    top = params_of(first)["image_rephrases[0]"]["pool_file"]
    (mine / top).write_bytes(b"broken after indexing")  # the index still lists it
    (second,) = backend.make_images([make_pair()])
    assert isinstance(second, ItemImages)
    replaced = params_of(second)["image_rephrases[0]"]
    assert replaced["attempt"] == 1 and replaced["pool_file"] != top

    fresh = make_image_backend(retrieve_settings(mine, clip_dir), cache_dir=tmp_path)
    fresh.make_images([make_pair()])
    assert fresh.generator.stats.snapshot()["index_built"] == 1  # the pool changed

    small = tmp_path / "small"
    small.mkdir()
    for name in sorted(p.name for p in pool.glob("flag_*.png"))[:6]:
        shutil.copy(pool / name, small / name)
    (result,) = make_image_backend(retrieve_settings(small, clip_dir)).make_images([make_pair()])
    assert isinstance(result, Rejection)
    assert "exhausted: no image left in the pool (6 files)" in result.reason


def test_image_usage_counts_requests_cache_hits_and_cost_per_backend(
    images_api: FakeImagesAPI, tmp_path: Path
) -> None:
    """What the manifest and the card say of the images stage: the requests the server got,
    the cache hits of a second process, the list-price cost, summed over processes."""
    from pipeline.card import images_section
    from pipeline.stages import summed

    pairs = [make_pair("okvqa-val-1"), make_pair("okvqa-val-2")]
    first = make_image_backend(openai_settings(images_api), seed=1, cache_dir=tmp_path)
    first.make_images(pairs)
    again = make_image_backend(openai_settings(images_api), seed=1, cache_dir=tmp_path)
    again.make_images(pairs)  # another process of the same build: all from the cache
    usage = summed([first.usage(), again.usage()])
    openai_usage = usage["backends"]["openai"]
    assert openai_usage["requests"] == images_api.requests == 2 * N_IMAGES
    assert openai_usage["cache_hits"] == 2 * N_IMAGES
    assert openai_usage["cost_usd"] == pytest.approx(2 * N_IMAGES * 0.016)  # dall-e-2 256²
    assert usage["images"] == 2 * 2 * N_IMAGES  # accepted by the stage, both processes
    section = images_section(usage)
    assert "## Image generation" in section and f"| openai | {2 * N_IMAGES} |" in section
    assert images_section({"images": 3, "backends": {"render": {}}}) == ""
