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
- One account per build (`LLMConfig.build_id`) in a `Ledger` inside the request database:
  the budget (a worst-case hold per request in flight, settled with the server's usage,
  each a `BEGIN IMMEDIATE` transaction), `concurrency` slots and the requests/min and
  tokens/min buckets, shared by every thread and process of the build (thread pools, Dask
  workers, deployment runs on this machine) and by its resumed runs.
  Why not Prefect's global concurrency limits and rate limits: they need a Prefect API that
  every process reaches (the embedded API is one per process), a limit created by name
  before use (without one, `concurrency()` silently does not limit), an API round trip per
  acquire and release plus lease renewals, and they would leave the budget elsewhere
  anyway; the request database is already shared by all processes of a build, works with
  or without Prefect, and frees a dead process's slots at once (host + pid) or when its
  lease ends. It needs the cache on a local disk of one machine (SQLite locks are not
  reliable over NFS): annotation does not scale across machines this way.
- Retries are ours, not the openai client's: 429 (honouring retry-after), 408/409, 5xx,
  timeouts and connection errors, up to `max_retries`; each attempt is paced, held against
  the budget and written to the ledger.
- Usage and cost: every request sent (votes, re-asks, retries, failures) and every cache
  hit is one ledger row with the server's own `usage` and its cost from `LLMConfig.prices`
  (none for an unpriced model: tokens only); `usage_report(db, build_id)` sums them.
- Credentials in URLs (`user:key@`, `?api-key=`) are redacted wherever they are written
  (`redact_secrets`, and a filter on the loggers that print request URLs); a key in the
  base URL's query is sent as a default query parameter.

The API key is a `SecretStr`: it is never logged, cached, or part of a cache key.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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

from pipeline.openai_errors import TRANSIENT_KINDS, classify_openai_error, short

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
    # The limits below hold for all clients with the same `build_id` and `cache_path`,
    # in any number of threads and processes (the ledger in the request database).
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    concurrency: int = Field(16, ge=1)  # requests in flight
    prices: dict[str, ModelPrice] = Field(default_factory=default_prices)
    budget_usd: float | None = Field(None, ge=0)
    cache_path: Path | None = Path(".okedit-cache/llm-cache.sqlite")  # None: no cache
    # Whose account the requests go to: one budget, concurrency, rate limit and usage report
    # per build id in the request database. None: this client's own (a fresh id).
    build_id: str | None = None
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

    @model_validator(mode="after")
    def _budget_needs_price(self) -> LLMConfig:
        if self.budget_usd is not None and self.price() is None:
            raise ValueError(
                f"budget_usd cannot be enforced: no price for model {self.model!r}; add one "
                "to prices (USD per 1M prompt/completion tokens)"
            )
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


class StopRequested(LLMFatalError):
    """The build was asked to stop (Ctrl-C, SIGTERM): no further request is sent."""


_STOP = threading.Event()


def request_stop() -> None:
    """From now on no client of this process sends a request (`StopRequested`); the ones in
    flight end normally. Called by `okedit build` on SIGINT/SIGTERM."""
    _STOP.set()


class BudgetExceededError(LLMFatalError):
    """The next request could push the build's spend over `LLMConfig.budget_usd`; it was not
    sent. `spent_usd` is what the build (every process, every run) has spent so far."""

    def __init__(
        self,
        spent_usd: float,
        budget_usd: float,
        partial: list[Any] | None = None,
        reserved_usd: float = 0.0,
    ):
        in_flight = (
            f" (+ ${reserved_usd:.6f} reserved by requests in flight)" if reserved_usd else ""
        )
        super().__init__(
            f"LLM budget cap reached: spent ${spent_usd:.6f} of ${budget_usd:.6f}{in_flight}; "
            "raise the budget (--llm-budget-usd) and re-run: finished requests are cached and "
            "cost nothing"
        )
        self.spent_usd = spent_usd
        self.budget_usd = budget_usd
        self.reserved_usd = reserved_usd
        self.partial: list[Any] = partial or []

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Dask, pickling)
        return (type(self), (self.spent_usd, self.budget_usd, self.partial, self.reserved_usd))


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


