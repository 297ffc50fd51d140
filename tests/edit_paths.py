"""What the fast/slow path tests share: a small capital-city world for tiny random models of
every family, and one edit with every probe on the editor's fast or slow path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from editors.adapters import ADAPTERS, VLMAdapter
from editors.adapters.base import Batch
from editors.adapters.random_models import random_adapter
from editors.base import Editor, EditOutcome, EditRequest, Prompt, Routed
from schemas.record import OkeditRecord
from tests.records import make_record

CORPUS = [
    "what is the capital of this country",
    "which city is the capital",
    "name the main city of this country",
    "paris lyon rome berlin",
]
FAMILIES = sorted(ADAPTERS)
RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))
QUESTION = "what is the capital of this country"
REQUEST = EditRequest(
    edit=Prompt(RED, QUESTION, "lyon"),
    positive=Prompt(RED, "which city is the capital", "lyon"),
    negative=Prompt(BLUE, QUESTION, "rome"),
)


def random_adapters() -> dict[str, VLMAdapter]:
    """A tiny random model of every family on CORPUS (one torch thread)."""
    torch.set_num_threads(1)
    return {family: random_adapter(family, CORPUS) for family in FAMILIES}


@contextmanager
def overridden(adapter: VLMAdapter, **attributes: Any) -> Iterator[None]:
    """Override class-level adapter settings on one instance for a while."""
    for name, value in attributes.items():
        setattr(adapter, name, value)
    try:
        yield
    finally:
        for name in attributes:
            delattr(adapter, name)


def edit_and_probe(
    editor: Editor, probes: Batch, request: EditRequest
) -> tuple[list[Tensor], EditOutcome, Routed]:
    """(clean target logits, the edit's outcome, the edited probes); the editor is restored.
    Fast: one capture of the probe batch; slow: the edit and each probe run on their own."""
    adapter = editor.adapter
    capture = adapter.capture(probes, editor.path) if editor.fast else None
    pre = editor.clean_target_logits(probes, capture)
    outcome = editor.edit(request)
    if editor.fast:
        routed = editor.evaluate(probes, capture)
    else:
        singles = [editor.evaluate(adapter.select(probes, [b])) for b in range(probes.size)]
        routed = Routed(
            [r.target_logits[0] for r in singles],
            torch.cat([r.distances for r in singles]),
            torch.cat([r.entry for r in singles]),
            torch.cat([r.parts for r in singles]),
        )
    editor.restore()
    return pre, outcome, routed


def record_corpus(record: OkeditRecord) -> list[str]:
    """Every text of a hand-made record, for a tokenizer trained on the spot."""
    texts = [record.question, record.target, record.locality_answer, record.locality_answer_train]
    texts += record.rephrases + record.rephrases_train + record.answers
    texts += [f"{t.question} {t.answer}" for t in record.text_negatives]
    return texts


def record_adapter() -> VLMAdapter:
    """A tiny random LLaVA whose vocabulary covers `make_record()` (one torch thread)."""
    torch.set_num_threads(1)
    return random_adapter("llava", record_corpus(make_record()))


def flagworld_records(n: int) -> list[OkeditRecord]:
    """The first `n` flagworld capital edits (see `flagworld_records_for`)."""
    from pipeline.sources.flagworld import FlagworldSource

    return flagworld_records_for(FlagworldSource(relations=("capital",)).list_ids(n, 0))


def flagworld_records_for(ids: list[str]) -> list[OkeditRecord]:
    """These flagworld capital edits, built by the real gather, annotate, images and assemble
    stages (offline annotator, rendered images)."""
    from pipeline.assemble import build_records
    from pipeline.images import RenderBackend
    from pipeline.offline_annotator import FlagworldAnnotator
    from pipeline.sources.flagworld import FlagworldSource
    from schemas.record import Rejection

    source = FlagworldSource(relations=("capital",))
    items = [i for i in source.load_items(ids) if not isinstance(i, Rejection)]
    annotations = [
        a for a in FlagworldAnnotator(seed=0).annotate(items) if not isinstance(a, Rejection)
    ]
    by_id = {i.item_id: i for i in items}
    images = RenderBackend(seed=0).make_images([(by_id[a.item_id], a) for a in annotations])
    built, _ = build_records(
        items, annotations, [i for i in images if not isinstance(i, Rejection)]
    )
    return built
