"""BalancEdit (Guo et al., ICML 2025; arXiv 2505.01343), as its reference code does it.

* Adaptor: one linear module of the language model's last decoder block is wrapped
  (`editors.base.EditedModule`). Its codebook holds, per edit, a key k, a radius ε and a
  value = a trainable copy of the module.
* Key k: the module's input pooled over the edit sequence (`mean_all`: image tokens, question
  and appended target, as the reference; or the prompt only, or its last token).
* Routing: an input sequence whose key lies within ε of its nearest k runs through that
  entry's copy at every position; otherwise through the original module. Routing is decided
  once per sequence (from the prompt when generating).
* Radius: with k_pos the key of a training paraphrase on the same image and k_neg the key of
  a negative (the item's training near-miss image, or an all-black/white image),
      ε = (1 − α)·d(k, k_neg) + α·d(k, k_pos),      d = 1 − cos  (or Euclidean),
  i.e. just inside the negative for a small α (ref: α = 0.05 for BLIP-2). The config's
  `alpha_weights` makes the other reading (α on the negative term) explicit.
* Edit loop: Adam (eps 1e-4) on the copy only, teacher-forced target loss, `steps` steps.

Key variants (issue 7, `EditorConfig.key_variant`). The same rule sets the radius of every
part p of the key: ε_p = (1 − α)·d(k_p, k_neg,p) + α·d(k_p, k_pos,p), where k_neg,p is the
*nearest* of the negatives that bound that part — the image negative, the item's training
text negative (another question about the same image, BalancEdit's principle applied to
text), or both — so ε_p stays just inside every one of them. `reference` uses the image
negative only (as published). For a two-part key the image part's positive is the same image
(d = 0 when the image precedes the question), so ε_image ≈ (1 − α)·d(k_image, k_neg,image).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from editors.base import Editor, Radius, routed_positions
from editors.codebook import balanced_radius, distance


class BalancEdit(Editor):
    name = "balancedit"
    uses_radius_probes = True

    def new_entry(
        self, keys: Tensor, x_edit: Tensor, last_prompt: int
    ) -> tuple[Any, tuple[Radius, ...]]:
        """The copy and the radius of each key part. keys (R, P, H); rows: k, k_pos, k_neg and,
        when a part is bounded by the text negative, k_text_neg."""
        needed = 4 if self.config.needs_text_negative else 3
        if keys.shape[0] != needed:
            raise ValueError(
                "BalancEdit needs a positive (a training paraphrase on the same image) and a "
                "negative (the near-miss image, or a black/white image) to set its radius"
                + (", and a training text negative" if needed == 4 else "")
                + f" (key variant {self.config.key_variant!r}); got {keys.shape[0] - 1} of them"
            )
        row = {"image": 2, "text": 3}  # which row holds the negative of each kind
        radii = tuple(
            self.part_radius(keys[0, p], keys[1, p], [keys[row[n], p] for n in part.negatives])
            for p, part in enumerate(self.config.key_parts())
        )
        return self.new_value(), radii

    def part_radius(self, k: Tensor, k_pos: Tensor, k_negs: list[Tensor]) -> Radius:
        """ε = (1 − α)·d(k, k_neg) + α·d(k, k_pos), k_neg the nearest of the negatives."""
        d_pos = distance(k, k_pos, self.config.distance)
        d_neg = min(distance(k, k_neg, self.config.distance) for k_neg in k_negs)
        epsilon = balanced_radius(d_pos, d_neg, self.config.alpha, self.config.alpha_weights)
        return Radius(epsilon, d_pos, d_neg)

    def new_value(self) -> nn.Linear:
        """A trainable fp32 copy of the wrapped module (the original stays untouched)."""
        value = copy.deepcopy(self.base).float()
        value.requires_grad_(True)
        return value

    def trainable(self, entry: int) -> list[Tensor]:
        return list(self.codebook.values[entry].parameters())

    def edited_output(
        self, x: Tensor, rows: Tensor, pos: Tensor, route: Tensor, last_prompt: Tensor
    ) -> Tensor:
        out = self.base(x)  # the original module, for inputs routed nowhere (-1)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for entry, at in routed_positions(route[rows]).items():
            # Each copy runs on its own routed inputs only: several items' edits side by side
            # cost one pass over their inputs, not one per entry.
            copy_out = self.codebook.values[entry](flat_x[at].float()).to(out.dtype)
            flat_out = flat_out.index_put((at,), copy_out)
        return flat_out.reshape(out.shape)
