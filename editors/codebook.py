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

Multi-part keys (issue 7). A key may have P parts k = (k_1, …, k_P) (e.g. an image part and a
text part), each with its own radius ε_p. An entry *contains* a query q when every part lies
inside: d(q_p, k_p) ≤ ε_p for all p. The nearest entry is the one with the smallest sum of
part distances Σ_p d(q_p, k_p); the query routes to it iff it contains q. With P = 1 all of
this is the single-key rule above. The GRACE rules act per part: two entries are disjoint
when *some* part's balls are (add); a split halves the radii of the part whose balls overlap
least (largest d_p / (ε_old,p + ε_new,p)); an expansion grows every part to cover the key.
Keys are stored as (N, P, H); a (H,) or (B, H) key is a one-part key.

Groups (independent edits in one codebook). Each entry belongs to a group (0 unless told);
given the group of each query row, a row sees only its own group's entries, as if each group
were a codebook of its own: another group's keys are out of reach (d = ∞) for routing and for
the placement rules. Several items edited side by side (`Editor.edit_rows`) each get a group,
so one item's edit never routes another item's probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor

DistanceName = Literal["cosine", "euclidean"]
PoolingName = Literal["mean_all", "mean_prompt", "last_prompt"]
V = TypeVar("V")

SPLIT_MARGIN = 1e-5  # GRACE: the old radius ends just short of d/2, so the midpoint goes new
PAIR_CHUNK = 2**24  # elements of a pairwise product at a time (64 MB in fp32)


def pairwise_distance(a: Tensor, b: Tensor, distance: DistanceName) -> Tensor:
    """d(a_i, b_j) for rows of a (N, H) and b (M, H): 1 - cos, or the Euclidean norm."""
    a, b = a.float(), b.float()
    if distance == "cosine":
        a_n = torch.nn.functional.normalize(a, dim=-1)
        b_n = torch.nn.functional.normalize(b, dim=-1)
        return (1.0 - _pairwise_dot(a_n, b_n)).clamp_min(0.0)
    if distance == "euclidean":
        # The direct differences, not cdist's |a|² + |b|² − 2ab shortcut for many rows: its
        # cancellation made a key's distance depend on how many rows share the call (5e-5
        # relative on GRACE's last-token keys), so a probe's routing on its batch.
        return torch.cdist(a, b, p=2, compute_mode="donot_use_mm_for_euclid_dist")
    raise ValueError(f"unknown distance {distance!r}; use 'cosine' or 'euclidean'")