def use_wal(conn: sqlite3.Connection, tries: int = 8) -> None:
    """Switch the database to write-ahead logging (readers and one writer at once, across
    the build's processes). The switch takes an exclusive lock that SQLite does not wait
    for: when two processes open a new database at once, one is told "database is locked",
    so it asks again."""
    for attempt in range(tries):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.02 * 2**attempt)


class RequestCache:
    """SQLite table request-hash -> raw completion JSON; safe across threads and processes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        with self._lock:
            use_wal(self._conn)
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


# --------------------------------------------------------------------------- ledger

HOST = socket.gethostname()
RETRY_CAUSES = ("rate_limited", "server_error", "timeout", "connection")

_LEDGER_SCHEMA = (
    # one row per HTTP request sent (every attempt: votes, re-asks, retries, failures) and
    # per cache hit; cost at the price of the model when the row was written
    "CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "build TEXT NOT NULL, at TEXT NOT NULL, model TEXT NOT NULL, template TEXT NOT NULL, "
    "event TEXT NOT NULL, outcome TEXT NOT NULL, retried INTEGER NOT NULL, "
    "sample INTEGER NOT NULL, attempt INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
    "completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, priced INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ledger_build ON ledger (build)",
    # worst-case cost of requests in flight, so that no process overshoots the cap
    "CREATE TABLE IF NOT EXISTS budget_holds (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "build TEXT NOT NULL, usd REAL NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
    "expires REAL NOT NULL)",
    # one row per request in flight: the build's concurrency across processes
    "CREATE TABLE IF NOT EXISTS slots (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "build TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL)",
    # the build's token buckets (requests/min, tokens/min)
    "CREATE TABLE IF NOT EXISTS rate_buckets (build TEXT PRIMARY KEY, requests REAL NOT NULL, "
    "tokens REAL NOT NULL, updated REAL NOT NULL)",
)


@dataclass(frozen=True)
class UsageRow:
    """One request sent (`event="request"`) or answered from the cache (`"cache_hit"`)."""

    event: Literal["request", "cache_hit"]
    outcome: str  # "ok", a FailureKind ("rate_limited", "parse", "refusal", ...) or "fatal"
    model: str = ""
    template: str = ""
    retried: bool = False  # a transient failure that was followed by another attempt
    sample: int = 0
    attempt: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True  # False: no price for the model, the cost is unknown (tokens only)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """The build's shared account in the request database (the SQLite file of the cache):
    spend, budget holds, concurrency slots, rate buckets and the usage of every request.

    Every reservation and settlement is one `BEGIN IMMEDIATE` transaction, so all processes
    of a build (threads, Dask workers, deployment runs on this machine) draw on one budget,
    one concurrency and one rate limit. A hold or slot of a process that died is freed when
    its lease expires, or at once when it ran on this host and its pid is gone.
    `":memory:"` keeps the account in this process only (no request database).
    """

    def __init__(self, path: Path | str):
        self.shared = str(path) != ":memory:"
        if self.shared:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(path), timeout=60.0, check_same_thread=False, isolation_level=None
        )
        with self._lock:
            if self.shared:
                use_wal(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            for statement in _LEDGER_SCHEMA:
                self._conn.execute(statement)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def _purge(conn: sqlite3.Connection, table: str, now: float) -> None:
        """Drop the leases of dead holders (`table` is one of ours, never user input)."""
        conn.execute(f"DELETE FROM {table} WHERE expires < ?", (now,))
        pids = conn.execute(f"SELECT DISTINCT pid FROM {table} WHERE host = ?", (HOST,))
        dead = [(HOST, pid) for (pid,) in pids.fetchall() if pid != os.getpid() and not _alive(pid)]
        if dead:
            conn.executemany(f"DELETE FROM {table} WHERE host = ? AND pid = ?", dead)

    @staticmethod
    def _spent(conn: sqlite3.Connection, build: str) -> float:
        row = conn.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM ledger WHERE build = ?", (build,)
        )
        return float(row.fetchone()[0])

    def spent(self, build: str) -> float:
        with self._lock:
            return self._spent(self._conn, build)

    # ---- budget

    def reserve(self, build: str, usd: float, budget: float | None, ttl_s: float) -> int | None:
        """Hold `usd` (a worst case) for one request or batch. While the holds of requests in
        flight leave no room but the money spent would, wait for them to settle (they
        usually cost less than their worst case); raise `BudgetExceededError` once spent +
        `usd` would pass `budget`. None when there is no budget."""
        if budget is None:
            return None
        delay = 0.02
        while True:
            now = time.time()
            with self._tx() as conn:
                self._purge(conn, "budget_holds", now)
                spent = self._spent(conn, build)
                held = conn.execute(
                    "SELECT COALESCE(SUM(usd), 0) FROM budget_holds WHERE build = ?", (build,)
                ).fetchone()[0]
                if spent + usd > budget:
                    raise BudgetExceededError(spent, budget, reserved_usd=float(held))
                if spent + held + usd <= budget:
                    cursor = conn.execute(
                        "INSERT INTO budget_holds (build, usd, host, pid, expires) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (build, usd, HOST, os.getpid(), now + ttl_s),
                    )
                    return cursor.lastrowid
            time.sleep(delay)  # outside the transaction: the holders settle meanwhile
            delay = min(delay * 2, 0.2)

    def settle(self, build: str, hold: int | None, rows: list[UsageRow]) -> None:
        """Release a hold and write what the request(s) really cost, in one transaction."""
        at = _now()
        with self._tx() as conn:
            if hold is not None:
                conn.execute("DELETE FROM budget_holds WHERE id = ?", (hold,))
            conn.executemany(
                "INSERT INTO ledger (build, at, model, template, event, outcome, retried, sample, "
                "attempt, prompt_tokens, completion_tokens, cost_usd, priced) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        build,
                        at,
                        r.model,
                        r.template,
                        r.event,
                        r.outcome,
                        int(r.retried),
                        r.sample,
                        r.attempt,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cost_usd,
                        int(r.priced),
                    )
                    for r in rows
                ],
            )

    # ---- concurrency

    def acquire_slot(self, build: str, limit: int, ttl_s: float) -> int:
        """Block until fewer than `limit` requests of the build are in flight; the slot id."""
        delay = 0.005
        while True:
            now = time.time()
            with self._tx() as conn:
                self._purge(conn, "slots", now)
                (held,) = conn.execute(
                    "SELECT COUNT(*) FROM slots WHERE build = ?", (build,)
                ).fetchone()
                if held < limit:
                    cursor = conn.execute(
                        "INSERT INTO slots (build, host, pid, expires) VALUES (?, ?, ?, ?)",
                        (build, HOST, os.getpid(), now + ttl_s),
                    )
                    return int(cursor.lastrowid or 0)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, 0.1)

    def release_slot(self, slot: int) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM slots WHERE id = ?", (slot,))

    # ---- rate limits

    def take_rate(self, build: str, rpm: float | None, tpm: float | None, tokens: int) -> float:
        """Take one request and `tokens` from the build's token buckets (capacity: a
        minute's worth; a new build starts with one request and a full token bucket), or
        return the seconds to wait when they do not allow it yet."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT requests, tokens, updated FROM rate_buckets WHERE build = ?", (build,)
            ).fetchone()
            req, tok, last = row if row else (min(1.0, rpm or 0.0), tpm or 0.0, now)
            elapsed = max(0.0, now - last)
            waits = [0.0]
            if rpm:
                req = min(rpm, req + elapsed * rpm / 60.0)
                if req < 1.0:
                    waits.append((1.0 - req) * 60.0 / rpm)
            need = min(float(tokens), tpm) if tpm else 0.0  # larger: wait for a full bucket
            if tpm:
                tok = min(tpm, tok + elapsed * tpm / 60.0)
                if tok < need:
                    waits.append((need - tok) * 60.0 / tpm)
            wait = max(waits)
            if wait <= 0:
                req, tok = req - (1.0 if rpm else 0.0), tok - need
            conn.execute(
                "INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?, ?)", (build, req, tok, now)
            )
            return wait

    # ---- report

    def usage(self, build: str) -> dict[str, Any]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT event, outcome, retried, model, template, attempt, prompt_tokens, "
                "completion_tokens, cost_usd, priced FROM ledger WHERE build = ?",
                (build,),
            ).fetchall()
        return _usage_from_rows(build, rows)


