"""GRACE (Hartvigsen et al., 2023) as a baseline: a codebook of output *vectors*.

Key = the wrapped module's input at the last prompt token; fixed initial radius ε (1.0) with
Euclidean distance; value = a vector that replaces the module's output at the last prompt
token of a routed sequence (initialised to the original output there), trained with Adam
(lr 1.0, 100 steps) on the teacher-forced target loss. Sequential edits use GRACE's add /
split / expand rules (`editors.codebook`). With the module in the last decoder block only
the first target token can change (the reference's "replace_last").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from editors.base import Editor, Radius


class Grace(Editor):
    name = "grace"

    def new_entry(
        self, keys: Tensor, x_edit: Tensor, last_prompt: int
    ) -> tuple[Any, tuple[Radius, ...]]:
        with torch.no_grad():
            initial = self.base(x_edit[last_prompt]).float()
        return nn.Parameter(initial.clone()), (Radius(self.config.grace_epsilon),)

    def trainable(self, entry: int) -> list[Tensor]:
        return [self.codebook.values[entry]]

    def edited_output(
        self, x: Tensor, rows: Tensor, pos: Tensor, route: Tensor, last_prompt: Tensor
    ) -> Tensor:
        out = self.base(x)
        at_last_prompt = pos == last_prompt[rows]
        for entry in route.unique().tolist():
            if entry < 0:
                continue
            here = ((route[rows] == entry) & at_last_prompt).unsqueeze(-1)
            out = torch.where(here, self.codebook.values[entry].to(out.dtype), out)
        return out
