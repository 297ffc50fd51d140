"""The codebook of a routed editor: one entry per edit {key k, radius ε, value, label}.

An input whose key lies within ε of its nearest entry's key is routed to that entry's value
(BalancEdit: a trained copy of the wrapped module; GRACE: a trained output vector);
otherwise the original module runs. Sequential editing follows GRACE's rules (design §7.1)
when a new key lands near an existing one:

* farther than ε_old + ε_new     -> add a new entry;
* closer, with a different label -> add, and split both radii to d/2 (never enlarging them),
  so that the two balls no longer overlap;
* closer, with the same label    -> expand: ε_old grows to d (if smaller), the old entry's
  value is trained on the new edit, no entry is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor

DistanceName = Literal["cosine", "euclidean"]
PoolingName = Literal["mean_all", "mean_prompt", "last_prompt"]
V = TypeVar("V")

SPLIT_MARGIN = 1e-5  # GRACE: the old radius ends just short of d/2, so the midpoint goes new


def pairwise_distance(a: Tensor, b: Tensor, distance: DistanceName) -> Tensor:
    """d(a_i, b_j) for rows of a (N, H) and b (M, H): 1 - cos, or the Euclidean norm."""
    a, b = a.float(), b.float()
    if distance == "cosine":
        a_n = torch.nn.functional.normalize(a, dim=-1)
        b_n = torch.nn.functional.normalize(b, dim=-1)
        return (1.0 - a_n @ b_n.T).clamp_min(0.0)
    if distance == "euclidean":
        return torch.cdist(a, b, p=2)
    raise ValueError(f"unknown distance {distance!r}; use 'cosine' or 'euclidean'")


def distance(a: Tensor, b: Tensor, distance_name: DistanceName) -> float:
    """d(a, b) for two key vectors."""
    return float(pairwise_distance(a.reshape(1, -1), b.reshape(1, -1), distance_name)[0, 0])


def pool_keys(x: Tensor, mask: Tensor) -> Tensor:
    """Key per sequence: the module input x (B, T, H) averaged over the positions of mask (B, T).

    `mask` selects the positions of the pooling variant (all tokens, prompt tokens, or the
    last prompt token); see `Batch.pool_mask`. Each row is pooled separately.
    """
    if x.shape[:2] != mask.shape:
        raise ValueError(f"pooling mask {tuple(mask.shape)} does not match input {tuple(x.shape)}")
    weights = mask.to(x.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return (x * weights).sum(dim=1) / counts


def balanced_radius(
    d_pos: float, d_neg: float, alpha: float, alpha_weights: Literal["positive", "negative"]
) -> float:
    """BalancEdit's radius from the distances of the key k to a positive and a negative key.

    ε = (1 − α)·d(k, k_neg) + α·d(k, k_pos)   ("positive": α weights the positive, ref code)
    ε = α·d(k, k_neg) + (1 − α)·d(k, k_pos)   ("negative": the other reading of the paper)
    With a small α on the positive term, ε sits just inside the negative.
    """
    if alpha_weights == "positive":
        return (1.0 - alpha) * d_neg + alpha * d_pos
    return alpha * d_neg + (1.0 - alpha) * d_pos


@dataclass
class Placement:
    """What `Codebook.add` did: the entry whose value is trained for this edit."""

    action: Literal["add", "split", "expand"]
    index: int
    nearest_distance: float = float("inf")


@dataclass
class Codebook(Generic[V]):
    """Keys (N, H), radii ε (N,), values and labels; routing by the nearest key."""

    distance: DistanceName = "cosine"
    keys: Tensor | None = None
    epsilons: list[float] = field(default_factory=list)
    values: list[V] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def distances(self, queries: Tensor) -> Tensor:
        """d(query_b, key_n) as (B, N)."""
        if self.keys is None:
            return torch.empty(queries.shape[0], 0, device=queries.device)
        return pairwise_distance(queries, self.keys.to(queries.device), self.distance)

    def nearest(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(distance, index) of the nearest key per query; (inf, -1) when the codebook is empty."""
        if len(self) == 0:
            batch = queries.shape[0]
            inf = torch.full((batch,), float("inf"), device=queries.device)
            return inf, torch.full((batch,), -1, dtype=torch.long, device=queries.device)
        return self.distances(queries).min(dim=1)

    def route(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(distance to nearest key, entry index or -1): an entry is used iff d <= its ε."""
        dist, index = self.nearest(queries)
        if len(self) == 0:
            return dist, index
        eps = torch.tensor(self.epsilons, device=dist.device, dtype=dist.dtype)[index]
        return dist, torch.where(dist <= eps, index, torch.full_like(index, -1))

    def add(self, key: Tensor, value: V, epsilon: float, label: str) -> Placement:
        """Place a new edit by GRACE's add / split / expand rules (module docstring)."""
        key = key.detach().reshape(1, -1)
        if len(self) == 0:
            return self._append(key, value, epsilon, label, "add")
        dist_t, index_t = self.nearest(key)
        d, nearest = float(dist_t[0]), int(index_t[0])
        if d > self.epsilons[nearest] + epsilon:
            return self._append(key, value, epsilon, label, "add", d)
        if self.labels[nearest] != label:
            placement = self._append(key, value, min(epsilon, d / 2), label, "split", d)
            self.epsilons[nearest] = min(self.epsilons[nearest], d / 2 - SPLIT_MARGIN)
            return placement
        self.epsilons[nearest] = max(self.epsilons[nearest], d)
        return Placement("expand", nearest, d)

    def append(self, key: Tensor, value: V, epsilon: float, label: str) -> Placement:
        """Add an entry without GRACE's placement rules (e.g. FT, which does not route)."""
        return self._append(key.detach().reshape(1, -1), value, epsilon, label, "add")

    def clear(self) -> None:
        self.keys, self.epsilons, self.values, self.labels = None, [], [], []

    def _append(
        self,
        key: Tensor,
        value: V,
        epsilon: float,
        label: str,
        action: str,
        d: float = float("inf"),
    ) -> Placement:
        self.keys = key if self.keys is None else torch.cat([self.keys, key.to(self.keys)], dim=0)
        self.epsilons.append(float(epsilon))
        self.values.append(value)
        self.labels.append(label)
        return Placement(action, len(self) - 1, d)  # type: ignore[arg-type]