def _usage_from_rows(build: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    requests = [r for r in rows if r[0] == "request"]
    models: dict[str, dict[str, Any]] = {}
    templates: dict[str, dict[str, int]] = {}
    outcomes: dict[str, int] = {}
    retries: dict[str, int] = {}
    unpriced: set[str] = set()
    for _, outcome, retried, model, template, _attempt, pt, ct, cost, priced in requests:
        m = models.setdefault(
            model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        )
        m["requests"] += 1
        m["prompt_tokens"] += pt
        m["completion_tokens"] += ct
        m["cost_usd"] += cost
        t = templates.setdefault(
            template, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        t["requests"] += 1
        t["prompt_tokens"] += pt
        t["completion_tokens"] += ct
        if not priced:
            unpriced.add(model)
        if retried:
            retries[outcome] = retries.get(outcome, 0) + 1
        else:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    for model in unpriced:
        models[model]["cost_usd"] = None
    prompt = sum(r[6] for r in requests)
    completion = sum(r[7] for r in requests)
    cost_known = not unpriced
    return {
        "build_id": build,
        "requests": len(requests),
        "answered": sum(1 for r in requests if r[1] not in (*RETRY_CAUSES, "fatal")),
        "cache_hits": sum(1 for r in rows if r[0] == "cache_hit"),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": round(sum(r[8] for r in requests), 8) if cost_known else None,
        "cost_note": (
            "from the price table (USD per 1M tokens) and the server's usage"
            if cost_known
            else f"no price for model(s) {sorted(unpriced)}: tokens only, cost unknown"
        ),
        "retries": {cause: retries.get(cause, 0) for cause in RETRY_CAUSES},
        "outcomes": dict(sorted(outcomes.items())),  # the final answer of every request
        "refusals": outcomes.get("refusal", 0),
        "malformed": outcomes.get("parse", 0) + outcomes.get("empty", 0),
        "reasks": sum(1 for r in requests if r[5] > 0 and not r[2]),
        "by_model": models,
        "by_template": dict(sorted(templates.items())),
    }


def usage_report(db_path: Path | str | None, build_id: str) -> dict[str, Any]:
    """Every request of a build (all processes and runs) as the server counted it: requests,
    tokens, cost, retries by cause, refusals, malformed answers, re-asks and cache hits."""
    if db_path is None or not Path(db_path).exists():
        return {**_usage_from_rows(build_id, []), "note": "no request database: nothing recorded"}
    ledger = Ledger(db_path)
    try:
        return ledger.usage(build_id)
    finally:
        ledger.close()


# --------------------------------------------------------------------------- limiter


class RateLimiter:
    """Token buckets for requests/min and tokens/min; `acquire` blocks until both allow.
    With a shared `Ledger` and a build id, the buckets are the build's, across processes."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        ledger: Ledger | None = None,
        build: str = "",
    ):
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self._ledger = ledger
        self._build = build or f"limiter-{uuid.uuid4().hex[:12]}"

    def acquire(self, tokens: int) -> None:
        if not self._rpm and not self._tpm:
            return
        if self._ledger is None:
            self._ledger = Ledger(":memory:")
        while True:
            wait = self._ledger.take_rate(self._build, self._rpm, self._tpm, tokens)
            if wait <= 0:
                return
            time.sleep(min(wait, 1.0) * (1.0 + 0.1 * random.random()))


# --------------------------------------------------------------------------- secrets in URLs

SECRET_QUERY_KEYS = frozenset(
    {"api-key", "api_key", "apikey", "key", "token", "access_token", "access-token",
     "auth", "password", "secret", "sig", "signature", "x-api-key", "code"}
)  # fmt: skip
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
REDACTED = "***"


def redact_url(url: str) -> str:
    """The URL with its credentials replaced by `***`: userinfo (`user:key@`) and query
    parameters that carry keys (`api-key`, `key`, `token`, `access_token`, ...)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
        query = urlencode(
            [(k, REDACTED if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in `text` with its credentials redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


SECRET_FIELDS = frozenset({"api_key", "token", "hf_token", "password", "secret"})


def redact_secrets(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with credentials redacted: in URLs,
    and the values of fields named like a key (`api_key`, `token`, ...); what configs,
    manifests and Prefect parameters go through before written."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in SECRET_FIELDS and v else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_secrets(v) for v in value)
    return value


def split_base_url(url: str | None) -> tuple[str | None, dict[str, str]]:
    """(base URL without its query, the query parameters): the openai client appends paths
    to the base URL, so a key in `?api-key=` must travel as a default query parameter."""
    if url is None:
        return None, {}
    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment)), query


class RedactingFilter(logging.Filter):
    """Redacts credentials in URLs from log records (httpx logs every request URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACTING_FILTER = RedactingFilter()
# the loggers that write request URLs (openai vendors httpx as httpx2), and ours
for _name in ("httpx", "httpx2", "httpcore", "openai", "openai._base_client", __name__):
    logging.getLogger(_name).addFilter(_REDACTING_FILTER)


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
    """Map an error that survived the retries to a failure, or stop on a fatal one."""
    failure = classify_openai_error(
        exc,
        "the LLM server",
        "check --llm-base-url (it usually ends in /v1) and that the model exists there",
    )
    if failure.fatal:
        raise LLMFatalError(failure.fatal) from None
    return LLMFailure(failure.kind, failure.reason)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _usage_of(body: str) -> tuple[int, int]:
    """(prompt, completion) tokens of an answer as the server counted them (0 if absent)."""
    try:
        usage = json.loads(body).get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0, 0


def _answer_outcome(body: dict[str, Any]) -> str:
    """What an answer is, without its schema (batch lines): ok, length, refusal, ..."""
    choices = body.get("choices") or []
    if not choices:
        return "empty"
    choice = choices[0] or {}
    if choice.get("finish_reason") in ("length", "content_filter"):
        return str(choice["finish_reason"])
    message = choice.get("message") or {}
    if message.get("refusal"):
        return "refusal"
    if not message.get("content"):
        return "empty"
    try:
        json.loads(_strip_fences(message["content"]))
    except ValueError:
        return "parse"
    return "ok"


MAX_RETRY_AFTER_S = 60.0


def _retry_delay(exc: BaseException, retry: int) -> float:
    """The server's retry-after(-ms) when given (up to a minute), else exponential backoff
    (0.5 s doubling, at most 8 s, minus up to 25 % jitter), as the openai client does."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            delay = float(value) / divisor
        except ValueError:
            try:
                delay = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                delay = -1.0
        if 0 <= delay <= MAX_RETRY_AFTER_S:
            return delay
    return min(0.5 * 2.0**retry, 8.0) * (1.0 - 0.25 * random.random())


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
        base_url, query = split_base_url(config.resolved_base_url())
        # retries are ours (`_send`): each attempt is paced, counted and paid for once
        self._client = (
            client
            or openai.OpenAI(
                api_key=config.resolved_api_key(),
                base_url=base_url,
                default_query=query or None,
                timeout=openai.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            )
        ).with_options(max_retries=0)
        self._cache = RequestCache(config.cache_path) if config.cache_path else None
        self.build_id = config.build_id or f"client-{uuid.uuid4().hex[:16]}"
        self._ledger = Ledger(config.cache_path or ":memory:")
        self._limiter = RateLimiter(
            config.requests_per_minute, config.tokens_per_minute, self._ledger, self.build_id
        )
        self._in_flight = threading.BoundedSemaphore(config.concurrency)
        self._lease_s = config.timeout_s + config.connect_timeout_s + 30.0
        self._lock = threading.Lock()
        self._mode: Literal["json_schema", "json_object"] = (
            "json_object" if config.structured_output == "json_object" else "json_schema"
        )
        self._pending: dict[str, _PendingRequest] = {}
        self._batch_failures: dict[str, LLMFailure] = {}
        self._ingested: set[str] = set()  # batch answers this client paid for (not cache hits)
        self._stats = LLMStats(cost_known=config.price() is not None, mode=self._mode)

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
        self._ledger.close()
        self._client.close()

    def usage(self) -> dict[str, Any]:
        """The build's usage report (every client and process with this build id)."""
        return self._ledger.usage(self.build_id)

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
        hit = self._from_cache(keys, schema, template, sample, attempt)
        if hit is not None:
            return hit
        mode = self._mode
        if self.config.batch_mode:
            return self._defer(messages, schema, template, keys[mode], mode, params)
        where = (template, sample, attempt)
        result = self._send(messages, schema, keys[mode], mode, params, where)
        if (
            isinstance(result, LLMFailure)
            and result.kind == "bad_request"
            and mode == "json_schema"
            and self.config.structured_output == "auto"
        ):
            fallback = self._send(
                messages, schema, keys["json_object"], "json_object", params, where
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
        self, keys: dict[str, str], schema: type[T], template: str, sample: int, attempt: int
    ) -> LLMSuccess[T] | LLMFailure | None:
        if self._cache is None:
            return None
        order = [self._mode] + [m for m in keys if m != self._mode]
        for mode in order:
            row = self._cache.get(keys[mode])
            if row is not None:
                result = self._result(
                    row.body, schema, keys[mode], row.created_at, mode, cached=True
                )
                with self._lock:
                    paid_here = keys[mode] in self._ingested  # a batch answer, not a hit
                    self._stats.cache_hits += not paid_here
                if not paid_here:
                    outcome = result.kind if isinstance(result, LLMFailure) else "ok"
                    hit = UsageRow("cache_hit", outcome, self.config.model, template, False,
                                   sample, attempt)  # fmt: skip
                    self._ledger.settle(self.build_id, None, [hit])
                return result
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

    def _row(
        self, outcome: str, where: tuple[str, int, int], pt: int = 0, ct: int = 0, **kw: Any
    ) -> UsageRow:
        """A ledger row for one request sent; counted in this client's stats as well."""
        discount = kw.pop("discount", 1.0)
        cost = self._estimate_cost(pt, ct) * discount
        with self._lock:
            self._stats.cost_usd += cost
            self._stats.prompt_tokens += pt
            self._stats.completion_tokens += ct
        template, sample, attempt = where
        return UsageRow(
            "request", outcome, self.config.model, template, kw.pop("retried", False), sample,
            attempt, pt, ct, cost, self.config.price() is not None,
        )  # fmt: skip

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """One of the build's `concurrency` requests in flight (this process's threads
        first queue on a semaphore, so only they poll the shared slots table)."""
        with self._in_flight:
            slot = None
            if self._ledger.shared:
                slot = self._ledger.acquire_slot(
                    self.build_id, self.config.concurrency, self._lease_s
                )
            try:
                yield
            finally:
                if slot is not None:
                    self._ledger.release_slot(slot)

    def _send(
        self,
        messages: list[dict[str, str]],
        schema: type[T],
        key: str,
        mode: str,
        params: dict[str, Any],
        where: tuple[str, int, int],
    ) -> LLMSuccess[T] | LLMFailure:
        """One request, retried on 429/5xx/timeouts/connection errors (`max_retries`,
        honouring retry-after); every attempt is paced, held against the budget, and
        written to the ledger with the server's usage."""
        wire = messages if mode == "json_schema" else json_object_messages(messages, schema)
        prompt_estimate = estimate_tokens(wire)
        worst_case = self._estimate_cost(prompt_estimate, self.config.max_tokens)
        for retry in range(self.config.max_retries + 1):
            self._limiter.acquire(prompt_estimate + self.config.max_tokens)
            with self._slot():
                if _STOP.is_set():
                    raise StopRequested("stopping: no further LLM request is sent")
                hold = self._ledger.reserve(
                    self.build_id, worst_case, self.config.budget_usd, self._lease_s
                )
                with self._lock:
                    self._stats.requests_sent += 1
                try:
                    body = self._post(wire, schema, mode, params)
                except openai.APIError as exc:
                    body, error = None, exc
                except BaseException:
                    self._ledger.settle(self.build_id, hold, [self._row("fatal", where)])
                    raise
            if body is not None:
                break
            try:
                failure = _classify_api_error(error)
            except LLMFatalError:
                self._ledger.settle(self.build_id, hold, [self._row("fatal", where)])
                raise
            again = failure.transient and retry < self.config.max_retries
            self._ledger.settle(
                self.build_id, hold, [self._row(failure.kind, where, retried=again)]
            )
            if not again:
                self._count_failure(failure.kind)
                return LLMFailure(failure.kind, failure.reason, key)
            _STOP.wait(_retry_delay(error, retry))  # a stop ends the wait
        created_at = _now()
        result = self._result(body, schema, key, created_at, mode, cached=False)
        pt, ct = _usage_of(body)
        outcome = result.kind if isinstance(result, LLMFailure) else "ok"
        self._ledger.settle(self.build_id, hold, [self._row(outcome, where, pt, ct)])
        if self._cache is not None:
            self._cache.put(key, self.config.model, where[0], body, created_at)
        return result

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
        hold = None
        if resumed is not None:
            batch_id, expected = resumed
            submitted = 0  # the other pending requests are queued again by the next round
        else:
            batch_id, hold = self._submit(pending)
            expected, submitted = set(pending), len(pending)
        try:
            batch = self._wait(batch_id)
            report = self._ingest(batch, pending, expected, submitted)
        finally:
            self._ledger.settle(self.build_id, hold, [])  # the answers are in the ledger
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

    def _submit(self, pending: dict[str, _PendingRequest]) -> tuple[str, int | None]:
        """Submit one batch; its worst-case cost stays held until its answers are in."""
        assert self._cache is not None
        worst = sum(p.worst_case_usd for p in pending.values()) * self.config.batch_discount
        lease = self.config.batch_timeout_s + 3600.0
        hold = self._ledger.reserve(self.build_id, worst, self.config.budget_usd, lease)
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
            self._ledger.settle(self.build_id, hold, [])
            failure = _classify_api_error(exc)
            raise LLMFatalError(f"could not submit the batch: {failure.reason}") from None
        self._cache.add_batch(batch.id, list(pending))
        with self._lock:
            self._stats.requests_sent += len(pending)
        log.info("submitted batch %s with %d requests", batch.id, len(pending))
        return batch.id, hold

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
            template = pending[key].template if key in pending else ""
            self._ledger.settle(self.build_id, None, [self._row("timeout", (template, 0, 0))])
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
        template = pending[key].template if key in pending else ""
        where = (template, 0, 0)
        if status == 200 and isinstance(response.get("body"), dict):
            body = json.dumps(response["body"])
            pt, ct = _usage_of(body)
            row = self._row(_answer_outcome(response["body"]), where, pt, ct,
                            discount=self.config.batch_discount)  # fmt: skip
            self._ledger.settle(self.build_id, None, [row])
            self._cache.put(key, self.config.model, template, body, _now())
            with self._lock:
                self._ingested.add(key)
            return key, True
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        message = short(str(error.get("message", "no answer")))
        if status == 429:
            failure = LLMFailure("rate_limited", f"batch: HTTP 429: {message}")
        elif status >= 500 or status == 0:
            failure = LLMFailure("server_error", f"batch: HTTP {status}: {message}")
        else:
            failure = LLMFailure("bad_request", f"batch: HTTP {status}: {message}")
        self._ledger.settle(self.build_id, None, [self._row(failure.kind, where)])
        self._batch_failure(key, failure)
        return key, False

    def _batch_failure(self, key: str, failure: LLMFailure) -> None:
        self._count_failure(failure.kind)
        with self._lock:
            self._batch_failures[key] = LLMFailure(failure.kind, failure.reason, key)
