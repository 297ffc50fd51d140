"""Schemas that carry the counts (issue 16): a server that follows only the JSON schema
(guided decoding) returns as many items as the schema allows, so the schema must say how
many the prompt asks for; longer answers are truncated to the configured count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.record import Annotation
from tests.fixtures_servers import llm_server, okedit_responder, request_schema, schema_name
from tests.fixtures_servers import schema_only_responder as schema_only
from tests.test_llm_annotator import SECRET, make_items


def annotate(server: Any, tmp_path: Path, items: int = 2, **settings: Any) -> list[Any]:
    from pipeline.annotate import make_annotator

    llm = {"base_url": server.url, "model": "m", "api_key": SECRET, "max_retries": 0}
    llm.update(cache_path=str(tmp_path / "llm.sqlite"), **settings.pop("llm", {}))
    return make_annotator({"llm": llm, **settings}).annotate(make_items(items))


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
def test_a_server_that_follows_only_the_schema(tmp_path: Path, mode: str) -> None:
    with llm_server(responder=schema_only(), keep_raw=True) as server:
        results = annotate(server, tmp_path, llm={"structured_output": mode})
        assert server.log.requests == 2 * 11  # 10 + image_free_locality; none asked again
        raw = server.log.raw
    assert all(isinstance(r, Annotation) for r in results)
    for a in results:
        assert len(a.rephrases) == 10 and len(a.rephrases_train) == 3
        assert len(a.text_negatives) == 3
    schemas = {schema_name(b): request_schema(b)["properties"] for b in raw}

    def bounds(prop: dict[str, Any]) -> tuple[int, int]:
        return prop["minItems"], prop["maxItems"]

    assert bounds(schemas["RephrasesOut"]["rephrases"]) == (10, 10)
    assert bounds(schemas["RephrasesOut"]["rephrases_train"]) == (3, 3)
    assert bounds(schemas["TextNegativesOut"]["text_negatives"]) == (3, 3)


def test_the_schema_follows_the_configured_counts(tmp_path: Path) -> None:
    with llm_server(responder=schema_only()) as server:
        results = annotate(
            server, tmp_path, items=1, n_rephrases=4, n_rephrases_train=2, n_text_negatives=5
        )
    (a,) = results
    assert isinstance(a, Annotation)
    assert (len(a.rephrases), len(a.rephrases_train), len(a.text_negatives)) == (4, 2, 5)


def test_longer_answers_are_truncated_to_the_configured_count(tmp_path: Path) -> None:
    def too_many(body: dict[str, Any]) -> str:
        data = json.loads(okedit_responder(body))
        base = "What brand is this"
        if schema_name(body) == "RephrasesOut":
            data["rephrases"] += [f"{base}, extra {i}?" for i in range(4)]
            data["rephrases_train"] = [f"{base}, train {i}?" for i in range(13)]
        if schema_name(body) == "TextNegativesOut":
            negative = {"question": "What colour is the logo here?", "answer": "blue"}
            data["text_negatives"].append(negative)
        return json.dumps(data)

    with llm_server(responder=too_many) as server:
        results = annotate(server, tmp_path)
        assert server.log.requests == 2 * 11  # truncated, not asked again
    for a in results:
        assert isinstance(a, Annotation)
        assert len(a.rephrases) == 10 and len(a.rephrases_train) == 3
        assert len(a.text_negatives) == 3


def test_shorter_answers_are_asked_again(tmp_path: Path) -> None:
    asked: list[int] = []

    def short_once(body: dict[str, Any]) -> str:
        data = json.loads(schema_only()(body))
        if schema_name(body) == "RephrasesOut":
            asked.append(1)
            if len(asked) == 1:
                data["rephrases"] = data["rephrases"][:9]
        return json.dumps(data)

    with llm_server(responder=short_once) as server:
        (a,) = annotate(server, tmp_path, items=1)
        assert server.log.requests == 12 and len(asked) == 2  # 11 + the re-ask
    assert isinstance(a, Annotation) and len(a.rephrases) == 10
    prov = next(p for p in a.provenance if p.field == "rephrases")
    assert json.loads(prov.params)["attempt"] == 1
