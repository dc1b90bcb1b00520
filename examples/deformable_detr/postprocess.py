"""Turn the detector's raw outputs into scored boxes in image pixels (COCO-evaluation format)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Sigmoid scores, the top ``num_select`` (query, class) pairs per image, boxes in pixels.

    A query can appear several times with different classes, as in the original: each class
    is an independent sigmoid.
    """

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            outputs: with ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4) normalised cxcywh.
            target_sizes: (B, 2) of (height, width) of each original image.

        Returns:
            per image {"scores" (K,), "labels" (K,) int64, "boxes" (K, 4) absolute xyxy}, sorted by
            decreasing score, K = min(num_select, Q * C).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be (batch, 2) = ({logits.shape[0]}, 2) of (height, width), "
                f"got {tuple(target_sizes.shape)}"
            )
        batch, _, num_classes = logits.shape
        prob = logits.float().sigmoid().view(batch, -1)
        k = min(self.num_select, prob.shape[1])
        scores, index = torch.topk(prob, k, dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        xyxy = box_cxcywh_to_xyxy(boxes.float())
        xyxy = torch.gather(xyxy, 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.to(xyxy.dtype).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        xyxy = xyxy * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
