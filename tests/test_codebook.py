"""Codebook routing and GRACE's add / split / expand rules on hand-made vectors; the radius."""

import math

import pytest
import torch

from editors.codebook import (
    SPLIT_MARGIN,
    Codebook,
    balanced_radius,
    distance,
    pairwise_distance,
    pool_keys,
)


def v(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_distances_by_hand() -> None:
    a, b = v(1, 0), v(0, 1)
    assert distance(a, b, "cosine") == pytest.approx(1.0)
    assert distance(a, v(2, 0), "cosine") == pytest.approx(0.0)
    assert distance(a, v(-1, 0), "cosine") == pytest.approx(2.0)
    assert distance(a, b, "euclidean") == pytest.approx(math.sqrt(2))
    grid = pairwise_distance(torch.stack([a, b]), torch.stack([a, b, v(3, 4)]), "euclidean")
    assert grid.shape == (2, 3)
    assert grid[0, 2] == pytest.approx(math.sqrt(4 + 16))
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise_distance(a[None], b[None], "manhattan")  # type: ignore[arg-type]


def test_pool_keys_respects_mask() -> None:
    x = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    assert torch.allclose(pool_keys(x, torch.tensor([[True, True, False]])), v(2, 3)[None])
    assert torch.allclose(pool_keys(x, torch.tensor([[False, True, False]])), v(3, 5)[None])
    with pytest.raises(ValueError, match="does not match"):
        pool_keys(x, torch.ones(1, 2, dtype=torch.bool))


def test_radius_formula_both_conventions() -> None:
    # eps = (1 - a) d_neg + a d_pos  (alpha on the positive term, the reference code)
    assert balanced_radius(0.1, 0.5, 0.05, "positive") == pytest.approx(0.95 * 0.5 + 0.05 * 0.1)
    # eps = a d_neg + (1 - a) d_pos  (alpha on the negative term)
    assert balanced_radius(0.1, 0.5, 0.05, "negative") == pytest.approx(0.05 * 0.5 + 0.95 * 0.1)
    assert balanced_radius(0.1, 0.5, 0.0, "positive") == pytest.approx(0.5)
    assert balanced_radius(0.1, 0.5, 1.0, "positive") == pytest.approx(0.1)


def test_routing_uses_nearest_key_and_its_radius() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    dist, idx = book.route(v(0, 0)[None])
    assert idx.tolist() == [-1] and math.isinf(float(dist[0]))
    book.add(v(0, 0), "A", 1.0, "a")
    book.add(v(10, 0), "B", 2.0, "b")
    queries = torch.stack([v(0.5, 0), v(1.5, 0), v(8.5, 0), v(5, 0)])
    dist, idx = book.route(queries)
    assert idx.tolist() == [0, -1, 1, -1]
    assert dist.tolist() == pytest.approx([0.5, 1.5, 1.5, 5.0])


def test_add_far_key_adds_entry() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    assert book.add(v(0, 0), "A", 1.0, "a").action == "add"
    placed = book.add(v(3, 0), "B", 1.0, "b")  # d = 3 > 1 + 1
    assert (placed.action, placed.index, len(book)) == ("add", 1, 2)
    assert book.epsilons == [1.0, 1.0]


def test_add_close_key_with_other_label_splits_radii() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(v(0, 0), "A", 1.0, "a")
    placed = book.add(v(1.5, 0), "B", 1.0, "b")  # d = 1.5 <= 2, labels differ
    assert (placed.action, placed.index) == ("split", 1)
    assert book.epsilons[0] == pytest.approx(0.75 - SPLIT_MARGIN)
    assert book.epsilons[1] == pytest.approx(0.75)
    assert book.values == ["A", "B"] and book.labels == ["a", "b"]
    _, idx = book.route(torch.stack([v(0.7, 0), v(0.8, 0)]))
    assert idx.tolist() == [0, 1]  # the two balls no longer overlap


def test_add_close_key_with_same_label_expands() -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(v(0, 0), "A", 1.0, "a")
    placed = book.add(v(1.5, 0), "A2", 1.0, "a")
    assert (placed.action, placed.index, len(book)) == ("expand", 0, 1)
    assert book.epsilons == [pytest.approx(1.5)]  # grown to cover the new key
    assert book.values == ["A"]  # the old value is trained further
    inside = book.add(v(0.5, 0), "A3", 1.0, "a")  # already covered: no change
    assert inside.action == "expand" and book.epsilons == [pytest.approx(1.5)]


def test_clear_empties_the_codebook() -> None:
    book: Codebook[str] = Codebook()
    book.add(v(1, 0), "A", 0.1, "a")
    book.clear()
    assert len(book) == 0 and book.keys is None


# A split must never enlarge the old entry's ball (issue 12): a conflicting key within
# ε_old + ε_new shrinks the old radius to d/2 (just short of it) or leaves it smaller.
@pytest.mark.parametrize(
    ("old_eps", "new_eps", "expected_old", "expected_new"),
    [
        (3.0, 1.0, 0.5 - SPLIT_MARGIN, 0.5),  # both balls larger than d/2: both become d/2
        (0.3, 2.0, 0.3, 0.5),  # the old ball already smaller than d/2: it stays as it was
    ],
)
def test_split_never_enlarges_the_old_radius(
    old_eps: float, new_eps: float, expected_old: float, expected_new: float
) -> None:
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(v(0, 0), "A", old_eps, "a")
    placed = book.add(v(1, 0), "B", new_eps, "b")  # d = 1 <= ε_old + ε_new, labels differ
    assert (placed.action, placed.index, placed.nearest_distance) == ("split", 1, 1.0)
    assert book.epsilons[0] <= old_eps
    assert book.epsilons[0] == pytest.approx(expected_old, abs=1e-9)
    assert book.epsilons[1] == pytest.approx(expected_new, abs=1e-9)
    # Beyond the old radius on the far side from the new key: the old entry is the nearest
    # but no longer covers the probe, so the original module runs.
    beyond = v(-(expected_old + 0.1), 0)
    inside = v(-(expected_old - 0.1), 0)
    _, idx = book.route(torch.stack([beyond, inside, v(0.6, 0)]))
    assert idx.tolist() == [-1, 0, 1]


def test_repeated_splits_never_grow_a_radius() -> None:
    """Conflicting keys one after another: no radius ever grows, and each split leaves the
    old and the new ball disjoint (ε_old + ε_new <= d)."""
    generator = torch.Generator().manual_seed(0)
    book: Codebook[str] = Codebook(distance="euclidean")
    book.add(v(0, 0), "A", 2.0, "a")
    splits = 0
    for i in range(8):
        before = list(book.epsilons)
        key = torch.randn(2, generator=generator)
        _, nearest = book.nearest(key[None])
        old = int(nearest[0])
        placed = book.add(key, f"V{i}", 2.0, f"label{i}")  # always a new label: add or split
        assert placed.action in ("add", "split")
        assert all(after <= eps for after, eps in zip(book.epsilons, before, strict=False))
        if placed.action == "split":
            splits += 1
            d = placed.nearest_distance
            assert book.epsilons[old] == pytest.approx(min(before[old], d / 2 - SPLIT_MARGIN))
            assert book.epsilons[old] + book.epsilons[placed.index] <= d
            _, idx = book.route(
                book.keys[old, 0][None]
                + (book.keys[old, 0] - key)[None] * ((book.epsilons[old] + 1e-3) / d)
            )
            assert int(idx[0]) != old  # just beyond the old ball, away from the new key
    assert splits >= 3
