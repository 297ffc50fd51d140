"""A client for any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, LM Studio).

One call = one structured answer: `LLMClient.complete(messages, schema=Model, ...)` returns
`LLMSuccess` (the parsed pydantic object) or `LLMFailure` (refusal, length cut-off, content
filter, parse failure, exhausted retries, ...) as data; only errors that make every further
request pointless raise (`LLMFatalError`: bad key, unknown model; `BudgetExceededError`).

- Structured outputs: `client.chat.completions.parse(response_format=Model)` (strict JSON
  schema); for servers without JSON-schema support a `json_object` request whose system
  message carries the schema, parsed with `Model.model_validate_json`. In `auto` mode the
  first 400/422 answer to a JSON-schema request switches the client to `json_object`.
- Request cache (SQLite): keyed by a hash of model + messages + params + schema + prompt
  template id/version + sample/attempt index. Every HTTP 200 answer is stored (its raw JSON,
  which holds no credentials) and interpreted by the same function whether fresh or cached,
  so a re-run sends nothing twice and yields the same results. Transient failures are not
  cached.
- Client-side limiter (requests/min, tokens/min), `concurrency` requests in flight; the
  openai client's own retries handle 429 (honouring retry-after), 5xx, timeouts and
  connection errors; nothing else is retried here.
- Usage and cost: tokens per request, cost from `LLMConfig.prices`, an optional budget cap
  checked *before* each request with a worst-case estimate, so it is never overrun.

The API key is a `SecretStr`: it is never logged, cached, or part of a cache key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import openai
from openai.types.chat import ChatCompletion
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

StructuredMode = Literal["auto", "json_schema", "json_object"]
FailureKind = Literal[
    "refusal",
    "length",
    "content_filter",
    "parse",
    "empty",
    "bad_request",
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "validation",
    "deferred",
]
TRANSIENT_KINDS: frozenset[str] = frozenset(
    {"rate_limited", "server_error", "timeout", "connection"}
)
NO_KEY_PLACEHOLDER = "not-needed"  # vLLM / Ollama accept any key; the openai client wants one


class ModelPrice(BaseModel):
    """USD per one million tokens."""

    model_config = ConfigDict(extra="forbid")

    prompt_per_1m: float = Field(ge=0)
    completion_per_1m: float = Field(ge=0)


def default_prices() -> dict[str, ModelPrice]:
    """Public list prices (USD / 1M tokens) of common OpenAI models; extend in config."""
    table = {
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4o": (2.50, 10.00),
        "gpt-4.1": (2.00, 8.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1-nano": (0.10, 0.40),
        "gpt-4-1106-preview": (10.00, 30.00),
        "gpt-4-turbo": (10.00, 30.00),
    }
    return {m: ModelPrice(prompt_per_1m=p, completion_per_1m=c) for m, (p, c) in table.items()}


class LLMConfig(BaseModel):
    """Everything about talking to the LLM server. No secret is ever dumped in clear."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None  # None: OPENAI_BASE_URL, else api.openai.com
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = None  # None: OPENAI_API_KEY
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1)
    seed: int | None = 0  # sent to the server (best effort there) and part of the cache key
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(4, ge=0)  # the openai client's retries: 429, 5xx, timeouts
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    concurrency: int = Field(16, ge=1)  # requests in flight
    prices: dict[str, ModelPrice] = Field(default_factory=default_prices)
    budget_usd: float | None = Field(None, ge=0)
    cache_path: Path | None = Path(".okedit-cache/llm-cache.sqlite")  # None: no cache
    structured_output: StructuredMode = "auto"
    # OpenAI Batch API: requests are queued and sent as one batch per round (50 % price)
    batch_mode: bool = False
    batch_discount: float = Field(0.5, gt=0, le=1)  # batch price = list price x this
    batch_poll_s: float = Field(30.0, gt=0)
    batch_timeout_s: float = Field(26 * 3600.0, gt=0)  # then stop; a re-run picks it up

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _batch_needs_cache(self) -> LLMConfig:
        if self.batch_mode and self.cache_path is None:
            raise ValueError("batch_mode needs cache_path: batch results arrive through the cache")
        return self

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def resolved_api_key(self) -> str:
        """The key from config, else OPENAI_API_KEY, else a placeholder for local servers."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        env_key = os.environ.get("OPENAI_API_KEY")
        if env_key:
            return env_key
        if self.resolved_base_url() is None:
            raise LLMFatalError(
                "No API key: set OPENAI_API_KEY (or LLMConfig.api_key), or point base_url at "
                "a local OpenAI-compatible server (vLLM, Ollama) that needs none"
            )
        return NO_KEY_PLACEHOLDER

    def price(self) -> ModelPrice | None:
        return self.prices.get(self.model)


class LLMFatalError(RuntimeError):
    """Every further request would fail the same way (bad key, unknown model, no budget)."""


class BudgetExceededError(LLMFatalError):
    """The next request could push the spend over `LLMConfig.budget_usd`; nothing was sent."""

    def __init__(self, spent_usd: float, budget_usd: float, partial: list[Any] | None = None):
        super().__init__(
            f"LLM budget cap reached: spent ${spent_usd:.4f} of ${budget_usd:.4f}; "
            "raise budget_usd and re-run (finished requests are cached and cost nothing)"
        )
        self.spent_usd = spent_usd
        self.budget_usd = budget_usd
        self.partial: list[Any] = partial or []


@dataclass(frozen=True)
class LLMSuccess(Generic[T]):
    value: T
    request_hash: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    timestamp: str  # when the server answered (the cached time on a cache hit)
    cached: bool
    mode: str


@dataclass(frozen=True)
class LLMFailure:
    kind: FailureKind
    reason: str
    request_hash: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


LLMResult = LLMSuccess[T] | LLMFailure


class BatchReport(BaseModel):
    """One Batch API round."""

    batch_id: str
    status: str
    submitted: int  # requests in the batch (0 when an open batch of an earlier run was resumed)
    succeeded: int
    failed: int


class LLMStats(BaseModel):
    """Counters of one client's life; tokens and cost cover requests sent, not cache hits."""

    requests_sent: int = 0  # live requests, and requests submitted in batches
    batches: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True
    failures: dict[str, int] = Field(default_factory=dict)
    mode: str = ""


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CachedResponse:
    body: str
    created_at: str


