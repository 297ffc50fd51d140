"""A file cache of generated images, so that a re-run of a build costs nothing.

Keyed by backend + model + prompt + seed + the generation settings that change the image
(size, steps, quality, ...). Every image is two files under
`<cache_dir>/images/generated/<backend>/<key[:2]>/`: `<key>.bin` (the encoded image) and
`<key>.json` (how it was made; written last, so a crash never leaves a half entry).
Refusals are stored too (a JSON entry without image): the same prompt is not paid or sent
again. Transient failures (5xx, timeouts) are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.image_backends.core import Failed, ImageGenerator, Job, Produced, Result, Stats

CACHED_FAILURES = frozenset({"refusal"})


def cache_key(backend: str, identity: dict[str, Any], prompt: str, seed: int) -> str:
    blob = json.dumps(
        {"backend": backend, **identity, "prompt": prompt, "seed": seed}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _paths(self, backend: str, key: str) -> tuple[Path, Path]:
        folder = self.root / backend / key[:2]
        return folder / f"{key}.json", folder / f"{key}.bin"

    def get(self, backend: str, key: str) -> Result | None:
        meta_path, data_path = self._paths(backend, key)
        try:
            meta = json.loads(meta_path.read_text())
            if meta["kind"] == "failed":
                return Failed(meta["failure"], meta["reason"], retry=False)
            return Produced(
                data=data_path.read_bytes(),
                backend=meta["backend"],
                model=meta["model"],
                seed=meta["seed"],
                params=meta["params"],
                request_hash=key,
                timestamp=meta["timestamp"],
            )
        except (OSError, ValueError, KeyError):
            return None  # missing or damaged: generate again

    def put(self, backend: str, key: str, result: Result) -> None:
        meta_path, data_path = self._paths(backend, key)
        if isinstance(result, Failed):
            meta = {"kind": "failed", "failure": result.kind, "reason": result.reason}
        else:
            _atomic_write(data_path, result.data)
            meta = {
                "kind": "image",
                "backend": result.backend,
                "model": result.model,
                "seed": result.seed,
                "params": result.params,
                "timestamp": result.timestamp,
            }
        _atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode())


class CachedGenerator:
    """Serves jobs from the cache; sends only the misses to the wrapped generator."""

    def __init__(self, inner: Any, cache: ImageCache, stats: Stats | None = None) -> None:
        self.inner: ImageGenerator = inner
        self.cache = cache
        self.name = inner.name
        self.stats = stats or Stats()

    def key(self, job: Job) -> str:
        return cache_key(self.inner.name, self.inner.identity(), job.slot.prompt, job.seed)

    def generate(self, jobs: list[Job]) -> list[Result]:
        keys = [self.key(job) for job in jobs]
        results: list[Result | None] = [self.cache.get(self.name, k) for k in keys]
        misses = [i for i, r in enumerate(results) if r is None]
        self.stats.add("cache_hits", len(jobs) - len(misses))
        if misses:
            fresh = self.inner.generate([jobs[i] for i in misses])
            for i, result in zip(misses, fresh, strict=True):
                if isinstance(result, Produced):
                    result.request_hash = keys[i]
                    self.cache.put(self.name, keys[i], result)
                elif result.kind in CACHED_FAILURES:
                    self.cache.put(self.name, keys[i], result)
                results[i] = result
        return [r for r in results if r is not None]
