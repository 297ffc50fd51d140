"""The scope check on real flagworld items with the shipped tiny flagworld VLM."""

from __future__ import annotations

import pytest
import torch

from editors.adapters import VLMAdapter, load_model
from editors.metrics import normalize_answer
from editors.scope import make_editor, validate_record
from pipeline.build import build_records
from pipeline.config import ValidateSettings
from pipeline.images import RenderBackend
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.sources.flagworld import FlagworldSource
from schemas.record import OkeditRecord, Rejection

N_ITEMS = 3


@pytest.fixture(scope="module")
def records() -> list[OkeditRecord]:
    source = FlagworldSource(relations=("capital",))
    items = [
        i for i in source.load_items(source.list_ids(N_ITEMS, 0)) if not isinstance(i, Rejection)
    ]
    annotations = [
        a for a in FlagworldAnnotator(seed=0).annotate(items) if not isinstance(a, Rejection)
    ]
    by_id = {i.item_id: i for i in items}
    images = RenderBackend(seed=0).make_images([(by_id[a.item_id], a) for a in annotations])
    built, _ = build_records(
        items, annotations, [i for i in images if not isinstance(i, Rejection)]
    )
    assert len(built) == N_ITEMS
    return built


@pytest.fixture(scope="module")
def tiny() -> VLMAdapter:
    torch.set_num_threads(1)
    return load_model(ValidateSettings().model_settings())


def test_default_validation_edits_and_answers(records, tiny) -> None:
    settings = ValidateSettings()
    config = settings.editor_settings()
    assert (config.key_variant, config.preset, config.lr) == ("last_prompt", "tiny-flagworld", 1e-2)
    editor = make_editor(tiny, config)
    for record in records:
        validation = validate_record(record, editor, "tiny-flagworld")
        assert validation.verdict in {"ok", "fail", "ambiguous"}, validation.reason
        edit = validation.probes[0]
        # The clean model knows the fact; the edited one answers the counterfactual target.
        assert normalize_answer(edit.pre_answer) == normalize_answer(record.original_answer)
        assert edit.pre_accuracy == 0.0 and edit.post_accuracy == 1.0
        assert edit.post_answer.lower().startswith(record.target.lower())
        assert validation.metrics.gen_locality >= 0 and validation.metrics.hm >= 0


def test_reference_key_is_ambiguous_only_across_families(records, tiny) -> None:
    """The paper's mean-pooled key puts other questions about the edit image nearer than a
    re-rendered flag (design §9): judged across families every item is ambiguous."""
    settings = ValidateSettings(editor={"key_variant": "reference", "ambiguity": "all"})
    editor = make_editor(tiny, settings.editor_settings())
    for record in records:
        validation = validate_record(record, editor)
        assert validation.verdict == "ambiguous"
        assert "text_negative" in validation.reason.split(";")[0]
