"""Tiny configurations of every variant: forward and backward on CPU, outputs, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

import msda
from examples.deformable_detr.configs import VARIANTS, config_for_variant, tiny_config
from examples.deformable_detr.deformable_detr import build_model


def batch(b=2, h=96, w=112, pad_w=24):
    torch.manual_seed(0)
    images = torch.randn(b, 3, h, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[-1, :, w - pad_w :] = True  # the last image is narrower: padded on the right
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward(variant):
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    model = build_model(cfg).train()
    images, mask = batch()
    out = model(images, mask)
    q, c = cfg.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (2, q, c)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, c) and aux["pred_boxes"].shape == (2, q, 4)
    assert ("enc_outputs" in out) == cfg.two_stage
    loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_boxes"].sum() + a["pred_logits"].mean() for a in out["aux_outputs"])
    if cfg.two_stage:
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape[:2] == enc["pred_boxes"].shape[:2]
        loss = loss + enc["pred_logits"].mean() + enc["pred_boxes"].nan_to_num().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # Every deformable attention receives a gradient through the op, in every layer.
    for name in [n for n in grads if n.endswith("sampling_offsets.weight") or n.endswith("value_proj.weight")]:
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "value_proj" in n)
    assert grads["backbone.0.body.layer4.0.conv1.weight"].abs().sum() > 0
    frozen = [p for n, p in model.named_parameters() if n.startswith("backbone.0.body.layer1")]
    assert all(p.grad is None for p in frozen)


def test_deformable_attention_is_msda_everywhere():
    model = build_model(tiny_config("two_stage"))
    attn = [m for m in model.modules() if isinstance(m, msda.MSDeformAttn)]
    assert len(attn) == model.config.enc_layers + model.config.dec_layers


def test_eval_is_deterministic_and_batch_independent():
    model = build_model(tiny_config("box_refine")).eval()
    images, mask = batch()
    with torch.no_grad():
        a = model(images, mask)
        b = model(images, mask)
        first = model(images[:1], mask[:1])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_logits"][:1], first["pred_logits"], rtol=1e-5, atol=1e-5)


def test_mask_changes_the_output():
    model = build_model(tiny_config("base")).eval()
    images, mask = batch()
    with torch.no_grad():
        # (boxes do not depend on the input at initialisation: the box heads start at zero)
        masked = model(images, mask)["pred_logits"][-1]
        unmasked = model(images, torch.zeros_like(mask))["pred_logits"][-1]
    assert not torch.allclose(masked, unmasked)


def test_head_initialisation():
    prior = -math.log((1 - 0.01) / 0.01)
    base = build_model(tiny_config("base"))
    assert base.class_embed[0] is base.class_embed[-1]  # one head shared by all layers
    assert base.transformer.decoder.bbox_embed is None
    torch.testing.assert_close(base.class_embed[0].bias, torch.full_like(base.class_embed[0].bias, prior))
    assert base.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert (base.bbox_embed[0].layers[-1].weight == 0).all()

    refine = build_model(tiny_config("box_refine"))
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.bbox_embed[1].layers[-1].bias.tolist() == [0, 0, 0, 0]

    two = build_model(tiny_config("two_stage"))
    assert len(two.class_embed) == two.config.dec_layers + 1
    assert two.transformer.decoder.class_embed is two.class_embed
    assert all(h.layers[-1].bias.tolist() == [0, 0, 0, 0] for h in two.bbox_embed)

    for proj in base.input_proj:
        assert (proj[0].bias == 0).all()


def test_full_size_initialisation_matches_the_original_rules():
    model = build_model(config_for_variant("base"))
    t = model.transformer
    assert (t.reference_points.bias == 0).all()
    attn = t.encoder.layers[0].self_attn
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    # xavier_uniform over the transformer's matrices: the FFN weights are within its bound
    w = t.encoder.layers[0].linear1.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


@pytest.mark.parametrize("dilation, last_stride", [(False, 32), (True, 16)])
def test_dc5_halves_the_last_stride(dilation, last_stride):
    model = build_model(tiny_config("single_scale", dilation=dilation))
    images, mask = batch(b=1, h=128, w=96, pad_w=0)
    levels = model.backbone[0](images, mask)
    assert len(levels) == 1
    assert levels[0][0].shape[-2:] == (128 // last_stride, 96 // last_stride)
    assert model.backbone.strides == [last_stride]


def test_multi_scale_levels_and_strides():
    model = build_model(tiny_config("base"))
    images, mask = batch(b=1, h=128, w=96, pad_w=0)
    levels = model.backbone[0](images, mask)
    assert [f.shape[-2:] for f, _ in levels] == [(16, 12), (8, 6), (4, 3)]
    assert [m.shape[-2:] for _, m in levels] == [(16, 12), (8, 6), (4, 3)]


def test_bad_inputs_are_rejected():
    model = build_model(tiny_config("base"))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, 32))


def test_config_validation():
    with pytest.raises(ValueError, match="two_stage needs with_box_refine"):
        config_for_variant("base", two_stage=True)
    with pytest.raises(ValueError, match="unknown variant"):
        config_for_variant("huge")
    with pytest.raises(ValueError, match="num_feature_levels must be 1"):
        config_for_variant("base", num_feature_levels=2)
    with pytest.raises(ValueError, match="backbone must be"):
        config_for_variant("base", backbone="vgg16")
