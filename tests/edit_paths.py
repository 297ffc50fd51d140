"""One edit and every probe on the editor's fast or slow path: what the path tests compare."""

from __future__ import annotations

import torch
from torch import Tensor

from editors.adapters.base import Batch
from editors.base import Editor, EditOutcome, EditRequest, Routed


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
