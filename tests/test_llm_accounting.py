"""Exact accounting (issue 16): every request the build sent (votes, re-asks, retries,
failures, rejected items) counted once, from the server's own `usage`, across runs; the
totals must equal the loopback server's log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.annotate import make_annotator
from pipeline.llm import usage_report
from schemas.record import Annotation, Rejection
from tests.fixtures_servers import FaultPlan, fault_for_schema, faults_at, llm_server
from tests.test_llm_annotator import SECRET, make_items

PRICE = {"prompt_per_1m": 2.0, "completion_per_1m": 8.0}


def plans(*plans: FaultPlan) -> FaultPlan:
    """The first fault any plan injects (each plan sees every request)."""

    def plan(index: int, body: dict[str, Any]) -> str | None:
        faults = [p(index, body) for p in plans]
        return next((f for f in faults if f), None)

    return plan


def annotator(url: str, tmp_path: Path, **llm: Any) -> Any:
    settings = {
        "base_url": url,
        "model": "fake-model",
        "api_key": SECRET,
        "cache_path": str(tmp_path / "llm.sqlite"),
        "build_id": "build-accounting",
        "concurrency": 3,
        "max_retries": 3,
        "prices": {"fake-model": PRICE},
    }
    return make_annotator({"llm": {**settings, **llm}})


def test_totals_equal_the_servers_log_across_runs(tmp_path: Path) -> None:
    faults = plans(
        fault_for_schema("RephrasesOut", "malformed", times=1),  # one re-ask
        fault_for_schema("TargetOut", "refusal", times=1),  # one item rejected
        fault_for_schema("LocalityOut", "429", times=2),  # two retries, then fine
        fault_for_schema("ImageObjectOut", "500", times=1),  # one retry
    )
    with llm_server(faults=faults, retry_after_ms=5) as server:
        first = annotator(server.url, tmp_path)
        results = first.annotate(make_items(3))
        # a second run of the same build: 3 items from the cache, 1 new
        second = annotator(server.url, tmp_path)
        again = second.annotate(make_items(4))
        log = server.log
        report = usage_report(tmp_path / "llm.sqlite", "build-accounting")
    assert sum(isinstance(r, Rejection) for r in results) == 1
    assert sum(isinstance(r, Annotation) for r in again) == 3
    print(
        f"ledger {report['requests']} requests, {report['prompt_tokens']}/"
        f"{report['completion_tokens']} tokens; server {log.requests} requests, "
        f"{log.prompt_tokens}/{log.completion_tokens} tokens"
    )
    assert report["requests"] == log.requests
    assert report["prompt_tokens"] == log.prompt_tokens
    assert report["completion_tokens"] == log.completion_tokens
    expected_cost = (log.prompt_tokens * 2.0 + log.completion_tokens * 8.0) / 1e6
    assert report["cost_usd"] == pytest.approx(expected_cost)
    assert report["retries"] == {
        "rate_limited": 2,
        "server_error": 1,
        "timeout": 0,
        "connection": 0,
    }
    assert report["retries"]["rate_limited"] == log.statuses[429]
    assert report["refusals"] == log.faults["refusal"] == 1
    assert report["malformed"] == log.faults["malformed"] == 1
    assert report["reasks"] == 1
    assert report["answered"] == log.statuses[200]
    votes = report["by_template"]["counterfact_type@1"]["requests"]
    assert votes == 3 * 3  # 3 votes for each item that got that far (2 + the new one)
    stats = [first.report().llm, second.report().llm]
    assert report["requests"] == sum(s.requests_sent for s in stats)
    assert report["cache_hits"] == stats[1].cache_hits > 0
    assert sum(m["requests"] for m in report["by_model"].values()) == report["requests"]


def test_a_model_without_a_price_reports_tokens_only(tmp_path: Path) -> None:
    with llm_server(faults=faults_at({0: "500"}), retry_after_ms=5) as server:
        ann = annotator(server.url, tmp_path, model="local-llama", prices={})
        ann.annotate(make_items(1))
        report = usage_report(tmp_path / "llm.sqlite", "build-accounting")
        assert report["requests"] == server.log.requests == 12  # 11 + the 500 retried
        assert report["prompt_tokens"] == server.log.prompt_tokens > 0
    assert report["cost_usd"] is None
    assert "no price for model(s) ['local-llama']" in report["cost_note"]
    assert report["by_model"]["local-llama"]["cost_usd"] is None


def test_an_unknown_build_or_no_database_reports_zero(tmp_path: Path) -> None:
    assert usage_report(tmp_path / "missing.sqlite", "b")["requests"] == 0
    assert usage_report(None, "b")["cost_usd"] == 0.0
