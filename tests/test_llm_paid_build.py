"""A paid build through the command line and the Prefect flow (issue 16): the manifest's
LLM usage equals the loopback server's log, and a key in the LLM URL (userinfo and an
`api-key` query parameter) is used but written nowhere: not in the manifest, the card, the
build folder, the request database, Prefect's flow-run parameters or the logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import BuildConfig
from tests.fixtures_images_api import render_pool, tiny_clip
from tests.fixtures_servers import FakeImageServer, Route, fault_for_schema, llm_server
from tests.test_llm_accounting import plans
from tests.test_okvqa_build_e2e import IMAGE_IDS, build, coco, write_vqa_files

USER_SECRET, QUERY_SECRET = "sk-userinfo-SECRET-1", "sk-query-SECRET-2"


def secret_url(url: str) -> str:
    return url.replace("http://", f"http://user:{USER_SECRET}@") + f"?api-key={QUERY_SECRET}"


def test_describe_redacts_credentials_in_urls() -> None:
    cfg = BuildConfig.model_validate(
        {
            "annotator": {
                "kind": "llm",
                "llm_base_url": "https://user:sk-secret@host/v1?api-key=sk-2&x=1",
                "llm": {"api_key": "sk-3", "budget_usd": 1.0},
            },
            "source": {"image_base_url": "https://host/img?token=sk-4"},
        }
    )
    text = json.dumps(cfg.describe())
    for secret in ("sk-secret", "sk-2", "sk-3", "sk-4"):
        assert secret not in text
    described = cfg.describe()
    assert described["annotator"]["llm_base_url"] == "https://***@host/v1?api-key=***&x=1"
    assert described["source"]["image_base_url"] == "https://host/img?token=***"
    # a new key, a raised budget or other limits are the same build (it resumes)
    same = cfg.model_copy(deep=True)
    same.annotator.llm_base_url = "https://user:sk-other@host/v1?api-key=sk-9&x=1"
    same.annotator.llm = {"budget_usd": 5.0, "requests_per_minute": 60}
    same.annotator.concurrency = 2
    assert same.fingerprint() == cfg.fingerprint()


def _flow_run_parameters() -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run.parameters for run in client.read_flow_runs()]


def test_paid_build_accounts_every_request_and_writes_no_secret(
    prefect_api: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    questions, annotations = write_vqa_files(tmp_path)
    pool = render_pool(tmp_path / "pool")
    clip = tiny_clip(tmp_path / "tiny-clip")
    routes = {f"/val2014/COCO_val2014_{i:012d}.jpg": Route(coco(i)) for i in IMAGE_IDS}
    out = tmp_path / "okedit"
    faults = plans(
        fault_for_schema("RephrasesOut", "malformed", times=1),  # a re-ask
        fault_for_schema("TargetOut", "refusal", times=1),  # a rejected item
        fault_for_schema("LocalityOut", "429", times=1),  # a retry
    )
    try:
        with FakeImageServer(routes) as images, llm_server(faults=faults, retry_after_ms=5) as llm:
            build(
                *("--source", "okvqa-files", "--out", str(out), "--chunk-size", "2"),
                *("--okvqa-questions", str(questions), "--okvqa-annotations", str(annotations)),
                *("--image-base-url", images.url),
                *("--annotator", "llm", "--llm-base-url", secret_url(llm.url)),
                *("--llm-budget-usd", "1.0", "--llm-concurrency", "2", "--llm-rpm", "6000"),
                *("--image-backend", "retrieve", "--image-pool", str(pool)),
                *("--image-model", str(clip), "--no-validate"),
            )
            log = llm.log
    finally:
        torch.set_num_threads(threads)
    # the key was used ...
    assert log.queries == {f"api-key={QUERY_SECRET}"}
    assert log.max_in_flight <= 2
    manifest = json.loads((out / "manifest.json").read_text())
    usage = manifest["llm"]
    print(
        f"manifest {usage['requests']} requests {usage['prompt_tokens']}/"
        f"{usage['completion_tokens']} tokens ${usage['cost_usd']}; server {log.requests} "
        f"requests {log.prompt_tokens}/{log.completion_tokens} tokens"
    )
    assert manifest["counts"]["rejected"] >= 1
    assert usage["requests"] == log.requests
    assert usage["prompt_tokens"] == log.prompt_tokens
    assert usage["completion_tokens"] == log.completion_tokens
    price = usage["price_per_1m_usd"]
    expected = (log.prompt_tokens * price["prompt_per_1m"]) / 1e6 + (
        log.completion_tokens * price["completion_per_1m"]
    ) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected)
    assert usage["retries"]["rate_limited"] == 1
    assert usage["refusals"] == 1 and usage["malformed"] == 1 and usage["reasks"] == 1
    assert usage["budget_usd"] == 1.0 and usage["model"] == "gpt-4o-mini"
    # the totals the manifest and the card show are the server's, not the records' provenance
    assert manifest["tokens"] == {"prompt": log.prompt_tokens, "completion": log.completion_tokens}
    card = (out / "README.md").read_text()
    assert "## Annotation cost" in card and f"{usage['requests']} ({usage['answered']})" in card
    # ... and written nowhere
    for secret in (USER_SECRET, QUERY_SECRET):
        for path in [*out.rglob("*"), *(tmp_path / ".okedit-cache").rglob("*")]:
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
        assert secret not in json.dumps(_flow_run_parameters())
        assert secret not in caplog.text
    described = manifest["config"]["annotator"]["llm_base_url"]
    assert described.startswith("http://***@127.0.0.1:") and described.endswith("api-key=***")
