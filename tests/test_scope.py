"""The scope verdict (design §7.4) and the validate stage on a tiny random LLaVA."""

from __future__ import annotations

import json

import pytest
import torch

from editors.adapters import VLMAdapter
from editors.config import EditorConfig, ModelConfig
from editors.metrics import generation_exact_match
from pipeline.check import filter_by_check
from pipeline.scope import build_probes, make_editor, validate_record, verdict
from pipeline.validate import validate_records
from schemas.record import CheckReason, ItemCheck, ProbeResult, Validation
from tests.edit_paths import record_adapter
from tests.records import make_record

N_PROBES = 1 + 10 + 10 + 1 + 1 + 1 + 2  # edit, rephrases, image rephrases, locality, text neg,
# image-free locality, train


@pytest.fixture(scope="module")
def adapter() -> VLMAdapter:
    return record_adapter()


def tiny_config(**overrides) -> EditorConfig:
    return EditorConfig.for_model("tiny-flagworld", **overrides)


def test_validate_record_fills_validation(adapter: VLMAdapter) -> None:
    record = make_record()
    validation = validate_record(record, make_editor(adapter, tiny_config()), "tiny")
    assert validation.verdict in {"ok", "fail", "ambiguous"}, validation.reason
    assert validation.editor == "balancedit" and validation.model == "tiny"
    assert validation.key_variant == "reference" and validation.alpha == 0.05
    assert validation.epsilon > 0 and validation.seconds > 0
    assert len(validation.probes) == N_PROBES
    kinds = [p.kind for p in validation.probes]
    assert kinds[0] == "edit" and kinds[-2:] == ["train_pos", "train_neg"]
    assert kinds.count("rephrase") == 10 and kinds.count("image_rephrase") == 10
    edit = validation.probes[0]
    assert edit.distance == pytest.approx(0.0, abs=1e-6) and edit.routed
    assert all(p.routed == (p.distance <= validation.epsilon) for p in validation.probes)
    assert all(
        (p.agreement >= 0) == (p.kind not in ("edit", "rephrase", "image_rephrase"))
        for p in validation.probes
    )
    assert validation.metrics.reliability == edit.post_accuracy
    for probe in validation.probes:  # greedy answers before and after, VQA exact match
        assert probe.post_generation_match == generation_exact_match(
            probe.post_answer, probe.expected
        )
        assert probe.pre_generation_match == generation_exact_match(
            probe.pre_answer, probe.expected
        )
    assert validation.metrics.gen_reliability == edit.post_generation_match
    assert 0 <= validation.metrics.text_generality <= 1
    config = json.loads(validation.edit_config)
    assert (config["lr"], config["steps"], config["preset"], config["path"]) == (
        1e-2,
        50,
        "tiny-flagworld",
        "fast",
    )
    assert config["module"] == "model.language_model.layers.1.mlp.down_proj"
    if validation.verdict == "ok":
        assert validation.in_scope_ok and validation.out_of_scope_ok
    else:
        assert validation.reason


def test_fast_and_slow_validation_agree(adapter: VLMAdapter) -> None:
    record = make_record()
    fast = validate_record(record, make_editor(adapter, tiny_config(fast=True)))
    slow = validate_record(record, make_editor(adapter, tiny_config(fast=False)))
    assert json.loads(slow.edit_config)["path"] == "slow"
    assert (fast.verdict, fast.in_scope_ok, fast.out_of_scope_ok) == (
        slow.verdict,
        slow.in_scope_ok,
        slow.out_of_scope_ok,
    )
    assert fast.epsilon == pytest.approx(slow.epsilon, rel=1e-5)
    for a, b in zip(fast.probes, slow.probes, strict=True):
        assert (a.kind, a.index, a.routed) == (b.kind, b.index, b.routed)
        assert a.distance == pytest.approx(b.distance, abs=1e-5)
        assert (a.pre_accuracy, a.post_accuracy) == (b.pre_accuracy, b.post_accuracy)
        assert a.agreement == pytest.approx(b.agreement)
        assert (a.pre_answer, a.post_answer) == (b.pre_answer, b.post_answer)


def test_edit_eos_trains_the_stop_after_the_target(adapter: VLMAdapter) -> None:
    record = make_record()
    editor = make_editor(adapter, tiny_config(edit_eos=True))
    batch = adapter.build_inputs([record.image], [record.question], [record.target])
    rows, pos, targets = editor.training_targets(batch)
    n = int(batch.target_mask.sum())
    assert len(targets) == n + 1 and int(targets[-1]) == adapter.tokenizer.eos_token_id
    assert int(pos[-1]) == int(batch.attention_mask[0].sum()) - 1  # the last target token
    fast = validate_record(record, editor)
    slow = validate_record(record, make_editor(adapter, tiny_config(edit_eos=True, fast=False)))
    assert [p.post_answer for p in fast.probes] == [p.post_answer for p in slow.probes]
    assert [p.routed for p in fast.probes] == [p.routed for p in slow.probes]


@pytest.mark.parametrize("editor", ["grace", "ft"])
def test_baselines_produce_verdicts(adapter: VLMAdapter, editor: str) -> None:
    validation = validate_record(make_record(), make_editor(adapter, tiny_config(editor=editor)))
    assert validation.verdict in {"ok", "fail", "ambiguous"}, validation.reason
    assert validation.editor == editor and validation.alpha == -1.0
    if editor == "ft":
        assert validation.epsilon == -1.0 and all(p.routed for p in validation.probes)
    else:
        assert validation.epsilon == 1.0


