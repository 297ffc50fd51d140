"""The item check (design §7.4): is an OKEDIT item sound benchmark data?

Decided from what the *unedited* model answers (the greedy pre-edit answers the validate
stage decodes for every probe), from the annotation and from text similarity (MiniLM,
`pipeline.similarity`) — never from what the editor did, which is the other outcome
(`Validation.verdict`, metrics and `Validation.edit`).

Rules, each a reason code in `REASONS`:
- the model knows the original fact (its clean answer to the edit prompt is a gold answer),
  else `model_gap`: the edit would insert a fact, not change one (kept, labelled);
- the target differs from every gold answer, and so does the near-miss answer C;
- each image rephrase shows the same thing: the model answers it as it answers the edit image;
- each near-miss image is really different: the model does not answer it with the original;
- each text rephrase asks the same thing: close in meaning to the question and, when the model
  knows the fact, answered as the edit prompt is;
- each text negative asks something else: not a paraphrase, a different expected answer, and
  not answered with the original answer.
Answer-based probe rules need a model that knows the fact; on a `model_gap` item only the
annotation and similarity rules run. A bad evaluation probe is dropped from the item and
recorded; more than `max_bad_share` bad probes in a family, an empty family, a bad training
probe (it sets the radius) or an item-level defect make the item `unsound` — except near
misses: when most of them (or the training one) are answered as the edit image, the model
cannot tell them apart, and the item is a `model_gap` (`near_miss_indistinct`), kept with
its near misses. Measured on planted defects and across render and model seeds in
docs/benchmarks.md (bench/defects.py, bench/check_stability.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from editors.metrics import generation_exact_match
from schemas.record import CheckReason, ItemCheck, OkeditRecord, ProbeResult, Rejection

FilterMode = Literal["none", "unsound", "model-gap"]

REASONS: dict[str, str] = {
    "model_gap": "the unedited model does not give a gold answer to the edit prompt",
    "no_answers": "no pre-edit answers were decoded (generate_answers is off): not checked",
    "target_is_gold": "the edit target is one of the gold answers",
    "near_miss_answer_is_gold": "the near-miss answer C is one of the gold answers",
    "image_rephrase_differs": "an image rephrase is answered differently from the edit image",
    "near_miss_looks_original": "a near-miss image is answered with the original answer",
    "rephrase_far": "a text rephrase is not close in meaning to the question",
    "rephrase_differs": "a text rephrase is answered differently from the edit prompt",
    "text_negative_paraphrase": "a text negative reads as a paraphrase of the question",
    "text_negative_same_fact": "a text negative expects or gets the original answer",
    "bad_training_probe": "a probe that sets the radius is itself bad",
    "near_miss_indistinct": "most near-miss images are answered as the edit image: this model "
    "cannot measure the item's locality (status model_gap)",
    "too_many_bad": "more than the allowed share of a probe family is bad",
    "family_empty": "a probe family has no usable probe",
}

# evaluated probe families whose bad probes are dropped; training probes map to a family's rule
FAMILIES = ("rephrase", "image_rephrase", "locality", "text_negative")
TRAINING_RULES = {
    "train_pos": "rephrase",
    "train_neg": "locality",
    "train_text_neg": "text_negative",
}


class CheckConfig(BaseModel):
    """Thresholds of the item check."""

    model_config = ConfigDict(extra="forbid")

    max_bad_share: float = Field(0.5, ge=0.0, le=1.0)  # above this a family makes it unsound
    text_similarity: bool = True  # MiniLM rules for rephrases and text negatives
    paraphrase_min_cos: float = Field(0.6, ge=-1.0, le=1.0)  # a rephrase below this is far
    negative_max_cos: float = Field(0.9, ge=-1.0, le=1.0)  # a text negative above this reads
    # as a paraphrase (flagworld 2: paraphrases of one relation 0.78-1.0, median 0.92;
    # questions about another relation of the same flag up to 0.88, median 0.69-0.78)
    # a text negative that expects the original answer and is this close asks the same fact
    same_fact_min_cos: float = Field(0.8, ge=-1.0, le=1.0)


class Similarity(Protocol):
    def cosine(self, a: list[str], b: list[str]) -> list[list[float]]: ...


@dataclass
class Finding:
    code: str
    probe: str
    measured: str


def _gold(record: OkeditRecord) -> list[str]:
    return [*record.answers, record.original_answer]


def item_findings(record: OkeditRecord) -> list[Finding]:
    """Defects of the annotation itself, independent of any model."""
    gold = _gold(record)
    found = []
    if generation_exact_match(record.target, gold):
        found.append(Finding("target_is_gold", "", f"target {record.target!r}"))
    if record.locality_images and generation_exact_match(record.locality_answer, gold):
        found.append(Finding("near_miss_answer_is_gold", "", f"C {record.locality_answer!r}"))
    return found


def probe_findings(
    record: OkeditRecord,
    probes: Sequence[ProbeResult],
    knows: bool,
    clean: str,
    cosines: dict[str, float],
    config: CheckConfig,
) -> list[Finding]:
    """One finding per bad probe (evaluated or training)."""
    gold = _gold(record)
    found = []
    for p in probes:
        rule = TRAINING_RULES.get(p.kind, p.kind)
        name, answer = p.name, p.pre_answer
        cos = cosines.get(name)
        if rule == "image_rephrase" and knows and not generation_exact_match(answer, clean):
            found.append(Finding("image_rephrase_differs", name, f"{answer!r} vs {clean!r}"))
        elif rule == "locality" and p.kind == "train_neg" and p.expected == record.target:
            continue  # the black/white negative of the paper is no near miss
        elif rule == "locality" and knows and generation_exact_match(answer, gold):
            found.append(Finding("near_miss_looks_original", name, f"answered {answer!r}"))
        elif rule == "rephrase" and cos is not None and cos < config.paraphrase_min_cos:
            found.append(Finding("rephrase_far", name, f"cos {cos:.2f}"))
        elif rule == "rephrase" and knows and not generation_exact_match(answer, clean):
            found.append(Finding("rephrase_differs", name, f"{answer!r} vs {clean!r}"))
        elif rule == "text_negative" and cos is not None and cos > config.negative_max_cos:
            found.append(Finding("text_negative_paraphrase", name, f"cos {cos:.2f}"))
        elif rule == "text_negative":
            finding = _text_negative_finding(p, gold, knows, cos, config)
            found += [finding] if finding else []
    return found


def _text_negative_finding(
    p: ProbeResult, gold: list[str], knows: bool, cos: float | None, config: CheckConfig
) -> Finding | None:
    """A text negative that asks the edit's fact again. Expecting the original answer is only
    a hint (another fact may share the string: the capital and the country "luxembourg"), so
    it counts when the wording is close too (or no similarity model can judge it); the model
    answering the original where the negative expects something else always counts."""
    name, expects_gold = p.name, bool(generation_exact_match(p.expected, gold))
    close = cos is None or cos >= config.same_fact_min_cos
    if expects_gold and close:
        measured = f"expects {p.expected!r}" + (f", cos {cos:.2f}" if cos is not None else "")
        return Finding("text_negative_same_fact", name, measured)
    if knows and not expects_gold and generation_exact_match(p.pre_answer, gold):
        return Finding("text_negative_same_fact", name, f"answered {p.pre_answer!r}")
    return None


def question_cosines(
    record: OkeditRecord, probes: Sequence[ProbeResult], similarity: Similarity | None
) -> dict[str, float]:
    """cos(question, probe question) of every text probe, by probe name ({} without a model)."""
    if similarity is None:
        return {}
    texts: dict[str, str] = {}
    for p in probes:
        if p.kind == "rephrase":
            texts[p.name] = record.rephrases[p.index]
        elif p.kind == "train_pos":
            texts[p.name] = record.rephrases_train[0]
        elif p.kind in ("text_negative", "train_text_neg"):
            texts[p.name] = record.text_negatives[p.index].question
    if not texts:
        return {}
    scores = similarity.cosine([record.question], list(texts.values()))[0]
    return dict(zip(texts, scores, strict=True))


def family_findings(
    probes: Sequence[ProbeResult], bad: set[str], config: CheckConfig
) -> list[Finding]:
    """Families with too many bad probes, or none left."""
    found = []
    for family in FAMILIES:
        members = [p.name for p in probes if p.kind == family]
        n_bad = sum(name in bad for name in members)
        measured = f"{n_bad} of {len(members)} bad"
        if members and n_bad == len(members):
            found.append(Finding("family_empty", family, measured))
        elif members and n_bad / len(members) > config.max_bad_share:
            found.append(Finding("too_many_bad", family, measured))
    return found


def check_item(
    record: OkeditRecord,
    probes: Sequence[ProbeResult],
    config: CheckConfig,
    similarity: Similarity | None = None,
) -> ItemCheck:
    """The check of one item from its probe results (with pre-edit answers)."""
    edit = next((p for p in probes if p.kind == "edit"), None)
    if edit is None or not any(p.pre_answer or p.pre_generation_match >= 0 for p in probes):
        return ItemCheck(status="not_run", reasons=[CheckReason(code="no_answers")])
    clean = edit.pre_answer
    knows = bool(generation_exact_match(clean, _gold(record)))
    findings = item_findings(record)
    if not knows:
        gold = record.original_answer
        findings.append(Finding("model_gap", "edit[0]", f"clean {clean!r}, gold {gold!r}"))
    cosines = question_cosines(record, probes, similarity)
    bad = probe_findings(record, probes, knows, clean, cosines, config)
    bad_names = {f.probe for f in bad}
    families = family_findings(probes, bad_names, config)
    training = [f for f in bad if f.probe.split("[")[0] in TRAINING_RULES]
    # near misses answered as the edit image: the model cannot tell them apart (look-alike
    # flags it confuses), or they show the edit's object; either way this model cannot
    # measure the item's locality, which is a gap of the model more than of the item
    indistinct = [f for f in [*families, *training] if _is_near_miss(f.probe)]
    defects = [f for f in [*families, *training] if f not in indistinct]
    annotation = [f for f in findings if f.code != "model_gap"]
    if annotation or defects:
        status = "unsound"
    elif not knows or indistinct:
        status = "model_gap"
    else:
        status = "sound"
    keep_near_misses = any(f in families for f in indistinct)
    reasons = [CheckReason(code=f.code, probe=f.probe, measured=f.measured) for f in findings]
    reasons += [
        CheckReason(
            code="bad_training_probe" if f in training else f.code,
            probe=f.probe,
            measured=f"{f.code}: {f.measured}" if f in training else f.measured,
            dropped=status != "unsound"
            and f not in training
            and not (keep_near_misses and _is_near_miss(f.probe)),
        )
        for f in bad
    ]
    reasons += [
        CheckReason(
            code="near_miss_indistinct" if f in indistinct else f.code,
            probe=f.probe,
            measured=f.measured,
        )
        for f in families
    ]
    return ItemCheck(status=status, reasons=reasons, clean_answer=clean, knows_original=knows)


def _is_near_miss(probe: str) -> bool:
    return probe.split("[")[0] in ("locality", "train_neg")


def dropped_probes(check: ItemCheck) -> set[str]:
    """Names (`kind[index]`) of the probes the check removed from the item."""
    return {r.probe for r in check.reasons if r.dropped}


def without_probes(record: OkeditRecord, dropped: set[str]) -> OkeditRecord:
    """`record` with the dropped evaluation probes removed from its lists."""
    if not dropped:
        return record

    def keep(kind: str, items: list) -> list:
        return [x for i, x in enumerate(items) if f"{kind}[{i}]" not in dropped]

    return record.model_copy(
        update={
            "rephrases": keep("rephrase", record.rephrases),
            "image_rephrases": keep("image_rephrase", record.image_rephrases),
            "locality_images": keep("locality", record.locality_images),
            "text_negatives": keep("text_negative", record.text_negatives),
        }
    )


def reindexed(probes: Sequence[ProbeResult], dropped: set[str]) -> list[ProbeResult]:
    """Probe results without the dropped probes, indices renumbered to the pruned lists
    (`train_text_neg` indexes `text_negatives`, so it follows the text negatives)."""
    removed = {
        kind: [int(n[len(kind) + 1 : -1]) for n in dropped if n.startswith(kind + "[")]
        for kind in FAMILIES
    }
    removed["train_text_neg"] = removed["text_negative"]
    return [
        p.model_copy(update={"index": p.index - sum(r < p.index for r in removed.get(p.kind, []))})
        for p in probes
        if p.name not in dropped
    ]


def dropped_statuses(mode: FilterMode) -> tuple[str, ...]:
    """The check statuses `--filter MODE` removes from the published set."""
    return {"none": (), "unsound": ("unsound",), "model-gap": ("unsound", "model_gap")}[mode]


def filter_by_check(
    records: list[OkeditRecord], mode: FilterMode
) -> tuple[list[OkeditRecord], list[Rejection]]:
    """(kept, rejections): the items whose check status `mode` drops become rejections of the
    validate stage, with their reason codes. Never filters on the editor outcome."""
    dropped = dropped_statuses(mode)
    kept = [r for r in records if r.validation.check.status not in dropped]
    rejected = [
        Rejection(item_id=r.item_id, stage="validate", reason=check_summary(r))
        for r in records
        if r.validation.check.status in dropped
    ]
    return kept, rejected


def check_summary(record: OkeditRecord) -> str:
    """`status: code probe (measured); ...` in one line, for rejections and tables."""
    check = record.validation.check
    parts = [
        " ".join(x for x in (reason.code, reason.probe) if x)
        + (f" ({reason.measured})" if reason.measured else "")
        for reason in check.reasons
        if not reason.dropped
    ]
    return f"{check.status}: " + ("; ".join(parts) if parts else "-")
