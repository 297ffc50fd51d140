"""LLMClient against a real OpenAI-compatible server on 127.0.0.1, via the real openai client."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.llm import (
    BudgetExceededError,
    LLMClient,
    LLMConfig,
    LLMFailure,
    LLMFatalError,
    LLMSuccess,
    ModelPrice,
    RateLimiter,
)
from tests.fixtures_servers import FakeOpenAIServer, faults_at, llm_server

SECRET = "sk-okedit-test-NEVER-LOG-ME-4242"


class TargetOut(BaseModel):
    target: str


def messages(question: str = "What brand is this computer?") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Give a counterfactual answer."},
        {"role": "user", "content": f"Question: {question}\nAnswers: dell"},
    ]


def make_client(server: FakeOpenAIServer, tmp_path: Path, **overrides: Any) -> LLMClient:
    settings: dict[str, Any] = {
        "base_url": server.url,
        "model": "fake-model",
        "api_key": SECRET,
        "cache_path": tmp_path / "llm.sqlite",
        "timeout_s": 5.0,
        "max_retries": 3,
    }
    settings.update(overrides)
    return LLMClient(LLMConfig(**settings))


def test_structured_answer_with_usage(tmp_path: Path) -> None:
    with llm_server() as server:
        client = make_client(server, tmp_path)
        result = client.complete(messages(), TargetOut, template="target@1")
        assert isinstance(result, LLMSuccess)
        assert result.value.target and result.value.target != "dell"
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
        assert not result.cached and result.mode == "json_schema"
        assert server.log.requests == 1
        body_format = server.log.schemas
        assert body_format["TargetOut"] == 1
        stats = client.stats()
        assert stats.requests_sent == 1 and stats.prompt_tokens == result.prompt_tokens


def test_warm_cache_sends_nothing_and_gives_the_same_result(tmp_path: Path) -> None:
    with llm_server() as server:
        first = make_client(server, tmp_path).complete(messages(), TargetOut, template="target@1")
        second_client = make_client(server, tmp_path)
        second = second_client.complete(messages(), TargetOut, template="target@1")
        assert server.log.requests == 1
        assert isinstance(first, LLMSuccess) and isinstance(second, LLMSuccess)
        assert second.cached and second.value == first.value
        assert second.timestamp == first.timestamp and second.request_hash == first.request_hash
        assert second_client.stats().cache_hits == 1 and second_client.stats().requests_sent == 0


def test_cache_key_covers_template_version_sample_and_model(tmp_path: Path) -> None:
    with llm_server() as server:
        client = make_client(server, tmp_path)
        client.complete(messages(), TargetOut, template="target@1")
        client.complete(messages(), TargetOut, template="target@2")
        client.complete(messages(), TargetOut, template="target@1", sample=1)
        make_client(server, tmp_path, model="other").complete(
            messages(), TargetOut, template="target@1"
        )
        assert server.log.requests == 4
        client.complete(messages(), TargetOut, template="target@2")
        assert server.log.requests == 4


def test_429_with_retry_after_is_retried_and_honoured(tmp_path: Path) -> None:
    with llm_server(faults=faults_at({0: "429"}), retry_after_ms=400) as server:
        client = make_client(server, tmp_path)
        start = time.monotonic()
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMSuccess)
        assert time.monotonic() - start >= 0.4
        assert server.log.statuses[429] == 1 and server.log.requests == 2


def test_500_and_timeouts_are_retried(tmp_path: Path) -> None:
    plan = faults_at({0: "500", 1: "timeout"})
    with llm_server(faults=plan, timeout_sleep_s=1.0) as server:
        client = make_client(server, tmp_path, timeout_s=0.3)
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMSuccess)
        assert server.log.requests == 3


def test_exhausted_retries_are_a_failure_and_not_cached(tmp_path: Path) -> None:
    with llm_server(faults=lambda i, b: "500" if i < 2 else None) as server:
        client = make_client(server, tmp_path, max_retries=1)
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMFailure) and result.kind == "server_error" and result.transient
        assert server.log.requests == 2
        again = client.complete(messages(), TargetOut)  # not cached: asked again, now fine
        assert isinstance(again, LLMSuccess) and server.log.requests == 3
        assert client.stats().failures == {"server_error": 1}


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("malformed", "parse"),
        ("not_json", "parse"),
        ("refusal", "refusal"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("400", "bad_request"),
    ],
)
def test_bad_answers_are_typed_failures(tmp_path: Path, fault: str, kind: str) -> None:
    with llm_server(faults=lambda i, b: fault) as server:
        client = make_client(server, tmp_path, structured_output="json_schema")
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMFailure)
        assert result.kind == kind and result.reason
        assert not result.transient


def test_answered_failures_are_cached_so_a_rerun_repeats_nothing(tmp_path: Path) -> None:
    with llm_server(faults=lambda i, b: "refusal") as server:
        make_client(server, tmp_path).complete(messages(), TargetOut)
        again = make_client(server, tmp_path).complete(messages(), TargetOut)
        assert isinstance(again, LLMFailure) and again.kind == "refusal" and again.cached
        assert server.log.requests == 1


def test_json_object_fallback_for_servers_without_json_schema(tmp_path: Path) -> None:
    with llm_server(json_schema_supported=False) as server:
        client = make_client(server, tmp_path)
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMSuccess) and result.mode == "json_object"
        assert client.mode == "json_object"
        assert server.log.requests == 2  # the refused JSON-schema request + the fallback
        client.complete(messages("Another question?"), TargetOut)
        assert server.log.requests == 3
        fresh = make_client(server, tmp_path)  # a re-run starts in auto mode again
        assert isinstance(fresh.complete(messages(), TargetOut), LLMSuccess)
        assert server.log.requests == 3


def test_explicit_json_object_mode(tmp_path: Path) -> None:
    with llm_server() as server:
        client = make_client(server, tmp_path, structured_output="json_object")
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMSuccess) and result.mode == "json_object"
        assert server.log.requests == 1


def test_bad_key_is_fatal(tmp_path: Path) -> None:
    with llm_server(faults=lambda i, b: "401") as server:
        with pytest.raises(LLMFatalError, match="credentials"):
            make_client(server, tmp_path).complete(messages(), TargetOut)


def test_budget_cap_stops_before_overspending(tmp_path: Path) -> None:
    price = {"fake-model": ModelPrice(prompt_per_1m=1000.0, completion_per_1m=1000.0)}
    with llm_server() as server:
        client = make_client(server, tmp_path, prices=price, budget_usd=0.5, max_tokens=100)
        sent = 0
        with pytest.raises(BudgetExceededError, match="budget cap") as info:
            for i in range(50):
                client.complete(messages(f"Question number {i}?"), TargetOut)
                sent += 1
        assert sent >= 1 and server.log.requests == sent
        assert info.value.spent_usd <= 0.5
        assert client.stats().cost_usd == pytest.approx(info.value.spent_usd)
        assert client.stats().cost_usd > 0


def test_cost_is_computed_from_the_price_table(tmp_path: Path) -> None:
    price = {"fake-model": ModelPrice(prompt_per_1m=2.0, completion_per_1m=8.0)}
    with llm_server() as server:
        client = make_client(server, tmp_path, prices=price)
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMSuccess)
        expected = (result.prompt_tokens * 2.0 + result.completion_tokens * 8.0) / 1e6
        assert client.stats().cost_usd == pytest.approx(expected)


def test_rate_limiter_spaces_requests() -> None:
    limiter = RateLimiter(requests_per_minute=1200, tokens_per_minute=None)
    start = time.monotonic()
    for _ in range(6):  # a new bucket holds one request: no burst of a minute's worth
        limiter.acquire(1)
    assert 0.25 <= time.monotonic() - start < 2.0  # 20 requests/s


def test_token_limiter_waits_for_tokens() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600_000)
    limiter.acquire(600_000)
    start = time.monotonic()
    limiter.acquire(3_000)  # 10,000 tokens/s
    assert 0.2 <= time.monotonic() - start < 2.0


def test_api_key_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with llm_server(faults=faults_at({0: "500", 2: "malformed"})) as server:
        config = LLMConfig(
            base_url=server.url, model="fake-model", cache_path=tmp_path / "c.sqlite"
        )
        client = LLMClient(config)
        client.complete(messages(), TargetOut)
        client.complete(messages("Second?"), TargetOut)
        assert server.log.auth_headers == {f"Bearer {SECRET}"}  # the key was used ...
    # ... and appears nowhere we write or print
    assert SECRET not in caplog.text
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert SECRET not in config.model_dump_json()
    assert SECRET not in client.stats().model_dump_json()
    for path in tmp_path.rglob("*"):
        assert SECRET.encode() not in path.read_bytes(), path
    explicit = LLMConfig(api_key=SECRET, base_url=server.url)
    assert SECRET not in repr(explicit) and SECRET not in explicit.model_dump_json()


def test_config_rejects_non_http_base_url_and_batch_without_cache() -> None:
    with pytest.raises(ValueError, match="http"):
        LLMConfig(base_url="file:///etc/passwd")
    with pytest.raises(ValueError, match="batch_mode needs cache_path"):
        LLMConfig(batch_mode=True, cache_path=None)


def test_missing_key_for_openai_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMFatalError, match="OPENAI_API_KEY"):
        LLMClient(LLMConfig(cache_path=None))


def test_an_unrelated_400_does_not_switch_to_json_object(tmp_path: Path) -> None:
    with llm_server(faults=lambda i, b: "400") as server:
        client = make_client(server, tmp_path)
        result = client.complete(messages(), TargetOut)
        assert isinstance(result, LLMFailure) and result.kind == "bad_request"
        assert client.mode == "json_schema" and server.log.requests == 2
