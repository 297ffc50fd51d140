"""The offline world: facts, templates, rendering and the source interface."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import flagworld as fw
from schemas.record import Rejection, SourceItem

BRIEF_GROUPS = [
    ("IT", "IE", "MX", "CI"),
    ("FR", "RU", "NL"),
    ("TD", "RO"),
    ("ID", "MC", "PL"),
    ("BE", "DE"),
    ("DK", "SE", "NO", "FI", "IS"),
    ("JP", "BD", "PW"),
]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _distance(a: str, b: str) -> float:
    return float(np.abs(_pixels(fw.render_flag(a)) - _pixels(fw.render_flag(b))).mean())


def test_world_has_at_least_40_distinct_flags() -> None:
    codes = [c.code for c in fw.COUNTRIES]
    assert len(codes) >= 40
    assert len(set(codes)) == len(codes)
    assert set(fw.COUNTRY_BY_CODE) == set(codes)
    names = [c.name for c in fw.COUNTRIES]
    assert len(set(names)) == len(names)
    assert fw.COUNTRY_BY_CODE["CI"].capital == "Yamoussoukro"
    assert fw.COUNTRY_BY_CODE["CI"].currency == "CFA franc"
    assert fw.COUNTRY_BY_CODE["MX"].capital == "Mexico City"


def test_lookalike_groups_partition_the_world_and_contain_the_brief_groups() -> None:
    members = [code for group in fw.LOOKALIKE_GROUPS for code in group]
    assert sorted(members) == sorted(c.code for c in fw.COUNTRIES)
    assert all(len(group) >= 2 for group in fw.LOOKALIKE_GROUPS)
    for wanted in BRIEF_GROUPS:
        first = wanted[0]
        assert set(wanted) - {first} <= set(fw.lookalikes(first))
    for code in members:
        assert code not in fw.lookalikes(code)
        assert all(code in fw.lookalikes(other) for other in fw.lookalikes(code))


def test_answers_are_written_as_people_write_them() -> None:
    vocab = set(fw.vocabulary())
    values = {fw.answer(c.code, r) for c in fw.COUNTRIES for r in fw.RELATIONS}
    for value in values | set(fw.COUNTERFACTUAL_CITIES):
        assert value == value.lower() and "_" not in value and value == " ".join(value.split())
        assert set(fw.words(value)) <= vocab
    assert {"mexico city", "us dollar", "cfa franc", "north america", "ivory coast"} <= values
    assert fw.answer("MX", "capital") == "mexico city"
    assert fw.answer("US", "country") == "united states"
    assert not set(fw.COUNTERFACTUAL_CITIES) & {fw.answer(c.code, "capital") for c in fw.COUNTRIES}
    assert "sao paulo" in fw.COUNTERFACTUAL_CITIES
    assert set(fw.CITY_CONTINENTS.values()) <= {c.continent for c in fw.COUNTRIES}
    assert fw.answer("FR", "country") == "france"
    with pytest.raises(KeyError, match="relation"):
        fw.answer("FR", "anthem")
    with pytest.raises(KeyError, match="XX"):
        fw.answer("XX", "capital")


def test_vocabulary_is_sorted_deterministic_and_covers_every_question() -> None:
    vocab = fw.vocabulary()
    assert vocab == sorted(set(vocab)) == fw.vocabulary()
    for table in (fw.TRAIN_TEMPLATES, fw.HELDOUT_TEMPLATES, fw.PARAPHRASE_TEMPLATES):
        for templates in table.values():
            for template in templates:
                assert set(fw.words(template)) <= set(vocab)
    for relation in fw.ITEM_RELATIONS:
        for table in (fw.TEXT_TRAIN_TEMPLATES, fw.TEXT_HELDOUT_TEMPLATES):
            for _, question, _ in fw.text_questions(relation, table):
                assert set(fw.words(question)) <= set(vocab)
    assert fw.words("what is it?") == ["what", "is", "it", "?"]
    assert fw.words("in peru, which city?") == ["in", "peru", ",", "which", "city", "?"]


def _training_questions() -> list[str]:
    """Every question the tiny VLM is trained on: the flag templates and the image-free
    questions about named countries."""
    flags = [t for ts in fw.TRAIN_TEMPLATES.values() for t in ts]
    named = [q for r in fw.ITEM_RELATIONS for _, q, _ in fw.text_questions(r)]
    return flags + named


def test_templates_counts_style_and_disjointness() -> None:
    assert set(fw.TRAIN_TEMPLATES) == set(fw.HELDOUT_TEMPLATES) == set(fw.RELATIONS)
    trained = _training_questions()
    train_words = {w for q in trained for w in fw.words(q)}
    for relation in fw.RELATIONS:
        train = fw.TRAIN_TEMPLATES[relation]
        heldout = fw.HELDOUT_TEMPLATES[relation]
        paraphrases = fw.PARAPHRASE_TEMPLATES[relation]
        assert len(train) == 4 and len(set(train)) == 4
        assert len(heldout) >= 2
        assert len(paraphrases) >= 14 and len(set(paraphrases)) == len(paraphrases)
        assert set(heldout) <= set(paraphrases)
        assert not set(paraphrases) & set(trained)
        for template in (*train, *paraphrases):
            assert template == template.lower() and template.endswith("?")
            assert "  " not in template and "{" not in template
        # A model trained on the training questions has seen every paraphrase word.
        for template in paraphrases:
            assert set(fw.words(template)) <= train_words


def _frame(question: str) -> str:
    """A question with its country reference (flag phrase or named country) replaced."""
    for phrase in fw._COUNTRY_OBJECTS:
        question = question.replace(phrase, "{x}")
    return question


def test_evaluated_paraphrases_are_wordings_never_asked_about_a_flag() -> None:
    """Issue 13: the paraphrases an item is evaluated on are no recombination of the flag
    training templates (a new opener or object alone); beyond the held-out opener they are
    sentence frames the model only ever saw about named countries."""
    for relation in fw.ITEM_RELATIONS:
        train_frames = {_frame(t) for t in fw.TRAIN_TEMPLATES[relation]}
        openers = {f.removesuffix(" {x}?") for f in train_frames}
        named_frames = set(fw.TEXT_TRAIN_TEMPLATES[relation])
        heldout = set(fw.HELDOUT_TEMPLATES[relation])
        beyond = [t for t in fw.PARAPHRASE_TEMPLATES[relation] if t not in heldout]
        assert len(beyond) >= 16
        for template in beyond:
            frame = _frame(template)
            assert frame not in train_frames  # not a training opener with another object
            assert not any(frame.startswith(o + " ") for o in openers)
            assert frame in named_frames  # ... but a frame learnt about named countries


def test_image_free_questions_name_their_country() -> None:
    assert fw.country_phrase("NL") == "the netherlands"
    assert fw.country_phrase("CI") == "ivory coast"
    template = fw.TEXT_TRAIN_TEMPLATES["capital"][0]
    assert fw.text_question(template, "PE") == "what is the capital of peru?"
    for relation in fw.ITEM_RELATIONS:
        train = fw.TEXT_TRAIN_TEMPLATES[relation]
        assert set(fw.TEXT_LOCALITY_TEMPLATES[relation]) <= set(train)
        assert not set(fw.TEXT_HELDOUT_TEMPLATES[relation]) & set(train)
        rows = fw.text_questions(relation)
        assert len(rows) == len(train) * len(fw.COUNTRIES)
        for code, question, value in rows:
            assert "flag" not in question and "this" not in question
            assert fw.country_phrase(code) in question
            assert value == fw.answer(code, relation)


def test_render_flag_is_clean_rgb_and_cached_safely() -> None:
    img = fw.render_flag("FR")
    assert img.mode == "RGB" and img.size == (64, 64)
    assert img.getpixel((0, 0)) == fw.CLEAN_BACKGROUND  # centred with a margin
    img.putpixel((32, 32), (1, 2, 3))  # the caller owns a copy, not the cache
    assert fw.render_flag("FR").getpixel((32, 32)) != (1, 2, 3)
    assert fw.render_flag("JP", size=128).size == (128, 128)
    # Real aspect ratios: Switzerland is square, Ireland 2:1.
    ch = _pixels(fw.render_flag("CH")) != np.array(fw.CLEAN_BACKGROUND)
    ie = _pixels(fw.render_flag("IE")) != np.array(fw.CLEAN_BACKGROUND)
    assert ch.any(axis=2).any(axis=1).sum() > 1.8 * ie.any(axis=2).any(axis=1).sum()


def test_render_variant_is_deterministic_by_seed_and_varies() -> None:
    a = fw.to_png(fw.render_variant("IT", random.Random(7)))
    b = fw.to_png(fw.render_variant("IT", random.Random(7)))
    c = fw.to_png(fw.render_variant("IT", random.Random(8)))
    assert a == b and a != c
    rng = random.Random(0)
    variants = [fw.render_variant("SE", rng) for _ in range(5)]
    assert all(v.mode == "RGB" and v.size == (64, 64) for v in variants)
    assert len({v.tobytes() for v in variants}) == 5
    assert Image.open(io.BytesIO(a)).format == "PNG"


def test_lookalike_renders_differ_but_are_close_relative_to_unrelated_flags() -> None:
    codes = [c.code for c in fw.COUNTRIES]
    unrelated = [
        _distance(a, b)
        for i, a in enumerate(codes)
        for b in codes[i + 1 :]
        if b not in fw.lookalikes(a)
    ]
    for code in codes:
        assert all(_distance(code, other) > 1.0 for other in fw.lookalikes(code))
    nearest = [min(_distance(c, o) for o in fw.lookalikes(c)) for c in codes]
    assert np.mean(nearest) < np.median(unrelated)
    # The near-identical pairs of real flags stay closer than 95 % of unrelated pairs.
    close = np.percentile(unrelated, 5)
    for a, b in [("TD", "RO"), ("ID", "MC"), ("IT", "IE"), ("YE", "EG"), ("ML", "SN")]:
        assert _distance(a, b) < close, (a, b)


def test_country_for_object_round_trips() -> None:
    for country in fw.COUNTRIES:
        assert fw.country_for_object(fw.flag_object(country.code)) == country.code
    assert fw.flag_object("CI") == "the flag of Ivory Coast"
    assert fw.country_for_object("The flag of the netherlands.") == "NL"
    assert fw.country_for_object("Mexico") == "MX"
    with pytest.raises(KeyError, match="Atlantis"):
        fw.country_for_object("the flag of Atlantis")


def test_source_lists_ids_deterministically_by_seed() -> None:
    source = fw.FlagworldSource()
    ids = source.list_ids(None, seed=0)
    assert len(ids) == len(set(ids)) == len(fw.COUNTRIES) * len(fw.ITEM_RELATIONS)
    assert ids == source.list_ids(None, seed=0)
    assert ids != source.list_ids(None, seed=1)
    assert sorted(ids) == sorted(source.list_ids(None, seed=1))
    assert source.list_ids(5, seed=0) == ids[:5]
    assert all(i.startswith("flagworld-") for i in ids)
    only = fw.FlagworldSource(relations=("capital",)).list_ids(None, seed=3)
    assert len(only) == len(fw.COUNTRIES) and all(i.endswith("-capital") for i in only)
    with pytest.raises(ValueError, match="relations"):
        fw.FlagworldSource(relations=("anthem",))


def test_source_loads_items_and_rejects_unknown_ids() -> None:
    source = fw.FlagworldSource()
    results = source.load_items(
        ["flagworld-FR-capital", "flagworld-XX-capital", "flagworld-FR-anthem", "okvqa-1"]
    )
    item = results[0]
    assert isinstance(item, SourceItem)
    assert item.source == "flagworld" and item.question_id == item.item_id
    assert item.image_id == "FR" and item.question_type == "capital"
    assert item.question == fw.TRAIN_TEMPLATES["capital"][0]
    assert item.answers == ["paris"] * 10
    assert item.image == fw.to_png(fw.render_flag("FR"))
    reasons = []
    for rejection in results[1:]:
        assert isinstance(rejection, Rejection) and rejection.stage == "gather"
        reasons.append(rejection.reason)
    assert "XX" in reasons[0] and "anthem" in reasons[1] and "flagworld-<CODE>" in reasons[2]


def test_source_question_seed_picks_training_templates_deterministically() -> None:
    ids = fw.FlagworldSource().list_ids(None, seed=0)
    first = fw.FlagworldSource(question_seed=5).load_items(ids)
    again = fw.FlagworldSource(question_seed=5).load_items(ids)
    questions = [i.question for i in first if isinstance(i, SourceItem)]
    assert questions == [i.question for i in again if isinstance(i, SourceItem)]
    assert len(set(questions)) > len(fw.ITEM_RELATIONS)  # not always the first template
    for item in first:
        assert isinstance(item, SourceItem)
        assert item.question in fw.TRAIN_TEMPLATES[item.question_type]
