"""A new prompt version is asked anew, never answered from the cache of the old one (issue 15).

Prompt templates carry an id and a version; the version is part of every request key, so
bumping it (for a changed instruction whose text might even render the same for some
inputs, or simply to force fresh answers) sends new requests. Were the version dropped from
the key, a build with the new prompts would silently reuse the old answers from the SQLite
request cache. Real openai client against the loopback OpenAI-compatible server; requests
are counted on the server.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.annotate import PROMPTS_DIR, TEMPLATE_IDS, LLMAnnotator, load_template, make_annotator
from schemas.record import Annotation, SourceItem
from tests.fixtures_servers import FakeOpenAIServer, llm_server

N_ITEMS = 2
# pipeline/annotate.py: 10 requests per item when nothing is re-asked, + 1 for the
# image-free locality question (`image_free_locality`, on by default)
REQUESTS_PER_ITEM = 11


def items() -> list[SourceItem]:
    return [
        SourceItem(
            item_id=f"okvqa-val-{2000 + i}",
            source="okvqa/val2014",
            question_id=str(2000 + i),
            image_id=str(200 + i),
            question_type="brands",
            question=f"What brand is the laptop in picture {i}?",
            answers=["dell", "dell", "dell computer", "hp"] + ["dell"] * 6,
            image=b"\xff\xd8fake",
        )
        for i in range(N_ITEMS)
    ]


def prompts(tmp_path: Path, name: str, bump: tuple[str, ...] = ()) -> Path:
    """A copy of the shipped templates with the version of the templates in `bump` raised
    and nothing else changed (same id, same system and user text)."""
    folder = tmp_path / name
    folder.mkdir()
    for template_id in TEMPLATE_IDS:
        source = PROMPTS_DIR / f"{template_id}.yaml"
        if template_id not in bump:
            shutil.copy(source, folder / source.name)
            continue
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
        data["version"] = f"{data['version']}.1"
        (folder / source.name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return folder


def annotator(server: FakeOpenAIServer, tmp_path: Path, prompts_dir: Path) -> LLMAnnotator:
    llm: dict[str, Any] = {
        "base_url": server.url,
        "model": "fake-model",
        "api_key": "sk-prompt-versions",
        "cache_path": str(tmp_path / "llm.sqlite"),  # one request cache for every run
        "concurrency": 2,
        "max_retries": 0,
    }
    return make_annotator({"llm": llm, "prompts_dir": str(prompts_dir)})


def provenance(results: list[Any], field: str) -> list[tuple[str, str]]:
    """(template_version, request_hash) of `field` in each annotation."""
    out = []
    for result in results:
        assert isinstance(result, Annotation), result
        (prov,) = [p for p in result.provenance if p.field == field]
        out.append((prov.template_version, prov.request_hash))
    return out


def test_templates_differing_only_in_version_render_the_same_messages(tmp_path: Path) -> None:
    """The premise: the bumped copy asks exactly the same text, so only the version can tell
    the two apart in a request key."""
    old, new = prompts(tmp_path, "v1"), prompts(tmp_path, "v2", bump=("target",))
    a, b = load_template("target", old), load_template("target", new)
    assert (a.id, a.system, a.user) == (b.id, b.system, b.user)
    assert a.version != b.version and a.ref != b.ref
    variables = {"question": "What brand is this?", "answers": "dell; hp"}
    assert a.render(**variables) == b.render(**variables)


def test_a_bumped_prompt_version_sends_new_requests(tmp_path: Path) -> None:
    old, new = prompts(tmp_path, "v1"), prompts(tmp_path, "v2", bump=("target",))
    with llm_server() as server:
        first = annotator(server, tmp_path, old).annotate(items())
        assert server.log.requests == N_ITEMS * REQUESTS_PER_ITEM
        # the same prompts again: everything from the cache
        again = annotator(server, tmp_path, old).annotate(items())
        assert server.log.requests == N_ITEMS * REQUESTS_PER_ITEM
        targets_before = server.log.schemas["TargetOut"]

        bumped = annotator(server, tmp_path, new)
        second = bumped.annotate(items())
        new_requests = server.log.requests - N_ITEMS * REQUESTS_PER_ITEM
        new_targets = server.log.schemas["TargetOut"] - targets_before

    assert [r.model_dump() for r in again] == [r.model_dump() for r in first]
    assert new_requests == N_ITEMS, (
        f"target@{load_template('target', new).version} sent {new_requests} requests: "
        "a new prompt version must be asked anew, not answered from the old version's cache"
    )
    assert new_targets == N_ITEMS  # only the bumped template; the rest is cached
    assert bumped.report().llm.requests_sent == N_ITEMS
    old_target, new_target = provenance(first, "target"), provenance(second, "target")
    new_version = load_template("target", new).version
    assert [v for v, _ in new_target] == [new_version] * N_ITEMS
    for (_, old_key), (_, new_key) in zip(old_target, new_target, strict=True):
        assert old_key != new_key  # the request key (cache key) holds the version
    # a template whose version did not change keeps its key
    assert provenance(first, "image_object") == provenance(second, "image_object")


def test_bumping_every_template_re_asks_everything(tmp_path: Path) -> None:
    old, new = prompts(tmp_path, "v1"), prompts(tmp_path, "v2", bump=TEMPLATE_IDS)
    with llm_server() as server:
        annotator(server, tmp_path, old).annotate(items())
        sent = server.log.requests
        bumped = annotator(server, tmp_path, new)
        results = bumped.annotate(items())
        assert server.log.requests == 2 * sent
    assert bumped.report().llm.requests_sent == sent
    versions = {t: load_template(t, new).version for t in TEMPLATE_IDS}
    for result in results:
        assert isinstance(result, Annotation)
        for p in result.provenance:
            assert p.template_version == versions[p.template_id]
            assert p.template_version != load_template(p.template_id, old).version
