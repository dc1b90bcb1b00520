"""Whole models of the families that test_integrations_transformers.py does
not build: with msda_hf.enable() their outputs equal transformers' own path
(float32, within 1e-5), msda's op really runs, and disable() restores
transformers' bits.

Each model comes from a tiny random config (nothing downloaded, no timm):
small ResNet, HGNetV2, Swin, ViT or DINOv2 backbones, two decoder layers,
64x64 images. Every parameter gets a little noise first: the box heads start
at zero (the boxes would then ignore the attention), and the sampling offsets
at whole pixels (see test_integrations_transformers.py).

All families of transformers 5.24 with the layer or the functions are built
here or there; none needed a download.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = pytest.importorskip("transformers")

import msda.integrations.transformers as msda_hf  # noqa: E402
from msda.integrations import _hf_forwards, _shared  # noqa: E402

ATOL = 1e-5
IMAGE = (2, 3, 64, 64)


def _hgnet(stages: list[str]):
    return T.HGNetV2Config(
        embedding_size=8, hidden_sizes=[16, 16, 16, 16], depths=[1, 1, 1, 1], stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 16], stage_mid_channels=[8, 8, 8, 8], stage_out_channels=[16, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1], out_features=stages,
    )


# The RT-DETR-style hybrid encoder and decoder that rt_detr_v2, deimv2 and pp_doclayout_* share.
RT_DETR_LIKE = dict(
    d_model=32, encoder_hidden_dim=32, encoder_in_channels=[16, 16, 16], encoder_ffn_dim=32, encoder_attention_heads=2,
    decoder_in_channels=[32, 32, 32], decoder_ffn_dim=32, decoder_layers=2, decoder_attention_heads=2, num_queries=10,
    num_denoising=0, num_labels=3,
)
DETECTION = ("logits", "pred_boxes")


def _lw_detr():
    vit = T.LwDetrViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, window_block_indices=[0], out_indices=[0, 1],
        num_windows=4, image_size=64,
    )
    config = T.LwDetrConfig(
        backbone_config=vit, d_model=32, projector_scale_factors=[0.5, 2.0], decoder_ffn_dim=32, decoder_layers=2,
        decoder_self_attention_heads=2, decoder_cross_attention_heads=2, num_queries=10, group_detr=2, num_labels=3,
        dropout=0.0,
    )
    pixel_mask = torch.ones(IMAGE[0], *IMAGE[2:], dtype=torch.long)
    pixel_mask[1, :, 40:] = 0  # padding on the right of the second image: the value is masked
    return T.LwDetrForObjectDetection(config), {"pixel_values": torch.randn(IMAGE), "pixel_mask": pixel_mask}, DETECTION


def _rf_detr():
    dinov2 = T.RfDetrDinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8, out_indices=[1, 2],
        num_windows=2,
    )
    config = T.RfDetrConfig(
        backbone_config=dinov2, d_model=32, decoder_ffn_dim=32, decoder_layers=2, decoder_self_attention_heads=2,
        decoder_cross_attention_heads=2, num_queries=10, group_detr=2, num_labels=3, dropout=0.0,
    )
    return T.RfDetrForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


def _omdet_turbo():
    text = dict(
        model_type="clip_text_model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=8, vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    swin = dict(
        model_type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
        out_indices=[2, 3, 4],
    )
    # class_embed_dim (= the text width) must differ from the decoder width:
    # transformers 5.24 builds the task projection only then, and reads it always.
    config = T.OmDetTurboConfig(
        text_config=text, backbone_config=swin, use_timm_backbone=False, apply_layernorm_after_vision_backbone=False,
        image_size=64, encoder_in_channels=[16, 32, 64], encoder_hidden_dim=32, decoder_hidden_dim=32,
        vision_features_channels=[32, 32, 32], encoder_layers=1, encoder_attention_heads=2, encoder_dim_feedforward=32,
        encoder_projection_indices=[2], decoder_num_layers=2, decoder_num_heads=2, decoder_num_points=3,
        decoder_dim_feedforward=32, task_encoder_hidden_dim=32, class_embed_dim=16, text_projection_in_dim=16,
        text_projection_out_dim=16, num_queries=10,
    )
    g = torch.Generator().manual_seed(1)
    inputs = {  # 3 class prompts for each of the 2 images, 7 tokens each
        "pixel_values": torch.randn(IMAGE),
        "classes_input_ids": torch.randint(2, 50, (6, 7), generator=g),
        "classes_attention_mask": torch.ones(6, 7, dtype=torch.long),
        "tasks_input_ids": torch.randint(2, 50, (2, 7), generator=g),
        "tasks_attention_mask": torch.ones(2, 7, dtype=torch.long),
        "classes_structure": torch.tensor([3, 3]),
    }
    return T.OmDetTurboForObjectDetection(config), inputs, ("decoder_class_logits", "decoder_coord_logits")


def _oneformer():
    swin = T.SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = T.OneFormerConfig(
        backbone_config=swin, conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
        num_attention_heads=2, encoder_layers=1, decoder_layers=2, num_queries=5, num_labels=3, text_encoder_width=32,
        text_encoder_num_layers=1, text_encoder_vocab_size=50, text_encoder_context_length=8, task_seq_len=8,
        query_dec_layers=1, dropout=0.0,
    )
    inputs = {
        "pixel_values": torch.randn(IMAGE),
        "task_inputs": torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),
    }
    return T.OneFormerForUniversalSegmentation(config), inputs, ("class_queries_logits", "masks_queries_logits")


def _rt_detr_v2():
    resnet = T.RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = T.RTDetrV2Config(backbone_config=resnet, decoder_n_points=3, **RT_DETR_LIKE)
    return T.RTDetrV2ForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


def _deimv2():
    # A different number of points per level: msda's v2 op, not v1 underneath.
    config = T.Deimv2Config(
        backbone_config=_hgnet(["stage2", "stage3", "stage4"]), decoder_n_points=[2, 3, 1], **RT_DETR_LIKE
    )
    return T.Deimv2ForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


def _pp_doclayout_v2():
    reading_order = dict(  # the reading-order model: hidden = 2 * coordinate_size + shape_size
        hidden_size=32, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1, coordinate_size=11,
        shape_size=10, global_pointer_head_size=8, num_classes=3,
    )
    config = T.PPDocLayoutV2Config(
        backbone_config=_hgnet(["stage2", "stage3", "stage4"]), class_thresholds=[0.5] * 3, class_order=[0, 1, 2],
        reading_order_config=reading_order, **RT_DETR_LIKE,
    )
    return T.PPDocLayoutV2ForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


def _pp_doclayout_v3():
    config = T.PPDocLayoutV3Config(
        backbone_config=_hgnet(["stage1", "stage2", "stage3", "stage4"]), x4_feat_dim=16,
        mask_feature_channels=[16, 16], num_prototypes=8, **RT_DETR_LIKE,
    )
    return T.PPDocLayoutV3ForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


def _pp_doclayout_v4():
    config = T.PPDocLayoutV4Config(backbone_config=_hgnet(["stage2", "stage3", "stage4"]), **RT_DETR_LIKE)
    return T.PPDocLayoutV4ForObjectDetection(config), {"pixel_values": torch.randn(IMAGE)}, DETECTION


FAMILIES = {
    "lw_detr": _lw_detr,
    "rf_detr": _rf_detr,
    "omdet_turbo": _omdet_turbo,
    "oneformer": _oneformer,
    "rt_detr_v2": _rt_detr_v2,
    "deimv2": _deimv2,
    "pp_doclayout_v2": _pp_doclayout_v2,
    "pp_doclayout_v3": _pp_doclayout_v3,
    "pp_doclayout_v4": _pp_doclayout_v4,
}
# Families that keep the function on the module at construction: enable(model).
STORES_FUNCTION = {"deimv2"}


@pytest.fixture(autouse=True)
def _always_disabled():
    msda_hf.disable()
    yield
    msda_hf.disable()


def _outputs(model, inputs, names):
    with torch.no_grad():
        out = model.eval()(**inputs)
    return {n: getattr(out, n) for n in names}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_whole_model_equals_transformers_path(name, monkeypatch):
    if not os.path.isdir(os.path.join(os.path.dirname(T.__file__), "models", name)):
        pytest.skip(f"this transformers ({T.__version__}) has no {name}")
    torch.manual_seed(0)
    model, inputs, names = FAMILIES[name]()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    want = _outputs(model, inputs, names)

    calls = []
    for module, op in ((_hf_forwards, "ms_deform_attn"), (_shared, "ms_deform_attn"), (_hf_forwards, "ms_deform_attn_v2")):
        real = getattr(module, op)
        monkeypatch.setattr(module, op, lambda *a, _real=real: calls.append(1) or _real(*a))
    with msda_hf.enable(model if name in STORES_FUNCTION else None) as handle:
        got = _outputs(model, inputs, names)
    assert any(s.startswith(name + ".") for s in handle.switched), handle.switched
    assert calls, "msda's op never ran"
    if name in STORES_FUNCTION:
        assert handle.instances > 0  # the model's stored functions were switched
    for n in names:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0, msg=n)

    again = _outputs(model, inputs, names)
    for n in names:  # disable() restores transformers' path bit for bit
        assert torch.equal(again[n], want[n]), n
