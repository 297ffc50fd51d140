"""Deferred items are retried (issue 16, part 4), through the real build flow on the
session's Prefect API: a flagworld build annotated by the LLM annotator against the
loopback OpenAI-compatible server, which answers 500 to every `target` request of two items
on the first run. Those items are `deferred` (not rejected): the annotate chunk is not
final, `in = published + rejected + deferred`, and rejected.jsonl lists them with
`"deferred": true`. The server is healthy on the second run: only the deferred items are
asked again (nothing answered before is paid twice), the later stages of their chunk run
again, they are published, and a third run sends nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.sources.flagworld import COUNTRIES, flag_object
from tests.fixtures_servers import _field, _user_text, llm_server, okedit_responder, schema_name

FAILING = {"lima", "romanian"}  # the answers of two of the first 8 flagworld items


def flag_responder(body: dict[str, Any]) -> str:
    """Valid answers whose image objects are flagworld flags (the render backend draws only
    those): a country chosen by the answer asked about."""
    if schema_name(body) == "ImageObjectOut":
        answer = _field(_user_text(body), "Answer")
        country = COUNTRIES[sum(map(ord, answer)) % len(COUNTRIES)]
        return json.dumps({"image_object": flag_object(country.code)})
    return okedit_responder(body)


def fail_targets_of(answers: set[str]) -> Any:
    def plan(_index: int, body: dict[str, Any]) -> str | None:
        if schema_name(body) == "TargetOut" and _field(_user_text(body), "Answers") in answers:
            return "500"
        return None

    return plan


def markers(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in (out / ".okedit").glob("*/*.done.json")
    }


def test_deferred_items_are_retried_by_the_next_run(prefect_api: None, tmp_path: Path) -> None:
    from flows.build_okedit import build_okedit

    with llm_server(responder=flag_responder, faults=fail_targets_of(FAILING)) as llm:
        cfg = BuildConfig(
            out=tmp_path / "okedit",
            cache_dir=tmp_path / "cache",
            limit=8,
            chunk_size=4,
            annotator={"kind": "llm", "llm_base_url": llm.url, "llm": {"max_retries": 1}},
            validation={"enabled": False},
        )
        first = build_okedit(config=cfg)
        manifest = json.loads((cfg.out / "manifest.json").read_text())
        rows = [json.loads(line) for line in (cfg.out / "rejected.jsonl").read_text().splitlines()]
        before = markers(cfg.out)
        paid = dict(llm.log.answered)
        assert llm.log.faults["500"] >= 2 * 2  # each failing request tried twice

        llm.faults = None  # the server is healthy again
        second = build_okedit(config=cfg)
        repaid = [h for h, n in paid.items() if llm.log.answered[h] > n]
        after = markers(cfg.out)
        requests = llm.log.requests

        third = build_okedit(config=cfg)
        assert llm.log.requests == requests  # nothing left to ask
        assert third["counts"] == second["counts"]

    counts = first["counts"]
    print(f"first run {counts}; second run {second['counts']}")
    assert counts["deferred"] == 2
    assert counts["in"] == 8 == counts["published"] + counts["rejected"] + counts["deferred"]
    assert manifest["counts"] == counts
    assert first["stages"]["annotate"]["deferred"] == 2
    deferred_rows = [r for r in rows if r["deferred"]]
    assert len(deferred_rows) == 2
    assert {r["stage"] for r in deferred_rows} == {"annotate"}
    assert all("server_error" in r["reason"] for r in deferred_rows)

    counts = second["counts"]
    assert "deferred" not in counts
    assert counts["in"] == 8 == counts["published"] + counts["rejected"]
    assert counts["published"] == first["counts"]["published"] + 2
    assert repaid == []
    published = json.loads((cfg.out / "manifest.json").read_text())["counts"]
    assert published == counts
    # chunk 0 holds both deferred items: it was annotated again and its later stages redone;
    # chunk 1 was final and kept as it was
    redone = {k for k in before if after.get(k) != before[k]}
    assert redone == {
        f".okedit/{stage}/chunk-00000.done.json"
        for stage in ("annotate", "images", "assemble", "validate")
    }
