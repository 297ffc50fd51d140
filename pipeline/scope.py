"""The scope verdict of one OKEDIT item (design §7.4).

After editing a clean model with the item's edit, every probe is run on the clean and the
edited model, and its key's distance to the edit key and its routing are recorded:

* positives — the edit itself, each text rephrase, each image rephrase: must route to the
  edit and answer the target (teacher-forced, all target tokens right) -> `in_scope_ok`;
* negatives — each near-miss locality image (same question, expected answer C), each text
  negative (same image, another fact) and, when the record has one, the image-free locality
  question (EasyEdit's `loc`; on a grey stand-in image, see `IMAGE_FREE_COLOUR`): must route
  away or keep their answer (top-1 unchanged at every answer position) -> `out_of_scope_ok`;
* `ambiguous` — a negative is closer to the key than some positive of its family (usually a
  bad generated image or a paraphrase that changed the meaning): near-miss images are
  compared with the image rephrases, text negatives with the rephrases. Comparing across
  families (`EditorConfig.ambiguity="all"`) flags every flagworld item under the reference
  key, whose mean over all positions is dominated by the image: another question about the
  edit image sits nearer than a re-rendered flag (design §9).

Verdict: "ok" when both hold, else "ambiguous" (if so) or "fail", with a reason naming the
probes; "error" (with the cause) when the item cannot be validated. Training probes
(`train_pos` from `rephrases_train[0]`, `train_neg` from the negative that sets the radius)
are recorded too.

Key variants whose radius also stays inside a text negative (issue 7) need a *training* text
negative; OKEDIT records have no separate field for it, so one of `text_negatives` (the last,
`EditorConfig.train_text_negative`) becomes the `train_text_neg` probe and is left out of the
evaluated `text_negative` probes. For a multi-part key, `ProbeResult.distance` is the relative
distance max_p d_p / ε_p (routed iff ≤ 1) and `Validation.epsilon` is 1.

Several items may be validated together (`validate_items`, issue 17): their probes share the
clean forwards, their edits train side by side (each in its own codebook group, which routes
only that item's probes) and their answers decode in one batch, with the same results as one
item at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from editors.adapters.base import (
    Batch,
    Capture,
    ImageLike,
    TargetEncodingError,
    VLMAdapter,
    to_pil,
)
from editors.balancedit import BalancEdit
from editors.base import Editor, EditOutcome, EditRequest, Prompt, Routed
from editors.codebook import relative_distance
from editors.config import EditorConfig
from editors.decoding import greedy_answers
from editors.ft import FineTune
from editors.grace import Grace
from editors.metrics import (
    exact_match,
    generation_exact_match,
    item_metrics,
    token_accuracy,
    topk_agreement,
)
from schemas.record import OkeditRecord, ProbeResult, Validation

logger = logging.getLogger(__name__)

EDITORS: dict[str, type[Editor]] = {"balancedit": BalancEdit, "grace": Grace, "ft": FineTune}
POSITIVE_KINDS = ("edit", "rephrase", "image_rephrase")
RADIUS_KINDS = ("edit", "train_pos", "train_neg", "train_text_neg")  # EditRequest.rows() order
NEGATIVE_KINDS = ("locality", "text_negative", "image_free_locality")
MAX_REASONS = 5
# The image-free locality probe (EasyEdit's `loc`: a question on an unrelated fact asked with
# no image). Every adapter builds each row from an image, and a true text-only row would need
# batches that mix rows with and without images in every family (BLIP-2 always prepends its
# query tokens), so the question is asked on a plain mid-grey image, the closest to "no image"
# that every family accepts. The tiny flagworld VLM is trained to answer such questions with
# no image, this grey image or any flag alike (pipeline/tiny_model.py).
IMAGE_FREE_COLOUR = (128, 128, 128)


def image_free_image(size: tuple[int, int]) -> Image.Image:
    """The stand-in image of image-free probes: plain `IMAGE_FREE_COLOUR`, `size` (w, h)."""
    return Image.new("RGB", size, IMAGE_FREE_COLOUR)


class ScopeInputError(ValueError):
    """An item that cannot be validated as it stands (missing probes, empty target, ...)."""


@dataclass
class Probe:
    kind: str  # see ProbeResult.kind
    index: int
    image: ImageLike
    question: str
    expected: str  # the answer this probe should give after the edit
    role: Literal["positive", "negative", "train"]
    image_probe: bool  # agreement measured top-k for images, top-1 for text


def make_editor(adapter: VLMAdapter, config: EditorConfig) -> Editor:
    return EDITORS[config.editor](adapter, config)


def negative_prompt(record: OkeditRecord, config: EditorConfig) -> Prompt:
    """The negative that sets BalancEdit's radius: the item's training near-miss (question +
    `locality_image_train` -> `locality_answer_train`), or the edit question on a black/white
    image followed by the target or, as the authors' code does
    (`negative_answer="train_answer"`), by `locality_answer_train`."""
    if config.negative == "near_miss":
        if not record.locality_image_train or not record.locality_answer_train.strip():
            raise ScopeInputError(
                "no training negative: locality_image_train / locality_answer_train are empty "
                "(use negative='black' or 'white', or rebuild the item)"
            )
        return Prompt(record.locality_image_train, record.question, record.locality_answer_train)
    colour = (0, 0, 0) if config.negative == "black" else (255, 255, 255)
    plain = Image.new("RGB", to_pil(record.image).size, colour)
    if config.negative_answer == "target":
        return Prompt(plain, record.question, record.target)
    if not record.locality_answer_train.strip():
        raise ScopeInputError(
            "negative_answer='train_answer' needs locality_answer_train, which is empty"
        )
    return Prompt(plain, record.question, record.locality_answer_train)


def training_text_negative(record: OkeditRecord, config: EditorConfig) -> int | None:
    """Index in `text_negatives` of the one that sets the text radius (None if not needed)."""
    if not config.needs_text_negative:
        return None
    n = len(record.text_negatives)
    if not -n <= config.train_text_negative < n:
        raise ScopeInputError(
            f"key variant {config.key_variant!r} needs a training text negative: "
            f"text_negatives[{config.train_text_negative}] does not exist ({n} text negatives)"
        )
    return config.train_text_negative % n


def build_probes(record: OkeditRecord, config: EditorConfig) -> list[Probe]:
    """Every probe of the item, positives first; raises ScopeInputError when one is missing."""
    if not record.target.strip():
        raise ScopeInputError("empty target")
    if not record.rephrases and not record.image_rephrases:
        raise ScopeInputError("no positive probes: rephrases and image_rephrases are empty")
    if not record.locality_images and not record.text_negatives:
        raise ScopeInputError("no negative probes: locality_images and text_negatives are empty")
    if not record.rephrases_train:
        raise ScopeInputError("no training positive: rephrases_train is empty")
    image, question, target = record.image, record.question, record.target
    held_out = training_text_negative(record, config)
    probes = [Probe("edit", 0, image, question, target, "positive", False)]
    probes += [
        Probe("rephrase", i, image, q, target, "positive", False)
        for i, q in enumerate(record.rephrases)
    ]
    probes += [
        Probe("image_rephrase", i, im, question, target, "positive", True)
        for i, im in enumerate(record.image_rephrases)
    ]
    probes += [
        Probe("locality", i, im, question, record.locality_answer, "negative", True)
        for i, im in enumerate(record.locality_images)
    ]
    probes += [
        Probe("text_negative", i, image, tn.question, tn.answer, "negative", False)
        for i, tn in enumerate(record.text_negatives)
        if i != held_out
    ]
    if record.image_free_locality is not None:  # EasyEdit's `loc`, on the grey stand-in
        free, size = record.image_free_locality, to_pil(image).size
        probes.append(
            Probe(
                "image_free_locality",
                0,
                image_free_image(size),
                free.question,
                free.answer,
                "negative",
                False,
            )
        )
    negative = negative_prompt(record, config)
    probes.append(Probe("train_pos", 0, image, record.rephrases_train[0], target, "train", False))
    probes.append(
        Probe("train_neg", 0, negative.image, negative.question, negative.answer, "train", True)
    )
    if held_out is not None:
        tn = record.text_negatives[held_out]
        probes.append(
            Probe("train_text_neg", held_out, image, tn.question, tn.answer, "train", False)
        )
    return probes


def edit_request(record: OkeditRecord, config: EditorConfig) -> EditRequest:
    held_out = training_text_negative(record, config)
    text_negative = None
    if held_out is not None:
        tn = record.text_negatives[held_out]
        text_negative = Prompt(record.image, tn.question, tn.answer)
    return EditRequest(
        edit=Prompt(record.image, record.question, record.target),
        positive=Prompt(record.image, record.rephrases_train[0], record.target),
        negative=negative_prompt(record, config),
        text_negative=text_negative,
        label=record.target,
    )


@dataclass
class _Run:
    pre: list[Tensor]  # per probe: clean target logits (m, V)
    post: list[Tensor]  # per probe: edited target logits
    distance: Tensor  # (probes,) d(probe key, edit key); relative (d_p / ε_p) for multi-part
    routed: Tensor  # (probes,) bool
    targets: list[Tensor]
    outcome: EditOutcome
    pre_answers: list[str] | None = None  # greedy answers, clean model
    post_answers: list[str] | None = None  # ... edited model


def answer_tokens(config: EditorConfig, batch: Batch) -> int:
    """How many tokens greedy answers may take: one past the longest expected answer shows
    whether an answer stops; more only costs decode steps (`max_new_tokens` at most)."""
    return min(config.max_new_tokens, int(batch.target_mask.sum(dim=1).max()) + 1)


def generated_answers(
    editor: Editor,
    batch: Batch,
    edited: bool,
    capture: Capture | None = None,
    groups: Tensor | None = None,
) -> list[str] | None:
    """Greedy answers to every probe's prompt (None when `generate_answers` is off): decoded
    from a capture with a KV cache (fast path, `editors.decoding`), else one `generate` per
    row; edited rows route within their codebook `groups`. The clean side runs without the
    wrapper, so earlier sequential edits do not leak in."""
    if not editor.config.generate_answers:
        return None
    max_new_tokens = answer_tokens(editor.config, batch)
    if capture is not None and capture.kv is not None:
        return greedy_answers(editor, batch, capture, edited, max_new_tokens, groups)
    if edited:
        return editor.generate(batch, max_new_tokens, groups)
    return editor.adapter.generate(batch, max_new_tokens)


def keeps_kv(editor: Editor, batch: Batch) -> bool:
    """Keep the capture's KV cache to decode answers from it, when it fits the budget."""
    config = editor.config
    budget = config.decode_kv_gb * 2**30
    return config.generate_answers and editor.adapter.kv_bytes(batch) <= budget


