"""Batched validation (issue 17 part 3): several items edited and probed together give the same
results as one at a time, and one item's edit never routes or changes another item's probes.

Exact for verdicts, answers, routing and check status. Floats within 1e-5 relative (1e-6
absolute near 0): key distances are sums per pair (`codebook._pairwise_dot`), the same in any
batch, but the joint batch runs the lm_head's matrix products over more rows, which round
differently (≈ 1e-7 relative), and 50 Adam steps carry that into the losses (measured ≤ 3e-6
relative on 8 flagworld items, all distances and radii bit-equal).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from editors.adapters import VLMAdapter, load_model
from editors.adapters.base import _bundles
from editors.base import Editor, EditRequest, Prompt
from editors.config import EditorConfig, ModelConfig
from pipeline.scope import Probe, make_editor, run_items, validate_items
from pipeline.validate import validate_records
from schemas.record import OkeditRecord
from tests.edit_paths import (
    BLUE,
    FAMILIES,
    QUESTION,
    RED,
    flagworld_records,
    overridden,
    random_adapters,
)

REL = 1e-5
ABS = 1e-6
# Differ between a joint run and one item at a time by design: wall time shares.
TIMES = {"seconds", "edit_seconds"}


@pytest.fixture(scope="module")
def tiny() -> VLMAdapter:
    """The shipped flagworld VLM on the CPU (one thread: deterministic kernels)."""
    from pipeline.tiny_model import default_model_dir

    torch.set_num_threads(1)
    return load_model(
        ModelConfig(model=str(default_model_dir()), name="tiny-flagworld", device="cpu")
    )


@pytest.fixture(scope="module")
def adapters() -> dict[str, VLMAdapter]:
    return random_adapters()


@pytest.fixture(scope="module")
def records() -> list[OkeditRecord]:
    return flagworld_records(5)


def validation_config(**overrides: Any) -> EditorConfig:
    """The validate stage's editor settings for the tiny VLM (last-prompt key, stop trained,
    greedy answers)."""
    defaults = {"key_variant": "last_prompt", "edit_eos": True}
    if overrides.get("editor", "balancedit") != "balancedit":
        defaults.pop("key_variant")
    return EditorConfig.for_model("tiny-flagworld", **{**defaults, **overrides})


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats within REL (and JSON strings compared as their values); wall times
    skipped."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in TIMES:
                assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not (math.isinf(a) or math.isnan(a)):
        assert a == pytest.approx(b, rel=REL, abs=ABS), where
    elif isinstance(a, str) and a.startswith("{"):
        assert_same(json.loads(a), json.loads(b), where)
    else:
        assert a == b, where


def with_bad_items(records: list[OkeditRecord]) -> list[OkeditRecord]:
    """The records with two that fail: no target (before any model work) and a target the
    tokenizer cannot encode (inside the joint run: its items then run one at a time)."""
    empty = records[1].model_copy(update={"item_id": "empty-target", "target": " "})
    unknown = records[2].model_copy(update={"item_id": "unknown-target", "target": "ж"})
    return [records[0], empty, records[1], unknown, *records[2:]]


def test_batched_equals_one_at_a_time(tiny: VLMAdapter, records: list[OkeditRecord]) -> None:
    items = with_bad_items(records)
    config, model = validation_config(), ModelConfig(model="tiny-flagworld")
    one = validate_records(items, config, model, tiny, show_progress=False)
    together = validate_records(items, config, model, tiny, show_progress=False, batch_items=3)
    for a, b in zip(one, together, strict=True):
        assert_same(a.model_dump(), b.model_dump(), a.item_id)
    verdicts = {r.item_id: r.validation.verdict for r in together}
    assert verdicts["empty-target"] == verdicts["unknown-target"] == "error"
    assert "TargetEncodingError" in together[3].validation.reason
    sound = [r.validation for r in together if r.validation.verdict != "error"]
    assert len(sound) == len(records)
    # the edits did something: each edit probe answers its target after the edit
    assert all(v.probes[0].post_accuracy == 1.0 and v.probes[0].post_answer for v in sound)


@pytest.mark.parametrize(
    ("settings", "side_by_side"),
    [
        ({"editor": "grace"}, True),
        ({"editor": "ft"}, False),
        ({"fast": False, "steps": 10}, False),  # full forwards: a short edit
    ],
    ids=["grace", "ft", "slow"],
)
def test_other_editors_and_paths_batched_equal_one_at_a_time(
    tiny: VLMAdapter, records: list[OkeditRecord], settings: dict, side_by_side: bool
) -> None:
    """GRACE edits side by side; FT (which trains the one shared module) and the slow path
    fall back to one item at a time."""
    config, model = validation_config(**settings), ModelConfig(model="tiny-flagworld")
    items = records[:2]
    one = validate_records(items, config, model, tiny, show_progress=False)
    together = validate_records(items, config, model, tiny, show_progress=False, batch_items=2)
    assert make_editor(tiny, config).edits_side_by_side == side_by_side
    for a, b in zip(one, together, strict=True):
        assert_same(a.model_dump(), b.model_dump(), a.item_id)


def test_one_items_edit_never_reaches_anothers_probes(
    tiny: VLMAdapter, records: list[OkeditRecord]
) -> None:
    """Two items ask the same question about the same image with different targets: their
    keys coincide, so each one's probes lie inside the other's radius. Edited together, each
    still routes only to its own entry and answers its own target."""
    first = records[0]
    twin = first.model_copy(update={"item_id": "twin", "target": records[1].target})
    editor = make_editor(tiny, validation_config())
    alone = [validate_items([r], editor)[0] for r in (first, twin, records[2])]
    together = validate_items([first, twin, records[2]], editor)
    for record, a, b in zip((first, twin, records[2]), alone, together, strict=True):
        edit = b.probes[0]
        assert edit.routed and edit.post_accuracy == 1.0, record.item_id
        assert edit.post_answer == record.target, record.item_id
        assert_same(a.model_dump(), b.model_dump(), record.item_id)
    assert together[0].probes[0].post_answer != together[1].probes[0].post_answer


def _family_items() -> list[tuple[list[Probe], EditRequest]]:
    """Two edits on the capital-city world: red -> lyon, blue -> paris, each with probes on
    its own image, the other image and a rephrase."""
    items = []
    for image, other, target, negative in (
        (RED, BLUE, "lyon", "rome"),
        (BLUE, RED, "paris", "berlin"),
    ):
        request = EditRequest(
            edit=Prompt(image, QUESTION, target),
            positive=Prompt(image, "which city is the capital", target),
            negative=Prompt(other, QUESTION, negative),
        )
        probes = [
            Probe("edit", 0, image, QUESTION, target, "positive", False),
            Probe(
                "rephrase",
                0,
                image,
                "name the main city of this country",
                target,
                "positive",
                False,
            ),
            Probe("locality", 0, other, QUESTION, negative, "negative", True),
            Probe("train_pos", 0, image, "which city is the capital", target, "train", False),
            Probe("train_neg", 0, other, QUESTION, negative, "train", True),
        ]
        items.append((probes, request))
    return items


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("editor", ["balancedit", "grace"])
@pytest.mark.parametrize("family", FAMILIES)
def test_joint_run_equals_single_runs_in_every_family(
    adapters: dict[str, VLMAdapter], family: str, editor: str, shared: bool
) -> None:
    """The joint run on tiny random models of every family: the same losses, radii, logits,
    distances, routing and answers as each item alone; with prefix sharing, the items'
    same-image rows run their prefixes in one bundled forward."""
    adapter = adapters[family]
    config = EditorConfig(editor=editor, lr=1e-2, steps=20, edit_eos=True, max_new_tokens=3)
    ed = make_editor(adapter, config)
    items = _family_items()
    with overridden(adapter, prefix_min_saved=1 if shared else 10**9):
        singles, joint = singles_and_joint(ed, items)
    for a, b in zip(singles, joint, strict=True):
        assert a.outcome.losses == pytest.approx(b.outcome.losses, rel=REL, abs=1e-6)
        assert [r.epsilon for r in a.outcome.radii] == pytest.approx(
            [r.epsilon for r in b.outcome.radii], rel=REL
        )
        torch.testing.assert_close(a.distance, b.distance, rtol=REL, atol=1e-6)
        assert torch.equal(a.routed, b.routed)
        for x, y in zip(a.pre + a.post, b.pre + b.post, strict=True):
            torch.testing.assert_close(x, y, rtol=REL, atol=1e-5)
        assert (a.pre_answers, a.post_answers) == (b.pre_answers, b.post_answers)


def singles_and_joint(ed: Editor, items: list) -> tuple[list, list]:
    """Each item's run alone, then all of them side by side (the editor restored after each)."""
    singles = []
    for item in items:
        singles.extend(run_items(ed, [item]))
        ed.restore()
    joint = run_items(ed, items)
    ed.restore()
    return singles, joint


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_an_edit_that_stops_early_leaves_the_others_training(
    adapters: dict[str, VLMAdapter], family: str
) -> None:
    """With `target_loss_stop` the two edits stop at different steps (measured: steps 3 and 4
    on BLIP-2, 8 and 11 on LLaVA); side by side each stops where it stops alone."""
    config = EditorConfig(lr=1e-2, steps=20, edit_eos=True, target_loss_stop=3.0)
    ed = make_editor(adapters[family], config)
    items = _family_items()
    singles, joint = singles_and_joint(ed, items)
    lengths = [len(run.outcome.losses) for run in singles]
    assert lengths[0] != lengths[1] and max(lengths) < config.steps
    for a, b in zip(singles, joint, strict=True):
        assert a.outcome.losses == pytest.approx(b.outcome.losses, rel=REL, abs=1e-6)
        for x, y in zip(a.post, b.post, strict=True):
            torch.testing.assert_close(x, y, rtol=REL, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bundled_prefixes_equal_the_plain_forward(
    adapters: dict[str, VLMAdapter], family: str
) -> None:
    """Prefix groups of two images, one sharing part of the question too (a longer prefix),
    cut to a common prefix and run as one bundle: the capture equals the plain forward."""
    adapter = adapters[family]
    batch = adapter.build_inputs(
        [RED, RED, BLUE, BLUE, RED],
        [QUESTION, QUESTION, QUESTION, "which city is the capital", QUESTION],
        ["lyon", "rome berlin", "paris", "rome", "berlin paris"],
    )
    path = adapter.resolve_module(None)
    with overridden(adapter, prefix_min_saved=1):
        groups = adapter.prefix_groups(batch)
        shared = adapter.capture(batch, path, keep_kv=True)
    with overridden(adapter, shares_prefix=False):
        plain = adapter.capture(batch, path, keep_kv=True)
    assert len({prefix for _, prefix in groups}) == 2  # the red rows share "what is ..."
    assert [len(bundle) for bundle, _ in _bundles(batch, groups)] == [2]
    real = batch.attention_mask.bool()
    for name in ("x", "resid", "final_hidden"):
        torch.testing.assert_close(
            getattr(shared, name)[real], getattr(plain, name)[real], rtol=1e-5, atol=1e-5
        )
    assert torch.equal(shared.position_shift, plain.position_shift)
