"""The Hungarian matcher against brute force over every assignment, on small cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from examples.deformable_detr.matcher import HungarianMatcher, focal_class_cost, matching_cost


def _random_case(generator: torch.Generator, batch: int, queries: int, classes: int, sizes: list[int]):
    logits = torch.randn(batch, queries, classes, generator=generator) * 2
    centres = torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2
    sides = torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.05
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([centres, sides], dim=-1)}
    targets = []
    for size in sizes:
        boxes = torch.cat([torch.rand(size, 2, generator=generator) * 0.6 + 0.2,
                           torch.rand(size, 2, generator=generator) * 0.3 + 0.05], dim=-1)
        targets.append({"labels": torch.randint(classes, (size,), generator=generator), "boxes": boxes})
    return outputs, targets


def _brute_force_min_cost(cost: torch.Tensor) -> float:
    """Least total cost over every injective assignment of targets (columns) to queries (rows)."""
    queries, num_targets = cost.shape
    best = float("inf")
    for rows in itertools.permutations(range(queries), num_targets):
        best = min(best, sum(float(cost[r, c]) for c, r in enumerate(rows)))
    return best if num_targets else 0.0


@pytest.mark.parametrize("seed", range(12))
def test_matcher_finds_the_least_cost_assignment(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    queries = 3 + seed % 3
    sizes = [seed % 4, min(queries, 1 + seed % 5), 2]
    outputs, targets = _random_case(generator, batch=3, queries=queries, classes=4, sizes=sizes)
    indices = HungarianMatcher()(outputs, targets)
    for b, (rows, cols) in enumerate(indices):
        cost = matching_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"])
        # a complete one-to-one assignment ...
        assert len(rows) == len(cols) == len(targets[b]["labels"])
        assert len(set(rows.tolist())) == len(rows) and sorted(cols.tolist()) == list(range(len(cols)))
        # ... of least total cost
        got = float(cost[rows, cols].sum()) if len(rows) else 0.0
        assert got == pytest.approx(_brute_force_min_cost(cost), abs=1e-5)


def test_matcher_pairs_identical_boxes_and_classes() -> None:
    """Queries that are exact, confident copies of the targets (shuffled) are matched to them."""
    boxes = torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.2, 0.2], [0.4, 0.8, 0.1, 0.1]])
    labels = torch.tensor([2, 0, 1, 2])
    logits = torch.full((4, 3), -8.0)
    logits[torch.arange(4), labels] = 8.0
    order = torch.tensor([2, 0, 3, 1])  # target j sits at query order[j]
    outputs = {"pred_logits": torch.zeros(1, 4, 3), "pred_boxes": torch.zeros(1, 4, 4)}
    outputs["pred_logits"][0, order] = logits
    outputs["pred_boxes"][0, order] = boxes
    (rows, cols), = HungarianMatcher()(outputs, [{"labels": labels, "boxes": boxes}])
    assert dict(zip(cols.tolist(), rows.tolist())) == {j: int(order[j]) for j in range(4)}


def test_focal_class_cost_by_hand() -> None:
    logit = torch.tensor([[0.3, -1.2]])
    p = torch.sigmoid(logit[0, 1]).item()
    import math
    want = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
    assert focal_class_cost(logit, torch.tensor([1])).item() == pytest.approx(want, rel=1e-6)