def run_probes(editor: Editor, probes: list[Probe], request: EditRequest) -> _Run:
    """`run_items` for one item."""
    return run_items(editor, [(probes, request)])[0]


def run_items(editor: Editor, items: list[tuple[list[Probe], EditRequest]]) -> list[_Run]:
    """Per item: pre (clean) logits, its edit, post logits, distances and routing of its probes.

    Fast path: the probes of all items form one batch. One clean capture (shared forwards)
    caches the module input of every probe (the edit, `train_pos` and `train_neg` rows
    included: they are the edit requests) and, when answers are generated, its KV cache; the
    edits train side by side on the tail, item i's entry in codebook group i, which routes
    only item i's probes; post logits and the greedy answers' decode steps run batched. Items
    whose KV cache would not fit `decode_kv_gb` together run in halves. Slow path (and FT,
    and sequential edits): one item; the edit and every probe run their own forwards.
    """
    if len(items) > 1 and not editor.edits_side_by_side:
        raise ValueError(f"{editor.name} validates one item at a time here")
    adapter = editor.adapter
    probes = [p for item_probes, _ in items for p in item_probes]
    batch = adapter.build_inputs(
        [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
    )
    if len(items) > 1 and editor.config.generate_answers and not keeps_kv(editor, batch):
        half = len(items) // 2
        first = run_items(editor, items[:half])
        editor.restore()  # the second half's groups start at 0 again
        return first + run_items(editor, items[half:])
    spans = _spans([len(item_probes) for item_probes, _ in items])
    groups = torch.cat(
        [torch.full((len(item_probes),), i) for i, (item_probes, _) in enumerate(items)]
    ).to(batch.input_ids.device)
    targets = [batch.labels[b][batch.target_mask[b]] for b in range(batch.size)]
    capture = None
    if editor.fast:
        capture = adapter.capture(batch, editor.path, keep_kv=keeps_kv(editor, batch))
    pre_answers = generated_answers(editor, batch, edited=False, capture=capture)
    if capture is not None:
        pre = editor.clean_target_logits(batch, capture)
        edits = [
            _edit_rows(editor, item_probes, span)
            for (item_probes, _), span in zip(items, spans, strict=True)
        ]
        labels = [request.label or request.edit.answer for _, request in items]
        outcomes = editor.edit_rows(batch, capture, edits, labels)
        routed = editor.evaluate(batch, capture, groups)
        post, parts, entries = routed.target_logits, routed.parts, routed.entry
    else:
        singles = [adapter.select(batch, [b]) for b in range(batch.size)]
        pre = [editor.clean_target_logits(s)[0] for s in singles]
        outcomes = [editor.edit(request) for _, request in items]
        results: list[Routed] = [editor.evaluate(s) for s in singles]
        post = [r.target_logits[0] for r in results]
        parts = torch.cat([r.parts for r in results])
        entries = torch.cat([r.entry for r in results])
    post_answers = generated_answers(editor, batch, edited=True, capture=capture, groups=groups)
    return [
        _Run(
            pre=pre[span],
            post=post[span],
            distance=_reported_distance(parts[span, outcome.entry], outcome),
            routed=entries[span] == outcome.entry,
            targets=targets[span],
            outcome=outcome,
            pre_answers=pre_answers[span] if pre_answers is not None else None,
            post_answers=post_answers[span] if post_answers is not None else None,
        )
        for span, outcome in zip(spans, outcomes, strict=True)
    ]


def _spans(sizes: list[int]) -> list[slice]:
    """Consecutive row ranges of items with `sizes` rows each."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def _edit_rows(editor: Editor, probes: list[Probe], span: slice) -> list[int]:
    """Batch rows of an item's edit request, in `EditRequest.rows()` order."""
    kinds = [p.kind for p in probes]
    used = [k for k in RADIUS_KINDS if k in kinds] if editor.uses_radius_probes else ["edit"]
    return [span.start + kinds.index(kind) for kind in used]


def _reported_distance(parts: Tensor, outcome: EditOutcome) -> Tensor:
    """d of a one-part key; max_p d_p / ε_p (routed iff ≤ 1) of a multi-part key."""
    if parts.shape[-1] == 1:
        return parts[:, 0]
    return relative_distance(parts, [r.epsilon for r in outcome.radii])


def _reported_epsilon(outcome: EditOutcome) -> float:
    """ε of a one-part key (-1 when infinite: FT); 1 for the relative distance of a multi-part
    key."""
    if len(outcome.radii) > 1:
        return 1.0
    epsilon = outcome.radii[0].epsilon
    return epsilon if epsilon != float("inf") else -1.0


def probe_results(probes: list[Probe], run: _Run, config: EditorConfig) -> list[ProbeResult]:
    results = []
    for i, probe in enumerate(probes):
        pre, post, target = run.pre[i], run.post[i], run.targets[i]
        k = config.top_k_image if probe.image_probe else config.top_k_text
        results.append(
            ProbeResult(
                kind=probe.kind,
                index=probe.index,
                distance=float(run.distance[i]),
                routed=bool(run.routed[i]),
                expected=probe.expected,
                pre_accuracy=token_accuracy(pre, target),
                post_accuracy=token_accuracy(post, target),
                agreement=topk_agreement(pre, post, k) if probe.role != "positive" else -1.0,
                **_generation_fields(run, i, probe.expected),
            )
        )
    return results


def _generation_fields(run: _Run, i: int, expected: str) -> dict[str, str | float]:
    if run.pre_answers is None or run.post_answers is None:
        return {}
    pre, post = run.pre_answers[i], run.post_answers[i]
    return {
        "pre_answer": pre,
        "post_answer": post,
        "pre_generation_match": generation_exact_match(pre, expected),
        "post_generation_match": generation_exact_match(post, expected),
    }


def verdict(
    results: list[ProbeResult],
    kept: list[bool],
    epsilon: float,
    negative: str,
    ambiguity_scope: str = "family",
) -> tuple[str, str, bool, bool]:
    """(verdict, reason, in_scope_ok, out_of_scope_ok) from the probe results.

    `kept[i]`: probe i's top-1 answer is unchanged by the edit at every answer position.
    """
    in_problems, out_problems = [], []
    for p in results:
        if p.kind not in POSITIVE_KINDS:
            continue
        if not p.routed:
            in_problems.append(f"{p.name} not routed (d={p.distance:.4g} > eps={epsilon:.4g})")
        elif p.post_accuracy < 1.0:
            in_problems.append(f"{p.name} routed but does not answer the target")
    for p, unchanged in zip(results, kept, strict=True):
        if p.kind in NEGATIVE_KINDS and p.routed and not unchanged:
            out_problems.append(f"{p.name} routed (d={p.distance:.4g}) and its answer changed")
    in_ok, out_ok = not in_problems, not out_problems
    problems = in_problems + out_problems
    ambiguity = _ambiguity(results, negative, ambiguity_scope)
    if in_ok and out_ok:
        return "ok", f"note: {ambiguity}" if ambiguity else "", True, True
    listed = "; ".join(problems[:MAX_REASONS]) + ("; ..." if len(problems) > MAX_REASONS else "")
    if ambiguity:
        return "ambiguous", f"{ambiguity}; {listed}", in_ok, out_ok
    return "fail", listed, in_ok, out_ok


# Probe families for `ambiguous` (config.ambiguity == "family"): each negative is compared
# with the positives that differ from the edit in the same way.
AMBIGUITY_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # same question, another image: image rephrases vs near-miss images
    "image": (("image_rephrase",), ("locality", "train_neg")),
    # same image, another question: rephrases vs text negatives
    "text": (("rephrase", "train_pos"), ("text_negative", "train_text_neg")),
}
# ambiguity == "all": every positive against every negative
ALL_PROBES = {
    "all": (
        tuple(kind for positives, _ in AMBIGUITY_FAMILIES.values() for kind in positives),
        tuple(kind for _, negatives in AMBIGUITY_FAMILIES.values() for kind in negatives),
    )
}


