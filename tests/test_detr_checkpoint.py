"""Checkpoints: original format, safe loading, strict reload, variant and class-count handling."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch

from examples.deformable_detr.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    infer_variant,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from examples.deformable_detr.configs import VARIANTS, tiny_config
from examples.deformable_detr.deformable_detr import build_model


def outputs_of(model, seed=0):
    torch.manual_seed(seed)
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("variant", ["base", "two_stage"])
def test_save_and_strict_reload_give_identical_outputs(tmp_path, variant):
    torch.manual_seed(1)
    model = build_model(tiny_config(variant))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [40])
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, opt, sched, epoch=3)
    ckpt = read_checkpoint(path)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == 3
    assert isinstance(ckpt["lr_scheduler"]["milestones"], collections.Counter)

    config = config_from_checkpoint(ckpt)
    assert config == model.config
    torch.manual_seed(2)  # a differently initialised model...
    reloaded = build_model(config)
    assert load_weights(reloaded, ckpt) == []
    a, b = outputs_of(model), outputs_of(reloaded)  # ...computes the same after loading
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def test_original_style_checkpoint_with_namespace_args(tmp_path):
    # as the original main.py writes it: state_dict under 'model', args a Namespace with its flags
    model = build_model(tiny_config("box_refine"))
    args = argparse.Namespace(lr=2e-4, backbone="resnet18", dilation=False, nheads=4, dropout=0.1,
                              with_box_refine=True, two_stage=False, lr_drop_epochs=None, frozen_weights=None)
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 49, "args": args},
               tmp_path / "orig.pth")
    ckpt = read_checkpoint(tmp_path / "orig.pth")
    assert infer_variant(ckpt["model"], ckpt["args"]) == "box_refine"
    reloaded = build_model(config_from_checkpoint(ckpt))
    load_weights(reloaded, ckpt)
    torch.testing.assert_close(outputs_of(model)["pred_boxes"], outputs_of(reloaded)["pred_boxes"])


class NotAllowed:
    pass


def test_only_namespace_is_allowed_when_unpickling(tmp_path):
    torch.save({"model": {}, "args": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "evil.pth")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        read_checkpoint("/nonexistent/ckpt.pth")


def test_wrong_variant_lists_missing_and_unexpected_keys():
    two_stage = build_model(tiny_config("two_stage"))
    base = build_model(tiny_config("base"))
    with pytest.raises(CheckpointError) as info:
        load_weights(base, {"model": two_stage.state_dict()})
    message = str(info.value)
    assert "the checkpoint is variant 'two_stage', the model is 'base'" in message
    assert "missing keys (3): ['query_embed.weight', 'transformer.reference_points.bias'" in message
    # the first five of the unexpected keys and how many more, not all of them
    unexpected = sorted(set(two_stage.state_dict()) - set(base.state_dict()))
    assert len(unexpected) > 5
    assert f"unexpected keys ({len(unexpected)}): {unexpected[:5]} and {len(unexpected) - 5} more" in message
    assert unexpected[5] not in message


def test_same_variant_of_other_sizes_is_named():
    small = build_model(tiny_config("base"))
    deeper = build_model(tiny_config("base", enc_layers=2))
    with pytest.raises(CheckpointError, match="keys are those of variant 'base', as the model's: the sizes differ"):
        load_weights(small, deeper.state_dict())


def test_mis_shaped_keys_are_reported():
    small = build_model(tiny_config("base"))
    other = build_model(tiny_config("base", dim_feedforward=48))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys .*linear1.weight: checkpoint \(48, 32\)"):
        load_weights(small, other.state_dict())


def test_another_number_of_classes_reinitialises_the_class_heads():
    source = build_model(tiny_config("box_refine"))
    target = build_model(tiny_config("box_refine", num_classes=3))
    messages = load_weights(target, {"model": source.state_dict()})
    assert messages == ["checkpoint has 91 classes, the model 3: class heads re-initialised, everything else loaded"]
    torch.testing.assert_close(target.bbox_embed[1].layers[0].weight, source.bbox_embed[1].layers[0].weight)
    torch.testing.assert_close(
        target.transformer.level_embed, source.transformer.level_embed
    )
    assert target.class_embed[0].weight.shape == (3, 32)
    assert torch.allclose(target.class_embed[0].bias, torch.full((3,), -4.59512), atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_variant_from_full_size_keys(variant):
    model = build_model(tiny_config(variant))
    args = argparse.Namespace(dilation=model.config.dilation)
    assert infer_variant(model.state_dict(), args) == variant


def test_unsupported_backbone_in_args_is_a_checkpoint_error():
    model = build_model(tiny_config("base"))
    ckpt = {"model": model.state_dict(), "args": argparse.Namespace(backbone="resnet101")}
    with pytest.raises(CheckpointError, match="unsupported configuration.*resnet101"):
        config_from_checkpoint(ckpt)
