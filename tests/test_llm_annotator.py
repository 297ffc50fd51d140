"""LLMAnnotator end to end against the fake OpenAI-compatible server (real openai client)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.annotate import (
    Annotator,
    LLMAnnotator,
    answer_problems,
    leaked,
    load_template,
    majority,
    make_annotator,
    rephrase_problems,
)
from pipeline.llm import BudgetExceededError
from schemas.record import Annotation, Rejection, SourceItem
from tests.fixtures_servers import (
    FakeOpenAIServer,
    canonical_hash,
    fault_for_schema,
    llm_server,
    okedit_responder,
    schema_name,
    storm,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-annotator-secret-DO-NOT-PRINT"


def make_items(n: int, start: int = 0) -> list[SourceItem]:
    return [
        SourceItem(
            item_id=f"okvqa-val-{1000 + i}",
            source="okvqa/val2014",
            question_id=str(1000 + i),
            image_id=str(100 + i),
            question_type="brands",
            question=f"What brand is the computer in item {i}?",
            answers=["dell", "dell", "dell computer", "hp"] + ["dell"] * 6,
            image=b"\xff\xd8fake",
        )
        for i in range(start, start + n)
    ]


def annotator(server: FakeOpenAIServer, tmp_path: Path, **llm: Any) -> LLMAnnotator:
    settings: dict[str, Any] = {
        "base_url": server.url,
        "model": "fake-model",
        "api_key": SECRET,
        "cache_path": str(tmp_path / "llm.sqlite"),
        "concurrency": 4,
        "max_retries": 3,
    }
    settings.update(llm)
    return make_annotator({"llm": settings})


def without_timestamps(results: list[Annotation | Rejection]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        d = r.model_dump(mode="json")
        for p in d.get("provenance", []):
            p.pop("timestamp")
        out.append(d)
    return out


def test_every_field_is_annotated_and_validated(tmp_path: Path) -> None:
    with llm_server() as server:
        ann = annotator(server, tmp_path)
        assert isinstance(ann, Annotator)
        results = ann.annotate(make_items(3))
        assert (
            server.log.requests == 33
        )  # 11 requests per item (the image-free loc question too), nothing re-asked
    assert [r.item_id for r in results] == ["okvqa-val-1000", "okvqa-val-1001", "okvqa-val-1002"]
    for a in results:
        assert isinstance(a, Annotation)
        assert a.image_object and a.target not in {"dell", "hp", "dell computer"}
        assert len(a.counterfact_votes) == 3 and a.counterfact_type == "image-text"
        assert a.counterfact_votes.count("image-text") == 2  # the fake server's third vote differs
        assert len(a.rephrases) == 10 and len(a.rephrases_train) >= 3
        assert not set(a.rephrases) & set(a.rephrases_train)
        assert a.locality_answer not in {"dell", "hp", a.target}
        assert a.locality_answer_train not in {"dell", "hp", a.target, a.locality_answer}
        assert a.locality_image_object and a.locality_image_train_object
        assert len(a.text_negatives) == 3
        fields = {p.field for p in a.provenance}
        assert fields == {
            "image_object",
            "target",
            "counterfact_votes[0]",
            "counterfact_votes[1]",
            "counterfact_votes[2]",
            "rephrases",
            "rephrases_train",
            "locality_answer",
            "locality_answer_train",
            "locality_image_object",
            "locality_image_train_object",
            "text_negatives",
            "image_free_locality",
        }
        assert a.image_free_locality is not None and a.image_free_locality.question
        for p in a.provenance:
            assert p.backend == "openai-chat" and p.model == "fake-model"
            assert p.template_version == "1" and len(p.request_hash) == 64
            assert p.prompt_tokens > 0 and p.timestamp
        seeds = sorted(p.seed for p in a.provenance if p.field.startswith("counterfact_votes"))
        assert seeds == [0, 1000, 2000]  # every vote is an independent sample
    report = ann.report()
    assert report.items_in == 3 and report.kept == 3 and report.rejected == 0
    assert report.llm.requests_sent == 33 and report.llm.prompt_tokens > 0


def test_warm_cache_sends_no_request_and_gives_identical_output(tmp_path: Path) -> None:
    with llm_server() as server:
        first = annotator(server, tmp_path).annotate(make_items(4))
        sent = server.log.requests
        second_ann = annotator(server, tmp_path)
        second = second_ann.annotate(make_items(4))
        assert server.log.requests == sent
    assert [r.model_dump() for r in second] == [r.model_dump() for r in first]
    assert second_ann.report().llm.requests_sent == 0


def test_refusals_become_rejections_with_reasons(tmp_path: Path) -> None:
    with llm_server(faults=fault_for_schema("TargetOut", "refusal")) as server:
        results = annotator(server, tmp_path).annotate(make_items(2))
        assert server.log.schemas["TargetOut"] == 2  # a refusal is not re-asked
    for r in results:
        assert isinstance(r, Rejection) and r.stage == "annotate"
        assert r.reason.startswith("target: refusal: model refused")


@pytest.mark.parametrize("fault", ["malformed", "length"])
def test_a_malformed_or_cut_answer_is_asked_again(tmp_path: Path, fault: str) -> None:
    with llm_server(faults=fault_for_schema("RephrasesOut", fault, times=1)) as server:
        ann = annotator(server, tmp_path)
        (result,) = ann.annotate(make_items(1))
        assert isinstance(result, Annotation)
        assert server.log.schemas["RephrasesOut"] == 2
    prov = next(p for p in result.provenance if p.field == "rephrases")
    assert json.loads(prov.params)["attempt"] == 1
    assert ann.report().llm.failures == {"parse" if fault == "malformed" else "length": 1}


def test_invalid_answers_are_rejected_after_the_retries(tmp_path: Path) -> None:
    def nine_rephrases(body: dict[str, Any]) -> str:
        if schema_name(body) == "RephrasesOut":
            data = json.loads(okedit_responder(body))
            data["rephrases"] = data["rephrases"][:9]
            return json.dumps(data)
        return okedit_responder(body)

    with llm_server(responder=nine_rephrases) as server:
        (result,) = annotator(server, tmp_path).annotate(make_items(1))
        assert server.log.schemas["RephrasesOut"] == 3  # 1 + 2 retries
    assert isinstance(result, Rejection)
    assert result.reason == "rephrases: validation: 9 distinct rephrases, need 10"


def test_locality_answer_equal_to_an_answer_is_rejected(tmp_path: Path) -> None:
    def lazy_locality(body: dict[str, Any]) -> str:
        if schema_name(body) == "LocalityOut":
            return json.dumps({"locality_answer": "Dell", "locality_answer_train": "lenovo"})
        return okedit_responder(body)

    with llm_server(responder=lazy_locality) as server:
        (result,) = annotator(server, tmp_path).annotate(make_items(1))
    assert isinstance(result, Rejection)
    assert result.reason.startswith("locality_answer: validation: C 'Dell' repeats")


def test_validation_rules() -> None:
    assert answer_problems("The Dell.", ["dell"], "C")
    assert answer_problems("  ", [], "C") == ["C is empty"]
    assert answer_problems("apple", ["dell"], "C") == []
    assert leaked("Is this an Apple computer?", "apple", "What brand is this computer?")
    assert not leaked("What brand is this computer?", "brand", "What brand is it?")
    assert not leaked("Which pineapple is this?", "apple", "What fruit is this?")
    problems = rephrase_problems(
        "What brand is this?",
        ["Which brand is it?", "What brand is this?"],
        ["Which brand is it?"],
        n_eval=2,
        n_train=1,
        answers=["dell"],
    )
    assert "a rephrase repeats the question" in problems
    assert "training rephrases overlap the evaluation rephrases" in problems
    assert majority(["text", "image-text", "text"]) == "text"
    assert majority(["text", "image-text"]) is None


def test_templates_are_versioned_files() -> None:
    template = load_template("target")
    assert template.ref == "target@1"
    messages = template.render(question="Q?", answers="a; b")
    assert messages[0]["role"] == "system" and "Question: Q?" in messages[1]["content"]


def test_servers_without_json_schema_still_work(tmp_path: Path) -> None:
    with llm_server(json_schema_supported=False) as server:
        ann = annotator(server, tmp_path)
        results = ann.annotate(make_items(2))
    assert all(isinstance(r, Annotation) for r in results)
    assert ann.report().llm.mode == "json_object"


def test_storm_of_errors_completes_with_every_item_accounted_for(tmp_path: Path) -> None:
    plan = storm(p_429=0.15, p_500=0.15, p_malformed=0.05, seed=7)
    items = make_items(20)
    with llm_server(faults=plan, retry_after_ms=2) as server:
        ann = annotator(server, tmp_path, max_retries=6, concurrency=8)
        results = ann.annotate(items)
        assert server.log.statuses[429] > 0 and server.log.statuses[500] > 0
    kept = [r for r in results if isinstance(r, Annotation)]
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(items) == len(kept) + len(rejected) == len(results)
    assert [r.item_id for r in results] == [i.item_id for i in items]
    assert all(r.reason and r.stage == "annotate" for r in rejected)
    assert len(kept) >= 15
    report = ann.report()
    assert report.items_in == 20 and report.kept == len(kept)
    assert report.llm.failures.get("parse", 0) > 0  # malformed answers were seen and re-asked


def test_budget_cap_stops_the_run_cleanly(tmp_path: Path) -> None:
    prices = {"fake-model": {"prompt_per_1m": 100.0, "completion_per_1m": 100.0}}
    with llm_server() as server:
        ann = annotator(
            server, tmp_path, prices=prices, budget_usd=1.0, max_tokens=200, concurrency=2
        )
        with pytest.raises(BudgetExceededError) as info:
            ann.annotate(make_items(20))
        assert server.log.requests < 200
    assert 0.5 < ann.client.stats().cost_usd <= 1.0
    finished = info.value.partial
    assert finished and all(isinstance(r, Annotation | Rejection) for r in finished)


def test_killed_run_resumes_without_repeating_finished_requests(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            sys.path.insert(0, sys.argv[4])
            from pipeline.annotate import make_annotator
            from tests.test_llm_annotator import make_items

            url, cache, out = sys.argv[1], sys.argv[2], sys.argv[3]
            progress = open(out + ".progress", "a")

            def on_result(result):
                progress.write(result.item_id + "\\n")
                progress.flush()

            cfg = {"llm": {"base_url": url, "model": "fake-model", "cache_path": cache,
                           "concurrency": 2}}
            results = make_annotator(cfg, on_result=on_result).annotate(make_items(12))
            with open(out, "w") as f:
                json.dump([r.model_dump(mode="json") for r in results], f)
            """
        )
    )
    cache, out = tmp_path / "llm.sqlite", tmp_path / "out.json"
    progress = Path(str(out) + ".progress")
    with llm_server(latency_s=0.03, keep_raw=True) as server:
        args = [sys.executable, str(script), server.url, str(cache), str(out), str(REPO)]
        proc = subprocess.Popen(args, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if progress.exists() and len(progress.read_text().split()) >= 4:
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        finished = set(progress.read_text().split())
        assert 4 <= len(finished) < 12 and not out.exists()
        first_run_requests = server.log.requests

        subprocess.run(args, cwd=REPO, check=True, timeout=120)
        assert server.log.requests < first_run_requests + 12 * 10

        # every request of an item finished before the kill went out exactly once
        for body in server.log.raw:
            user = body["messages"][-1]["content"]
            item = re.search(r"item (\d+)\?", user)
            assert item is not None
            if f"okvqa-val-{1000 + int(item.group(1))}" in finished:
                assert server.log.bodies[canonical_hash(body)] == 1
        resumed = json.loads(out.read_text())

    with llm_server() as clean_server:  # the same output as a run that was never killed
        clean = annotator(clean_server, tmp_path / "clean").annotate(make_items(12))
    for r in resumed:
        for p in r.get("provenance", []):
            p.pop("timestamp")
    assert resumed == without_timestamps(clean)


def test_okvqa_files_to_annotations_end_to_end(tmp_path: Path) -> None:
    from pipeline.download import DownloadConfig
    from pipeline.sources.okvqa import get_okvqa_source
    from tests.fixtures_servers import FakeImageServer, Route, make_jpeg
    from tests.test_okvqa_sources import image_path, write_vqa_files

    q, a = write_vqa_files(tmp_path)
    routes = {image_path(1): Route(make_jpeg(1)), image_path(2): Route(make_jpeg(2))}
    with FakeImageServer(routes) as images, llm_server() as llm:
        source = get_okvqa_source(
            "okvqa-files",
            questions_file=q,
            annotations_file=a,
            image_base_url=images.url,
            cache_dir=tmp_path / "cache",
            download=DownloadConfig(retries=0, read_timeout_s=2),
        )
        gathered = source.load_items(source.list_ids(3, seed=0))
        items = [g for g in gathered if isinstance(g, SourceItem)]
        assert items and len(gathered) == 3
        results = annotator(llm, tmp_path).annotate(items)
    assert [r.item_id for r in results] == [i.item_id for i in items]
    assert all(isinstance(r, Annotation) for r in results)
    assert results[0].image_object == f"a photo of {items[0].answers[0]}"


def test_make_annotator_from_a_build_config(tmp_path: Path) -> None:
    from pipeline.config import BuildConfig

    cfg = BuildConfig.model_validate(
        {
            "source": {"name": "okvqa-files"},
            "cache_dir": str(tmp_path),
            "annotator": {"kind": "llm", "llm_base_url": "http://127.0.0.1:9/v1", "llm_model": "m"},
        }
    )
    ann = make_annotator(cfg)
    assert ann.config.llm.base_url == "http://127.0.0.1:9/v1" and ann.config.llm.model == "m"
    assert ann.config.llm.cache_path == tmp_path / "llm-cache.sqlite"
    assert ann.name == "openai-chat" and ann.version
    ann.close()


# --------------------------------------------------------------------------- Batch API mode


def batch_annotator(server: FakeOpenAIServer, tmp_path: Path, **llm: Any) -> LLMAnnotator:
    return annotator(server, tmp_path, batch_mode=True, batch_poll_s=0.01, **llm)


def test_batch_mode_gives_the_live_results_in_three_rounds(tmp_path: Path) -> None:
    with llm_server() as live_server:
        live = annotator(live_server, tmp_path / "live").annotate(make_items(4))
    with llm_server(batch_polls_until_done=2) as server:
        ann = batch_annotator(server, tmp_path / "batch")
        results = ann.annotate(make_items(4))
        assert len(server.batch_store.batches) == 3  # one per level
        assert server.log.requests == 44 and server.log.auth_headers == {"batch"}
    assert without_timestamps(results) == without_timestamps(live)
    stats = ann.report().llm
    assert stats.batches == 3 and stats.requests_sent == 44 and stats.prompt_tokens > 0


def test_batch_mode_failures_are_rejections(tmp_path: Path) -> None:
    with llm_server(faults=fault_for_schema("TargetOut", "500")) as server:
        results = batch_annotator(server, tmp_path).annotate(make_items(2))
        assert len(server.batch_store.batches) == 1  # nothing to ask after level 1
    assert all(isinstance(r, Rejection) for r in results)
    assert results[0].reason.startswith("target: server_error: batch: HTTP 500")


def test_an_interrupted_batch_is_resumed_not_paid_twice(tmp_path: Path) -> None:
    from pipeline.annotate import TargetOut
    from pipeline.llm import LLMClient, LLMConfig, LLMFatalError, LLMSuccess

    def config() -> LLMConfig:
        return LLMConfig(
            base_url=server.url,
            model="fake-model",
            api_key=SECRET,
            cache_path=tmp_path / "llm.sqlite",
            batch_mode=True,
            batch_poll_s=0.01,
            batch_timeout_s=0.05,
        )

    msgs = [[{"role": "user", "content": f"Question: Q{i}?\nAnswers: dell"}] for i in range(3)]
    with llm_server(batch_polls_until_done=1000) as server:
        first = LLMClient(config())
        assert all(first.complete(m, TargetOut).kind == "deferred" for m in msgs)
        with pytest.raises(LLMFatalError, match="re-run later"):
            first.run_batch()
        first.close()
        server.batch_store.polls_until_done = 0  # the batch finishes while nobody waits

        second = LLMClient(config())
        assert all(second.complete(m, TargetOut).kind == "deferred" for m in msgs)
        report = second.run_batch()
        assert report is not None and report.submitted == 0 and report.succeeded == 3
        assert len(server.batch_store.batches) == 1 and server.log.requests == 3
        assert all(isinstance(second.complete(m, TargetOut), LLMSuccess) for m in msgs)


def test_batch_mode_refuses_a_batch_over_budget(tmp_path: Path) -> None:
    prices = {"fake-model": {"prompt_per_1m": 1000.0, "completion_per_1m": 1000.0}}
    with llm_server() as server:
        ann = batch_annotator(server, tmp_path, prices=prices, budget_usd=0.01)
        with pytest.raises(BudgetExceededError) as info:
            ann.annotate(make_items(3))
        assert not server.batch_store.batches and server.log.requests == 0
    assert info.value.partial == []


def test_storm_without_retries_lists_every_failed_item_with_its_reason(tmp_path: Path) -> None:
    plan = storm(p_429=0.15, p_500=0.15, p_malformed=0.05, seed=3)
    items = make_items(10)
    with llm_server(faults=plan, retry_after_ms=2) as server:
        llm = {"base_url": server.url, "model": "m", "api_key": SECRET, "max_retries": 0}
        llm["cache_path"] = str(tmp_path / "c.sqlite")
        ann = make_annotator({"llm": llm, "retries": 0})
        results = ann.annotate(items)
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(results) == len(items) and rejected
    kinds = {r.reason.split(": ")[1] for r in rejected}
    assert kinds <= {"rate_limited", "server_error", "parse", "validation"}
    report = ann.report()
    assert report.rejected + report.deferred == len(rejected)
    assert report.deferred == sum(r.deferred for r in rejected) > 0  # 429/500 only: deferred
    assert sum(report.rejections_by_kind.values()) == len(rejected)
