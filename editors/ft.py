"""FT baseline: fine-tune the wrapped module itself, without routing (lr 0.01, 25 steps).

Every input sees the edited weights. The codebook keeps each edit's key only so that probe
distances can be reported; its radius is infinite. `restore()` copies the saved weights back
(bit-exact). Edits therefore run one at a time (`independent_entries` is False): several items
cannot train the one module side by side.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from editors.adapters.base import VLMAdapter
from editors.base import Editor, Radius
from editors.codebook import Placement
from editors.config import EditorConfig


class FineTune(Editor):
    name = "ft"
    independent_entries = False  # every edit trains the one shared module

    def __init__(self, adapter: VLMAdapter, config: EditorConfig) -> None:
        super().__init__(adapter, config)
        self._original = {n: p.detach().clone() for n, p in self.base.named_parameters()}

    def new_entry(
        self, keys: Tensor, x_edit: Tensor, last_prompt: int
    ) -> tuple[Any, tuple[Radius, ...]]:
        return None, (Radius(math.inf),)

    def place(
        self, key: Tensor, value: Any, radii: list[float], label: str, group: int = 0
    ) -> Placement:
        return self.codebook.append(key, value, radii, label, group)

    def trainable(self, entry: int) -> list[Tensor]:
        params = list(self.base.parameters())
        for param in params:
            param.requires_grad_(True)
        return params

    def edited_output(
        self, x: Tensor, rows: Tensor, pos: Tensor, route: Tensor, last_prompt: Tensor
    ) -> Tensor:
        return self.base(x)

    def restore(self) -> None:
        with torch.no_grad():
            for name, param in self.base.named_parameters():
                param.copy_(self._original[name])
                param.requires_grad_(False)
        super().restore()