def _ambiguity(results: list[ProbeResult], negative: str, scope: str = "family") -> str:
    """'' or why a negative is closer to the key than some positive (of its family, or of
    any family when `scope` is "all"). The black/white training image is no near miss."""
    excluded = () if negative == "near_miss" else ("train_neg",)
    families = ALL_PROBES if scope == "all" else AMBIGUITY_FAMILIES
    found = []
    for family, (positive_kinds, negative_kinds) in families.items():
        positives = [p for p in results if p.kind in positive_kinds]
        negatives = [p for p in results if p.kind in negative_kinds and p.kind not in excluded]
        if not positives or not negatives:
            continue
        farthest = max(positives, key=lambda p: p.distance)
        closest = min(negatives, key=lambda p: p.distance)
        if closest.distance < farthest.distance:
            label = "" if scope == "all" else f"{family}: "
            found.append(
                f"{label}negative {closest.name} (d={closest.distance:.4g}) is closer to the "
                f"key than positive {farthest.name} (d={farthest.distance:.4g})"
            )
    return "; ".join(found)


def validate_record(
    record: OkeditRecord,
    editor: Editor,
    model_name: str = "",
    screen: Callable[[list[ProbeResult]], Collection[str]] | None = None,
) -> Validation:
    """Edit the model with `record`, probe its scope, return the filled `Validation`.

    `screen` sees every probe result (pre-edit answers included) and names the probes
    (`kind[index]`) to leave out of the verdict, the metrics and the stored probes: the
    item check's bad probes, which say nothing about the editor.

    Never raises for a bad item: the verdict is then "error" with the cause. Outside
    sequential mode the editor is restored afterwards (the next item sees a clean model).
    """
    return validate_items([record], editor, model_name, [screen])[0]


