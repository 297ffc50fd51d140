"""The `retrieve` image backend: real photos from a local pool instead of generated ones.

The pool is a folder of images (e.g. COCO train2014; any `.jpg/.jpeg/.png/.webp/.bmp`,
searched recursively). It is indexed once with CLIP (`CLIPModel` image embeddings) and a
perceptual fingerprint per file; the index is cached as a `.npz` under
`<cache_dir>/images/pool-index/`, keyed by the CLIP model and the pool's file list (paths,
sizes, modification times), so adding or changing a file re-indexes and nothing else does.

For a slot, candidates are ranked by the cosine between the image and the prompt's CLIP text
embedding. Never chosen: the item's own image (same bytes or a perceptual near-duplicate),
a near-duplicate of an image already chosen for the item, a file already tried for it, and
a file smaller than the minimum size. Near-miss negatives (locality and training images)
must also be closer to their own object than to the original's (`image_object`):
cos(img, C's object) - cos(img, A's object) >= `negative_margin`. A failed check takes the
next neighbour; an exhausted pool rejects the item.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.image_backends.checks import (
    Fingerprint,
    NearDuplicateRule,
    colour_thumb,
    dhash_bits,
)
from pipeline.image_backends.core import (
    Failed,
    ImageConfigError,
    ItemContext,
    Job,
    Produced,
    Result,
    Stats,
)

log = logging.getLogger(__name__)

POOL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
INDEX_VERSION = "1"


@dataclass
class PoolIndex:
    root: Path
    files: list[str]  # posix paths relative to root
    sha256: list[str]
    sizes: np.ndarray  # (N, 2) int32: width, height
    hashes: np.ndarray  # (N,) uint64 dHash
    thumbs: np.ndarray  # (N, 8, 8, 3) uint8
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    skipped: list[str]  # files that did not decode

    def __len__(self) -> int:
        return len(self.files)


def pool_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ImageConfigError(f"image pool {root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in POOL_SUFFIXES and p.is_file())


def pool_key(model_id: str, root: Path, files: list[Path]) -> str:
    listing = []
    for path in files:
        stat = path.stat()
        listing.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"v": INDEX_VERSION, "model": model_id, "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _scan(root: Path, files: list[Path], embedder: Any, batch: int = 64) -> PoolIndex:
    rel, sha, sizes, hashes, thumbs, embeddings, skipped = [], [], [], [], [], [], []
    for start in range(0, len(files), batch):
        decoded: list[Image.Image] = []
        for path in files[start : start + batch]:
            data = path.read_bytes()
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
                img = img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                skipped.append(path.relative_to(root).as_posix())
                continue
            rel.append(path.relative_to(root).as_posix())
            sha.append(hashlib.sha256(data).hexdigest())
            sizes.append(img.size)
            hashes.append(dhash_bits(img))
            thumbs.append(colour_thumb(img))
            decoded.append(img)
        if decoded:
            embeddings.append(embedder.embed_images(decoded))
    dim = embeddings[0].shape[1] if embeddings else 0
    return PoolIndex(
        root=root,
        files=rel,
        sha256=sha,
        sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        hashes=np.asarray(hashes, dtype=np.uint64),
        thumbs=np.asarray(thumbs, dtype=np.uint8).reshape(-1, 8, 8, 3),
        embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
        skipped=skipped,
    )


def _save(index: PoolIndex, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(
            tmp,
            files=np.asarray(index.files, dtype=str),
            sha256=np.asarray(index.sha256, dtype=str),
            sizes=index.sizes,
            hashes=index.hashes,
            thumbs=index.thumbs,
            embeddings=index.embeddings,
            skipped=np.asarray(index.skipped, dtype=str),
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(root: Path, path: Path) -> PoolIndex:
    with np.load(path, allow_pickle=False) as z:
        return PoolIndex(
            root=root,
            files=[str(f) for f in z["files"]],
            sha256=[str(s) for s in z["sha256"]],
            sizes=z["sizes"],
            hashes=z["hashes"],
            thumbs=z["thumbs"],
            embeddings=z["embeddings"],
            skipped=[str(s) for s in z["skipped"]],
        )


def build_pool_index(
    root: Path, embedder: Any, model_id: str, cache_root: Path | None
) -> tuple[PoolIndex, bool]:
    """The pool's index, from the cache when the model and file list match; and whether it
    came from the cache."""
    root = Path(root).resolve()
    files = pool_files(root)
    key = pool_key(model_id, root, files)
    path = cache_root / f"{key}.npz" if cache_root is not None else None
    if path is not None and path.exists():
        try:
            return _load(root, path), True
        except (OSError, ValueError, KeyError):
            log.warning("pool index %s is damaged; rebuilding it", path)
    index = _scan(root, files, embedder)
    if path is not None:
        _save(index, path)
    return index, False


def fit_bytes(data: bytes, max_side: int) -> tuple[bytes, list[int] | None]:
    """The image as stored: unchanged when it fits `max_side`, else downscaled (JPEG q90,
    PNG for other formats); and its former size when it was resized."""
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data, None
        before = [img.width, img.height]
        fmt = "JPEG" if img.format == "JPEG" else "PNG"
        small = img.convert("RGB")
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue(), before


class RetrieveImages:
    name = "retrieve"

    def __init__(
        self,
        pool_dir: Path,
        embedder: Any,
        *,
        model_id: str,
        cache_root: Path | None = None,
        max_side: int = 512,
        min_size: int = 32,
        negative_margin: float = 0.0,
        rule: NearDuplicateRule | None = None,
    ) -> None:
        self.pool_dir = Path(pool_dir)
        self.embedder = embedder
        self.model = model_id
        self.cache_root = cache_root
        self.max_side = max_side
        self.min_size = min_size
        self.negative_margin = negative_margin
        self.rule = rule or NearDuplicateRule()
        self.stats = Stats()
        self._index: PoolIndex | None = None
        self._lock = threading.Lock()
        self._texts: dict[str, np.ndarray] = {}

    @property
    def index(self) -> PoolIndex:
        with self._lock:
            if self._index is None:
                self._index, cached = build_pool_index(
                    self.pool_dir, self.embedder, self.model, self.cache_root
                )
                self.stats.add("index_cached" if cached else "index_built")
                if not len(self._index):
                    raise ImageConfigError(f"image pool {self.pool_dir} holds no usable image")
            return self._index

    def generate(self, jobs: list[Job]) -> list[Result]:
        index = self.index
        prompts = {j.slot.prompt for j in jobs} | {j.context.annotation.image_object for j in jobs}
        self._embed_prompts(sorted(prompts))
        picks: dict[int, list[int]] = {}  # id(context) -> pool rows picked in this call
        return [self._pick(index, job, picks.setdefault(id(job.context), [])) for job in jobs]

    # ---- internals

    def _embed_prompts(self, prompts: list[str]) -> None:
        with self._lock:
            todo = [p for p in prompts if p not in self._texts]
        if todo:
            vectors = self.embedder.embed_texts(todo)
            with self._lock:
                self._texts.update(zip(todo, vectors, strict=True))

    def _excluded(self, index: PoolIndex, row: int, ctx: ItemContext, picked: list[int]) -> bool:
        """Too small, the original or a near-duplicate of it, already tried, or a
        near-duplicate of an image chosen for the item (earlier or in this call)."""
        if int(index.sizes[row].min()) < self.min_size or index.files[row] in ctx.tried:
            return True
        fp = _row_fingerprint(index, row)
        others = [ctx.original] if ctx.original is not None else []
        others += ctx.chosen + [_row_fingerprint(index, r) for r in picked]
        return any(self.rule.same(fp, other) for other in others)

    def _pick(self, index: PoolIndex, job: Job, picked: list[int]) -> Result:
        prompt = job.slot.prompt
        sims = index.embeddings @ self._texts[prompt]
        margin = None
        if job.slot.role != "positive":
            margin = sims - index.embeddings @ self._texts[job.context.annotation.image_object]
        # walk the ranking and test candidates one by one: on a large pool only the first
        # few are ever looked at (a stable sort keeps ties deterministic)
        order = np.argsort(-sims, kind="stable")
        rank = next(
            (
                r
                for r, row in enumerate(order)
                if (margin is None or margin[row] >= self.negative_margin)
                and not self._excluded(index, int(row), job.context, picked)
            ),
            None,
        )
        if rank is None:
            self.stats.add("exhausted")
            return Failed(
                "exhausted",
                f"no image left in the pool ({len(index)} files) for {prompt!r} once the "
                "original, its near-duplicates, the images already used"
                + (" and images closer to the original's object" if margin is not None else "")
                + " are excluded",
                retry=False,
            )
        row = int(order[rank])
        picked.append(row)
        params: dict[str, Any] = {
            "pool_file": index.files[row],
            "pool_sha256": index.sha256[row],
            "pool_rank": rank,
            "pool_size": len(index),
        }
        # a file changed or gone since indexing goes to the image check as it is now:
        # rejected there, and the next neighbour replaces it
        try:
            raw = (index.root / index.files[row]).read_bytes()
        except OSError:
            raw = b""
        try:
            data, resized_from = fit_bytes(raw, self.max_side)
            params["size"] = list(Image.open(io.BytesIO(data)).size)
        except (OSError, ValueError):
            data, resized_from = raw, None
        if resized_from:
            params["resized_from"] = resized_from
        if margin is not None:
            params["margin_vs_image_object"] = round(float(margin[row]), 6)
        self.stats.add("images")
        return Produced(
            data=data,
            backend=self.name,
            model=self.model,
            params=params,
            score=round(float(sims[row]), 6),
            candidate=index.files[row],
        )


def _row_fingerprint(index: PoolIndex, row: int) -> Fingerprint:
    return Fingerprint(int(index.hashes[row]), index.thumbs[row], index.sha256[row])
