"""Hungarian matching of predicted boxes to target boxes (one-to-one).

The cost of pairing query q with target t is

    2 * focal_class_cost + 5 * L1(box_q, box_t) + 2 * (-GIoU(box_q, box_t))

with the focal class cost of Deformable DETR (alpha 0.25, gamma 2):
``alpha (1-p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))``
at p = sigmoid(logit of t's class). scipy's ``linear_sum_assignment`` then
picks, per image, the assignment of least total cost.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .optional import needs_extra

with needs_extra():
    from scipy.optimize import linear_sum_assignment

__all__ = ["HungarianMatcher", "focal_class_cost", "matching_cost"]

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def focal_class_cost(logits: torch.Tensor, target_labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(Q, C) logits, (T,) labels -> (Q, T) classification cost."""
    prob = logits.sigmoid()
    neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos_cost[:, target_labels] - neg_cost[:, target_labels]


def matching_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_boxes: torch.Tensor,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """(Q, C) logits and (Q, 4) cxcywh boxes against (T,) labels and (T, 4) boxes -> (Q, T) cost."""
    class_cost = focal_class_cost(logits, target_labels, alpha, gamma)
    l1_cost = torch.cdist(boxes, target_boxes, p=1)
    giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
    return cost_class * class_cost + cost_bbox * l1_cost + cost_giou * giou_cost


class HungarianMatcher(nn.Module):
    """Assigns each target to one query, minimising the matching cost per image."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]) -> Indices:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4) cxcywh.
            targets: per image, ``labels`` (T_i,) and ``boxes`` (T_i, 4) cxcywh.

        Returns:
            Per image ``(query_indices, target_indices)``, int64 tensors of length min(Q, T_i).
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        # One cost matrix for the whole batch (cheaper), in float32 even under AMP.
        logits = outputs["pred_logits"].flatten(0, 1).float()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        cost = matching_cost(
            logits, boxes, labels, target_boxes,
            self.cost_class, self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma,
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