Screen = Callable[[list[ProbeResult]], Collection[str]]


def validate_items(
    records: list[OkeditRecord],
    editor: Editor,
    model_name: str = "",
    screens: list[Screen | None] | None = None,
) -> list[Validation]:
    """`validate_record` for several items edited and probed together (`run_items`): the same
    results as one at a time, up to float rounding between batched and single forwards.

    Each item gets its own error: an item without its probes is an error before the joint
    run; if the joint run itself fails (e.g. a target the tokenizer cannot encode), its items
    run one at a time, so the failing one gets the error and the others their results. An
    editor that edits one item at a time (`Editor.edits_side_by_side`: FT, the slow path,
    sequential edits) validates them in turn. `seconds` is each item's share of the run.
    """
    screens = screens or [None] * len(records)
    if len(records) > 1 and not editor.edits_side_by_side:
        return [
            validate_record(record, editor, model_name, screen)
            for record, screen in zip(records, screens, strict=True)
        ]
    config = editor.config
    start = time.perf_counter()
    out: list[Validation | None] = [None] * len(records)
    ready, items = [], []  # the items whose probes exist, and their probes and requests
    for i, record in enumerate(records):
        try:
            items.append((build_probes(record, config), edit_request(record, config)))
            ready.append(i)
        except Exception as exc:
            out[i] = _error(record, editor, model_name, exc, _since(start))
    runs: list[_Run] | Exception = []
    if items:
        try:
            runs = run_items(editor, items)
        except Exception as exc:
            runs = exc
        finally:
            if not config.sequential:
                editor.restore()
    if isinstance(runs, Exception) and len(ready) > 1:
        for i in ready:  # one at a time: the failing item gets the error, the others results
            out[i] = validate_record(records[i], editor, model_name, screens[i])
    elif isinstance(runs, Exception):
        out[ready[0]] = _error(records[ready[0]], editor, model_name, runs, _since(start))
    else:
        seconds = _since(start) / max(len(ready), 1)  # each item's share of the joint run
        for i, (probes, _), run in zip(ready, items, runs, strict=True):
            try:
                validation = _validation(records[i], editor, model_name, probes, run, screens[i])
                out[i] = validation.model_copy(update={"seconds": seconds})
            except Exception as exc:
                out[i] = _error(records[i], editor, model_name, exc, seconds)
    return [v for v in out if v is not None]


