"""The offline flagworld annotator: every field filled, every constraint kept."""

from __future__ import annotations

import json

import pytest

from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.sources import flagworld as fw
from schemas.record import Annotation, Rejection, SourceItem

GENERATED_FIELDS = set(Annotation.model_fields) - {"item_id", "provenance"}


@pytest.fixture(scope="module")
def items() -> list[SourceItem]:
    source = fw.FlagworldSource()
    loaded = source.load_items(source.list_ids(None, seed=0))
    assert all(isinstance(i, SourceItem) for i in loaded)
    return loaded  # type: ignore[return-value]


@pytest.fixture(scope="module")
def results(items: list[SourceItem]) -> list[Annotation | Rejection]:
    return FlagworldAnnotator(seed=0).annotate(items)


def _accepted(items, results) -> list[tuple[SourceItem, Annotation]]:
    return [(i, r) for i, r in zip(items, results, strict=True) if isinstance(r, Annotation)]


def test_one_result_per_item_in_order(items, results) -> None:
    assert [r.item_id for r in results] == [i.item_id for i in items]
    accepted = _accepted(items, results)
    by_relation = {rel: 0 for rel in fw.ITEM_RELATIONS}
    for item, _ in accepted:
        by_relation[item.question_type] += 1
    # Every capital has a look-alike with another capital; continents often share one.
    assert by_relation["capital"] == len(fw.COUNTRIES)
    assert 0 < by_relation["continent"] < len(fw.COUNTRIES)
    assert len(accepted) >= 0.8 * len(items)


def test_all_fields_filled_with_the_right_counts(items, results) -> None:
    for item, ann in _accepted(items, results):
        for name in GENERATED_FIELDS:
            assert getattr(ann, name), (item.item_id, name)
        assert ann.image_object == fw.flag_object(item.image_id)
        assert ann.counterfact_type == "text"
        assert ann.counterfact_votes == ["text"] * 3
        assert len(ann.rephrases) == 10
        assert len(ann.rephrases_train) >= 3
        assert len(ann.text_negatives) >= 2


def test_answers_target_and_locality_constraints(items, results) -> None:
    for item, ann in _accepted(items, results):
        code, relation = item.image_id, item.question_type
        answers = set(item.answers)
        group_answers = {fw.answer(c, relation) for c in [code, *fw.lookalikes(code)]}
        assert ann.target not in group_answers
        assert set(fw.words(ann.target)) <= set(fw.vocabulary())
        assert ann.target == ann.target.lower() and "_" not in ann.target
        assert ann.locality_answer not in answers | {ann.target}
        assert ann.locality_answer_train not in answers | {ann.target, ann.locality_answer}
        near = fw.country_for_object(ann.locality_image_object)
        assert near in fw.lookalikes(code)
        assert fw.answer(near, relation) == ann.locality_answer
        train = fw.country_for_object(ann.locality_image_train_object)
        assert train not in (code, near)
        assert fw.answer(train, relation) == ann.locality_answer_train


def test_capital_targets_stay_on_the_continent(items, results) -> None:
    for item, ann in _accepted(items, results):
        if item.question_type != "capital":
            continue
        continent = fw.COUNTRY_BY_CODE[item.image_id].continent
        cities = {city.lower(): cont for city, cont in fw.CITY_CONTINENTS.items()}
        capitals = {fw.answer(c.code, "capital"): c.continent for c in fw.COUNTRIES}
        assert {**cities, **capitals}[ann.target] == continent


def test_rephrases_are_disjoint_and_never_the_question(items, results) -> None:
    for item, ann in _accepted(items, results):
        relation = item.question_type
        assert item.question not in ann.rephrases + ann.rephrases_train
        assert not set(ann.rephrases) & set(ann.rephrases_train)
        assert len(set(ann.rephrases)) == len(ann.rephrases)
        assert set(ann.rephrases_train) <= set(fw.TRAIN_TEMPLATES[relation])
        assert set(ann.rephrases) <= set(fw.PARAPHRASE_TEMPLATES[relation])
        assert set(fw.HELDOUT_TEMPLATES[relation]) <= set(ann.rephrases)


