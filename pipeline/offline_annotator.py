"""The offline annotator for flagworld items (design §5, "Offline backend").

It derives every `Annotation` field from the world's knowledge table, its look-alike groups
and its question templates, deterministically from a seed, so the whole pipeline runs with
no network and no LLM. Choices:

- target: a counterfactual of the same kind that is never a true answer of the item's flag
  or of any of its look-alikes (so an edit cannot coincide with a near-miss fact):
  capital -> a counterfactual city (`COUNTERFACTUAL_CITIES`) or another country's capital
  on the same continent; continent -> another continent; currency/language -> one used by
  another country, on the same continent where possible.
- counterfact_type: always "text" (the flag is unchanged; a fact about its country changes).
- rephrases_train: the relation's other training templates; rephrases: the paraphrase
  templates (held-out ones first). Disjoint from each other and from the question by
  construction (see the flagworld module docstring).
- locality (C): the same relation's answer for a look-alike flag, C not in {answers, target};
  an item whose look-alikes all share its answer is rejected.
- locality_train (D): from another look-alike with an answer not in {answers, C}; when the
  group has no such second member (groups of 2, or shared answers) it falls back to a flag
  of another group, chosen by seed, with such an answer (recorded as `"fallback": true` in
  the provenance params).
- text_negatives: the other relations asked about the same flag with the same opener/object
  cell as the question (so the wording is close), answered with the true answer; negatives
  whose answer equals the target are skipped.
- image_free_locality (EasyEdit's `loc`/`loc_ans`): an image-free question about another
  country, named in the question and outside the flag's look-alike group, on a relation
  drawn by seed ("what is the currency of peru?" -> "sol"), in one of
  `TEXT_LOCALITY_TEMPLATES` (wordings the tiny VLM is trained on); its answer is neither an
  answer of the item nor its target. Different per item: drawn from 45 countries x 4
  relations x 4 wordings.

Answers are written as VQA answers are: lower case, words separated by spaces
("mexico city", "us dollar"), as `flagworld.answer` gives them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from pipeline.sources import flagworld as fw
from schemas.record import (
    Annotation,
    FieldProvenance,
    ImageFreeQuestion,
    Rejection,
    SourceItem,
    TextNegative,
)

BACKEND = "flagworld-offline"


class AnnotationError(ValueError):
    """An item whose annotation constraints cannot be met; the message is the reason."""


def _norm(text: str) -> str:
    return text.strip().lower().replace("_", " ")


@dataclass
class _Choice:
    """One generated field value and the parameters that explain it (for provenance)."""

    value: Any  # str, list[str] or list[TextNegative], as the field
    params: dict[str, Any]


class FlagworldAnnotator:
    """Annotates flagworld `SourceItem`s (question_type = relation, image_id = country code)."""

    name = BACKEND
    version = "2"

    def __init__(
        self,
        seed: int = 0,
        n_rephrases: int = 10,
        n_rephrases_train: int = 3,
        min_text_negatives: int = 2,
    ) -> None:
        self.seed = seed
        self.n_rephrases = n_rephrases
        self.n_rephrases_train = n_rephrases_train
        self.min_text_negatives = min_text_negatives

    def annotate(self, items: list[SourceItem]) -> list[Annotation | Rejection]:
        out: list[Annotation | Rejection] = []
        for item in items:
            try:
                out.append(self.annotate_one(item))
            except AnnotationError as exc:
                out.append(Rejection(item_id=item.item_id, stage="annotate", reason=str(exc)))
        return out

    # -- one item ------------------------------------------------------------------------

    def annotate_one(self, item: SourceItem) -> Annotation:
        """Annotate one item; raises `AnnotationError` when its constraints cannot be met."""
        code, relation = self._parse(item)
        answers = {_norm(a) for a in item.answers}
        loc = self._locality(item, code, relation, answers)
        loc_train = self._locality_train(item, code, relation, answers, loc)
        target = self._target(item, code, relation, answers, {loc.value, loc_train.value})
        rephrases_train = self._rephrases_train(item, relation)
        rephrases = self._rephrases(item, relation, rephrases_train.value)
        negatives = self._text_negatives(item, code, relation, target.value)
        image_free = self._image_free_locality(item, code, answers | {_norm(target.value)})
        reason = (
            f"The image still shows {fw.flag_object(code)}; only a fact about its country "
            f"({relation}) changes, so the counterfactual is about text, not the object."
        )
        fields: dict[str, _Choice] = {
            "image_object": _Choice(fw.flag_object(code), {"country": code}),
            "target": target,
            "counterfact_type": _Choice("text", {"rule": "relation about an unchanged flag"}),
            "counterfact_votes": _Choice(["text"] * 3, {"votes": 3}),
            "counterfact_reason": _Choice(reason, {}),
            "rephrases": rephrases,
            "rephrases_train": rephrases_train,
            "locality_answer": _Choice(loc.value, loc.params),
            "locality_image_object": _Choice(fw.flag_object(loc.params["country"]), loc.params),
            "locality_answer_train": _Choice(loc_train.value, loc_train.params),
            "locality_image_train_object": _Choice(
                fw.flag_object(loc_train.params["country"]), loc_train.params
            ),
            "text_negatives": negatives,
            "image_free_locality": image_free,
        }
        annotation = Annotation(
            item_id=item.item_id,
            **{name: choice.value for name, choice in fields.items()},
            provenance=[self._provenance(item, name, c.params) for name, c in fields.items()],
        )
        _check(annotation, item)
        return annotation

    def _parse(self, item: SourceItem) -> tuple[str, str]:
        code, relation = item.image_id, item.question_type
        if code not in fw.COUNTRY_BY_CODE:
            raise AnnotationError(f"image_id {code!r} is not a flagworld country code")
        if relation not in fw.ITEM_RELATIONS:
            raise AnnotationError(
                f"question_type {relation!r} is not a flagworld relation {fw.ITEM_RELATIONS}"
            )
        return code, relation

    def _rng(self, item: SourceItem, field: str) -> random.Random:
        # Seeded per item and field: a result never depends on the batch it came in.
        return random.Random(f"{self.seed}:{item.item_id}:{field}")

    def _provenance(self, item: SourceItem, field: str, params: dict[str, Any]) -> FieldProvenance:
        # The hash names the inputs (as an LLM request hash would); no timestamp, so that
        # re-runs are byte-identical.
        request = {"backend": BACKEND, "version": self.version, "seed": self.seed,
                   "item": item.item_id, "question": item.question, "field": field}  # fmt: skip
        return FieldProvenance(
            field=field,
            backend=BACKEND,
            template_id=f"flagworld/{field}",
            template_version=self.version,  # bump with any rule or template change
            seed=self.seed,
            params=json.dumps(params, sort_keys=True),
            request_hash=hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest(),
        )

    # -- locality ------------------------------------------------------------------------

    def _locality(self, item: SourceItem, code: str, relation: str, answers: set[str]) -> _Choice:
        """C: a look-alike flag's answer to the same question, different from the answers."""
        options = [c for c in fw.lookalikes(code) if _norm(fw.answer(c, relation)) not in answers]
        if not options:
            shared = fw.answer(code, relation)
            raise AnnotationError(
                f"no look-alike of {code} ({', '.join(fw.lookalikes(code))}) has a {relation} "
                f"other than {shared!r}: no near-miss image with a different answer"
            )
        country = self._rng(item, "locality").choice(options)
        return _Choice(
            fw.answer(country, relation),
            {"country": country, "relation": relation, "candidates": options},
        )

    def _locality_train(
        self, item: SourceItem, code: str, relation: str, answers: set[str], loc: _Choice
    ) -> _Choice:
        """D: another look-alike's answer, else (documented fallback) another group's flag."""
        taken = answers | {_norm(loc.value)}
        rng = self._rng(item, "locality_train")

        def ok(c: str) -> bool:
            return c != loc.params["country"] and _norm(fw.answer(c, relation)) not in taken

        options = [c for c in fw.lookalikes(code) if ok(c)]
        fallback = not options
        if fallback:
            group = {code, *fw.lookalikes(code)}
            options = [c.code for c in fw.COUNTRIES if c.code not in group and ok(c.code)]
        if not options:
            raise AnnotationError(f"no flag has a {relation} outside {sorted(taken)}")
        country = rng.choice(options)
        return _Choice(
            fw.answer(country, relation),
            {"country": country, "relation": relation, "fallback": fallback},
        )

    # -- target --------------------------------------------------------------------------

    def _target(
        self, item: SourceItem, code: str, relation: str, answers: set[str], taken: set[str]
    ) -> _Choice:
        """A counterfactual answer of the same kind, never true for this flag's group."""
        group = [code, *fw.lookalikes(code)]
        excluded = answers | {_norm(t) for t in taken}
        excluded |= {_norm(fw.answer(c, relation)) for c in group}
        continent = fw.COUNTRY_BY_CODE[code].continent
        near, far = _target_pool(relation, continent)
        near = [v for v in near if _norm(v) not in excluded]
        far = [v for v in far if _norm(v) not in excluded]
        pool = near or far
        if not pool:
            raise AnnotationError(f"no counterfactual {relation} left for {code}")
        return _Choice(
            self._rng(item, "target").choice(pool),
            {"relation": relation, "same_continent": bool(near), "candidates": len(pool)},
        )

    # -- wording -------------------------------------------------------------------------

    def _rephrases_train(self, item: SourceItem, relation: str) -> _Choice:
        options = [t for t in fw.TRAIN_TEMPLATES[relation] if t != item.question]
        if len(options) < self.n_rephrases_train:
            raise AnnotationError(
                f"only {len(options)} training templates differ from the question; "
                f"{self.n_rephrases_train} needed"
            )
        chosen = self._rng(item, "rephrases_train").sample(options, self.n_rephrases_train)
        return _Choice(chosen, {"pool": "TRAIN_TEMPLATES", "relation": relation})

    def _rephrases(self, item: SourceItem, relation: str, train: list[str]) -> _Choice:
        used = {item.question, *train}
        options = [t for t in fw.PARAPHRASE_TEMPLATES[relation] if t not in used]
        heldout = [t for t in options if t in fw.HELDOUT_TEMPLATES[relation]]
        rest = [t for t in options if t not in heldout]
        n_rest = self.n_rephrases - len(heldout)
        if n_rest < 0 or len(rest) < n_rest:
            raise AnnotationError(
                f"{len(options)} paraphrase templates available; {self.n_rephrases} needed"
            )
        chosen = heldout + self._rng(item, "rephrases").sample(rest, n_rest)
        return _Choice(
            chosen, {"pool": "PARAPHRASE_TEMPLATES", "heldout": len(heldout), "relation": relation}
        )

    def _text_negatives(self, item: SourceItem, code: str, relation: str, target: str) -> _Choice:
        """Other relations on the same flag in the question's own opener/object cell."""
        train = fw.TRAIN_TEMPLATES[relation]
        cell = train.index(item.question) if item.question in train else 0
        others = [r for r in (*fw.ITEM_RELATIONS, "country") if r != relation]
        negatives = [
            TextNegative(question=fw.TRAIN_TEMPLATES[r][cell], answer=fw.answer(code, r))
            for r in others
            if _norm(fw.answer(code, r)) != _norm(target)
        ]
        if len(negatives) < self.min_text_negatives:
            raise AnnotationError(
                f"only {len(negatives)} text negatives differ from the target; "
                f"{self.min_text_negatives} needed"
            )
        return _Choice(negatives, {"relations": others, "template_cell": cell})

    def _image_free_locality(self, item: SourceItem, code: str, taken: set[str]) -> _Choice:
        """An image-free question about a named country outside the flag's look-alike group
        (EasyEdit's `loc`), whose answer is not in `taken` (the answers and the target)."""
        group = {code, *fw.lookalikes(code)}
        options = [
            (c.code, relation, template)
            for c in fw.COUNTRIES
            if c.code not in group
            for relation in fw.ITEM_RELATIONS
            if _norm(fw.answer(c.code, relation)) not in taken
            for template in fw.TEXT_LOCALITY_TEMPLATES[relation]
        ]
        if not options:
            raise AnnotationError("no image-free locality question with an answer of its own")
        country, relation, template = self._rng(item, "image_free_locality").choice(options)
        question = ImageFreeQuestion(
            question=fw.text_question(template, country), answer=fw.answer(country, relation)
        )
        return _Choice(question, {"country": country, "relation": relation, "template": template})


