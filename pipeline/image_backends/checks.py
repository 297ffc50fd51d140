"""Checks on every image (design §6): it decodes, is large enough, is RGB, and is not a
near-duplicate of the item's original image or of an image already chosen for the item.

Near-duplicates are found with a small perceptual hash: a 64-bit difference hash (dHash:
is each pixel of a 9x8 grey thumbnail brighter than its right neighbour) plus an 8x8 colour
thumbnail. Two images are near-duplicates when both their structure (Hamming distance of
the hashes) and their colours (mean absolute difference of the thumbnails) are close. The
colour term matters: flags such as Chad/Romania share one grey structure but are different
flags, while a re-encoded or resized copy of a photo keeps both (measured: JPEG q60 at half
size: 0-1 bits, colour 0.5; Chad vs Romania: 0 bits, colour 9.1; two unrelated photos: 25
bits, colour 101).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

HASH_SIDE = 8  # 8x8 = 64 bits
THUMB_SIDE = 8


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


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Fingerprint:
    """What near-duplicate detection compares: a dHash and a colour thumbnail."""

    dhash: int  # 64 bits
    thumb: np.ndarray  # (8, 8, 3) uint8
    sha256: str  # of the encoded bytes: exact copies


def dhash_bits(img: Image.Image) -> int:
    grey = img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    a = np.asarray(grey, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def colour_thumb(img: Image.Image) -> np.ndarray:
    small = img.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def fingerprint_image(img: Image.Image, data: bytes) -> Fingerprint:
    return Fingerprint(dhash_bits(img), colour_thumb(img), hashlib.sha256(data).hexdigest())


def fingerprint(data: bytes) -> Fingerprint:
    with Image.open(io.BytesIO(data)) as img:
        return fingerprint_image(img, data)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@dataclass(frozen=True)
class NearDuplicateRule:
    max_bits: int = 8  # dHash Hamming distance, of 64
    max_colour: float = 6.0  # mean |difference| of the 8x8 colour thumbnails, 0-255

    def same(self, a: Fingerprint, b: Fingerprint) -> bool:
        if a.sha256 == b.sha256:
            return True
        return (
            hamming(a.dhash, b.dhash) <= self.max_bits
            and colour_distance(a.thumb, b.thumb) <= self.max_colour
        )


@dataclass(frozen=True)
class Checked:
    """An image that passed the checks: RGB bytes and its fingerprint."""

    data: bytes
    fingerprint: Fingerprint
    converted_from: str  # the original mode when it had to be converted to RGB, else ""


def to_rgb_bytes(data: bytes) -> tuple[bytes, str]:
    """The image as RGB bytes (re-encoded only when it was not RGB) and its former mode."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "RGB":
            return data, ""
        mode, fmt = img.mode, "JPEG" if img.format == "JPEG" else "PNG"
        rgb = img.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue(), mode


class ImageChecker:
    """Applies the checks; `check` returns the usable image or the reason it is not."""

    def __init__(self, min_size: int = 32, rule: NearDuplicateRule | None = None) -> None:
        self.min_size = min_size
        self.rule = rule or NearDuplicateRule()

    def check(
        self, data: bytes, original: Fingerprint | None, chosen: list[Fingerprint]
    ) -> Checked | str:
        problem = check_image(data, self.min_size)
        if problem:
            return problem
        rgb, mode = to_rgb_bytes(data)
        fp = fingerprint(rgb)
        if original is not None and self.rule.same(fp, original):
            return "near-duplicate of the item's original image"
        if any(self.rule.same(fp, other) for other in chosen):
            return "near-duplicate of another image of this item"
        return Checked(rgb, fp, mode)
