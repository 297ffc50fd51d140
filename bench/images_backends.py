"""Images stage measurements (docs/benchmarks.md, "Images"): the `openai` backend's thread
pool against the loopback Images API, and the near-duplicate rule on flags and photos.

Run: `.venv/bin/python bench/images_backends.py [--latency 0.1 --items 4]`
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ImageSettings  # noqa: E402
from pipeline.image_backends.checks import (  # noqa: E402
    NearDuplicateRule,
    colour_distance,
    fingerprint,
    hamming,
)
from pipeline.images import make_image_backend  # noqa: E402
from pipeline.sources import flagworld as fw  # noqa: E402
from tests.fixtures_images_api import GOOD_KEY, FakeImagesAPI  # noqa: E402
from tests.test_images_backends import make_pair  # noqa: E402


def openai_throughput(latency: float, n_items: int) -> None:
    os.environ["OPENAI_API_KEY"] = GOOD_KEY
    pairs = [make_pair(f"okvqa-val-{i}", obj=f"a photo of object {i}") for i in range(n_items)]
    print("| run | images | seconds | images/s | requests sent |\n|---|---:|---:|---:|---:|")
    with FakeImagesAPI(latency_s=latency) as api, tempfile.TemporaryDirectory() as tmp:
        for label, concurrency, cache in (
            ("concurrency 1", 1, "a"),
            ("concurrency 8", 8, "b"),
            ("warm cache, concurrency 8", 8, "b"),
        ):
            settings = ImageSettings(
                backend="openai", api_base_url=api.url, concurrency=concurrency
            )
            backend = make_image_backend(settings, cache_dir=Path(tmp) / cache)
            sent, start = api.requests, time.perf_counter()
            results = backend.make_images(pairs)
            seconds = time.perf_counter() - start
            images = sum(len(r.provenance) for r in results if hasattr(r, "provenance"))
            print(
                f"| {label} | {images} | {seconds:.2f} | {images / seconds:.1f} | "
                f"{api.requests - sent} |"
            )


def _png(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def near_duplicates() -> None:
    from sklearn.datasets import load_sample_images

    rule = NearDuplicateRule()
    pairs: dict[str, list[tuple[bytes, bytes]]] = {
        "flag variant vs its clean flag": [],
        "look-alike flags (clean)": [],
        "photo vs JPEG q60 half-size copy": [],
        "photo vs brightness x1.1": [],
        "photo vs 5 % crop": [],
    }
    for code in sorted(fw.COUNTRY_BY_CODE):
        clean = fw.to_png(fw.render_flag(code))
        for i in range(5):
            variant = fw.render_variant(code, random.Random(f"{code}{i}"))
            pairs["flag variant vs its clean flag"].append((clean, fw.to_png(variant)))
        for other in fw.lookalikes(code):
            pairs["look-alike flags (clean)"].append((clean, fw.to_png(fw.render_flag(other))))
    for array in load_sample_images().images:
        img = Image.fromarray(array)
        raw = _png(img)
        half = img.resize((img.width // 2, img.height // 2))
        pairs["photo vs JPEG q60 half-size copy"].append((raw, _png(half, "JPEG", quality=60)))
        pairs["photo vs brightness x1.1"].append(
            (raw, _png(ImageEnhance.Brightness(img).enhance(1.1)))
        )
        crop = img.crop((img.width // 20, img.height // 20, img.width, img.height))
        pairs["photo vs 5 % crop"].append((raw, _png(crop)))
    print("| pair | n | dHash bits min / median | colour min / median | near-duplicate |")
    print("|---|---:|---:|---:|---:|")
    for label, items in pairs.items():
        fps = [(fingerprint(a), fingerprint(b)) for a, b in items]
        bits = [hamming(a.dhash, b.dhash) for a, b in fps]
        colour = [colour_distance(a.thumb, b.thumb) for a, b in fps]
        same = sum(rule.same(a, b) for a, b in fps)
        print(
            f"| {label} | {len(items)} | {min(bits)} / {np.median(bits):.0f} | "
            f"{min(colour):.1f} / {np.median(colour):.1f} | {same} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--items", type=int, default=4)
    args = parser.parse_args()
    openai_throughput(args.latency, args.items)
    print()
    near_duplicates()


if __name__ == "__main__":
    main()
