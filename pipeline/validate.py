"""The validate stage (design §7.4): edit each record on a clean model, probe its scope, and
store the `Validation` in the record. One model load per call; a failing item gets verdict
"error" with the reason and the run goes on.
"""

from __future__ import annotations

import logging
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from editors.adapters import VLMAdapter, load_model
from editors.base import Editor
from editors.config import EditorConfig, ModelConfig
from editors.scope import make_editor, validate_record
from schemas.record import OkeditRecord, Validation

logger = logging.getLogger(__name__)


def validate_records(
    records: list[OkeditRecord],
    config: EditorConfig,
    model_config: ModelConfig,
    model: VLMAdapter | None = None,
    show_progress: bool = True,
) -> list[OkeditRecord]:
    """Validate every record with the configured editor; returns copies with `validation` set.

    `model` is an already loaded adapter (e.g. one per worker, reused across chunks); when
    None the model is loaded once from `model_config`. Configuration errors (bad module path,
    unsupported family, CUDA absent) raise before any item runs.
    """
    adapter = model if model is not None else load_model(model_config)
    editor = make_editor(adapter, config)
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
        for record in records:
            validation = _validate_one(record, editor, name)
            out.append(record.model_copy(update={"validation": validation}))
            progress.update(task, advance=1, description=f"{record.item_id}: {validation.verdict}")
    return out


def _validate_one(record: OkeditRecord, editor: Editor, model_name: str) -> Validation:
    start = time.perf_counter()
    try:
        return validate_record(record, editor, model_name)
    except Exception as exc:  # validate_record already catches; belt and braces for the run
        logger.warning("validation of %s crashed: %s", record.item_id, exc, exc_info=True)
        return Validation(
            verdict="error",
            reason=f"{type(exc).__name__}: {exc}",
            editor=editor.config.editor,
            model=model_name,
            seconds=time.perf_counter() - start,
        )


def scope_filter(records: list[OkeditRecord]) -> tuple[list[OkeditRecord], list[OkeditRecord]]:
    """`--filter scope`: (kept, dropped), dropping the items whose verdict is "ambiguous"."""
    kept = [r for r in records if r.validation.verdict != "ambiguous"]
    dropped = [r for r in records if r.validation.verdict == "ambiguous"]
    return kept, dropped
