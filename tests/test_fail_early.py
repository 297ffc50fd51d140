"""Failing early and cleanly (issue 13, part 4), and part 5: provenance timestamps filled,
full rejection reasons in rejected.jsonl, `--help` listing every accepted value.

Every error a user can fix is found by the command's preflight, before any stage runs and
before any LLM request: exit code 2, one line on stderr, no traceback, and nothing in the
output folder that blocks the corrected command, which then builds in the same folder
(through the real flow on the session's Prefect API). Per kind of build, every bad variant
is tried in one folder, one after the other, then the corrected command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.tasks import is_transient
from pipeline.cli import CHOICES, app
from pipeline.work import WorkDir
from tests.fixtures_images_api import render_pool, tiny_clip
from tests.fixtures_servers import llm_server, make_jpeg
from tests.test_deferred import flag_responder
from tests.test_inputs import vqa_entries, write_coco, write_files


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["build", *args], catch_exceptions=False)


def assert_refused(out: Path, args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    # nothing ran, nothing is claimed
    assert not (out / ".okedit" / "build.json").exists()
    assert not any((out / ".okedit" / stage).exists() for stage in ("gather", "annotate"))


def assert_builds(args: list[str], n_in: int) -> dict:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((Path(args[args.index("--out") + 1]) / "manifest.json").read_text())
    assert manifest["counts"]["in"] == n_in
    return manifest


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the build caches stay in tmp_path
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return tmp_path


def test_flagworld_model_device_and_a_dead_claim(prefect_api: None, in_tmp: Path) -> None:
    import torch

    out = in_tmp / "okedit"
    base = ["--limit", "2", "--chunk-size", "2", "--out", str(out)]
    assert_refused(out, [*base, "--model", "/nonexistent/vlm"], "--model /nonexistent/vlm: no")
    assert_refused(
        out,
        [*base, "--model", "nonexistent-org/no-such-vlm"],
        "no local copy in the Hugging Face cache, and HF_HUB_OFFLINE is set",
    )
    assert_refused(out, [*base, "--model", str(in_tmp)], f"--model {in_tmp}: ")  # not a model
    if not torch.cuda.is_available():
        assert_refused(out, [*base, "--device", "cuda"], "--device cuda: no CUDA device")
    # a build that died right after claiming the folder (before any chunk) blocks nothing
    WorkDir(out).claim("0123456789abcdef", {"source": {"name": "something else"}})
    assert_builds(base, 2)


def test_flagworld_llm_key_and_url(prefect_api: None, in_tmp: Path) -> None:
    out = in_tmp / "okedit"
    base = ["--limit", "2", "--chunk-size", "2", "--out", str(out), "--no-validate"]
    with llm_server(responder=flag_responder) as llm:
        assert_refused(out, [*base, "--annotator", "llm"], "No API key")
        for url, message in [
            ("ftp://127.0.0.1/v1", "not an http(s) URL"),
            ("http://[bad/v1", "not a valid URL"),
            ("http://127.0.0.1:99999/v1", "not a valid URL (Port out of range"),
        ]:
            bad = [*base, "--annotator", "llm", "--llm-base-url", url]
            assert_refused(out, bad, f"--llm-base-url {url}: {message}")
        assert llm.log.requests == 0
        assert_builds([*base, "--annotator", "llm", "--llm-base-url", llm.url], 2)
        assert llm.log.requests > 0


def test_okvqa_files_inputs(prefect_api: None, in_tmp: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q, a = write_files(in_tmp, *vqa_entries(2))
    coco = write_coco(in_tmp, range(1, 3))
    pool = render_pool(in_tmp / "pool")
    clip = tiny_clip(in_tmp / "tiny-clip")
    out = in_tmp / "okedit"
    not_vqa = in_tmp / "not_vqa.json"
    not_vqa.write_text(json.dumps({"annotations": []}))
    try:
        with llm_server() as llm:
            base = [
                *("--source", "okvqa-files", "--out", str(out), "--no-validate"),
                *("--annotator", "llm", "--llm-base-url", llm.url),
                *("--image-backend", "retrieve", "--image-pool", str(pool)),
            ]
            good = ["--okvqa-questions", str(q), "--okvqa-annotations", str(a)]
            good += ["--coco-dir", str(coco), "--image-model", str(clip)]

            def but(option: str, value: str) -> list[str]:
                changed = list(good)
                changed[changed.index(option) + 1] = value
                return [*base, *changed]

            missing = str(in_tmp / "missing.json")
            assert_refused(out, but("--okvqa-questions", missing), f"{missing}: file not found")
            assert_refused(
                out, but("--okvqa-questions", str(not_vqa)), "expected an object with a 'questions'"
            )
            assert_refused(
                out, but("--okvqa-annotations", str(q)), "expected an object with a 'annotations'"
            )
            assert_refused(
                out, but("--coco-dir", str(in_tmp / "no-coco")), "no-coco: no such folder"
            )
            assert_refused(
                out, but("--image-model", "/nonexistent/clip"), "--image-model /nonexistent/clip"
            )
            assert llm.log.requests == 0
            assert_builds([*base, *good], 5)  # 2 items + 3 malformed entries (test_inputs)
    finally:
        torch.set_num_threads(threads)


def write_parquet(path: Path, answers: Any, drop: str | None = None) -> Path:
    import datasets

    columns = {
        "question_id": ("2971475", datasets.Value("string")),
        "image": ({"bytes": make_jpeg(3, size=(96, 72)), "path": None}, datasets.Image()),
        "question": ("What sport can you use this for?", datasets.Value("string")),
        "answers": answers,
    }
    columns = {k: v for k, v in columns.items() if k != drop}
    rows = {k: [v[0]] for k, v in columns.items()}
    features = datasets.Features({k: v[1] for k, v in columns.items()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_okvqa_parquet_columns(prefect_api: None, in_tmp: Path) -> None:
    import datasets
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    as_list = (["racing"] * 10, datasets.List(datasets.Value("string")))
    one_string = ("racing", datasets.Value("string"))  # was published as ['r','a','c',...]
    good = write_parquet(in_tmp / "good.parquet", as_list)
    stringly = write_parquet(in_tmp / "string.parquet", one_string)
    no_answers = write_parquet(in_tmp / "no_answers.parquet", as_list, drop="answers")
    not_parquet = in_tmp / "broken.parquet"
    not_parquet.write_bytes(b"PAR1 not really")
    pool = render_pool(in_tmp / "pool")
    clip = tiny_clip(in_tmp / "tiny-clip")
    out = in_tmp / "okedit"
    try:
        with llm_server() as llm:
            base = [
                *("--source", "okvqa-hub", "--out", str(out), "--no-validate"),
                *("--annotator", "llm", "--llm-base-url", llm.url),
                *("--image-backend", "retrieve", "--image-pool", str(pool)),
                *("--image-model", str(clip)),
            ]
            for path, message in [
                (stringly, "column 'answers' is Value('string'), not a list of answers"),
                (no_answers, "lacks column(s) ['answers']"),
                (not_parquet, "broken.parquet: not a parquet file (Parquet magic bytes"),
                (in_tmp / "missing.parquet", "file not found"),
            ]:
                assert_refused(out, [*base, "--okvqa-parquet", str(path)], message)
            assert llm.log.requests == 0
            manifest = assert_builds([*base, "--okvqa-parquet", str(good)], 1)
    finally:
        torch.set_num_threads(threads)
    assert manifest["counts"]["published"] + manifest["counts"]["rejected"] == 1


def test_errors_that_cannot_go_away_are_not_retried() -> None:
    import transformers

    for name in ("/nonexistent/model", "nonexistent-org/no-such-model"):
        with pytest.raises(OSError) as raised:
            transformers.AutoConfig.from_pretrained(name)  # offline: wraps the Hub's error
        assert type(raised.value) is OSError and not is_transient(raised.value)
    wrapped = OSError("cannot reach the server")
    wrapped.__cause__ = ConnectionError("refused")
    assert is_transient(wrapped)
    assert is_transient(OSError("a flaky disk"))


def test_provenance_timestamps_and_full_rejection_reasons(prefect_api: None, in_tmp: Path) -> None:
    """The offline annotator and the render backend (deterministic: no clock) get their
    fields stamped by the build; rejected.jsonl holds each reason whole."""
    from datetime import datetime

    import pyarrow.parquet as pq

    from schemas.record import Rejection

    out = in_tmp / "okedit"
    args = ["--limit", "40", "--out", str(out), "--no-validate"]
    assert_builds(args, 40)
    shard = next((out / "data").glob("*.parquet"))
    rows = pq.read_table(shard, columns=["provenance"]).to_pylist()
    stamps = [p["timestamp"] for row in rows for p in row["provenance"]]
    assert len(stamps) > 100 and all(stamps)
    assert all(datetime.fromisoformat(t).tzinfo is not None for t in stamps)
    written = [Rejection.model_validate_json(x) for x in (out / "rejected.jsonl").open()]
    work = WorkDir(out)
    made = [
        r
        for stage in ("gather", "annotate", "images", "assemble", "validate")
        for i in range(3)
        for r in work.read_rejected(stage, i)
    ]
    assert sorted(written, key=lambda r: r.item_id) == sorted(made, key=lambda r: r.item_id)
    assert max(len(r.reason) for r in written) > 90  # e.g. "no look-alike of NO (...) has ..."
    before = shard.read_bytes()
    assert_builds(args, 40)  # a re-run stamps nothing again: the same bytes
    assert next((out / "data").glob("*.parquet")).read_bytes() == before


def test_help_lists_every_accepted_value() -> None:
    import re
    import typing

    from typer.main import get_command

    import editors.config as editors_config
    import pipeline.check as check
    import pipeline.config as config

    literal = {
        "source": config.SourceName,
        "annotator": config.AnnotatorSettings.model_fields["kind"].annotation,
        "device": config.ValidateSettings.model_fields["device"].annotation,
        "editor": editors_config.EditorName,
        "key_variant": editors_config.KeyVariant,
        "editor_preset": editors_config.EditorPreset,
        "filter": check.FilterMode,
        "image_backend": config.ImageBackendName,
    }
    assert {k: set(v) for k, v in CHOICES.items()} == {
        k: set(typing.get_args(v)) for k, v in literal.items()
    }
    commands = get_command(app).commands
    for command in ("build", "validate"):
        for param in commands[command].params:
            name = "filter" if param.name == "item_filter" else param.name
            if name in CHOICES:
                words = set(re.findall(r"[\w-]+", param.help))
                missing = set(CHOICES[name]) - words
                assert not missing, f"{command} --{name} help omits {missing}: {param.help}"
    shown = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "250"}).output
    assert "two_part_last" in shown and "model-gap" in shown and "okvqa-files" in shown
