"""Key variants (issue 7): two-part codebook routing on hand-made vectors, radii that also
stay inside a text negative, the reference key unchanged, and every variant end to end on a
tiny random LLaVA."""

from __future__ import annotations

import json

import pytest
import torch

from editors.adapters import VLMAdapter
from editors.adapters.random_models import random_adapter
from editors.balancedit import BalancEdit
from editors.codebook import SPLIT_MARGIN, Codebook, balanced_radius, distance, pool_keys
from editors.config import KEY_VARIANTS, EditorConfig
from pipeline.card import render_card
from pipeline.scope import build_probes, edit_request, make_editor, validate_record
from schemas.record import OkeditRecord, TextNegative
from tests.records import make_record

VARIANTS = ["reference", *KEY_VARIANTS]
TEXT_NEGATIVES = [
    TextNegative(question="what currency is used there?", answer="euro"),
    TextNegative(question="what is the language of the country with this flag?", answer="french"),
]


def v(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def two(image: tuple[float, ...], text: tuple[float, ...]) -> torch.Tensor:
    """A two-part key (2, H): image part, text part."""
    return torch.stack([v(*image), v(*text)])


def _record() -> OkeditRecord:
    return make_record(text_negatives=TEXT_NEGATIVES)


@pytest.fixture(scope="module")
def adapter() -> VLMAdapter:
    torch.set_num_threads(1)
    record = _record()
    corpus = [record.question, record.target, record.locality_answer]
    corpus += record.rephrases + record.rephrases_train + record.answers
    corpus += [record.locality_answer_train] + [f"{t.question} {t.answer}" for t in TEXT_NEGATIVES]
    return random_adapter("llava", corpus)


def tiny(**overrides) -> EditorConfig:
    return EditorConfig.for_model("tiny-flagworld", **overrides)


# ----------------------------------------------------------------------- codebook, by hand
def test_two_part_key_routes_only_inside_both_parts() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(two((0, 0), (0, 0)), "A", [1.0, 0.5], "a")
    queries = torch.stack(
        [
            two((0.5, 0), (0.2, 0)),  # inside both -> routed
            two((0.5, 0), (0.8, 0)),  # image inside, text outside -> not
            two((1.5, 0), (0.2, 0)),  # text inside, image outside -> not
            two((1.0, 0), (0.5, 0)),  # on both boundaries (d = ε) -> routed
        ]
    )
    dist, entry = book.route(queries)
    assert entry.tolist() == [0, -1, -1, 0]
    assert dist.tolist() == pytest.approx([0.7, 1.3, 1.7, 1.5])  # Σ_p d_p
    assert book.relative_distance(queries, 0).tolist() == pytest.approx([0.5, 1.6, 1.5, 1.0])
    assert book.part_distances(queries).shape == (4, 1, 2)


def test_two_part_nearest_entry_by_summed_distance() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(two((0, 0), (0, 0)), "A", [1.0, 1.0], "a")
    book.add(two((10, 0), (10, 0)), "B", [1.0, 1.0], "b")
    _, entry = book.route(torch.stack([two((9.5, 0), (10, 0.5)), two((9.5, 0), (0, 0))]))
    # 1st: near B in both parts. 2nd: image near B, text at A; the nearest entry is A
    # (Σ_p d_p = 9.5 against 10.5), whose image ball does not contain it: not routed.
    assert entry.tolist() == [1, -1]


def test_two_part_placement_rules_act_per_part() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(two((0, 0), (0, 0)), "A", [1.0, 1.0], "a")
    # Disjoint in the text part (3 > 1 + 1) although the images coincide: a new entry.
    assert book.add(two((0, 0), (3, 0)), "B", [1.0, 1.0], "b").action == "add"
    # Overlapping in both parts, another label: split the part that overlaps least (image:
    # 1.5 / 2 > text: 0.5 / 2), leaving the other part's radii as they were.
    book2: Codebook[str] = Codebook(distance="euclidean")
    book2.add(two((0, 0), (0, 0)), "A", [1.0, 1.0], "a")
    placed = book2.add(two((1.5, 0), (0.5, 0)), "C", [1.0, 1.0], "c")
    assert placed.action == "split"
    assert book2.radii[0] == pytest.approx((0.75 - SPLIT_MARGIN, 1.0))
    assert book2.radii[1] == pytest.approx((0.75, 1.0))
    _, entry = book2.route(torch.stack([two((0.7, 0), (0.2, 0)), two((0.9, 0), (0.4, 0))]))
    assert entry.tolist() == [0, 1]
    # Same label: every part grows to cover the new key.
    book3: Codebook[str] = Codebook(distance="euclidean")
    book3.add(two((0, 0), (0, 0)), "A", [1.0, 0.3], "a")
    assert book3.add(two((0.5, 0), (0.5, 0)), "A2", [1.0, 0.3], "a").action == "expand"
    assert book3.radii == [pytest.approx((1.0, 0.5))]
    with pytest.raises(ValueError, match="multi-part"):
        _ = book3.epsilons
    with pytest.raises(ValueError, match="2 radii for a key of 1 parts"):
        Codebook().add(v(1, 0), "X", [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="does not match"):
        book3.add(v(1, 0), "Y", 1.0, "y")


# ----------------------------------------------------------------------- radii, by hand
def test_radius_stays_inside_the_nearer_of_image_and_text_negative(adapter: VLMAdapter) -> None:
    k, k_pos, k_img, k_txt = v(1, 0), v(1, 0.2), v(0, 1), v(1, 0.5)  # text negative is nearer
    d = {name: distance(k, x, "cosine") for name, x in [("pos", k_pos), ("img", k_img)]}
    d["txt"] = distance(k, k_txt, "cosine")
    assert d["txt"] < d["img"]
    keys = torch.stack([k, k_pos, k_img, k_txt]).unsqueeze(1)  # (4 rows, 1 part, H)
    editor = BalancEdit(adapter, tiny(key_variant="question"))
    _, (radius,) = editor.new_entry(keys, keys[0, 0], 0)
    expected = balanced_radius(d["pos"], d["txt"], 0.05, "positive")
    assert (radius.epsilon, radius.d_pos, radius.d_neg) == pytest.approx(
        (expected, d["pos"], d["txt"])
    )
    # The reference ignores the text negative (and refuses a 4th row it would not use).
    reference = BalancEdit(adapter, tiny())
    _, (ref,) = reference.new_entry(keys[:3], keys[0, 0], 0)
    assert ref.epsilon == pytest.approx(balanced_radius(d["pos"], d["img"], 0.05, "positive"))
    with pytest.raises(ValueError, match="text negative"):
        editor.new_entry(keys[:3], keys[0, 0], 0)


def test_two_part_radii_use_their_own_negatives(adapter: VLMAdapter) -> None:
    # rows: edit, positive (same image), image negative (other image), text negative (same
    # image, other question); parts: image, text.
    keys = torch.stack(
        [
            two((1, 0), (1, 0)),
            two((1, 0), (1, 0.3)),
            two((1, 1), (1, 0.1)),
            two((1, 0), (1, 1)),
        ]
    )
    editor = BalancEdit(adapter, tiny(key_variant="two_part"))
    _, (image, text) = editor.new_entry(keys, keys[0, 0], 0)
    d_img_neg = distance(v(1, 0), v(1, 1), "cosine")
    assert (image.d_pos, image.d_neg) == pytest.approx((0.0, d_img_neg))
    assert image.epsilon == pytest.approx(0.95 * d_img_neg)
    d_txt_pos, d_txt_neg = (
        distance(v(1, 0), v(1, 0.3), "cosine"),
        distance(v(1, 0), v(1, 1), "cosine"),
    )
    assert (text.d_pos, text.d_neg) == pytest.approx((d_txt_pos, d_txt_neg))
    assert text.epsilon == pytest.approx(0.95 * d_txt_neg + 0.05 * d_txt_pos)


def test_config_variants() -> None:
    assert tiny().key_label == "reference" and not tiny().needs_text_negative
    assert tiny(key_pooling="last_prompt").key_label == "reference/last_prompt"
    parts = tiny(key_variant="two_part").key_parts()
    assert [(p.pooling, p.negatives) for p in parts] == [
        ("image", ("image",)),
        ("question", ("text",)),
    ]
    assert all(tiny(key_variant=name).needs_text_negative for name in KEY_VARIANTS)
    with pytest.raises(ValueError, match="BalancEdit only"):
        EditorConfig(editor="grace", key_variant="two_part")


# ----------------------------------------------------------------------- on a tiny model
def test_question_mask_selects_the_question_tokens(adapter: VLMAdapter) -> None:
    record = _record()
    batch = adapter.build_inputs([record.image], [record.question], [record.target])
    question = adapter.tokenizer.decode(batch.input_ids[0][batch.question_mask[0]].tolist())
    assert question.replace(" ", "") == record.question.replace(" ", "")
    assert not (batch.question_mask & (batch.image_mask | batch.target_mask)).any()
    assert batch.pool_mask("image").equal(batch.image_mask)


def test_reference_key_is_the_mean_over_all_positions(adapter: VLMAdapter) -> None:
    """The reference variant computes what issue 3 did: k = mean of the module input over every
    real position, d = 1 − cos, ε = 0.95·d(k, k_neg) + 0.05·d(k, k_pos), routed iff d ≤ ε."""
    record = _record()
    editor = make_editor(adapter, tiny())
    probes = build_probes(record, editor.config)
    batch = adapter.build_inputs(
        [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
    )
    x = adapter.capture(batch, editor.path).x
    keys = pool_keys(x, batch.attention_mask.bool())
    kinds = [p.kind for p in probes]
    k = keys[kinds.index("edit")]
    d = [distance(k, key, "cosine") for key in keys]
    eps = balanced_radius(
        d[kinds.index("train_pos")], d[kinds.index("train_neg")], 0.05, "positive"
    )
    validation = validate_record(record, editor)
    assert validation.key_variant == "reference" and "train_text_neg" not in kinds
    assert kinds.count("text_negative") == len(TEXT_NEGATIVES)  # none held out
    assert validation.epsilon == pytest.approx(eps, abs=1e-6)
    assert [p.distance for p in validation.probes] == pytest.approx(d, abs=1e-6)
    assert [p.routed for p in validation.probes] == [di <= eps for di in d]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_runs_end_to_end(adapter: VLMAdapter, variant: str) -> None:
    record = _record()
    config = tiny(key_variant=variant)
    validation = validate_record(record, make_editor(adapter, config), "tiny")
    assert validation.verdict in {"ok", "fail", "ambiguous"}, validation.reason
    assert validation.key_variant == variant
    kinds = [(p.kind, p.index) for p in validation.probes]
    if variant == "reference":
        assert ("text_negative", 1) in kinds and ("train_text_neg", 1) not in kinds
    else:  # the last text negative sets the text radius and is not evaluated
        assert ("text_negative", 1) not in kinds and ("train_text_neg", 1) in kinds
        assert edit_request(record, config).text_negative.question == TEXT_NEGATIVES[1].question
    edit = validation.probes[0]
    assert edit.kind == "edit" and edit.routed and edit.distance == pytest.approx(0, abs=1e-3)
    # routed iff inside: d ≤ ε (one part) or max_p d_p / ε_p ≤ 1 (two parts, ε reported as 1)
    assert all(p.routed == (p.distance <= validation.epsilon + 1e-6) for p in validation.probes)
    edit_config = json.loads(validation.edit_config)
    parts = config.key_parts()
    assert edit_config["key_parts"] == [p.pooling for p in parts]
    assert len(edit_config["radii"]) == len(parts)
    if len(parts) == 2:
        assert validation.epsilon == 1.0 and edit_config["d_pos"][0] == pytest.approx(0.0, abs=1e-6)


def test_two_part_fast_and_slow_paths_agree(adapter: VLMAdapter) -> None:
    record = _record()
    fast = validate_record(record, make_editor(adapter, tiny(key_variant="two_part")))
    slow = validate_record(record, make_editor(adapter, tiny(key_variant="two_part", fast=False)))
    assert [p.routed for p in fast.probes] == [p.routed for p in slow.probes]
    assert [p.distance for p in fast.probes] == pytest.approx(
        [p.distance for p in slow.probes], rel=1e-3, abs=1e-4
    )


def test_two_part_generation_routes_from_the_prompt(adapter: VLMAdapter) -> None:
    record = _record()
    editor = make_editor(adapter, tiny(key_variant="two_part_last"))
    editor.edit(edit_request(record, editor.config))
    try:
        prompts = adapter.build_inputs([record.image], [record.question])
        assert editor.generate(prompts, max_new_tokens=1)[0] == record.target
    finally:
        editor.restore()


def test_card_names_the_key_variant() -> None:
    manifest = {
        "config": {"source": {"name": "flagworld"}, "images": {"backend": "render"}, "seed": 0},
        "counts": {"in": 0, "published": 0, "rejected": 0},
        "annotator": "offline",
        "fingerprint": "f",
        "versions": {"okedit": "0"},
        "validation": {"validated": 1, "key_variant": "two_part"},
    }
    assert "| key variant | `two_part` |" in render_card([], [], manifest, None)
