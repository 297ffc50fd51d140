"""The `openai` image backend: the Images API through the `openai` client.

One request per image (`n=1`) with `response_format="b64_json"` (gpt-image models always
answer base64 and do not take the parameter), `concurrency` requests in flight from a thread
pool; the client's own retries handle 429 (honouring retry-after), 5xx, timeouts and
connection errors. The API has no seed: the job's seed only tells attempts apart in the
cache key and the provenance (`params.seed_sent` is false).

A refusal (HTTP 400 `content_policy_violation` / `moderation_blocked`, or a safety message)
is recorded as `Failed("refusal")` and not retried with the same prompt; with a fallback
backend configured the image is made there and the refusal is stored in its provenance.
A bad key or an unknown model stops the run (`ImageFatalError`).

The key comes from `OPENAI_API_KEY` (resolved like the LLM client's, `pipeline.llm`); it is
never logged, cached or part of a cache key.
"""

from __future__ import annotations

import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from pipeline.image_backends.core import (
    Failed,
    ImageConfigError,
    ImageFatalError,
    Job,
    Produced,
    Result,
    Stats,
    now,
)
from pipeline.llm import LLMConfig, LLMFatalError
from pipeline.openai_errors import classify_openai_error

DEFAULT_MODEL = "dall-e-2"
NO_RETRY = ("refusal", "bad_request")  # the same prompt fails the same way again

# USD per image, public list prices (model, side, quality); None quality = the default
PRICES: dict[tuple[str, int, str | None], float] = {
    ("dall-e-2", 256, None): 0.016,
    ("dall-e-2", 512, None): 0.018,
    ("dall-e-2", 1024, None): 0.020,
    ("dall-e-3", 1024, None): 0.040,
    ("dall-e-3", 1024, "standard"): 0.040,
    ("dall-e-3", 1024, "hd"): 0.080,
    ("gpt-image-1", 1024, "low"): 0.011,
    ("gpt-image-1", 1024, "medium"): 0.042,
    ("gpt-image-1", 1024, "high"): 0.167,
}


def price_per_image(model: str, size: int, quality: str | None) -> float | None:
    return PRICES.get((model, size, quality))


def make_client(
    base_url: str | None, timeout_s: float, max_retries: int, model: str
) -> openai.OpenAI:
    """An openai client with the key resolved as for the LLM (config, env, or none for a
    local server); a missing key is a configuration error, reported without the key."""
    settings = LLMConfig(base_url=base_url, model=model, cache_path=None)
    try:
        key = settings.resolved_api_key()
    except LLMFatalError as exc:
        raise ImageConfigError(f"openai image backend: {exc}") from None
    return openai.OpenAI(
        api_key=key,
        base_url=settings.resolved_base_url(),
        timeout=openai.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        max_retries=max_retries,
    )


class OpenAIImages:
    name = "openai"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        size: int = 256,
        quality: str | None = None,
        *,
        base_url: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        client: openai.OpenAI | None = None,
    ) -> None:
        self.model = model
        self.size = size
        self.quality = quality
        self.concurrency = max(1, concurrency)
        self.client = client or make_client(base_url, timeout_s, max_retries, model)
        self.stats = Stats()
        self._price = price_per_image(model, size, quality)

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "size": self.size, "quality": self.quality}

    def generate(self, jobs: list[Job]) -> list[Result]:
        if len(jobs) <= 1:
            return [self._one(job) for job in jobs]
        with ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(self._one, jobs))

    def cost_usd(self) -> float | None:
        """What the images made so far cost at list price (None: unknown price)."""
        if self._price is None:
            return None
        return self.stats.snapshot().get("images", 0) * self._price

    def _request(self, prompt: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "n": 1,
            "size": f"{self.size}x{self.size}",
        }
        if not self.model.startswith("gpt-image"):
            kwargs["response_format"] = "b64_json"
        if self.quality:
            kwargs["quality"] = self.quality
        return kwargs

    def _one(self, job: Job) -> Result:
        self.stats.add("requests")
        try:
            response = self.client.images.generate(**self._request(job.slot.prompt))
        except openai.APIError as exc:
            failure = classify_error(exc)
            self.stats.add(failure.kind)
            return failure
        if not response.data or not response.data[0].b64_json:
            self.stats.add("empty")
            return Failed("empty", "the API answered without a base64 image")
        try:
            data = base64.b64decode(response.data[0].b64_json, validate=True)
        except (binascii.Error, ValueError):
            self.stats.add("bad_response")
            return Failed("bad_response", "the base64 image does not decode")
        self.stats.add("images")
        params: dict[str, Any] = {"size": self.size, "seed_sent": False}
        if self.quality:
            params["quality"] = self.quality
        revised = getattr(response.data[0], "revised_prompt", None)
        if revised:
            params["revised_prompt"] = revised
        return Produced(
            data=data,
            backend=self.name,
            model=self.model,
            seed=job.seed,
            params=params,
            timestamp=now(),
        )


def classify_error(exc: openai.APIError) -> Failed:
    """A failure for the job, or `ImageFatalError` when no request can succeed."""
    failure = classify_openai_error(
        exc,
        "the images API",
        "check the base URL (it usually ends in /v1) and the image model name",
    )
    if failure.fatal:
        raise ImageFatalError(failure.fatal) from None
    return Failed(failure.kind, failure.reason, retry=failure.kind not in NO_RETRY)
