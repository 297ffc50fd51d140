"""The planted-defect benchmark of the item check (`bench/defects.py`, issue 12) at small size:
planting changes exactly the field of its kind, detection is scored by the probe a reason
names, and the small run (16 flagworld items, seed 0, the shipped tiny VLM) catches the
planted target and text-rephrase defects."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from schemas.record import CheckReason, ItemCheck, Validation

BENCH = Path(__file__).resolve().parents[1] / "bench" / "defects.py"
# the field each kind plants into
FIELDS = {
    "image_rephrase_other_flag": {"image_rephrases"},
    "image_rephrase_same_answer": {"image_rephrases"},
    "near_miss_edit_flag": {"locality_images"},
    "near_miss_answer_original": {"locality_answer"},
    "rephrase_other_relation": {"rephrases"},
    "text_negative_paraphrase": {"text_negatives"},
    "target_is_gold": {"target"},
    "model_gap": {"answers", "original_answer", "majority_answer"},
}


@pytest.fixture(scope="module")
def defects() -> ModuleType:
    spec = importlib.util.spec_from_file_location("okedit_bench_defects", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(defects):
    return defects.build_flagworld(16, 0)


def test_planting_changes_only_the_kind_field(defects, built) -> None:
    kinds = list(defects.ALL_KINDS)
    planted_records, planted = defects.plant_defects(built, kinds, 1.0, 0)
    # an item a kind does not fit (no flag with the same answer) passes to the next kind
    assert set(defects.KINDS) <= {p.kind for p in planted} <= set(kinds)
    assert len({p.item_id for p in planted}) == len(planted)  # one kind per planted item
    before = {r.item_id: r for r in built}
    marks = {p.item_id: p for p in planted}
    for record in planted_records:
        changed = {
            name
            for name in type(record).model_fields
            if getattr(record, name) != getattr(before[record.item_id], name)
        }
        mark = marks.get(record.item_id)
        assert changed == (FIELDS[mark.kind] if mark else set()), record.item_id
        if mark and mark.probe:  # the named probe is the one that changed
            family, index = mark.probe.rstrip("]").split("[")
            field = {"locality": "locality_images"}.get(family, family + "s")
            old, new = getattr(before[record.item_id], field), getattr(record, field)
            assert [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b] == [
                int(index)
            ]
    # deterministic in the seed
    again, planted_again = defects.plant_defects(built, kinds, 1.0, 0)
    assert planted_again == planted and again == planted_records


def test_detection_is_scored_by_the_named_probe(defects, built) -> None:
    record = built[0]
    mark = defects.Planted(record.item_id, "rephrase_other_relation", "rephrase[3]", "")

    def with_reasons(*reasons: CheckReason):
        check = ItemCheck(status="sound", reasons=list(reasons))
        return [record.model_copy(update={"validation": Validation(check=check)})]

    other = CheckReason(code="rephrase_differs", probe="rephrase[4]", dropped=True)
    hit = CheckReason(code="rephrase_far", probe="rephrase[3]", dropped=True)
    (row,), _ = defects.score(with_reasons(other), [mark], [record])
    assert not row["detected"] and row["other_flagged_probes"] == ["rephrase[4]"]
    (row,), _ = defects.score(with_reasons(other, hit), [mark], [record])
    assert row["detected"] and row["right_code"]
    assert defects.probe_name("locality_images[2]") == "locality[2]"
    assert defects.probe_name("rephrase") is None  # a family-level reason names no probe


@pytest.fixture(scope="module")
def small_run(defects, tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("defects") / "defects.json"
    try:
        report = defects.main(["--small", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return report, out


def test_small_bench_detects_planted_target_and_rephrase(defects, small_run) -> None:
    report, out = small_run
    assert json.loads(out.read_text())["seeds"] == [0]
    summary = report["summary"]
    per_kind = summary["per_kind"]
    assert set(per_kind) == set(defects.KINDS)
    assert all(stats["planted"] >= 1 for stats in per_kind.values())
    for kind in ("target_is_gold", "rephrase_other_relation"):
        assert per_kind[kind]["recall"] == 1.0, per_kind[kind]
    assert per_kind["target_is_gold"]["statuses"] == {
        "unsound": per_kind["target_is_gold"]["planted"]
    }
    assert summary["clean_items"] >= 5
    assert "| target_is_gold |" in defects.markdown(report)