def _since(start: float) -> float:
    return time.perf_counter() - start


def _base_validation(editor: Editor, model_name: str) -> Validation:
    config = editor.config
    return Validation(
        editor=config.editor,
        model=model_name,
        key_variant=config.key_label,
        alpha=config.alpha if config.editor == "balancedit" else -1.0,
    )


def _validation(
    record: OkeditRecord,
    editor: Editor,
    model_name: str,
    probes: list[Probe],
    run: _Run,
    screen: Screen | None,
) -> Validation:
    """The filled `Validation` of one item from its run."""
    config = editor.config
    results = probe_results(probes, run, config)
    kept = [exact_match(post, pre.argmax(-1)) for pre, post in zip(run.pre, run.post, strict=True)]
    left_out = set(screen(results)) if screen is not None else set()
    pairs = [(p, k) for p, k in zip(results, kept, strict=True) if p.name not in left_out]
    results, kept = [p for p, _ in pairs], [k for _, k in pairs]
    epsilon = _reported_epsilon(run.outcome)
    name, reason, in_ok, out_ok = verdict(results, kept, epsilon, config.negative, config.ambiguity)
    return _base_validation(editor, model_name).model_copy(
        update={
            "verdict": name,
            "reason": reason,
            "in_scope_ok": in_ok,
            "out_of_scope_ok": out_ok,
            "epsilon": epsilon,
            "edit_config": _edit_config(editor, run.outcome),
            "metrics": item_metrics(results, config.hm_locality),
            "probes": results,
        }
    )


def _error(
    record: OkeditRecord, editor: Editor, model_name: str, exc: Exception, seconds: float
) -> Validation:
    """Verdict "error" with the cause: one bad item must not stop the run."""
    expected = isinstance(exc, ScopeInputError | TargetEncodingError)
    logger.warning("validation of %s: %s", record.item_id, exc, exc_info=not expected)
    return _base_validation(editor, model_name).model_copy(
        update={
            "verdict": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "edit_config": editor.config.to_json(module=editor.path),
            "seconds": seconds,
        }
    )


def _edit_config(editor: Editor, outcome: EditOutcome) -> str:
    losses = outcome.losses
    radii = outcome.radii
    one = radii[0] if len(radii) == 1 else None
    return editor.config.to_json(
        module=editor.path,
        path=outcome.path,
        action=outcome.action,
        steps_run=len(losses),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        d_pos=one.d_pos if one else [r.d_pos for r in radii],
        d_neg=one.d_neg if one else [r.d_neg for r in radii],
        radii=[r.epsilon if math.isfinite(r.epsilon) else None for r in radii],
        key_parts=[part.pooling for part in editor.config.key_parts()],
        edit_seconds=outcome.seconds,
    )
