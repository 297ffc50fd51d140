"""The scope check on real flagworld items with the shipped tiny flagworld VLM."""

from __future__ import annotations

import pytest
import torch

from editors.adapters import VLMAdapter, load_model
from editors.metrics import normalize_answer
from pipeline.config import ValidateSettings, resolve_validation
from pipeline.scope import make_editor, validate_record
from pipeline.sources.flagworld import FlagworldSource
from schemas.record import OkeditRecord
from tests.edit_paths import flagworld_records_for

N_ITEMS = 6


@pytest.fixture(scope="module")
def records() -> list[OkeditRecord]:
    return flagworld_records_for(FlagworldSource(relations=("capital",)).list_ids(N_ITEMS, 0))


@pytest.fixture(scope="module")
def tiny() -> VLMAdapter:
    torch.set_num_threads(1)
    return load_model(resolve_validation(ValidateSettings()).model)


def test_default_validation_edits_and_answers(records, tiny) -> None:
    settings = ValidateSettings()
    config = resolve_validation(settings).editor
    assert (config.key_variant, config.preset, config.lr, config.edit_eos) == (
        "last_prompt",
        "tiny-flagworld",
        1e-2,
        True,
    )
    editor = make_editor(tiny, config)
    for record in records:
        validation = validate_record(record, editor, "tiny-flagworld")
        assert validation.verdict in {"ok", "fail", "ambiguous"}, validation.reason
        edit = validation.probes[0]
        # The clean model knows the fact; the edited one answers the counterfactual target.
        assert normalize_answer(edit.pre_answer) == normalize_answer(record.original_answer)
        assert edit.pre_accuracy == 0.0 and edit.post_accuracy == 1.0
        # Trained to stop after the target, the edited model's greedy answer is the target.
        assert normalize_answer(edit.post_answer) == normalize_answer(record.target)
        assert validation.metrics.gen_reliability == validation.metrics.reliability == 1.0
        assert validation.metrics.gen_locality >= 0 and validation.metrics.hm >= 0


def test_reference_key_is_ambiguous_only_across_families(records, tiny) -> None:
    """The paper's mean-pooled key puts other questions about the edit image nearer than a
    re-rendered flag (design §9): judged across families every item is ambiguous."""
    settings = ValidateSettings(editor={"key_variant": "reference", "ambiguity": "all"})
    editor = make_editor(tiny, resolve_validation(settings).editor)
    for record in records:
        validation = validate_record(record, editor)
        assert validation.verdict == "ambiguous"
        assert "text_negative" in validation.reason.split(";")[0]


def test_without_the_stop_token_edited_answers_repeat(tiny) -> None:
    """The paper's objective trains the target tokens only: a routed sequence may then keep
    producing the target (measured: 30 % of 20 capital edits with the first tiny VLM; 3 of
    the 46 with the flagworld-2 model, which learnt to stop after multi-word answers: UA ->
    hamburg, EC and VE -> sao paulo)."""
    records = flagworld_records_for(
        ["flagworld-UA-capital", "flagworld-EC-capital", "flagworld-FR-capital"]
    )
    settings = ValidateSettings(editor={"edit_eos": False})
    editor = make_editor(tiny, resolve_validation(settings).editor)
    answers = [validate_record(r, editor).probes[0].post_answer for r in records]
    stopping = resolve_validation(ValidateSettings()).editor
    editor = make_editor(tiny, stopping)
    stopped = [validate_record(r, editor).probes[0].post_answer for r in records]
    assert [normalize_answer(s) for s in stopped] == [normalize_answer(r.target) for r in records]
    assert all(a.startswith(s) for a, s in zip(answers, stopped, strict=True))
    lengths = [
        (len(a.split()), len(r.target.split())) for a, r in zip(answers, records, strict=True)
    ]
    assert any(n > m for n, m in lengths)  # some did not stop


def test_resolved_editor_settings_define_the_build(monkeypatch) -> None:
    """A change of the validate stage's defaults makes a different build (refused in an old
    folder) instead of resuming chunks validated under the old settings."""
    from pipeline import config as config_module
    from pipeline.config import BuildConfig

    cfg = BuildConfig()
    resolved = cfg.describe()["validation"]["resolved_editor"]
    assert (resolved["key_variant"], resolved["edit_eos"], resolved["lr"]) == (
        "last_prompt",
        True,
        1e-2,
    )
    before = cfg.fingerprint()
    monkeypatch.setattr(config_module, "VALIDATION_EDIT_EOS", False)
    assert BuildConfig().fingerprint() != before
    assert (
        BuildConfig(validation={"enabled": False}).describe()["validation"].get("resolved_editor")
        is None
    )


def test_decoded_answers_equal_row_by_row_generation(records, tiny) -> None:
    """The fast path decodes every probe's answer from the capture's KV cache, in one batch;
    the slow path calls `generate` per probe: same greedy answers, clean and edited."""
    answers = {}
    # fast, decoded; slow; fast with no room for the KV cache (row by row, like slow)
    for name, editor_settings in {
        "decoded": {},
        "slow": {"fast": False},
        "over budget": {"decode_kv_gb": 0.0},
    }.items():
        editor = make_editor(
            tiny, resolve_validation(ValidateSettings(editor=editor_settings)).editor
        )
        answers[name] = [
            [(p.pre_answer, p.post_answer) for p in validate_record(r, editor).probes]
            for r in records[:3]
        ]
    assert answers["decoded"] == answers["slow"] == answers["over budget"]
    pairs = [pair for item in answers["decoded"] for pair in item]
    assert sum(pre != post for pre, post in pairs) >= 3  # the edits change answers
    assert len({pre for pre, _ in pairs}) >= 3  # and the clean answers differ between probes
