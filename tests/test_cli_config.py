"""`okedit build --config FILE`: every setting of a build from a YAML/JSON file, with the
options a user changes on the command line on top (issue 15: every knob reachable from the
config file and the command line)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app, changed, merged


def plan(*args: str) -> str:
    result = CliRunner().invoke(app, ["build", *args, "--plan"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_changed_and_merged_are_nested() -> None:
    given = {"limit": 5, "validation": {"device": "cpu", "filter": "none"}}
    defaults = {"limit": None, "validation": {"device": "auto", "filter": "none"}}
    assert changed(given, defaults) == {"limit": 5, "validation": {"device": "cpu"}}
    base = {"limit": 7, "validation": {"batch_items": 4, "device": "auto"}}
    top = {"validation": {"device": "cpu"}}
    assert merged(base, top) == {"limit": 7, "validation": {"batch_items": 4, "device": "cpu"}}


def test_the_file_sets_what_the_options_do_not(tmp_path: Path) -> None:
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({"limit": 7, "annotator": {"n_rephrases": 4}}))
    assert "7 items from flagworld" in plan("--config", str(config))
    assert "5 items from flagworld" in plan("--config", str(config), "--limit", "5")
    assert "12 items from flagworld" in plan("--limit", "12")  # no file: the options alone


def test_a_bad_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    result = CliRunner().invoke(app, ["build", "--config", str(bad), "--plan"])
    assert result.exit_code == 2
    assert "must hold a mapping" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("limt: 3\n")
    result = CliRunner().invoke(app, ["build", "--config", str(unknown), "--plan"])
    assert result.exit_code == 2 and "limt" in result.stderr


def test_the_annotator_knobs_reach_the_llm_annotator(tmp_path: Path) -> None:
    from pipeline.annotate import annotator_config
    from pipeline.config import BuildConfig

    knobs = {"n_rephrases": 4, "n_text_negatives": 1, "n_votes": 5, "prompts_dir": tmp_path}
    cfg = BuildConfig(
        annotator={"kind": "llm", "llm_base_url": "http://127.0.0.1:9/v1", **knobs},
        cache_dir=tmp_path / "cache",
    )
    config = annotator_config(cfg)
    assert {k: getattr(config, k) for k in knobs} == knobs
    assert config.llm.cache_path == tmp_path / "cache" / "llm-cache.sqlite"
    assert config.llm.build_id and config.llm.base_url == "http://127.0.0.1:9/v1"
    # and the plan counts what is asked: 5 votes on the counterfactual type per item
    out = plan("--annotator", "llm", "--llm-base-url", "http://127.0.0.1:9/v1",
               "--n-votes", "5", "--limit", "2", "--no-validate")  # fmt: skip
    assert "13 requests per item" in out and "counterfact_type x5" in out
