"""Locality agreement (design §7.3) compares the clean model with the edited one (issue 12):
each negative probe's top-k agreement is computed from the clean and the edited model's
logits, so an edit that reaches a negative (FT, or GRACE with a huge radius) lowers it, and
an unrouted negative keeps 1.0."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from editors.adapters import VLMAdapter
from editors.config import EditorConfig
from pipeline.scope import (
    build_probes,
    edit_request,
    make_editor,
    probe_results,
    run_probes,
    validate_record,
)
from tests.edit_paths import record_adapter
from tests.records import make_record

NEGATIVES = ("locality", "text_negative", "train_neg")
REACHING = {  # edits that reach every probe
    "ft": {"editor": "ft"},
    "ft-slow": {"editor": "ft", "fast": False},
    "grace-huge-radius": {"editor": "grace", "grace_epsilon": 1e6},
}


@pytest.fixture(scope="module")
def adapter() -> VLMAdapter:
    return record_adapter()


def config(**overrides) -> EditorConfig:
    return EditorConfig.for_model("tiny-flagworld", generate_answers=False, **overrides)


def agreement(clean: Tensor, edited: Tensor, k: int) -> float:
    """Fraction of (position, rank) pairs whose top-k token ids are equal, written out here
    rather than taken from editors.metrics."""
    k = min(k, clean.shape[-1])
    same = [
        int(a == b)
        for c, e in zip(clean, edited, strict=True)
        for a, b in zip(c.topk(k).indices.tolist(), e.topk(k).indices.tolist(), strict=True)
    ]
    return sum(same) / len(same)


@pytest.mark.parametrize("overrides", REACHING.values(), ids=REACHING.keys())
def test_an_edit_that_reaches_the_negatives_lowers_their_agreement(
    adapter: VLMAdapter, overrides: dict
) -> None:
    validation = validate_record(make_record(), make_editor(adapter, config(**overrides)))
    assert validation.verdict != "error", validation.reason
    negatives = [p for p in validation.probes if p.kind in NEGATIVES]
    assert negatives and all(p.routed for p in negatives)
    assert all(0.0 <= p.agreement <= 1.0 for p in negatives)
    assert min(p.agreement for p in negatives) < 1.0, [p.agreement for p in negatives]


@pytest.mark.parametrize(
    "overrides",
    [*REACHING.values(), {}, {"fast": False}],
    ids=[*REACHING.keys(), "balancedit", "balancedit-slow"],
)
def test_agreement_equals_clean_against_edited_logits(adapter: VLMAdapter, overrides: dict) -> None:
    """probe_results' agreement equals top-k agreement recomputed from full forwards of each
    probe on the clean model and, after the edit, with the editor's wrapper installed."""
    cfg = config(**overrides)
    editor = make_editor(adapter, cfg)
    record = make_record()
    probes = build_probes(record, cfg)
    batch = adapter.build_inputs(
        [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
    )
    singles = [adapter.select(batch, [b]) for b in range(batch.size)]

    def target_logits(edited: bool) -> list[Tensor]:
        out = []
        for single in singles:
            with torch.no_grad():
                if edited:
                    with editor.applied(single):
                        logits = adapter.logits(single)
                else:
                    logits = adapter.logits(single)
            out.append(logits[0][single.target_mask[0]].float())
        return out

    clean = target_logits(edited=False)
    try:
        run = run_probes(editor, probes, edit_request(record, cfg))
        edited = target_logits(edited=True)
    finally:
        editor.restore()
    results = probe_results(probes, run, cfg)
    checked = 0
    for probe, result, c, e in zip(probes, results, clean, edited, strict=True):
        if probe.role == "positive":
            assert result.agreement == -1.0
            continue
        k = cfg.top_k_image if probe.image_probe else cfg.top_k_text
        expected = agreement(c, e, k)
        assert result.agreement == pytest.approx(expected), (probe.kind, probe.index)
        if not result.routed:  # the original module ran: the clean answer is kept
            assert result.agreement == 1.0
        checked += 1
    assert checked >= 3