def test_text_negatives_ask_other_relations_of_the_same_flag(items, results) -> None:
    for item, ann in _accepted(items, results):
        for negative in ann.text_negatives:
            assert negative.question != item.question
            assert negative.question not in ann.rephrases + ann.rephrases_train
            assert negative.answer != ann.target
            relation = next(r for r in fw.RELATIONS if negative.question in fw.TRAIN_TEMPLATES[r])
            assert relation != item.question_type
            assert negative.answer == fw.answer(item.image_id, relation)
    # Same opener/object cell: the wording stays close to the question.
    item, ann = next((i, a) for i, a in _accepted(items, results) if i.question_type == "capital")
    assert "what is the currency of the country with this flag?" in {
        n.question for n in ann.text_negatives
    }


def test_image_free_locality_asks_about_another_named_country(items, results) -> None:
    """EasyEdit's `loc`: self-contained, no image needed, another country's fact."""
    accepted = _accepted(items, results)
    for item, ann in accepted:
        free = ann.image_free_locality
        assert free is not None
        params = json.loads(
            next(p for p in ann.provenance if p.field == "image_free_locality").params
        )
        country, relation = params["country"], params["relation"]
        assert country not in (item.image_id, *fw.lookalikes(item.image_id))
        assert free.question == fw.text_question(params["template"], country)
        assert params["template"] in fw.TEXT_LOCALITY_TEMPLATES[relation]
        assert free.answer == fw.answer(country, relation)
        assert free.answer not in {*item.answers, ann.target}
        assert "flag" not in free.question and "this" not in free.question
    # The demo's first 35 items: a different question nearly every time.
    questions = [a.image_free_locality.question for _, a in accepted[:35]]
    assert len(set(questions)) >= 30


def test_provenance_one_entry_per_generated_field(items, results) -> None:
    for _, ann in _accepted(items, results):
        fields = [p.field for p in ann.provenance]
        assert sorted(fields) == sorted(GENERATED_FIELDS)
        for p in ann.provenance:
            assert p.backend == "flagworld-offline" and p.seed == 0
            assert p.template_id and p.template_version and len(p.request_hash) == 64
            assert isinstance(json.loads(p.params), dict)


def test_deterministic_by_seed(items, results) -> None:
    again = FlagworldAnnotator(seed=0).annotate(list(reversed(items)))
    assert list(reversed(again)) == results  # also independent of batch order
    other = FlagworldAnnotator(seed=1).annotate(items)
    assert [r.item_id for r in other] == [r.item_id for r in results]
    assert other != results


def test_impossible_items_are_rejected_with_a_reason(items, results) -> None:
    by_id = {r.item_id: r for r in results}
    # All of France's look-alikes are in Europe; Colombia's all speak Spanish.
    for item_id in ("flagworld-FR-continent", "flagworld-CO-language"):
        rejection = by_id[item_id]
        assert isinstance(rejection, Rejection)
        assert rejection.stage == "annotate" and "look-alike" in rejection.reason


def test_items_from_other_sources_are_rejected(items) -> None:
    item = items[0]
    foreign = item.model_copy(update={"item_id": "okvqa-1", "image_id": "12345"})
    odd = item.model_copy(update={"item_id": "flagworld-FR-anthem", "question_type": "anthem"})
    results = FlagworldAnnotator().annotate([foreign, odd])
    assert all(isinstance(r, Rejection) for r in results)
    assert "12345" in results[0].reason and "anthem" in results[1].reason


def test_a_question_outside_the_training_templates_still_gets_disjoint_wordings(items) -> None:
    item = next(i for i in items if i.question_type == "currency")
    custom = item.model_copy(update={"question": "which currency do they pay with here?"})
    (ann,) = FlagworldAnnotator().annotate([custom])
    assert isinstance(ann, Annotation)
    wordings = [custom.question, *ann.rephrases, *ann.rephrases_train]
    assert len(set(wordings)) == len(wordings)
