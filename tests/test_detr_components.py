"""Hand-checked cases for the detector's building blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from examples.deformable_detr import box_ops
from examples.deformable_detr.backbone import Backbone, FrozenBatchNorm2d, ResNet, load_imagenet_weights
from examples.deformable_detr.deformable_transformer import DeformableTransformer, Encoder
from examples.deformable_detr.position_encoding import PositionEmbeddingSine


# --- box_ops -------------------------------------------------------------------------------------

def test_box_conversions_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]]))
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert box_ops.box_area(xyxy).tolist() == pytest.approx([0.08, 24.0])


def test_box_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    iou, union = box_ops.box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; identical; disjoint
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))
    giou = box_ops.generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 -> 1/7 - (9 - 7)/9; same box -> 1; 5x2 = 10 -> 0 - (10 - 5)/10
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.5]]))
    assert giou.shape == (1, 3)


def test_giou_rejects_inverted_boxes():
    with pytest.raises(ValueError, match="inverted"):
        box_ops.generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_inverse_sigmoid():
    x = torch.tensor([0.5, 0.25, 0.0, 1.0, -3.0, 2.0])
    y = box_ops.inverse_sigmoid(x)
    assert y[0] == 0 and y[1].item() == pytest.approx(math.log(1 / 3))
    bound = math.log(1 / 1e-5)
    assert y[2:].tolist() == pytest.approx([-bound, bound, -bound, bound], rel=1e-5)
    torch.testing.assert_close(box_ops.inverse_sigmoid(torch.tensor([0.3, 0.9])).sigmoid(), torch.tensor([0.3, 0.9]))


# --- position encoding ---------------------------------------------------------------------------

def test_position_encoding_values_by_hand():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # last column is padding: valid width 3
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)
    assert pos.shape == (1, 8, 2, 4)
    scale = 2 * math.pi
    y = (torch.tensor([1.0, 2.0]) - 0.5) / (2 + 1e-6) * scale
    x = (torch.tensor([1.0, 2.0, 3.0, 3.0]) - 0.5) / (3 + 1e-6) * scale
    t = 10000 ** (2 / 4)  # frequency of features 2 and 3
    # channels: [y sin f0, y cos f0, y sin f1, y cos f1, x sin f0, x cos f0, x sin f1, x cos f1]
    torch.testing.assert_close(pos[0, 0, :, 0], y.sin())
    torch.testing.assert_close(pos[0, 1, :, 0], y.cos())
    torch.testing.assert_close(pos[0, 3, :, 0], (y / t).cos())
    torch.testing.assert_close(pos[0, 4, 0], x.sin())
    torch.testing.assert_close(pos[0, 6, 0], (x / t).sin())


# --- backbone ------------------------------------------------------------------------------------

def test_frozen_batchnorm_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, not unexpected
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == []


def test_resnet50_shapes_and_torchvision_names():
    net = ResNet("resnet50")
    names = dict(net.named_parameters())
    assert names["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert names["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == 23_454_912  # torchvision resnet50 minus fc
    assert net.channels == [512, 1024, 2048]
    assert ResNet("resnet18").channels == [128, 256, 512]
    assert len(ResNet("resnet34").layer3) == 6


def test_imagenet_weights_load_from_a_file(tmp_path):
    source = ResNet("resnet18", width=8)
    for m in source.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_()
    state = dict(source.state_dict())
    # what a torchvision ImageNet file also holds: a classifier and BatchNorm counters
    state["fc.weight"] = torch.zeros(1000, 64)
    state["fc.bias"] = torch.zeros(1000)
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    target = ResNet("resnet18", width=8)
    load_imagenet_weights(target, str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)

    torch.save({"conv1.weight": state["conv1.weight"]}, path)
    with pytest.raises(ValueError, match="missing keys"):
        load_imagenet_weights(target, str(path))


def test_backbone_masks_follow_the_padding():
    backbone = Backbone("resnet18", width=8)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :, 32:] = True
    levels = backbone(images, mask)
    for feature, level_mask in levels:
        w = feature.shape[-1]
        assert level_mask[0, 0].tolist() == [False] * (w // 2) + [True] * (w // 2)


# --- transformer geometry ------------------------------------------------------------------------

def test_valid_ratio_and_encoder_reference_points():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[:, :, 2:] = True  # half the width is padding
    ratio = DeformableTransformer.valid_ratio(mask)
    assert ratio.tolist() == [[0.5, 1.0]]
    shapes = torch.tensor([[2, 4], [1, 2]])
    ratios = torch.tensor([[[0.5, 1.0], [0.5, 1.0]]])
    ref = Encoder.reference_points(shapes, ratios)
    assert ref.shape == (1, 10, 2, 2)
    # first pixel of level 0: centre (0.5, 0.5) over the valid size (2, 2) -> (0.25, 0.25),
    # then scaled by each level's valid ratio -> x * 0.5
    torch.testing.assert_close(ref[0, 0], torch.tensor([[0.125, 0.25], [0.125, 0.25]]))
    # level 1 (1 x 2, valid 1 x 1): its first pixel is (0.5, 0.5) -> (0.25, 0.5)
    assert ref[0, 8, 0].tolist() == pytest.approx([0.25, 0.5])


def test_two_stage_proposals_by_hand():
    t = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=32, num_feature_levels=2, two_stage=True, two_stage_num_proposals=3)
    shapes = torch.tensor([[2, 2], [1, 1]])
    memory = torch.randn(1, 5, 32)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, 1] = True  # level 0, pixel (y=0, x=1) is padding
    out_memory, proposals = t.encoder_proposals(memory, mask, shapes)
    logit = lambda p: math.log(p / (1 - p))
    # valid sizes are counted along the first row and column: valid_W = 1, valid_H = 2, so
    # pixel (0, 0) of level 0 has
    # centre ((0 + 0.5) / 1, (0 + 0.5) / 2) = (0.5, 0.25), size 0.05
    assert proposals[0, 0].tolist() == pytest.approx([logit(0.5), logit(0.25), logit(0.05), logit(0.05)], rel=1e-5)
    assert torch.isinf(proposals[0, 1]).all()  # padding
    # pixel (0, 1) of level 0 lies at x = 1.5 > 0.99: invalid as well
    assert torch.isinf(proposals[0, 3]).all()
    # level 1: one pixel, centre (0.5, 0.5), size 0.1
    assert proposals[0, 4].tolist() == pytest.approx([0.0, 0.0, logit(0.1), logit(0.1)], abs=1e-5)
    # the memory of invalid proposals is zeroed before enc_output: all equal rows after it
    torch.testing.assert_close(out_memory[0, 1], out_memory[0, 3])
