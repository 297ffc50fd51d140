"""One budget, one concurrency and one rate limit per build, across processes (issue 16).

Two worker processes (multiprocessing, spawn) each run their own `LLMClient` with several
threads, on the same request database and build id, against one loopback OpenAI-compatible
server in this process, which records what really arrived: the usage it returned, the most
requests it answered at once and when each request came.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.llm import BudgetExceededError, Ledger, LLMClient, LLMConfig, usage_report
from tests.fixtures_servers import llm_server

SECRET = "sk-shared-limits-NEVER-LOG"
PRICE = {"fake-model": {"prompt_per_1m": 1000.0, "completion_per_1m": 1000.0}}  # $0.001/token


class TargetOut(BaseModel):
    target: str


def _messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Give a counterfactual answer."},
        {"role": "user", "content": f"Question: What brand is computer number {i}?\nAnswers: dell"},
    ]


def _worker(url: str, cache: str, build: str, first: int, n: int, threads: int, llm: dict) -> dict:
    """One process of the build: `n` requests from `threads` threads on one client."""
    config = LLMConfig(
        base_url=url,
        model="fake-model",
        api_key=SECRET,
        cache_path=Path(cache),
        build_id=build,
        **llm,
    )
    client = LLMClient(config)
    sent, errors = 0, []

    def one(i: int) -> None:
        client.complete(_messages(i), TargetOut, template="target@1")

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one, first + i) for i in range(n)]:
            try:
                future.result()
                sent += 1
            except BudgetExceededError as exc:
                errors.append(str(exc))
    stats = client.stats()
    client.close()
    return {"completed": sent, "budget_errors": errors, "cost": stats.cost_usd}


def _run_in_processes(url: str, cache: Path, build: str, n: int, threads: int, **llm: Any):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        jobs = [
            pool.apply_async(_worker, (url, str(cache), build, p * 1000, n, threads, llm))
            for p in range(2)
        ]
        return [job.get(timeout=240) for job in jobs]


def _server_cost(log: Any) -> float:
    return (log.prompt_tokens + log.completion_tokens) * 1000.0 / 1e6


def test_two_processes_share_one_budget(tmp_path: Path) -> None:
    budget = 0.5
    cache = tmp_path / "llm.sqlite"
    with llm_server(latency_s=0.02) as server:
        workers = _run_in_processes(
            server.url, cache, "build-a", 40, 4, prices=PRICE, budget_usd=budget, max_tokens=40
        )
        log = server.log
        # the server's own count of what it billed, and the ledger's, are one and the same
        report = usage_report(cache, "build-a")
        assert report["requests"] == log.requests
        assert report["prompt_tokens"] == log.prompt_tokens
        assert report["completion_tokens"] == log.completion_tokens
    spent = _server_cost(log)
    print(f"spent ${spent:.4f} of ${budget} in {log.requests} requests")
    assert report["cost_usd"] == pytest.approx(spent)
    assert spent <= budget
    assert spent > budget * 0.6  # the cap was used, not refused up front
    assert all(w["budget_errors"] for w in workers)  # both processes stopped on the cap
    message = workers[0]["budget_errors"][0]
    # the error says what the build spent and holds, across processes (not "$0.0000 spent"
    # while money went out): a cap may be hit by reservations before anything settles
    spent_in_message = float(message.split("spent $")[1].split(" ")[0])
    reserved = message.split("+ $")[1].split(" ")[0] if "reserved" in message else "0"
    assert spent_in_message <= budget and spent_in_message + float(reserved) > 0
    assert sum(w["cost"] for w in workers) == pytest.approx(spent)


def test_two_processes_share_one_concurrency(tmp_path: Path) -> None:
    with llm_server(latency_s=0.15) as server:
        _run_in_processes(server.url, tmp_path / "llm.sqlite", "build-c", 12, 6, concurrency=3)
        print(f"max in flight {server.log.max_in_flight} (limit 3, 12 threads)")
        assert server.log.requests == 24
        assert server.log.max_in_flight == 3  # reached, never passed


def test_two_processes_share_one_rate_limit(tmp_path: Path) -> None:
    rpm = 240  # 4 requests/s for the whole build; a new bucket holds one request
    with llm_server() as server:
        _run_in_processes(
            server.url, tmp_path / "llm.sqlite", "build-r", 5, 5, requests_per_minute=rpm
        )
        arrivals = sorted(server.log.arrivals)
    span = arrivals[-1] - arrivals[0]
    print(f"10 requests at {rpm}/min over {span:.2f} s")
    assert len(arrivals) == 10
    assert span >= 9 * 60 / rpm * 0.9  # one bucket: 9 waits of 0.25 s (two would be ~1 s)
    # never more than one bucket allows since the first (+1: a request taken from the bucket
    # may reach the server a little after one taken later, e.g. on a new connection)
    for i, t in enumerate(arrivals):
        assert i + 1 <= 2 + (t - arrivals[0]) * rpm / 60 + 0.2


def test_the_budget_carries_over_to_a_resumed_run(tmp_path: Path) -> None:
    cache = tmp_path / "llm.sqlite"
    with llm_server() as server:
        settings = dict(base_url=server.url, model="fake-model", api_key=SECRET)
        settings.update(cache_path=cache, build_id="b", prices=PRICE, budget_usd=0.3)
        first = LLMClient(LLMConfig(**settings, max_tokens=20))
        with pytest.raises(BudgetExceededError):
            for i in range(100):
                first.complete(_messages(i), TargetOut)
        first.close()
        sent = server.log.requests
        again = LLMClient(LLMConfig(**settings, max_tokens=20))  # a re-run of the same build
        with pytest.raises(BudgetExceededError, match=r"spent \$0\.[1-3]"):
            again.complete(_messages(5000), TargetOut)
        assert server.log.requests == sent
        other = LLMClient(LLMConfig(**{**settings, "build_id": "another"}, max_tokens=20))
        assert other.complete(_messages(5001), TargetOut)  # another build: its own budget
    assert _server_cost(server.log) <= 0.3 + 0.3


def test_a_killed_process_does_not_keep_its_slots(tmp_path: Path) -> None:
    db = tmp_path / "llm.sqlite"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_hold_slot_and_die, args=(str(db),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    ledger = Ledger(db)
    start = time.monotonic()
    slot = ledger.acquire_slot("b", 1, ttl_s=600)  # the dead holder's lease is dropped
    assert time.monotonic() - start < 1.0
    ledger.release_slot(slot)
    ledger.close()


def _hold_slot_and_die(db: str) -> None:
    Ledger(db).acquire_slot("b", 1, ttl_s=600)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_reservation_waits_for_holds_that_leave_room_once_settled(tmp_path: Path) -> None:
    """Holds are worst cases: while the money spent still leaves room, a new request waits
    for the requests in flight to settle instead of stopping the build with the budget
    unspent; once the spent money leaves no room, it is refused at once."""
    import threading

    from pipeline.llm import UsageRow

    ledger = Ledger(tmp_path / "llm.sqlite")
    held = ledger.reserve("b", 0.8, budget=1.0, ttl_s=600)  # a request in flight, worst case
    settled = threading.Timer(
        0.3, ledger.settle, ("b", held, [UsageRow("request", "ok", cost_usd=0.3)])
    )
    settled.start()
    start = time.monotonic()
    second = ledger.reserve("b", 0.5, budget=1.0, ttl_s=600)  # 0.8 + 0.5 > 1, 0.3 + 0.5 <= 1
    waited = time.monotonic() - start
    settled.join()
    assert second is not None and waited >= 0.25  # it waited for the settlement
    with pytest.raises(BudgetExceededError):  # 0.3 spent + 0.8 > 1: no waiting helps
        ledger.reserve("b", 0.8, budget=1.0, ttl_s=600)


def test_opening_a_new_database_asks_again_while_another_process_switches_it() -> None:
    """Two processes of a build opening a fresh request database at once: SQLite does not
    wait for the exclusive lock of the switch to WAL, so the loser asks again."""
    import sqlite3

    from pipeline.llm import use_wal

    class Contended:
        def __init__(self, locked: int) -> None:
            self.locked, self.calls = locked, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.calls <= self.locked:
                raise sqlite3.OperationalError("database is locked")

    conn = Contended(locked=2)
    use_wal(conn)  # type: ignore[arg-type]
    assert conn.calls == 3
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(Contended(locked=99), tries=3)  # type: ignore[arg-type]
