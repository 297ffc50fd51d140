"""The OKEDIT record (design §3) as pydantic models.

Images are stored as encoded bytes (PNG/JPEG) everywhere in the pipeline, so a record is
self-contained; `schemas.features` maps them to `datasets.Image()` columns.

Stage outputs are models too: `SourceItem` (gather), `Annotation` (annotate),
`ItemImages` (images); `OkeditRecord` joins them (build) and `Validation` is filled by the
validate stage. Free-form parameters are JSON strings so that every model maps onto one
fixed Arrow schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CounterfactType = Literal["image-text", "text"]
Verdict = Literal["not_run", "in_scope_ok", "out_of_scope_ok", "ok", "fail", "ambiguous", "error"]
# Is the item sound benchmark data (design §7.4)? Decided from the unedited model's answers,
# the annotation and text similarity, never from what the editor did.
CheckStatus = Literal["not_run", "sound", "unsound", "model_gap"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldProvenance(_Model):
    """How one generated field (or one image) was made."""

    field: str  # e.g. "target", "rephrases", "image_rephrases[3]"
    backend: str  # "flagworld-offline", "openai-chat", "render", "diffusers", ...
    model: str = ""  # model id; empty for rule-based backends
    template_id: str = ""
    template_version: str = ""
    seed: int | None = None
    params: str = "{}"  # JSON: temperature, steps, size, score, ...
    request_hash: str = ""
    timestamp: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextNegative(_Model):
    """A near-miss text probe: same image, close wording, a different fact."""

    question: str
    answer: str


class ImageFreeQuestion(_Model):
    """A self-contained question that needs no image, on a fact unrelated to the item, and
    its answer: EasyEdit's text locality (`loc`, `loc_ans`), which it asks with no image."""

    question: str
    answer: str


class SourceItem(_Model):
    """One knowledge-based VQA item as gathered from a source."""

    item_id: str
    source: str  # "okvqa/val2014", "flagworld", ...
    question_id: str
    image_id: str
    question_type: str  # OK-VQA knowledge category, or the flagworld relation
    question: str
    answers: list[str]
    image: bytes


class Annotation(_Model):
    """Everything the annotator writes for one item (design §5)."""

    item_id: str
    image_object: str
    target: str
    counterfact_type: CounterfactType
    counterfact_votes: list[str]
    counterfact_reason: str
    rephrases: list[str]
    rephrases_train: list[str]
    locality_answer: str
    locality_image_object: str
    locality_answer_train: str
    locality_image_train_object: str
    text_negatives: list[TextNegative]
    image_free_locality: ImageFreeQuestion | None = None
    provenance: list[FieldProvenance] = Field(default_factory=list)


class ItemImages(_Model):
    """The images stage output: positives, near-miss negatives and the training negative."""

    item_id: str
    image_rephrases: list[bytes]
    locality_images: list[bytes]
    locality_image_train: bytes
    provenance: list[FieldProvenance] = Field(default_factory=list)


class EditMetrics(_Model):
    """Per-item editing metrics (design §7.3); -1 marks 'not measured'."""

    reliability: float = -1.0
    text_generality: float = -1.0
    image_generality: float = -1.0
    locality_label: float = -1.0  # accuracy of C on near-miss images, edited model
    locality_agreement: float = -1.0  # top-k agreement with the unedited model
    text_locality_label: float = -1.0
    text_locality_agreement: float = -1.0
    hm: float = -1.0
    # VQA-normalised exact match of the edited model's greedy answer (-1: not generated)
    gen_reliability: float = -1.0
    gen_text_generality: float = -1.0
    gen_image_generality: float = -1.0
    gen_locality: float = -1.0  # near-miss images answer C
    gen_text_locality: float = -1.0  # text negatives keep their answer
    # top-1 agreement with the unedited model on the image-free question (EasyEdit's `loc`)
    image_free_locality: float = -1.0


class ProbeResult(_Model):
    """One probe of the scope check: where its key falls and what the model answers."""

    # edit | rephrase | image_rephrase | locality | text_negative | image_free_locality
    # (evaluated);
    # train_pos | train_neg | train_text_neg (set the radius)
    kind: str
    index: int
    distance: float  # d(key, probe key)
    routed: bool  # d <= epsilon
    expected: str  # the answer this probe should give after the edit
    pre_accuracy: float  # teacher-forced accuracy of `expected` on the clean model
    post_accuracy: float  # ... on the edited model
    agreement: float = -1.0  # top-k agreement clean vs edited (negatives only)
    pre_answer: str = ""  # greedy answer of the clean model ("" when not generated)
    post_answer: str = ""  # ... of the edited model
    pre_generation_match: float = -1.0  # VQA exact match of pre_answer with `expected`
    post_generation_match: float = -1.0

    @property
    def name(self) -> str:
        """`kind[index]`, as reasons and verdicts name a probe."""
        return f"{self.kind}[{self.index}]"


