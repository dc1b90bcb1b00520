"""SetCriterion on cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from examples.deformable_detr.losses import SetCriterion, build_weight_dict, sigmoid_focal_loss, total_loss


def _focal_by_hand(logits: list[list[float]], onehot: list[list[int]], num_boxes: float) -> float:
    """sum over queries and classes of alpha_t (1 - p_t)^2 CE, / queries, / num_boxes, * queries."""
    total = 0.0
    for row, targets in zip(logits, onehot):
        for x, t in zip(row, targets):
            p = 1 / (1 + math.exp(-x))
            p_t = p if t else 1 - p
            alpha_t = 0.25 if t else 0.75
            total += alpha_t * (1 - p_t) ** 2 * -math.log(p_t)
    return total / len(logits) / num_boxes * len(logits)


def test_losses_single_target_by_hand() -> None:
    logits = [[1.0, -2.0], [-0.5, 0.5]]
    outputs = {
        # query 0 sits on the target, query 1 far away: the matcher must pick query 0
        "pred_logits": torch.tensor([logits]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.6, 0.2, 0.2]])}]
    losses = SetCriterion(num_classes=2)(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(_focal_by_hand(logits, [[1, 0], [0, 0]], 1.0), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1 + 0.1, rel=1e-5)
    # boxes [.4,.4,.6,.6] and [.5,.5,.7,.7]: IoU 0.01/0.07, enclosing 0.09
    giou = 0.01 / 0.07 - (0.09 - 0.07) / 0.09
    assert losses["loss_giou"].item() == pytest.approx(1 - giou, rel=1e-5)
    assert losses["class_error"].item() == 0.0


def test_losses_normalise_by_boxes_of_the_whole_batch() -> None:
    """Two images, three boxes: every term is divided by 3, not per image."""
    outputs = {
        "pred_logits": torch.tensor([[[2.0, -1.0, 0.0]], [[0.0, 0.0, 0.0]]]).repeat(1, 2, 1),
        "pred_boxes": torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], [[0.5, 0.5, 0.4, 0.4], [0.2, 0.8, 0.1, 0.1]]]),
    }
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    losses = SetCriterion(num_classes=3)(outputs, targets)
    # predicted boxes equal their targets: no box loss
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    want = _focal_by_hand([[2, -1, 0], [2, -1, 0]], [[1, 0, 0], [0, 0, 1]], 3.0)
    want += _focal_by_hand([[0, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 0, 0]], 3.0)
    assert losses["loss_ce"].item() == pytest.approx(want, rel=1e-5)


def test_aux_and_two_stage_losses_and_weights() -> None:
    torch.manual_seed(0)

    def head() -> dict[str, torch.Tensor]:
        return {"pred_logits": torch.randn(1, 3, 2), "pred_boxes": torch.rand(1, 3, 4) * 0.3 + 0.2}

    outputs = {**head(), "aux_outputs": [head(), head()], "enc_outputs": head()}
    targets = [{"labels": torch.tensor([1, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.1]])}]
    weights = build_weight_dict(dec_layers=3, two_stage=True)
    criterion = SetCriterion(num_classes=2, weight_dict=weights)
    losses = criterion(outputs, targets)
    names = {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", "_enc")}
    assert names <= set(losses) and names == set(weights)
    assert weights["loss_ce_1"] == 2 and weights["loss_bbox_enc"] == 5 and weights["loss_giou_0"] == 2
    # each auxiliary head is scored exactly like a last layer would be
    alone = SetCriterion(num_classes=2)(outputs["aux_outputs"][1], targets)
    assert losses["loss_giou_1"].item() == pytest.approx(alone["loss_giou"].item())
    # the encoder's loss relabels every target as class 0
    relabelled = [{**targets[0], "labels": torch.tensor([0, 0])}]
    enc = SetCriterion(num_classes=2)(outputs["enc_outputs"], relabelled)
    assert losses["loss_ce_enc"].item() == pytest.approx(enc["loss_ce"].item())
    want_total = sum(losses[k].item() * w for k, w in weights.items())
    assert total_loss(losses, weights).item() == pytest.approx(want_total, rel=1e-6)


def test_focal_loss_gradient_flows_and_no_targets_is_fine() -> None:
    logits = torch.zeros(1, 4, 3, requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.zeros(1, 4, 3), num_boxes=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.75 * 0.25 * math.log(2) * 3, rel=1e-5)  # per query, * Q / Q
    assert torch.all(logits.grad > 0)
    outputs = {"pred_logits": torch.randn(1, 3, 2), "pred_boxes": torch.rand(1, 3, 4) * 0.2 + 0.3}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(num_classes=2)(outputs, empty)
    assert losses["loss_bbox"].item() == 0.0 and torch.isfinite(losses["loss_ce"])
