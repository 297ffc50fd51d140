"""The annotation fields, one task per file (see `base.FieldTask`), in request order.

`FIELD_TASKS` is the registry: the annotator asks the tasks of an item in this order,
grouped into levels by `levels` (a level's requests go out together; in batch mode one
level is one Batch API round). A task joins the level of the task before it unless it
needs a field that level fills; then it starts the next level. Per item that gives
1. image_object, target; 2. counterfact votes, rephrases, locality C and D;
3. the image objects of C and D, text negatives, the image-free locality question.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.fields.base import FieldTask
from pipeline.fields.counterfact_type import CounterfactType
from pipeline.fields.image_free_locality import ImageFreeLocality
from pipeline.fields.image_object import ImageObject, LocalityImageObject, LocalityImageTrainObject
from pipeline.fields.locality import Locality
from pipeline.fields.rephrases import Rephrases
from pipeline.fields.target import Target
from pipeline.fields.text_negatives import TextNegatives

FIELD_TASKS: tuple[type[FieldTask], ...] = (
    ImageObject,
    Target,
    CounterfactType,
    Rephrases,
    Locality,
    LocalityImageObject,
    LocalityImageTrainObject,
    TextNegatives,
    ImageFreeLocality,
)


def levels(tasks: Sequence[FieldTask]) -> list[list[FieldTask]]:
    """`tasks` in order, cut into levels where a task needs a field of the current level.
    Raises ValueError for a task that needs a field no task before it fills."""
    done: set[str] = set()  # filled by earlier levels
    current: list[FieldTask] = []
    out = [current]
    for task in tasks:
        filling = {name for t in current for name in t.fills}
        missing = set(task.needs) - done - filling
        if missing:
            raise ValueError(f"field task {task.name!r} needs {sorted(missing)}: register it after")
        if set(task.needs) & filling:
            done |= filling
            current = []
            out.append(current)
        current.append(task)
    return [level for level in out if level]
