"""COCO box evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl.

Predictions are collected per image (xyxy boxes in original-image pixels, as
``PostProcess`` returns them), merged across processes when distributed, and
scored with ``COCOeval`` on exactly the images that were predicted.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Mapping

import numpy as np
import torch

from . import distributed
from .optional import needs_extra

with needs_extra():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

__all__ = ["STAT_NAMES", "CocoEvaluator", "coco_box_stats"]

# The first six numbers of COCOeval.stats, in order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_coco_results(predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> list[dict[str, Any]]:
    results = []
    for image_id, pred in predictions.items():
        boxes = pred["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = pred["scores"].detach().float().cpu().tolist()
        labels = pred["labels"].detach().cpu().tolist()
        results.extend(
            {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            for box, label, score in zip(xywh, labels, scores)
        )
    return results


def coco_box_stats(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: list[int], verbose: bool = False
) -> dict[str, float]:
    """Run COCOeval (bbox) on ``image_ids``; return the six AP figures.

    With no detections at all every AP is 0 (pycocotools cannot load an empty
    result list). A figure is -1 when no ground truth falls in its range, as
    in pycocotools.
    """
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        summary = [line for line in buffer.getvalue().splitlines() if line.startswith(" Average Precision")]
        print("\n".join(summary))
    return {name: float(value) for name, value in zip(STAT_NAMES, np.asarray(evaluator.stats)[:6])}


class CocoEvaluator:
    """Collects predictions batch by batch, then scores them.

    ``update`` takes ``{image_id: {"scores", "labels", "boxes" (xyxy pixels)}}``.
    Results are kept per image, so an image predicted twice (a DistributedSampler
    pads the last batch with repeats) counts once.
    """

    def __init__(self, coco_gt: COCO) -> None:
        self.coco_gt = coco_gt
        self.per_image: dict[int, list[dict[str, Any]]] = {}

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        for image_id, pred in predictions.items():
            self.per_image[int(image_id)] = _to_coco_results({image_id: pred})

    def summarize(self, verbose: bool = True) -> dict[str, float]:
        """Merge every process's predictions and score them (the same on every process)."""
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in distributed.all_gather_object(self.per_image):
            merged.update(part)
        results = [r for image_results in merged.values() for r in image_results]
        return coco_box_stats(self.coco_gt, results, list(merged), verbose=verbose and distributed.is_main_process())