def _pairwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """a_i · b_j (N, M), each a sum over the width of its own pair: a matrix product's
    rounding depends on how many rows share the call, and a key's distance (hence its routing)
    should not depend on which other items' probes are batched with it. Entries are taken in
    chunks of bounded size (`PAIR_CHUNK` elements)."""
    step = max(1, PAIR_CHUNK // max(1, a.shape[0] * a.shape[1]))
    chunks = [
        (a.unsqueeze(1) * b[i : i + step].unsqueeze(0)).sum(dim=-1)
        for i in range(0, b.shape[0], step)
    ]
    return torch.cat(chunks, dim=1) if chunks else a.new_zeros(a.shape[0], 0)


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


def pool_key_parts(x: Tensor, masks: Sequence[Tensor]) -> Tensor:
    """Multi-part keys (B, P, H): part p is x (B, T, H) pooled over the positions of masks[p]."""
    return torch.stack([pool_keys(x, mask) for mask in masks], dim=1)


def as_parts(keys: Tensor) -> Tensor:
    """Keys as (B, P, H): a (B, H) batch of keys becomes one-part keys."""
    return keys.unsqueeze(1) if keys.dim() == 2 else keys


def relative_distance(parts: Tensor, radii: Sequence[float]) -> Tensor:
    """max_p d_p / ε_p for part distances (B, P) to one entry with radii ε_p: ≤ 1 iff inside."""
    eps = torch.tensor(radii, device=parts.device, dtype=parts.dtype)
    return (parts / eps.clamp_min(1e-12)).amax(dim=-1)


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


Radii = float | Sequence[float]  # ε of a one-part key, or one ε per key part


@dataclass
class Codebook(Generic[V]):
    """Keys (N, P, H), radii ε (N, P), values and labels; routing by the nearest key."""

    distance: DistanceName = "cosine"
    keys: Tensor | None = None
    radii: list[tuple[float, ...]] = field(default_factory=list)  # ε_p of each entry
    values: list[V] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # group of each entry

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def epsilons(self) -> list[float]:
        """ε of each entry, for one-part keys."""
        if any(len(r) != 1 for r in self.radii):
            raise ValueError("a multi-part codebook has one ε per key part: use .radii")
        return [r[0] for r in self.radii]

    def part_distances(self, queries: Tensor) -> Tensor:
        """d(q_p, k_p) of each query b, entry n and part p, as (B, N, P)."""
        queries = as_parts(queries)
        b, p, _ = queries.shape
        if self.keys is None:
            return torch.empty(b, 0, p, device=queries.device)
        keys = self.keys.to(queries.device)
        parts = [pairwise_distance(queries[:, i], keys[:, i], self.distance) for i in range(p)]
        return torch.stack(parts, dim=-1)

    def distances(self, queries: Tensor, groups: Tensor | None = None) -> Tensor:
        """The combined distance Σ_p d(q_p, k_p) as (B, N) (= d for one-part keys); with the
        (B,) `groups` of the queries, ∞ to the entries of other groups."""
        combined = self.part_distances(queries).sum(dim=-1)
        if groups is None:
            return combined
        entry_groups = torch.tensor(self.groups, device=combined.device)
        same = groups.to(combined.device).unsqueeze(1) == entry_groups.unsqueeze(0)
        return combined.masked_fill(~same, float("inf"))

    def nearest(self, queries: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(distance, index) of the nearest key per query (within the query's group, when
        `groups` are given); (inf, -1) when there is none."""
        batch = as_parts(queries).shape[0]
        if len(self) == 0:
            inf = torch.full((batch,), float("inf"), device=queries.device)
            return inf, torch.full((batch,), -1, dtype=torch.long, device=queries.device)
        dist, index = self.distances(queries, groups).min(dim=1)
        return dist, torch.where(torch.isinf(dist), torch.full_like(index, -1), index)

    def route(self, queries: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(distance to nearest key, entry index or -1): the nearest entry (of the query's
        group) is used iff every part of the query lies within that part's ε."""
        dist, index = self.nearest(queries, groups)
        if len(self) == 0:
            return dist, index
        rows = torch.arange(len(index), device=index.device)
        nearest = index.clamp_min(0)  # rows with no entry in reach are masked below
        parts = self.part_distances(queries)[rows, nearest]  # (B, P): d_p to the nearest entry
        eps = torch.tensor(self.radii, device=dist.device, dtype=parts.dtype)[nearest]
        inside = (parts <= eps).all(dim=-1) & (index >= 0)
        return dist, torch.where(inside, index, torch.full_like(index, -1))

    def relative_distance(self, queries: Tensor, entry: int) -> Tensor:
        """max_p d(q_p, k_p) / ε_p for one entry, (B,): ≤ 1 iff the entry contains the query."""
        return relative_distance(self.part_distances(queries)[:, entry], self.radii[entry])

    def add(self, key: Tensor, value: V, epsilon: Radii, label: str, group: int = 0) -> Placement:
        """Place a new edit by GRACE's add / split / expand rules (module docstring), among the
        entries of its group."""
        key = self._checked(key)
        new = _radii(epsilon, key.shape[1])
        dist_t, index_t = self.nearest(key, torch.tensor([group]))
        if int(index_t[0]) < 0:  # no entry of this group yet
            return self._append(key, value, new, label, group, "add")
        d, nearest = float(dist_t[0]), int(index_t[0])
        d_parts = self.part_distances(key)[0, nearest].tolist()
        old = self.radii[nearest]
        reach = [eo + en for eo, en in zip(old, new, strict=True)]  # ε_old,p + ε_new,p
        if any(dp > r for dp, r in zip(d_parts, reach, strict=True)):  # some part disjoint
            return self._append(key, value, new, label, group, "add", d)
        if self.labels[nearest] != label:
            overlap = [dp / max(r, 1e-12) for dp, r in zip(d_parts, reach, strict=True)]
            p = overlap.index(max(overlap))  # split the part whose balls overlap least
            split = list(new)
            split[p] = min(new[p], d_parts[p] / 2)
            placement = self._append(key, value, tuple(split), label, group, "split", d)
            shrunk = list(old)
            shrunk[p] = min(old[p], d_parts[p] / 2 - SPLIT_MARGIN)
            self.radii[nearest] = tuple(shrunk)
            return placement
        self.radii[nearest] = tuple(max(eo, dp) for eo, dp in zip(old, d_parts, strict=True))
        return Placement("expand", nearest, d)

    def append(
        self, key: Tensor, value: V, epsilon: Radii, label: str, group: int = 0
    ) -> Placement:
        """Add an entry without GRACE's placement rules (e.g. FT, which does not route)."""
        key = self._checked(key)
        return self._append(key, value, _radii(epsilon, key.shape[1]), label, group, "add")

    def _checked(self, key: Tensor) -> Tensor:
        """One key as (1, P, H), from (H,) (one part) or (P, H), shaped like the stored keys."""
        key = key.detach()
        key = key.reshape(1, 1, -1) if key.dim() == 1 else key.reshape(1, *key.shape[-2:])
        if self.keys is not None and self.keys.shape[1:] != key.shape[1:]:
            raise ValueError(
                f"key of shape {tuple(key.shape[1:])} (parts, width) does not match the "
                f"codebook's {tuple(self.keys.shape[1:])}"
            )
        return key

    def clear(self) -> None:
        self.keys, self.radii, self.values, self.labels, self.groups = None, [], [], [], []

    def _append(
        self,
        key: Tensor,
        value: V,
        radii: tuple[float, ...],
        label: str,
        group: int,
        action: str,
        d: float = float("inf"),
    ) -> Placement:
        self.keys = key if self.keys is None else torch.cat([self.keys, key.to(self.keys)], dim=0)
        self.radii.append(radii)
        self.values.append(value)
        self.labels.append(label)
        self.groups.append(group)
        return Placement(action, len(self) - 1, d)  # type: ignore[arg-type]


def _radii(epsilon: Radii, parts: int) -> tuple[float, ...]:
    radii = (float(epsilon),) if isinstance(epsilon, int | float) else tuple(map(float, epsilon))
    if len(radii) != parts:
        raise ValueError(f"{len(radii)} radii for a key of {parts} parts")
    return radii