def _target_pool(relation: str, continent: str) -> tuple[list[str], list[str]]:
    """Counterfactual candidates for a relation, written as answers: (same continent,
    anywhere), each sorted. `continent` as the knowledge table writes it."""
    if relation == "continent":
        return [], sorted({fw.answer(c.code, "continent") for c in fw.COUNTRIES})
    if relation == "capital":
        cities = {city.lower() for city, cont in fw.CITY_CONTINENTS.items() if cont == continent}
        capitals = {fw.answer(c.code, "capital") for c in fw.COUNTRIES if c.continent == continent}
        return sorted(cities | capitals), sorted(set(fw.COUNTERFACTUAL_CITIES))
    near = {fw.answer(c.code, relation) for c in fw.COUNTRIES if c.continent == continent}
    return sorted(near), sorted({fw.answer(c.code, relation) for c in fw.COUNTRIES})


def _check(annotation: Annotation, item: SourceItem) -> None:
    """The constraints of design §3/§5, checked again on the finished annotation."""
    answers = {_norm(a) for a in item.answers}
    target = _norm(annotation.target)
    c, d = _norm(annotation.locality_answer), _norm(annotation.locality_answer_train)
    problems = []
    if target in answers:
        problems.append("target is an original answer")
    if c in answers or c == target:
        problems.append("locality_answer is an original answer or the target")
    if d in answers or d in (target, c):
        problems.append("locality_answer_train repeats an answer, the target or C")
    wordings = [item.question, *annotation.rephrases, *annotation.rephrases_train]
    if len(set(wordings)) != len(wordings):
        problems.append("rephrases overlap each other or the question")
    if any(n.question == item.question for n in annotation.text_negatives):
        problems.append("a text negative repeats the question")
    if problems:
        raise AnnotationError("; ".join(problems))