def test_black_negative(adapter: VLMAdapter) -> None:
    record = make_record()
    probes = build_probes(record, tiny_config(negative="black"))
    assert probes[-1].kind == "train_neg" and probes[-1].expected == record.target
    validation = validate_record(record, make_editor(adapter, tiny_config(negative="black")))
    assert validation.verdict != "error", validation.reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"rephrases": [], "image_rephrases": []}, "no positive probes"),
        ({"locality_images": [], "text_negatives": []}, "no negative probes"),
        ({"rephrases_train": []}, "no training positive"),
        ({"locality_image_train": b""}, "no training negative"),
        ({"target": "xyzzy"}, "'xyzzy' cannot be encoded"),
        ({"image": b"not an image"}, "UnidentifiedImageError"),
    ],
)
def test_bad_items_get_error_verdicts(adapter: VLMAdapter, overrides: dict, reason: str) -> None:
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    editor = make_editor(adapter, tiny_config())
    validation = validate_record(make_record(**overrides), editor)
    assert validation.verdict == "error"
    assert reason in validation.reason
    assert len(editor.codebook) == 0
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in before.items())


def _result(kind: str, distance: float, routed: bool, post: float = 1.0, index: int = 0):
    return ProbeResult(
        kind=kind,
        index=index,
        distance=distance,
        routed=routed,
        expected="x",
        pre_accuracy=0.0,
        post_accuracy=post,
    )


def test_verdict_rules() -> None:
    ok = [
        _result("edit", 0.0, True),
        _result("rephrase", 0.1, True),
        _result("locality", 0.5, False, post=0.0),
        _result("text_negative", 0.3, True, post=0.0),  # routed, but answer kept
    ]
    kept = [False, False, True, True]
    assert verdict(ok, kept, 0.4, "near_miss")[:1] == ("ok",)
    far = [*ok[:1], _result("rephrase", 0.45, False), *ok[2:]]
    name, reason, in_ok, out_ok = verdict(far, kept, 0.4, "near_miss")
    assert (name, in_ok, out_ok) == ("ambiguous", False, True)
    assert "text_negative[0]" in reason and "rephrase[0]" in reason and "not routed" in reason
    changed = [*ok[:3], _result("text_negative", 0.3, True, post=0.0)]
    name, reason, in_ok, out_ok = verdict(changed, [False, False, True, False], 0.4, "near_miss")
    assert (name, in_ok, out_ok) == ("fail", True, False)
    assert "text_negative[0] routed" in reason
    wrong = [_result("edit", 0.0, True, post=0.5), *ok[1:]]
    assert verdict(wrong, kept, 0.4, "near_miss")[0] == "fail"


def test_ambiguity_compares_negatives_with_positives_of_their_family() -> None:
    # A re-rendered image (0.45) is farther than another question about the edit image
    # (0.3): no fault of the item within the image or the text family.
    results = [
        _result("edit", 0.0, True),
        _result("rephrase", 0.1, True),
        _result("image_rephrase", 0.45, False),
        _result("locality", 0.5, False, post=0.0),
        _result("text_negative", 0.3, True, post=0.0),
    ]
    kept = [False, False, False, True, True]
    name, reason, *_ = verdict(results, kept, 0.4, "near_miss")
    assert name == "fail" and "image_rephrase[0] not routed" in reason
    name, reason, *_ = verdict(results, kept, 0.4, "near_miss", ambiguity_scope="all")
    assert name == "ambiguous" and "text_negative[0]" in reason
    # A near-miss image nearer than a positive image is ambiguous in the image family.
    near = [*results[:3], _result("locality", 0.2, True, post=0.0), results[4]]
    name, reason, *_ = verdict(near, kept, 0.4, "near_miss")
    assert name == "ambiguous" and reason.startswith("image: negative locality[0]")
    # The black training image is not a near miss: never a reason for ambiguity.
    black = [*results[:3], _result("train_neg", 0.2, False, post=0.0), results[4]]
    assert verdict(black, kept, 0.4, "black")[0] == "fail"
    assert verdict(black, kept, 0.4, "near_miss")[0] == "ambiguous"


def test_validate_records_and_check_filter(adapter: VLMAdapter) -> None:
    records = [make_record("a"), make_record("b", target="xyzzy"), make_record("c")]
    out = validate_records(
        records,
        tiny_config(steps=5),
        ModelConfig(model="unused", name="tiny-flagworld"),
        model=adapter,
        show_progress=False,
    )
    assert [r.item_id for r in out] == ["a", "b", "c"]
    assert out[1].validation.verdict == "error"
    assert out[0].validation.verdict != "error" and out[2].validation.verdict != "error"
    assert out[0].validation.check.status != "not_run"
    assert records[0].validation.verdict == "not_run"  # inputs are not mutated

    def status(record, name: str):
        check = ItemCheck(status=name, reasons=[CheckReason(code="model_gap", probe="edit[0]")])
        return record.model_copy(update={"validation": Validation(verdict="ok", check=check)})

    mixed = [status(out[0], "unsound"), status(out[1], "model_gap"), status(out[2], "sound")]
    kept, rejected = filter_by_check(mixed, "unsound")
    assert [r.item_id for r in kept] == ["b", "c"] and [r.item_id for r in rejected] == ["a"]
    assert rejected[0].stage == "validate" and rejected[0].reason.startswith("unsound: model_gap")
    kept, rejected = filter_by_check(mixed, "model-gap")
    assert [r.item_id for r in kept] == ["c"] and len(rejected) == 2
    assert filter_by_check(mixed, "none") == (mixed, [])


def test_sequential_validation_keeps_earlier_edits(adapter: VLMAdapter) -> None:
    editor = make_editor(adapter, tiny_config(sequential=True, steps=3))
    validate_record(make_record("a"), editor)
    validate_record(make_record("b", target="moscow"), editor)
    assert editor.codebook.labels[-1] == "moscow" and len(editor.codebook) >= 1
    editor.restore()
