"""The annotation field tasks (`pipeline/fields/`), called directly: `format_input` against
the shipped prompt, `validate` and `parse` on good and malformed answers, the schedule of
`FIELD_TASKS`, the rules they share with QC (`pipeline/quality.py`), and a new field added
by one class and one prompt file, run by the real annotator against the loopback server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.annotate import PROMPTS_DIR, LLMAnnotator, LLMAnnotatorConfig, load_template
from pipeline.fields import FIELD_TASKS, levels
from pipeline.fields.base import FieldFailed, FieldTask, ItemInput, _Out, answer_problems, clean
from pipeline.fields.counterfact_type import CounterfactType, CounterfactTypeOut
from pipeline.fields.image_free_locality import ImageFreeLocality, ImageFreeLocalityOut
from pipeline.fields.image_object import ImageObject, LocalityImageObject, LocalityImageTrainObject
from pipeline.fields.locality import Locality, LocalityOut
from pipeline.fields.rephrases import Rephrases, rephrase_problems
from pipeline.fields.target import Target, TargetOut
from pipeline.fields.text_negatives import TextNegatives, TextNegativesOut, negative_problems
from pipeline.quality import check_record
from schemas.record import Annotation, ImageFreeQuestion, SourceItem, TextNegative
from tests.fixtures_servers import llm_server, okedit_responder, schema_name
from tests.records import make_record

QUESTION = "What brand is this computer?"
REPHRASES = [f"Which brand made this computer, take {i}?" for i in range(10)]
TRAIN = [f"Who manufactured this computer, version {i}?" for i in range(3)]


def config(**changes: Any) -> LLMAnnotatorConfig:
    # no image-free question from the LLM: building that task would load MiniLM
    return LLMAnnotatorConfig(image_free_locality=False, **changes)


def item(answers: list[str] | None = None) -> SourceItem:
    return SourceItem(
        item_id="fields-1",
        source="okvqa/val2014",
        question_id="1",
        image_id="1",
        question_type="brands",
        question=QUESTION,
        answers=["dell", " 'dell' ", "Dell computer", ""] if answers is None else answers,
        image=b"\xff\xd8fake",
    )


def filled() -> ItemInput:
    """The item after every field before the last level is filled."""
    return ItemInput.of(item()).with_values(
        {
            "image_object": "a Dell laptop",
            "target": "apple",
            "rephrases": REPHRASES,
            "rephrases_train": TRAIN,
            "locality_answer": "lenovo",
            "locality_answer_train": "asus",
        }
    )


# --------------------------------------------------------------------------- the item input


def test_item_input_cleans_the_answers_and_lists_them_once() -> None:
    inp = ItemInput.of(item())
    assert inp.answers == ["dell", "dell", "Dell computer"]
    assert (inp.answer, inp.answers_text) == ("dell", "dell; Dell computer")


def test_an_item_without_answers_fails_as_the_answers_field() -> None:
    with pytest.raises(FieldFailed, match="^answers: validation: the source item has no answer$"):
        ItemInput.of(item(answers=[" ", "''"]))


# --------------------------------------------------------------------------- format_input


@pytest.mark.parametrize("task_type", FIELD_TASKS, ids=lambda t: t.__name__)
def test_format_input_fills_every_placeholder_of_the_shipped_prompt(
    task_type: type[FieldTask],
) -> None:
    task = task_type(config())
    messages = load_template(task.template_id).render(**task.format_input(filled()))
    user = messages[1]["content"]
    assert QUESTION in user and "{" not in user, user


def test_each_image_object_asks_for_its_own_answer() -> None:
    inp, cfg = filled(), config()
    answers = [t(cfg).format_input(inp)["answer"] for t in (ImageObject, LocalityImageObject)]
    answers.append(LocalityImageTrainObject(cfg).format_input(inp)["answer"])
    assert answers == ["dell", "lenovo", "asus"]


def test_counted_fields_ask_for_the_configured_counts() -> None:
    cfg = config(n_rephrases=4, n_rephrases_train=2, n_text_negatives=5)
    rephrases = Rephrases(cfg).schema().model_json_schema()["properties"]
    assert (rephrases["rephrases"]["minItems"], rephrases["rephrases_train"]["maxItems"]) == (4, 2)
    assert Rephrases(cfg).format_input(filled())["n_eval"] == 4
    negatives = TextNegatives(cfg).schema().model_json_schema()["properties"]
    assert negatives["text_negatives"]["minItems"] == 5


# --------------------------------------------------------------------------- validate / parse


def test_target_is_cleaned_and_must_differ_from_every_answer_once_normalised() -> None:
    task, inp = Target(config()), filled()
    assert task.parse(TargetOut(target='  "Apple"  '), inp) == {"target": "Apple"}
    assert task.validate(TargetOut(target="Apple"), inp) == []
    # articles, case and punctuation do not make a new answer
    assert task.validate(TargetOut(target="The DELL computer."), inp) == [
        "target 'The DELL computer.' repeats a forbidden answer"
    ]
    assert task.validate(TargetOut(target=" '' "), inp) == ["target is empty"]


def test_a_malformed_answer_does_not_parse_into_the_schema() -> None:
    with pytest.raises(ValidationError):
        TargetOut.model_validate_json('{"target": "apple", "why": "extra key"}')
    with pytest.raises(ValidationError):
        CounterfactTypeOut.model_validate_json('{"counterfact_type": "both", "reason": "x"}')
    with pytest.raises(ValidationError):
        Rephrases(config()).schema().model_validate_json(
            '{"rephrases": "one", "rephrases_train": []}'
        )


def test_rephrases_are_deduplicated_by_the_answer_normaliser() -> None:
    task, inp = Rephrases(config(n_rephrases=3, n_rephrases_train=2)), filled()
    out = task.schema()(
        rephrases=["Which brand is it?", "which brand is it", "Who made it?", "  ", "Whose is it?"],
        rephrases_train=["WHO MADE IT", "Which company built it?", "Name the maker?", "x?"],
    )
    assert task.parse(out, inp) == {
        "rephrases": ["Which brand is it?", "Who made it?", "Whose is it?"],
        "rephrases_train": ["Which company built it?", "Name the maker?"],
    }
    assert task.validate(out, inp) == []


def test_rephrases_too_few_repeating_the_question_or_leaking_an_answer_are_re_asked() -> None:
    task, inp = Rephrases(config(n_rephrases=3, n_rephrases_train=1)), filled()
    out = task.schema()(
        rephrases=["what brand is this computer", "Is this an Apple computer?"],
        rephrases_train=["Which maker is it?"],
    )
    assert task.validate(out, inp) == [
        "2 distinct rephrases, need 3",
        "a rephrase repeats the question",
        "a rephrase mentions the answer 'apple'",
    ]


def test_locality_answers_must_be_new_and_differ_from_each_other() -> None:
    task, inp = Locality(config()), filled()
    good = LocalityOut(locality_answer=" Lenovo ", locality_answer_train="'asus'")
    assert task.validate(good, inp) == []
    assert task.parse(good, inp) == {"locality_answer": "Lenovo", "locality_answer_train": "asus"}
    # "an Apple" is the target B once articles and case are dropped
    target = LocalityOut(locality_answer="an Apple", locality_answer_train="hp")
    assert task.validate(target, inp) == ["C 'an Apple' repeats a forbidden answer"]
    same = LocalityOut(locality_answer="lenovo", locality_answer_train="The Lenovo")
    assert task.validate(same, inp) == ["D 'The Lenovo' repeats a forbidden answer"]


def test_votes_keep_the_majority_of_all_votes_asked() -> None:
    task, inp = CounterfactType(config(n_votes=3)), filled()
    text = CounterfactTypeOut(counterfact_type="text", reason=" same object ")
    image = CounterfactTypeOut(counterfact_type="image-text", reason="looks different")
    assert task.combine([text, image, text], [], inp) == {
        "counterfact_type": "text",
        "counterfact_reason": "same object",
        "counterfact_votes": ["text", "image-text", "text"],
    }
    assert task.validate(CounterfactTypeOut(counterfact_type="text", reason=" "), inp)
    lost = [FieldFailed("counterfact_votes[2]", "rate_limited", "429")]
    with pytest.raises(FieldFailed) as failed:
        task.combine([text, image], lost, inp)
    assert str(failed.value) == (
        "counterfact_type: rate_limited: no majority in votes ['text', 'image-text']; "
        "failed: ['rate_limited: 429']"
    )
    assert failed.value.transient
    assert task.provenance_fields(1) == ["counterfact_votes[1]"]


def test_text_negatives_dedup_cut_to_k_and_must_not_repeat_a_rephrase() -> None:
    task, inp = TextNegatives(config(n_text_negatives=2)), filled()
    out = TextNegativesOut.model_validate(
        {
            "text_negatives": [
                {"question": "What color is this computer?", "answer": " silver "},
                {"question": "what colour is this computer", "answer": "grey"},
                {"question": "WHAT COLOR IS THIS COMPUTER", "answer": "black"},
                {"question": "How old is this computer?", "answer": "'two'"},
                {"question": "What OS does it run?", "answer": "windows"},
            ]
        }
    )
    assert task.parse(out, inp)["text_negatives"] == [
        TextNegative(question="What color is this computer?", answer="silver"),
        TextNegative(question="what colour is this computer", answer="grey"),
    ]
    assert task.validate(out, inp) == []
    repeat = TextNegativesOut.model_validate(
        {"text_negatives": [{"question": "which brand made this computer take 3", "answer": "x"}]}
    )
    assert task.validate(repeat, inp) == [
        "1 text negatives, need 2",
        "a text negative repeats the question or a rephrase",
    ]


def test_no_text_negatives_asked_for_needs_no_request() -> None:
    filled_values = TextNegatives(config(n_text_negatives=0)).without_request(filled())
    assert filled_values is not None and filled_values.values == {"text_negatives": []}
    assert TextNegatives(config()).without_request(filled()) is None


def test_image_free_question_from_a_file_or_switched_off(tmp_path: Path) -> None:
    assert ImageFreeLocality(config()).without_request(filled()).values == {  # type: ignore[union-attr]
        "image_free_locality": None
    }
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"question": "Which planet is largest?", "answer": "Apple"})
        + "\n"
        + json.dumps({"question": "What is the capital of Peru?", "answer": "lima", "source": "nq"})
        + "\n",
        encoding="utf-8",
    )
    task = ImageFreeLocality(config(text_locality_file=pairs, text_locality_seed=7))
    result = task.without_request(filled())
    assert result is not None
    # the pair answering with the target ("apple") is skipped
    assert result.values == {
        "image_free_locality": ImageFreeQuestion(
            question="What is the capital of Peru?", answer="lima"
        )
    }
    (provenance,) = result.provenance
    assert (provenance.field, provenance.backend, provenance.seed) == (
        "image_free_locality",
        "text-locality-file",
        7,
    )
    assert json.loads(provenance.params)["line"] == 2


def test_image_free_question_must_not_point_at_an_image_or_reuse_an_answer() -> None:
    task, inp = ImageFreeLocality(config()), filled()
    out = ImageFreeLocalityOut(question="What is in this picture?", answer="The Apple")
    assert task.validate(out, inp) == [
        "image-free answer 'The Apple' repeats a forbidden answer",
        "image-free question refers to an image ('this')",
    ]
    good = ImageFreeLocalityOut(question=" 'Who wrote Hamlet?' ", answer="Shakespeare")
    assert task.parse(good, inp) == {
        "image_free_locality": ImageFreeQuestion(question="Who wrote Hamlet?", answer="Shakespeare")
    }


# --------------------------------------------------------------------------- the schedule


def test_registered_fields_run_in_three_levels_in_request_order() -> None:
    cfg = config()
    names = [[t.name for t in level] for level in levels([t(cfg) for t in FIELD_TASKS])]
    assert names == [
        ["image_object", "target"],
        ["counterfact_type", "rephrases", "locality_answer"],
        [
            "locality_image_object",
            "locality_image_train_object",
            "text_negatives",
            "image_free_locality",
        ],
    ]


def test_a_field_registered_before_what_it_needs_is_refused() -> None:
    cfg = config()
    with pytest.raises(ValueError, match="'rephrases' needs \\['target'\\]"):
        levels([Rephrases(cfg), Target(cfg)])


# --------------------------------------------------------------------------- one rule set with QC

# the question of tests.records.make_record, as an LLM might echo it
RECORD_QUESTION = "what is the capital of the country with this flag?"
ECHOES = [
    "What is the capital of the country with this flag",
    "what is THE capital of a country with this flag ?",
    "what is the capital of the country with these flags?",  # a different question
]


@pytest.mark.parametrize("echo", ECHOES)
def test_annotator_and_qc_agree_on_a_rephrase_repeating_the_question(echo: str) -> None:
    rephrases = [f"rephrase number {i}?" for i in range(9)] + [echo]
    train = [f"training rephrase {i}?" for i in range(3)]
    at_annotate = "a rephrase repeats the question" in rephrase_problems(
        RECORD_QUESTION, rephrases, train, 10, 3, []
    )
    reasons = check_record(make_record(rephrases=rephrases))
    at_qc = "a rephrase repeats the question" in reasons
    assert at_annotate == at_qc == (echo != ECHOES[2]), reasons


@pytest.mark.parametrize("echo", ["Rephrase Number 4", "rephrase number four?", "rephrase 4?"])
def test_annotator_and_qc_agree_on_overlapping_rephrase_sets(echo: str) -> None:
    rephrases = [f"rephrase number {i}?" for i in range(10)]
    train = ["training rephrase 0?", "training rephrase 1?", echo]
    at_annotate = "training rephrases overlap the evaluation rephrases" in rephrase_problems(
        RECORD_QUESTION, rephrases, train, 10, 3, []
    )
    at_qc = "rephrases and rephrases_train overlap" in check_record(
        make_record(rephrases_train=train)
    )
    assert at_annotate == at_qc == (echo != "rephrase 4?")


@pytest.mark.parametrize("echo", ["Rephrase number 2", RECORD_QUESTION.upper(), "what flag?"])
def test_annotator_and_qc_agree_on_a_negative_repeating_a_rephrase(echo: str) -> None:
    record = make_record(text_negatives=[TextNegative(question=echo, answer="euro")])
    rule = "a text negative repeats the question or a rephrase"
    rephrases = record.rephrases + record.rephrases_train
    at_annotate = rule in negative_problems(record.question, rephrases, record.text_negatives, 1)
    assert at_annotate == (rule in check_record(record)) == (echo != "what flag?")


@pytest.mark.parametrize("target", ["The Paris.", "PARIS", "lyon"])
def test_annotator_and_qc_agree_on_a_target_repeating_an_answer(target: str) -> None:
    record = make_record(target=target)
    at_annotate = bool(answer_problems(target, record.answers, "target"))
    at_qc = "target is one of the original answers" in check_record(record)
    assert at_annotate == at_qc == (target != "lyon")


# --------------------------------------------------------------------------- a new field


class MoodOut(_Out):
    mood: str


class Mood(FieldTask):
    """A field added by one class (and its prompt file): the mood of the counterfactual."""

    template_id = "mood"
    fills = ("mood",)
    needs = ("target",)

    def schema(self) -> type[MoodOut]:
        return MoodOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        return {"question": inp.question, "target": inp.values["target"]}

    def validate(self, out: MoodOut, inp: ItemInput) -> list[str]:
        return [] if clean(out.mood) else ["empty mood"]

    def parse(self, out: MoodOut, inp: ItemInput) -> dict[str, Any]:
        return {"mood": clean(out.mood)}


class MoodAnnotation(Annotation):
    mood: str  # in a real field: a line in schemas/record.py


MOOD_PROMPT = {
    "id": "mood",
    "version": "1",
    "system": "Say in one word how the counterfactual answer feels.",
    "user": "Question: {question}\nCounterfactual: {target}",
}


def test_a_new_field_is_one_task_and_one_prompt_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    (prompts / "mood.yaml").write_text(json.dumps(MOOD_PROMPT), encoding="utf-8")
    asked: list[int] = []

    def responder(body: dict[str, Any]) -> str:
        if schema_name(body) != "MoodOut":
            return okedit_responder(body)
        asked.append(len(asked))
        return json.dumps({"mood": " " if len(asked) == 1 else " 'Cheerful' "})  # re-asked once

    with llm_server(responder=responder) as server:
        llm = {"base_url": server.url, "model": "fake-model", "api_key": "sk-fields"}
        llm["cache_path"] = str(tmp_path / "llm.sqlite")
        cfg = config(llm=llm | {"concurrency": 1, "max_retries": 0}, prompts_dir=prompts)
        annotator = LLMAnnotator(cfg, fields=(*FIELD_TASKS, Mood), record=MoodAnnotation)
        (result,) = annotator.annotate([item()])
        requests = server.log.requests

    assert isinstance(result, MoodAnnotation), result
    assert result.mood == "Cheerful"
    assert [t.name for t in annotator.levels[-1]][-1] == "mood"  # needs B: the last level
    assert requests == 10 + 2  # the shipped fields, then the mood asked twice
    (mood,) = [p for p in result.provenance if p.field == "mood"]
    assert (mood.template_id, mood.template_version) == ("mood", "1")
    assert json.loads(mood.params)["attempt"] == 1