class RequestCache:
    """SQLite table request-hash -> raw completion JSON; safe across threads and processes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # survives a killed process
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, "
                "template TEXT, body TEXT NOT NULL, created_at TEXT NOT NULL)"
            )
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, keys TEXT NOT NULL, "
                "state TEXT NOT NULL, created_at TEXT NOT NULL)"
            )
            self._conn.commit()

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT body, created_at FROM responses WHERE key = ?", (key,)
            ).fetchone()
        return CachedResponse(body=row[0], created_at=row[1]) if row else None

    def put(self, key: str, model: str, template: str, body: str, created_at: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (key, model, template, body, created_at),
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def add_batch(self, batch_id: str, keys: list[str]) -> None:
        """Remember a submitted batch before waiting on it, so a killed run resumes it."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, 'open', ?)",
                (batch_id, json.dumps(sorted(keys)), _now()),
            )
            self._conn.commit()

    def open_batches(self) -> dict[str, set[str]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, keys FROM batches WHERE state = 'open'"
            ).fetchall()
        return {row[0]: set(json.loads(row[1])) for row in rows}

    def close_batch(self, batch_id: str, state: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE batches SET state = ? WHERE id = ?", (state, batch_id))
            self._conn.commit()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# --------------------------------------------------------------------------- limiter


class RateLimiter:
    """Token buckets for requests/min and tokens/min; `acquire` blocks until both allow."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self._req = requests_per_minute or 0.0
        self._tok = tokens_per_minute or 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        self._last = now
        if self._rpm:
            self._req = min(self._rpm, self._req + elapsed * self._rpm / 60.0)
        if self._tpm:
            self._tok = min(self._tpm, self._tok + elapsed * self._tpm / 60.0)

    def _wait_needed(self, tokens: int) -> float:
        waits = [0.0]
        if self._rpm and self._req < 1.0:
            waits.append((1.0 - self._req) * 60.0 / self._rpm)
        if self._tpm:
            need = min(
                float(tokens), self._tpm
            )  # a request larger than the bucket waits for a full one
            if self._tok < need:
                waits.append((need - self._tok) * 60.0 / self._tpm)
        return max(waits)

    def acquire(self, tokens: int) -> None:
        if not self._rpm and not self._tpm:
            return
        while True:
            with self._lock:
                self._refill(time.monotonic())
                wait = self._wait_needed(tokens)
                if wait <= 0:
                    if self._rpm:
                        self._req -= 1.0
                    if self._tpm:
                        self._tok -= min(float(tokens), self._tpm)
                    return
            time.sleep(min(wait, 1.0))


# --------------------------------------------------------------------------- helpers


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def request_key(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines an answer."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """A rough prompt size (4 characters per token) for the limiter and the budget check."""
    return sum(len(m.get("content", "")) for m in messages) // 4 + 4 * len(messages)


def json_object_messages(
    messages: list[dict[str, str]], schema: type[BaseModel]
) -> list[dict[str, str]]:
    """The messages with the JSON schema spelled out, for servers without JSON-schema mode."""
    instruction = (
        "Respond with one JSON object and nothing else. It must validate against this JSON "
        f"schema: {json.dumps(schema_of(schema), sort_keys=True)}"
    )
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{instruction}"
    else:
        out.insert(0, {"role": "system", "content": instruction})
    return out


def interpret_completion(
    completion: ChatCompletion, schema: type[T]
) -> tuple[T | None, LLMFailure | None]:
    """The parsed object or the typed failure; the same rules as `chat.completions.parse`
    (length and content-filter finishes, refusals), applied to fresh and cached answers."""
    usage = completion.usage
    pt = usage.prompt_tokens if usage else 0
    ct = usage.completion_tokens if usage else 0
    if not completion.choices:
        return None, LLMFailure("empty", "the server returned no choices", "", pt, ct)
    choice = completion.choices[0]
    if choice.finish_reason == "length":
        return None, LLMFailure("length", "answer cut off at max_tokens", "", pt, ct)
    if choice.finish_reason == "content_filter":
        return None, LLMFailure("content_filter", "blocked by the content filter", "", pt, ct)
    message = choice.message
    refusal = getattr(message, "refusal", None)
    if refusal:
        return None, LLMFailure("refusal", f"model refused: {refusal[:200]}", "", pt, ct)
    if not message.content:
        return None, LLMFailure("empty", "empty message content", "", pt, ct)
    try:
        return schema.model_validate_json(_strip_fences(message.content)), None
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"msg": str(exc)}
        where = ".".join(str(p) for p in first.get("loc", ()))
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        return None, LLMFailure(
            "parse", f"answer does not match {schema.__name__}: {detail}", "", pt, ct
        )


def _strip_fences(content: str) -> str:
    """Some local models wrap JSON in ``` fences even in JSON mode."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else text[3:]
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text.strip()


def _classify_api_error(exc: openai.APIError) -> LLMFailure:
    """Map an error that survived the openai client's retries to a failure or a fatal error."""
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        raise LLMFatalError(
            f"the LLM server rejected the credentials (HTTP {exc.status_code}); "
            "check OPENAI_API_KEY / LLMConfig.api_key"
        ) from None
    if isinstance(exc, openai.NotFoundError):
        raise LLMFatalError(
            "the LLM server answered 404: check --llm-base-url (it usually ends in /v1) "
            "and that the model exists there"
        ) from None
    if isinstance(exc, openai.RateLimitError):
        return LLMFailure("rate_limited", "HTTP 429 after all retries")
    if isinstance(exc, openai.APITimeoutError):
        return LLMFailure("timeout", "request timed out after all retries")
    if isinstance(exc, openai.APIConnectionError):
        return LLMFailure(
            "connection", f"connection failed after all retries: {type(exc).__name__}"
        )
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return LLMFailure("server_error", f"HTTP {exc.status_code} after all retries")
        return LLMFailure("bad_request", f"HTTP {exc.status_code}: {_short(exc.message)}")
    return LLMFailure("bad_request", f"{type(exc).__name__}: {_short(str(exc))}")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class _PendingRequest:
    key: str
    template: str
    body: dict[str, Any]
    worst_case_usd: float


TERMINAL_BATCH_STATES = frozenset({"completed", "failed", "expired", "cancelled"})


class LLMClient:
    """Thread-safe: share one instance between worker threads."""

    def __init__(self, config: LLMConfig, client: openai.OpenAI | None = None):
        self.config = config
        self._client = client or openai.OpenAI(
            api_key=config.resolved_api_key(),
            base_url=config.resolved_base_url(),
            timeout=openai.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            max_retries=config.max_retries,
        )
        self._cache = RequestCache(config.cache_path) if config.cache_path else None
        self._limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._in_flight = threading.BoundedSemaphore(config.concurrency)
        self._lock = threading.Lock()
        self._mode: Literal["json_schema", "json_object"] = (
            "json_object" if config.structured_output == "json_object" else "json_schema"
        )
        self._spent = 0.0
        self._reserved = 0.0
        self._pending: dict[str, _PendingRequest] = {}
        self._batch_failures: dict[str, LLMFailure] = {}
        self._stats = LLMStats(cost_known=config.price() is not None, mode=self._mode)
        if config.budget_usd is not None and config.price() is None:
            log.warning(
                "no price for model %r in LLMConfig.prices: the budget cap cannot be enforced",
                config.model,
            )

    # ---- public

    @property
    def mode(self) -> str:
        return self._mode

    def stats(self) -> LLMStats:
        with self._lock:
            return self._stats.model_copy(deep=True)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._client.close()

    def cache_key(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        *,
        template: str,
        mode: str,
        params: dict[str, Any],
        sample: int = 0,
        attempt: int = 0,
    ) -> str:
        return request_key(
            {
                "model": self.config.model,
                "messages": messages,
                "params": params,
                "schema": schema_of(schema),
                "schema_name": schema.__name__,
                "template": template,
                "mode": mode,
                "sample": sample,
                "attempt": attempt,
            }
        )

    def complete(
        self,
        messages: list[dict[str, str]],
        schema: type[T],
        *,
        template: str = "",
        sample: int = 0,
        attempt: int = 0,
        temperature: float | None = None,
    ) -> LLMSuccess[T] | LLMFailure:
        """One structured answer. `template` is "id@version" of the prompt; `sample` tells
        independent samples of the same prompt apart (votes), `attempt` a re-ask after a
        failed parse or validation; both are part of the cache key and of the seed."""
        params = self.params(temperature, sample, attempt)
        keys = {
            mode: self.cache_key(
                messages,
                schema,
                template=template,
                mode=mode,
                params=params,
                sample=sample,
                attempt=attempt,
            )
            for mode in ("json_schema", "json_object")
        }
        hit = self._from_cache(keys, schema)
        if hit is not None:
            return hit
        mode = self._mode
        if self.config.batch_mode:
            return self._defer(messages, schema, template, keys[mode], mode, params)
        result = self._send(messages, schema, template, keys[mode], mode, params)
        if (
            isinstance(result, LLMFailure)
            and result.kind == "bad_request"
            and mode == "json_schema"
            and self.config.structured_output == "auto"
        ):
            fallback = self._send(
                messages, schema, template, keys["json_object"], "json_object", params
            )
            if isinstance(fallback, LLMFailure) and fallback.kind == "bad_request":
                return result  # not a JSON-schema problem: keep the mode, report the first
            log.warning(
                "the server refused a JSON-schema request (%s); using json_object mode",
                result.reason,
            )
            with self._lock:
                self._mode = "json_object"
                self._stats.mode = self._mode
            return fallback
        return result

    def params(self, temperature: float | None, sample: int, attempt: int) -> dict[str, Any]:
        """Sampling parameters; each sample/attempt gets its own seed, or a seeded server
        would return the same answer to every vote and every re-ask."""
        seed = self.config.seed
        return {
            "temperature": self.config.temperature if temperature is None else temperature,
            "max_tokens": self.config.max_tokens,
            "seed": None if seed is None else seed + 1000 * sample + attempt,
        }

    # ---- internals

    def _from_cache(
        self, keys: dict[str, str], schema: type[T]
    ) -> LLMSuccess[T] | LLMFailure | None:
        if self._cache is None:
            return None
        order = [self._mode] + [m for m in keys if m != self._mode]
        for mode in order:
            row = self._cache.get(keys[mode])
            if row is not None:
                with self._lock:
                    self._stats.cache_hits += 1
                return self._result(row.body, schema, keys[mode], row.created_at, mode, cached=True)
        return None

    def _result(
        self, body: str, schema: type[T], key: str, created_at: str, mode: str, *, cached: bool
    ) -> LLMSuccess[T] | LLMFailure:
        try:
            completion = ChatCompletion.model_validate_json(body)
        except ValidationError:
            return LLMFailure(
                "parse", "the server's answer is not a chat completion", key, cached=cached
            )
        value, failure = interpret_completion(completion, schema)
        if failure is not None:
            self._count_failure(failure.kind)
            return LLMFailure(
                failure.kind,
                failure.reason,
                key,
                failure.prompt_tokens,
                failure.completion_tokens,
                cached,
            )
        usage = completion.usage
        return LLMSuccess(
            value=value,  # type: ignore[arg-type]
            request_hash=key,
            model=completion.model or self.config.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            timestamp=created_at,
            cached=cached,
            mode=mode,
        )

    def _count_failure(self, kind: str) -> None:
        with self._lock:
            self._stats.failures[kind] = self._stats.failures.get(kind, 0) + 1

    def _estimate_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.config.price()
        if price is None:
            return 0.0
        return (
            prompt_tokens * price.prompt_per_1m + completion_tokens * price.completion_per_1m
        ) / 1e6

    def _reserve(self, estimate: float) -> None:
        budget = self.config.budget_usd
        with self._lock:
            if budget is not None and self._spent + self._reserved + estimate > budget:
                raise BudgetExceededError(self._spent, budget)
            self._reserved += estimate

    def _settle(self, estimate: float, prompt_tokens: int, completion_tokens: int) -> None:
        cost = self._estimate_cost(prompt_tokens, completion_tokens)
        with self._lock:
            self._reserved -= estimate
            self._spent += cost
            self._stats.cost_usd = self._spent
            self._stats.prompt_tokens += prompt_tokens
            self._stats.completion_tokens += completion_tokens

    def _send(
        self,
        messages: list[dict[str, str]],
        schema: type[T],
        template: str,
        key: str,
        mode: str,
        params: dict[str, Any],
    ) -> LLMSuccess[T] | LLMFailure:
        wire = messages if mode == "json_schema" else json_object_messages(messages, schema)
        prompt_estimate = estimate_tokens(wire)
        worst_case = self._estimate_cost(prompt_estimate, self.config.max_tokens)
        self._reserve(worst_case)
        body: str | None = None
        try:
            self._limiter.acquire(prompt_estimate + self.config.max_tokens)
            with self._in_flight:
                with self._lock:
                    self._stats.requests_sent += 1
                body = self._post(wire, schema, mode, params)
        except openai.APIError as exc:
            failure = _classify_api_error(exc)
            self._count_failure(failure.kind)
            return LLMFailure(failure.kind, failure.reason, key)
        finally:
            self._settle_from_body(worst_case, body)
        created_at = _now()
        if self._cache is not None:
            self._cache.put(key, self.config.model, template, body, created_at)
        return self._result(body, schema, key, created_at, mode, cached=False)

    def _settle_from_body(self, estimate: float, body: str | None) -> None:
        pt = ct = 0
        if body is not None:
            try:
                usage = json.loads(body).get("usage") or {}
                pt, ct = (
                    int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0),
                )
            except (ValueError, AttributeError, TypeError):
                pass
        self._settle(estimate, pt, ct)

    def _post(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        mode: str,
        params: dict[str, Any],
    ) -> str:
        common: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": params["temperature"],
            "max_tokens": params["max_tokens"],
        }
        if params["seed"] is not None:
            common["seed"] = params["seed"]
        completions = self._client.chat.completions.with_raw_response
        if mode == "json_schema":
            raw = completions.parse(response_format=schema, **common)
        else:
            raw = completions.create(response_format={"type": "json_object"}, **common)
        return raw.text

    # ---- Batch API mode

    def pending(self) -> int:
        """Requests queued for the next batch."""
        with self._lock:
            return len(self._pending)

    def _defer(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        template: str,
        key: str,
        mode: str,
        params: dict[str, Any],
    ) -> LLMFailure:
        with self._lock:
            failed = self._batch_failures.get(key)
            if failed is not None:
                return failed
            if key not in self._pending:
                wire = messages if mode == "json_schema" else json_object_messages(messages, schema)
                body = self._request_body(wire, schema, mode, params)
                worst = self._estimate_cost(estimate_tokens(wire), self.config.max_tokens)
                self._pending[key] = _PendingRequest(key, template, body, worst)
        return LLMFailure("deferred", "queued for the next batch", key)

    def _request_body(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        mode: str,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        from openai.lib._parsing import type_to_response_format_param

        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": params["temperature"],
            "max_tokens": params["max_tokens"],
        }
        if params["seed"] is not None:
            body["seed"] = params["seed"]
        if mode == "json_schema":
            body["response_format"] = type_to_response_format_param(schema)
        else:
            body["response_format"] = {"type": "json_object"}
        return body

    def run_batch(self) -> BatchReport | None:
        """Send the queued requests as one batch (or resume an open batch of an earlier,
        interrupted run that covers them), wait for it, and put its answers in the cache.
        Failed requests are remembered and come back as failures, not re-queued."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return None
        assert self._cache is not None  # LLMConfig guarantees a cache in batch mode
        resumed = self._resumable_batch(set(pending))
        if resumed is not None:
            batch_id, expected = resumed
            submitted = 0  # the other pending requests are queued again by the next round
        else:
            batch_id, expected, submitted = self._submit(pending), set(pending), len(pending)
        batch = self._wait(batch_id)
        report = self._ingest(batch, pending, expected, submitted)
        with self._lock:
            self._stats.batches += 1
        return report

    def _resumable_batch(self, keys: set[str]) -> tuple[str, set[str]] | None:
        assert self._cache is not None
        for batch_id, batch_keys in self._cache.open_batches().items():
            if batch_keys & keys:
                log.info("resuming batch %s of an earlier run", batch_id)
                return batch_id, batch_keys
        return None

    def _submit(self, pending: dict[str, _PendingRequest]) -> str:
        assert self._cache is not None
        worst = sum(p.worst_case_usd for p in pending.values()) * self.config.batch_discount
        self._reserve(worst)
        lines = [
            json.dumps(
                {
                    "custom_id": p.key,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": p.body,
                },
                sort_keys=True,
            )
            for p in pending.values()
        ]
        try:
            upload = self._client.files.create(
                file=("okedit-batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch"
            )
            batch = self._client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"client": "okedit"},
            )
        except openai.APIError as exc:
            self._settle(worst, 0, 0)
            failure = _classify_api_error(exc)
            raise LLMFatalError(f"could not submit the batch: {failure.reason}") from None
        self._cache.add_batch(batch.id, list(pending))
        with self._lock:
            self._reserved -= worst  # settled from the real usage when the answers arrive
            self._stats.requests_sent += len(pending)
        log.info("submitted batch %s with %d requests", batch.id, len(pending))
        return batch.id

    def _wait(self, batch_id: str) -> Any:
        deadline = time.monotonic() + self.config.batch_timeout_s
        while True:
            batch = self._client.batches.retrieve(batch_id)
            if batch.status in TERMINAL_BATCH_STATES:
                return batch
            if time.monotonic() > deadline:
                raise LLMFatalError(
                    f"batch {batch_id} is still {batch.status} after "
                    f"{self.config.batch_timeout_s:g} s; re-run later to collect it "
                    "(it is remembered in the cache and will not be paid twice)"
                )
            time.sleep(self.config.batch_poll_s)

    def _ingest(
        self,
        batch: Any,
        pending: dict[str, _PendingRequest],
        expected: set[str],
        submitted: int,
    ) -> BatchReport:
        assert self._cache is not None
        answered: set[str] = set()
        ok = failed = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self._client.files.content(file_id).text.splitlines():
                if not line.strip():
                    continue
                key, good = self._ingest_line(json.loads(line), pending)
                answered.add(key)
                ok, failed = ok + good, failed + (not good)
        for key in expected - answered:
            self._batch_failure(
                key, LLMFailure("timeout", f"batch {batch.id} ended {batch.status}")
            )
            failed += 1
        self._cache.close_batch(batch.id, batch.status)
        return BatchReport(
            batch_id=batch.id, status=batch.status, submitted=submitted, succeeded=ok, failed=failed
        )

    def _ingest_line(
        self, line: dict[str, Any], pending: dict[str, _PendingRequest]
    ) -> tuple[str, bool]:
        assert self._cache is not None
        key = str(line.get("custom_id", ""))
        response = line.get("response") or {}
        status = int(response.get("status_code") or 0)
        if status == 200 and isinstance(response.get("body"), dict):
            body = response["body"]
            usage = body.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            cost = self._estimate_cost(pt, ct) * self.config.batch_discount
            with self._lock:
                self._spent += cost
                self._stats.cost_usd = self._spent
                self._stats.prompt_tokens += pt
                self._stats.completion_tokens += ct
            template = pending[key].template if key in pending else ""
            self._cache.put(key, self.config.model, template, json.dumps(body), _now())
            return key, True
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        message = _short(str(error.get("message", "no answer")))
        if status == 429:
            failure = LLMFailure("rate_limited", f"batch: HTTP 429: {message}")
        elif status >= 500 or status == 0:
            failure = LLMFailure("server_error", f"batch: HTTP {status}: {message}")
        else:
            failure = LLMFailure("bad_request", f"batch: HTTP {status}: {message}")
        self._batch_failure(key, failure)
        return key, False

    def _batch_failure(self, key: str, failure: LLMFailure) -> None:
        self._count_failure(failure.kind)
        with self._lock:
            self._batch_failures[key] = LLMFailure(failure.kind, failure.reason, key)
