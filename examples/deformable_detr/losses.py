"""The Deformable DETR training loss (``SetCriterion``).

For every decoder output (the last layer, each auxiliary layer and, with
two-stage, the encoder proposals whose targets are all relabelled class 0):

* match queries to targets (``HungarianMatcher``);
* ``loss_ce``: sigmoid focal loss (alpha 0.25, gamma 2) against one-hot
  targets (unmatched queries: all zeros), averaged over queries, summed,
  divided by the number of target boxes and multiplied by the number of queries;
* ``loss_bbox``: L1 between matched (cx, cy, w, h) boxes / number of boxes;
* ``loss_giou``: 1 - GIoU of matched boxes / number of boxes.

The number of boxes is summed over all processes and divided by their count
(at least 1), as in the original, so the data-parallel gradient equals the
single-process gradient over the same images. Weights: class 2, L1 5, GIoU 2.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher, Indices

__all__ = ["sigmoid_focal_loss", "SetCriterion", "build_weight_dict", "total_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of (B, Q, C) logits against 0/1 targets,
    averaged over queries, summed over images and classes, divided by ``num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def build_weight_dict(
    dec_layers: int, two_stage: bool, aux_loss: bool = True, cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0
) -> dict[str, float]:
    """Loss name -> weight, including ``_{i}`` for auxiliary layers and ``_enc`` for two-stage."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    suffixes = [f"_{i}" for i in range(dec_layers - 1)] if aux_loss else []
    if two_stage:
        suffixes.append("_enc")
    for suffix in suffixes:
        weights.update({k + suffix: v for k, v in base.items()})
    return weights


def total_loss(loss_dict: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float]) -> torch.Tensor:
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)  # type: ignore[return-value]


class SetCriterion(nn.Module):
    """Matches, then computes the weighted losses of every output head.

    ``forward`` returns the unweighted losses by name (plus ``class_error``, a
    percentage, for logs); ``total_loss(losses, criterion.weight_dict)`` is
    what to back-propagate.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[dict[str, float]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = weight_dict if weight_dict is not None else build_weight_dict(6, two_stage=False)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def loss_labels(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping], indices: Indices, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()
        batch_idx, query_idx = (i.to(logits.device) for i in _query_indices(indices))
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, matched_labels] = 1.0
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma) * logits.shape[1]
        return {"loss_ce": loss}

    def loss_boxes(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping], indices: Indices, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        device = outputs["pred_boxes"].device
        batch_idx, query_idx = (i.to(device) for i in _query_indices(indices))
        pred = outputs["pred_boxes"][batch_idx, query_idx].float()
        target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        loss_bbox = F.l1_loss(pred, target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @torch.no_grad()
    def class_error(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping], indices: Indices) -> torch.Tensor:
        """Percentage of matched queries whose best class is wrong (for logs only)."""
        batch_idx, query_idx = _query_indices(indices)
        if len(batch_idx) == 0:
            return torch.tensor(0.0)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        predicted = outputs["pred_logits"].detach().cpu()[batch_idx, query_idx].argmax(-1)
        return 100.0 - 100.0 * (predicted == labels.cpu()).float().mean()

    def num_boxes(self, targets: Sequence[Mapping], device: torch.device) -> float:
        """Target boxes per process, averaged over processes (at least 1)."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        count = distributed.all_reduce_sum(count)
        return torch.clamp(count / distributed.get_world_size(), min=1).item()

    def head_losses(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping], num_boxes: float) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        return {**self.loss_labels(outputs, targets, indices, num_boxes), **self.loss_boxes(outputs, targets, indices, num_boxes)}

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the model's dict: ``pred_logits``, ``pred_boxes``, optional
                ``aux_outputs`` (list of dicts) and ``enc_outputs`` (dict).
            targets: per image ``labels`` (T_i,) and ``boxes`` (T_i, 4) cxcywh normalised.
        """
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        last = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        indices = self.matcher(last, targets)
        losses = {
            **self.loss_labels(last, targets, indices, num_boxes),
            **self.loss_boxes(last, targets, indices, num_boxes),
            "class_error": self.class_error(last, targets, indices),
        }
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update({f"{k}_{i}": v for k, v in self.head_losses(aux, targets, num_boxes).items()})
        enc = outputs.get("enc_outputs")
        if enc is not None:
            # Encoder proposals are class-agnostic: every target counts as class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update({f"{k}_enc": v for k, v in self.head_losses(enc, binary, num_boxes).items()})
        return losses


def _query_indices(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-image matches into (batch index, query index) tensors."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx
