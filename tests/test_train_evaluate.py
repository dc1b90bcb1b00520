"""COCO evaluation: perfect predictions score AP 1.0, wrong ones do not."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from examples.deformable_detr.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from examples.deformable_detr.evaluate import STAT_NAMES, CocoEvaluator


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory) -> COCO:
    root = tmp_path_factory.mktemp("synthetic")
    # objects from tiny to most of the image, so APs, APm and APl all have ground truth
    spec = SyntheticSpec(num_classes=3, image_size=320, min_objects=2, max_objects=4, min_scale=0.05, max_scale=0.7)
    ann_file = ensure_synthetic_dataset(str(root), {"val": 24}, spec)["val"]
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _ground_truth_predictions(coco: COCO, label_shift: int = 0, box_shift: float = 0.0) -> dict:
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes += box_shift * (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        labels = torch.tensor([a["category_id"] for a in anns])
        labels = (labels - 1 + label_shift) % 3 + 1
        predictions[image_id] = {"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}
    return predictions


def test_perfect_predictions_give_ap_one(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_ground_truth_predictions(coco_gt))
    stats = evaluator.summarize(verbose=False)
    assert list(stats) == list(STAT_NAMES)
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(1.0), name


def test_wrong_class_gives_ap_zero(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_ground_truth_predictions(coco_gt, label_shift=1))
    assert evaluator.summarize(verbose=False)["AP"] == pytest.approx(0.0)


def test_shifted_boxes_pass_ap50_but_not_ap75(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_ground_truth_predictions(coco_gt, box_shift=0.1))
    stats = evaluator.summarize(verbose=False)
    # IoU = (0.9 * 0.9) / (2 - 0.81) = 0.68: found at 0.5, missed at 0.75
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(0.0)


def test_no_detections_gives_zero(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({i: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)} for i in coco_gt.getImgIds()})
    assert evaluator.summarize(verbose=False) == {name: 0.0 for name in STAT_NAMES}


def test_an_image_predicted_twice_counts_once(coco_gt: COCO) -> None:
    """A DistributedSampler repeats images to even out the ranks; the repeats must not add detections."""
    perfect = _ground_truth_predictions(coco_gt)
    shifted = _ground_truth_predictions(coco_gt, box_shift=0.3)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(shifted)
    evaluator.update(perfect)  # the later prediction of an image replaces the earlier one
    assert evaluator.summarize(verbose=False)["AP"] == pytest.approx(1.0)
