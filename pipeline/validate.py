"""The validate stage (design §7.4): edit each record on a clean model, probe its scope, and
store both outcomes in the record's `Validation`: the item `check` (`pipeline.check`, from the
clean model's answers) and what the editor did (verdict, metrics, `edit`). One model load per
call; a failing item gets verdict "error" with the reason and the run goes on. With
`batch_items` > 1, several items are edited and probed together (`scope.validate_items`).
"""

from __future__ import annotations

import logging
import statistics
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from editors.adapters import VLMAdapter, load_model
from editors.base import Editor
from editors.config import EditorConfig, ModelConfig
from pipeline.check import (
    CheckConfig,
    Similarity,
    check_item,
    dropped_probes,
    reindexed,
    without_probes,
)
from pipeline.scope import (
    NEGATIVE_KINDS,
    POSITIVE_KINDS,
    Screen,
    make_editor,
    validate_items,
)
from schemas.record import (
    EditSummary,
    FamilyScope,
    ItemCheck,
    OkeditRecord,
    ProbeResult,
    Validation,
)

logger = logging.getLogger(__name__)


def validate_records(
    records: list[OkeditRecord],
    config: EditorConfig,
    model_config: ModelConfig,
    model: VLMAdapter | None = None,
    show_progress: bool = True,
    check: CheckConfig | None = None,
    batch_items: int = 1,
) -> list[OkeditRecord]:
    """Validate every record with the configured editor; returns copies with `validation` set
    and the probes the item check dropped removed.

    `model` is an already loaded adapter (e.g. one per worker, reused across chunks); when
    None the model is loaded once from `model_config`. Configuration errors (bad module path,
    unsupported family, CUDA absent) raise before any item runs.

    `batch_items` > 1 edits and probes up to that many items together (`scope.validate_items`:
    shared forwards, the edits trained side by side, batched answers), with the same results
    as one at a time; FT, the slow path and sequential edits still go one at a time.
    """
    if batch_items < 1:
        raise ValueError(f"batch_items must be at least 1, got {batch_items}")
    check = check or CheckConfig()
    adapter = model if model is not None else load_model(model_config)
    editor = make_editor(adapter, config)
    similarity = text_similarity() if check.text_similarity else None
    name = model_config.display_name
    out: list[OkeditRecord] = []
    with Progress(
        TextColumn("validate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("", total=len(records))
        for start in range(0, len(records), batch_items):
            chunk = records[start : start + batch_items]
            for validated in _validate_items(chunk, editor, name, check, similarity):
                out.append(validated)
                status = validated.validation.check.status
                progress.update(task, advance=1, description=f"{validated.item_id}: {status}")
    return out


def text_similarity() -> Similarity:
    """The offline MiniLM sentence model (loaded once per process)."""
    from pipeline.similarity import SimilarityChecker

    return SimilarityChecker()


def _validate_items(
    records: list[OkeditRecord],
    editor: Editor,
    model_name: str,
    check_config: CheckConfig,
    similarity: Similarity | None,
) -> list[OkeditRecord]:
    """Validate records together; each gets its item check (from its screen), its dropped
    probes removed and its edit summary."""
    checks: list[list[ItemCheck]] = [[] for _ in records]

    def screen(record: OkeditRecord, found: list[ItemCheck]) -> Screen:
        def dropped(probes: list[ProbeResult]) -> set[str]:
            found.append(check_item(record, probes, check_config, similarity))
            return dropped_probes(found[-1])

        return dropped

    screens: list[Screen | None] = [screen(r, c) for r, c in zip(records, checks, strict=True)]
    validations = _edit_and_probe(records, editor, model_name, screens)
    out = []
    for record, validation, found in zip(records, validations, checks, strict=True):
        item_check = found[-1] if found else ItemCheck()
        dropped = dropped_probes(item_check)
        validation = validation.model_copy(
            update={"check": item_check, "probes": reindexed(validation.probes, dropped)}
        )
        validation.edit = edit_summary(validation)
        out.append(without_probes(record, dropped).model_copy(update={"validation": validation}))
    return out


def _edit_and_probe(
    records: list[OkeditRecord],
    editor: Editor,
    model_name: str,
    screens: list[Screen | None],
) -> list[Validation]:
    start = time.perf_counter()
    try:
        return validate_items(records, editor, model_name, screens)
    except Exception as exc:  # validate_items already catches; belt and braces for the run
        logger.warning("validation of %d items crashed: %s", len(records), exc, exc_info=True)
        return [
            Validation(
                verdict="error",
                reason=f"{type(exc).__name__}: {exc}",
                editor=editor.config.editor,
                model=model_name,
                seconds=(time.perf_counter() - start) / len(records),
            )
            for _ in records
        ]


def edit_summary(validation: Validation) -> EditSummary:
    """Where each probe family fell relative to ε, which negative set ε, and whether any radius
    separates the positives from the negatives (margin in units of ε)."""
    epsilon = validation.epsilon
    if validation.verdict in ("error", "not_run") or epsilon <= 0:
        return EditSummary()  # FT (no radius) or no run

    def relative(p: ProbeResult) -> float:
        return p.distance / epsilon

    families = []
    for family in (*POSITIVE_KINDS, *NEGATIVE_KINDS):
        members = [p for p in validation.probes if p.kind == family]
        if members:
            families.append(
                FamilyScope(
                    family=family,
                    probes=len(members),
                    routed_share=sum(p.routed for p in members) / len(members),
                    median_relative_distance=statistics.median(map(relative, members)),
                )
            )
    positives = [relative(p) for p in validation.probes if p.kind in POSITIVE_KINDS]
    negatives = [relative(p) for p in validation.probes if p.kind in NEGATIVE_KINDS]
    margin = min(negatives) - max(positives) if positives and negatives else 0.0
    return EditSummary(
        epsilon_set_by=_epsilon_set_by(validation),
        margin=margin,
        separable=margin > 0,
        families=families,
    )


def _epsilon_set_by(validation: Validation) -> str:
    """The training negative nearest to the key (for a one-part key it sets ε)."""
    negatives = [p for p in validation.probes if p.kind in ("train_neg", "train_text_neg")]
    if not negatives:
        return ""
    if validation.key_variant.startswith("two_part"):
        return "per key part: " + ", ".join(p.kind for p in negatives)
    return min(negatives, key=lambda p: p.distance).kind
