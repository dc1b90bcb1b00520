"""PostProcess on hand-made outputs."""

from __future__ import annotations

import pytest
import torch

from examples.deformable_detr.postprocess import PostProcess


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_top_pairs_labels_and_pixel_boxes():
    # 3 queries x 2 classes; the best pairs are (q1, c0) 0.9, (q2, c1) 0.8, (q1, c1) 0.7
    probs = torch.tensor([[[0.1, 0.2], [0.9, 0.7], [0.05, 0.8]]])
    outputs = {
        "pred_logits": torch.logit(probs),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2], [0.75, 0.25, 0.1, 0.5]]]),
    }
    sizes = torch.tensor([[100, 200]])  # h = 100, w = 200
    [r] = PostProcess(num_select=3)(outputs, sizes)
    torch.testing.assert_close(r["scores"], torch.tensor([0.9, 0.8, 0.7]))
    assert r["labels"].tolist() == [0, 1, 1]
    expected = torch.tensor(
        [
            [0.0 * 200, 0.4 * 100, 0.5 * 200, 0.6 * 100],  # q1: cx .25 w .5, cy .5 h .2
            [0.7 * 200, 0.0 * 100, 0.8 * 200, 0.5 * 100],  # q2
            [0.0 * 200, 0.4 * 100, 0.5 * 200, 0.6 * 100],  # q1 again, other class
        ]
    )
    torch.testing.assert_close(r["boxes"], expected)


def test_default_keeps_100_and_clamps_to_available_pairs():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 300, 91), "pred_boxes": torch.rand(2, 300, 4)}
    results = PostProcess()(outputs, torch.tensor([[480, 640], [10, 20]]))
    assert len(results) == 2 and all(r["scores"].shape == (100,) for r in results)
    assert (results[0]["scores"][:-1] >= results[0]["scores"][1:]).all()
    small = {"pred_logits": torch.randn(1, 4, 5), "pred_boxes": torch.rand(1, 4, 4)}
    [r] = PostProcess()(small, torch.tensor([[1, 1]]))
    assert r["scores"].shape == (20,) and sorted(r["labels"].tolist()) == sorted(list(range(5)) * 4)


def test_per_image_scaling():
    outputs = {"pred_logits": torch.zeros(2, 1, 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 1.0, 1.0]]] * 2)}
    r = PostProcess()(outputs, torch.tensor([[10, 20], [30, 40]]))
    assert r[0]["boxes"].tolist() == [[0.0, 0.0, 20.0, 10.0]]
    assert r[1]["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]
    assert r[0]["scores"].tolist() == [0.5]


def test_target_sizes_shape_is_checked():
    outputs = {"pred_logits": torch.zeros(2, 1, 1), "pred_boxes": torch.zeros(2, 1, 4)}
    with pytest.raises(ValueError, match="target_sizes must be"):
        PostProcess()(outputs, torch.tensor([[10, 20]]))