class CheckReason(_Model):
    """One finding of the item check: a code, the probe it is about, what was measured."""

    code: str  # see `pipeline.check.REASONS`
    probe: str = ""  # e.g. "image_rephrase[3]"; "" for the item as a whole
    measured: str = ""  # the measurement behind it, e.g. "clean answer 'rome' vs 'paris'"
    dropped: bool = False  # the probe was removed from the published item


class ItemCheck(_Model):
    """`check`: is this item sound benchmark data (design §7.4)?"""

    status: CheckStatus = "not_run"
    reasons: list[CheckReason] = Field(default_factory=list)
    clean_answer: str = ""  # the unedited model's greedy answer to the edit prompt
    knows_original: bool | None = None  # clean_answer matches a gold answer (VQA-normalised)


class FamilyScope(_Model):
    """Where one probe family fell relative to the radius, after the edit."""

    family: str  # edit | rephrase | image_rephrase | locality | text_negative
    probes: int = 0
    routed_share: float = -1.0
    median_relative_distance: float = -1.0  # median d/ε (1.0 = on the radius)


class EditSummary(_Model):
    """`edit`: what the editor did on this item: the benchmark figure, never a filter."""

    epsilon_set_by: str = ""  # the training negative that set ε (e.g. "train_text_neg")
    # min d/ε of the evaluated negatives minus max d/ε of the positives: > 0 means some radius
    # separates every positive from every negative in this key space
    margin: float = 0.0
    separable: bool = False
    families: list[FamilyScope] = Field(default_factory=list)


class Validation(_Model):
    """The validate stage's result for one item (design §7.4): the item `check` and the
    editor outcome (`verdict`, metrics, `edit`)."""

    check: ItemCheck = Field(default_factory=ItemCheck)
    edit: EditSummary = Field(default_factory=EditSummary)
    # the editor's scope verdict on this item (an editor outcome, not a property of the item)
    verdict: Verdict = "not_run"
    reason: str = ""
    in_scope_ok: bool = False
    out_of_scope_ok: bool = False
    editor: str = ""
    model: str = ""
    key_variant: str = ""
    epsilon: float = -1.0
    alpha: float = -1.0
    edit_config: str = "{}"  # JSON of the editor settings actually used (lr, steps, ...)
    metrics: EditMetrics = Field(default_factory=EditMetrics)
    probes: list[ProbeResult] = Field(default_factory=list)
    seconds: float = 0.0


class OkeditRecord(_Model):
    """One OKEDIT edit: the source item, its annotation, its images, its validation."""

    item_id: str
    source: str
    question_id: str
    image_id: str
    question_type: str
    image: bytes
    question: str
    answers: list[str]
    original_answer: str  # answers[0] as in the reference
    majority_answer: str  # the normalized most frequent answer
    image_object: str
    target: str
    counterfact_type: CounterfactType
    counterfact_votes: list[str]
    counterfact_reason: str
    rephrases: list[str]
    rephrases_train: list[str]
    image_rephrases: list[bytes]
    locality_answer: str
    locality_image_object: str
    locality_images: list[bytes]
    locality_answer_train: str
    locality_image_train_object: str
    locality_image_train: bytes
    text_negatives: list[TextNegative]
    # EasyEdit's `loc`/`loc_ans`; None in records built before it existed
    image_free_locality: ImageFreeQuestion | None = None
    provenance: list[FieldProvenance]
    validation: Validation = Field(default_factory=Validation)


class Rejection(_Model):
    """An item that did not make it, with the stage and the reason."""

    item_id: str
    stage: str
    reason: str
    # failed only on transient errors (429, 5xx, timeouts) after its retries: not a verdict
    # on the item; a re-run tries it again
    deferred: bool = False


IMAGE_FIELDS: tuple[str, ...] = ("image", "locality_image_train")
IMAGE_LIST_FIELDS: tuple[str, ...] = ("image_rephrases", "locality_images")
