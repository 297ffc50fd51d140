"""One real `build-okedit` flow run on the embedded Prefect API, and the CLI around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from datasets import load_dataset
from PIL import Image

from pipeline.config import BuildConfig

LIMIT = 6


@pytest.fixture(scope="module")
def built(prefect_api, tmp_path_factory) -> tuple[BuildConfig, dict]:
    from flows.build_okedit import build_okedit

    out = tmp_path_factory.mktemp("build") / "okedit"
    cfg = BuildConfig(limit=LIMIT, out=out, chunk_size=4)
    return cfg, build_okedit(config=cfg)


def test_counts_reconcile(built):
    _, summary = built
    counts = summary["counts"]
    assert counts["in"] == LIMIT
    assert counts["in"] == counts["published"] + counts["rejected"]
    assert counts["published"] >= 1


def test_published_parquet_loads_elsewhere_with_images(built, tmp_path):
    cfg, summary = built
    copy = tmp_path / "copy.parquet"
    shard = next((cfg.out / "data").glob("*.parquet"))
    copy.write_bytes(shard.read_bytes())
    ds = load_dataset("parquet", data_files=str(copy), split="train")
    assert len(ds) == summary["counts"]["published"]
    row = ds[0]
    assert isinstance(row["image"], Image.Image)
    assert len(row["image_rephrases"]) == 10
    assert row["validation"]["verdict"] in {"ok", "fail", "ambiguous", "error"}


def test_easyedit_card_manifest(built):
    cfg, summary = built
    entries = json.loads((cfg.out / "easyedit" / "okedit.json").read_text())
    assert len(entries) == summary["counts"]["published"]
    for entry in entries:
        assert len(entry) == 12 and all(v.strip() for v in entry.values())  # 11 + item_id
        assert (cfg.out / "easyedit" / entry["m_loc"]).exists()
    card = (cfg.out / "README.md").read_text()
    assert card.startswith("---\n") and "### Item check" in card and "### Editor outcome" in card
    assert "authors' code" in card  # the settings table against donglgcn/EasyEdit
    manifest = json.loads((cfg.out / "manifest.json").read_text())
    assert manifest["fingerprint"] == cfg.fingerprint()
    assert manifest["counts"] == summary["counts"]
    checks = manifest["validation"]["checks"]
    assert sum(checks.values()) == summary["counts"]["published"] and "not_run" not in checks
    assert (cfg.out / "plots" / "scope.png").exists()
    assert len(pl.read_parquet(cfg.out / "checks.parquet")) == summary["counts"]["published"]


def test_rerun_resumes_without_redoing(built):
    from flows.build_okedit import build_okedit

    cfg, summary = built
    marker = cfg.out / ".okedit" / "validate" / "chunk-00000.done.json"
    before = marker.stat().st_mtime_ns
    again = build_okedit(config=cfg)
    assert again["counts"] == summary["counts"]
    assert marker.stat().st_mtime_ns == before


def _okedit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--limit", "-1"], "--limit must be a positive"),
        (["build", "--source", "nowhere", "--limit", "1"], "invalid source.name"),
        (["build", "--annotator", "llm", "--limit", "1"], "OPENAI_API_KEY"),
        (
            [
                "build",
                "--source",
                "okvqa-files",
                "--limit",
                "1",
                "--annotator",
                "llm",
                "--llm-base-url",
                "http://127.0.0.1:9/v1",
            ],
            "okvqa-files needs --okvqa-questions",
        ),
        (["build", "--limit", "1", "--key-variant", "middle"], "setting key_variant"),
        (
            ["build", "--limit", "1", "--editor", "grace", "--key-variant", "two_part"],
            "BalancEdit only",
        ),
    ],
)
def test_bad_options_fail_in_one_line(args, message, tmp_path):
    result = _okedit(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unwritable_and_foreign_output_folders(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _okedit("build", "--limit", "1", "--out", str(blocker / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "cannot write" in result.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    result = _okedit("build", "--limit", "1", "--out", str(foreign), cwd=tmp_path)
    assert result.returncode == 2 and "not an okedit build" in result.stderr
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_other_build_in_same_folder_is_refused(built, tmp_path):
    cfg, _ = built
    result = _okedit("build", "--limit", "2", "--seed", "9", "--out", str(cfg.out), cwd=tmp_path)
    assert result.returncode == 2
    assert "holds a different build" in result.stderr
    assert (cfg.out / "manifest.json").exists()


def test_plan_prints_and_claims_nothing(tmp_path):
    out = tmp_path / "o"
    result = _okedit("build", "--plan", "--limit", "7", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Build plan: 7 items from flagworld" in result.stdout
    assert "| validate | cpu | 0 | 0 | 7 |" in result.stdout
    assert not out.exists()  # a plan pays nothing and leaves no folder


def test_manifest_and_card_hold_estimate_against_actual(built):
    cfg, _ = built
    manifest = json.loads((cfg.out / "manifest.json").read_text())
    assert set(manifest["stage_seconds"]) == {
        "gather",
        "annotate",
        "images",
        "assemble",
        "validate",
    }
    rows = {(r["stage"], r["quantity"]): r for r in manifest["estimate_vs_actual"]}
    validate = rows[("validate", "seconds")]
    assert validate["estimate"] > 0 and validate["actual"] == manifest["stage_seconds"]["validate"]
    assert rows[("validate", "edits")]["actual"] == manifest["stages"]["validate"]["ok"]
    # the run's wall time, not the sum of stages that overlap across chunk tasks
    assert rows[("total", "seconds")]["actual"] == manifest["build_seconds"] > 0
    # what the images stage made, as it counted it (10 rephrases, 3 near misses, 1 training)
    assert manifest["images_usage"]["images"] == 14 * manifest["stages"]["images"]["ok"]
    assert "## Estimate vs actual" in (cfg.out / "README.md").read_text()
