"""Transient failures are not rejections (issue 16, part 4): an item that failed only on
429/5xx/timeouts after its retries is `deferred`; a re-run asks again what it still owes
and nothing that was answered before (0 repaid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.annotate import make_annotator
from schemas.record import Annotation, Rejection
from tests.fixtures_servers import fault_for_schema, llm_server, storm
from tests.test_llm_accounting import plans
from tests.test_llm_annotator import SECRET, make_items


def annotator(url: str, tmp_path: Path, **llm: Any) -> Any:
    settings = {"base_url": url, "model": "m", "api_key": SECRET, "max_retries": 1}
    settings.update(cache_path=str(tmp_path / "llm.sqlite"), build_id="b", **llm)
    return make_annotator({"llm": settings})


def test_transient_failures_are_deferred_and_retried_by_a_rerun(tmp_path: Path) -> None:
    items = make_items(12)
    faults = plans(
        storm(p_429=0.2, p_500=0.1, p_malformed=0.0, seed=5),
        fault_for_schema("TargetOut", "refusal", times=1),  # a real rejection stays one
    )
    with llm_server(faults=faults, retry_after_ms=2) as server:
        first = annotator(server.url, tmp_path, concurrency=1)  # one order: one outcome
        results = first.annotate(items)
        deferred = [r for r in results if isinstance(r, Rejection) and r.deferred]
        rejected = [r for r in results if isinstance(r, Rejection) and not r.deferred]
        report = first.report()
        assert deferred and len(rejected) == 1
        assert rejected[0].reason.startswith("target: refusal")
        assert all(r.reason.split(": ")[1] in {"rate_limited", "server_error"} for r in deferred)
        assert report.items_in == report.kept + report.rejected + report.deferred == 12
        assert report.deferred == len(deferred) and report.rejected == 1

        server.faults = None  # the storm is over: a re-run of the same build
        again = annotator(server.url, tmp_path).annotate(items)
        answered_twice = [h for h, n in server.log.answered.items() if n > 1]
    assert answered_twice == []  # nothing answered before was paid for again
    done_before = {r.item_id for r in results if isinstance(r, Annotation)}
    assert {r.item_id for r in again if isinstance(r, Annotation)} == done_before | {
        r.item_id for r in deferred
    }
    assert [r.reason for r in again if isinstance(r, Rejection)] == [rejected[0].reason]
