"""Training end to end on the CPU: the loss falls, every variant trains, the train
command checkpoints and resumes in the original format, the demo runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from examples.deformable_detr.checkpoint import read_checkpoint
from examples.deformable_detr.configs import tiny_config
from examples.deformable_detr.data import SyntheticSpec, build_dataset, collate_fn, ensure_synthetic_dataset
from examples.deformable_detr.deformable_detr import build_model
from examples.deformable_detr.engine import train_one_epoch
from examples.deformable_detr.losses import total_loss
from examples.deformable_detr.train import build_criterion, get_args_parser, main, param_groups, seed_everything

TINY_MODEL_ARGS = [
    "--backbone", "resnet18", "--backbone_width", "8", "--hidden_dim", "32", "--nheads", "4",
    "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "10",
    "--input_proj_groups", "8", "--enc_n_points", "2", "--dec_n_points", "2",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    spec = SyntheticSpec(num_classes=3, image_size=64, min_objects=1, max_objects=2, min_scale=0.3, seed=42)
    ensure_synthetic_dataset(root, {"train": 16, "val": 4}, spec)
    return root


def test_loss_falls_when_training_on_a_few_images(synthetic_root: str) -> None:
    seed_everything(0)
    dataset = build_dataset("train", synthetic_root, scale=64 / 800, augment="none")
    batch = collate_fn([dataset[i] for i in range(4)])
    config = tiny_config("base", num_classes=4, frozen_stem_and_layer1=False, dropout=0.0)
    model = build_model(config)
    criterion = build_criterion(config)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 1e-3), lr=1e-3, weight_decay=1e-4)
    first = train_one_epoch(model, criterion, [batch] * 5, optimizer, torch.device("cpu"), 0)
    for epoch in range(1, 6):
        last = train_one_epoch(model, criterion, [batch] * 5, optimizer, torch.device("cpu"), epoch)
    assert last["steps"] == 5
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert last["loss_giou"] < first["loss_giou"] and last["loss_bbox"] < first["loss_bbox"]


@pytest.mark.parametrize("variant", ["single_scale", "single_scale_dc5", "base", "box_refine", "two_stage"])
def test_every_variant_trains_every_parameter(variant: str) -> None:
    torch.manual_seed(0)
    config = tiny_config(variant, num_classes=4, frozen_stem_and_layer1=False)
    model, criterion = build_model(config), build_criterion(config)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])}] * 2
    losses = criterion(model(torch.randn(2, 3, 64, 64)), targets)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} | ({"loss_ce_enc"} if variant == "two_stage" else set())
    assert expected <= set(losses)
    total_loss(losses, criterion.weight_dict).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []


def test_param_groups_follow_the_original() -> None:
    model = build_model(tiny_config("base", num_classes=4))
    groups = param_groups(model, 2e-4, 2e-5, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.0.") for p in groups[1]["params"])
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)] for p in groups[2]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    # the original freezes the stem and layer1
    assert not any(names[id(p)].startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for g in groups for p in g["params"])


def test_train_command_checkpoints_and_resumes(synthetic_root: str, tmp_path) -> None:
    out = str(tmp_path / "run")
    common = [*TINY_MODEL_ARGS, "--dataset_file", "synthetic", "--synthetic_root", synthetic_root,
              "--synthetic_train_images", "16", "--synthetic_val_images", "4", "--synthetic_image_size", "64",
              "--batch_size", "4", "--num_workers", "0", "--lr_drop", "1", "--max_steps_per_epoch", "2",
              "--eval_every", "0", "--output_dir", out, "--device", "cpu"]
    main(get_args_parser().parse_args([*common, "--epochs", "1"]))
    ckpt = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert ckpt["epoch"] == 0 and ckpt["args"].hidden_dim == 32 and ckpt["args"].lr == 2e-4
    assert ckpt["lr_scheduler"]["last_epoch"] == 1
    result = main(get_args_parser().parse_args([*common, "--epochs", "2", "--resume", os.path.join(out, "checkpoint.pth")]))
    assert result["epoch"] == 1 and set(result) >= {"test_AP", "test_AP50", "train_loss"}
    with open(os.path.join(out, "log.txt")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
    resumed = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    # the lr dropped once per epoch (lr_drop 1): 2e-4 -> 2e-5 -> 2e-6
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-6)


def test_demo_runs_end_to_end(tmp_path) -> None:
    from examples.deformable_detr.demo import main as demo_main

    out = tmp_path / "demo"
    results = demo_main(["--steps", "3", "--train_images", "16", "--val_images", "4", "--image_size", "64",
                         "--batch_size", "4", "--speed_steps", "1", "--output_dir", str(out),
                         "--data_root", str(tmp_path / "data"), "--model", "hidden_dim=32", "--model", "num_queries=10"])
    assert results["train_steps"] == 3 and results["config"]["hidden_dim"] == 32
    assert set(results["ap"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["speed"]["speedup"] > 0
    assert (out / "predictions.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["train_steps"] == 3
