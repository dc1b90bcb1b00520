"""Train (and evaluate) Deformable DETR.

    python -m examples.deformable_detr.train                       # synthetic shapes, R50 base variant
    python -m examples.deformable_detr.train --dataset_file coco --coco_path /data/coco
    torchrun --nproc_per_node=2 -m examples.deformable_detr.train ...   # data parallel
    python -m examples.deformable_detr.train --resume outputs/train/checkpoint.pth
    python -m examples.deformable_detr.train --eval --resume checkpoint.pth

Defaults are the original recipe (detector.md): AdamW lr 2e-4, backbone lr
2e-5, sampling_offsets/reference_points lr x 0.1, weight decay 1e-4, batch 2
per process, 50 epochs, lr drop at 40, gradient clipping 0.1, seed 42. Model
sizes can be overridden (``--backbone resnet18 --hidden_dim 64 ...``) for
small runs. Checkpoints are the original dict (model, optimizer,
lr_scheduler, epoch, args) and resume exactly. AMP (``--amp``) applies on CUDA.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (README "OMP_WAIT_POLICY"):
# read once, when torch loads, so it only takes effect when this module is the
# program (python -m / torchrun -m). An OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import distributed
from .checkpoint import load_weights, read_checkpoint, save_checkpoint
from .configs import VARIANTS, DetrConfig, config_for_variant
from .data import SyntheticSpec, build_dataset, collate_fn, ensure_synthetic_dataset
from .deformable_detr import build_model
from .engine import evaluate, train_one_epoch
from .losses import SetCriterion, build_weight_dict
from .matcher import HungarianMatcher
from .postprocess import PostProcess

__all__ = [
    "get_args_parser",
    "config_from_args",
    "param_groups",
    "build_criterion",
    "build_data",
    "seed_everything",
    "main",
    "DEFAULT_OUTPUT_ROOT",
]

DEFAULT_OUTPUT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "outputs")
BACKBONE_NAMES = ("backbone.0",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")
# DetrConfig fields that can be set from the command line (None keeps the variant's value).
CONFIG_FIELDS = (
    "backbone", "backbone_width", "dilation", "hidden_dim", "nheads", "enc_layers", "dec_layers",
    "dim_feedforward", "dropout", "enc_n_points", "dec_n_points", "num_queries", "input_proj_groups",
    "num_feature_levels",
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.deformable_detr.train",
                                description="Train (and evaluate) Deformable DETR")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--lr_backbone", type=float, default=2e-5)
    g.add_argument("--lr_linear_proj_mult", type=float, default=0.1)
    g.add_argument("--batch_size", type=int, default=2, help="per process")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--lr_drop", type=int, default=40)
    g.add_argument("--clip_max_norm", type=float, default=0.1)
    g.add_argument("--amp", action="store_true", help="float16 autocast + grad scaler (CUDA only)")
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="cut epochs short (smoke tests)")

    g = p.add_argument_group("model")
    g.add_argument("--variant", default="base", choices=list(VARIANTS))
    g.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50"])
    g.add_argument("--pretrained_backbone", default=None, help="ImageNet ResNet state_dict file (torchvision names)")
    g.add_argument("--frozen_stem", default="auto", choices=["auto", "yes", "no"],
                   help="freeze conv1/bn1/layer1 as the original; 'auto' freezes them only with --pretrained_backbone "
                        "(frozen random filters cannot learn)")
    for name in CONFIG_FIELDS[1:]:
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if name == "dilation" else (
            float if name == "dropout" else int)
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")

    g = p.add_argument_group("matcher and loss")
    g.add_argument("--set_cost_class", type=float, default=2.0)
    g.add_argument("--set_cost_bbox", type=float, default=5.0)
    g.add_argument("--set_cost_giou", type=float, default=2.0)
    g.add_argument("--cls_loss_coef", type=float, default=2.0)
    g.add_argument("--bbox_loss_coef", type=float, default=5.0)
    g.add_argument("--giou_loss_coef", type=float, default=2.0)
    g.add_argument("--focal_alpha", type=float, default=0.25)

    g = p.add_argument_group("data")
    g.add_argument("--dataset_file", default="synthetic", choices=["synthetic", "coco"])
    g.add_argument("--coco_path", default=None, help="COCO-format root: train2017/, val2017/, annotations/")
    g.add_argument("--num_classes", type=int, default=None, help="default: max category id + 1 (91 for COCO)")
    g.add_argument("--image_scale", type=float, default=None,
                   help="multiply the original sizes (800/1333...); default 1 for COCO, image_size/800 for synthetic")
    g.add_argument("--augment", default="original", choices=["original", "flip_resize", "none"])
    g.add_argument("--synthetic_root", default=os.path.join(DEFAULT_OUTPUT_ROOT, "synthetic"))
    g.add_argument("--synthetic_train_images", type=int, default=2000)
    g.add_argument("--synthetic_val_images", type=int, default=200)
    g.add_argument("--synthetic_image_size", type=int, default=256)
    g.add_argument("--synthetic_classes", type=int, default=3)
    g.add_argument("--num_workers", type=int, default=2)

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=os.path.join(DEFAULT_OUTPUT_ROOT, "train"))
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--resume", default="", help="checkpoint to resume from (model, optimizer, scheduler, epoch)")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="only evaluate (with --resume)")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--find_unused_parameters", action="store_true")
    g.add_argument("--print_freq", type=int, default=10)
    return p


def seed_everything(seed: int) -> None:
    """The same seed for torch, numpy and Python's random (which the augmentations use)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def config_from_args(args: argparse.Namespace, num_classes: int) -> DetrConfig:
    overrides: dict[str, Any] = {k: getattr(args, k) for k in CONFIG_FIELDS if getattr(args, k, None) is not None}
    if args.frozen_stem == "auto":
        overrides["frozen_stem_and_layer1"] = bool(args.pretrained_backbone)
    else:
        overrides["frozen_stem_and_layer1"] = args.frozen_stem == "yes"
    return config_for_variant(args.variant, num_classes=num_classes, aux_loss=args.aux_loss, **overrides)


def param_groups(
    model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1,
    backbone_names: Sequence[str] = BACKBONE_NAMES, linear_proj_names: Sequence[str] = LINEAR_PROJ_NAMES,
) -> list[dict[str, Any]]:
    """The original three AdamW groups: transformer and heads at ``lr``, backbone at
    ``lr_backbone``, sampling offsets and reference points at ``lr * lr_linear_proj_mult``."""

    def matches(name: str, keys: Sequence[str]) -> bool:
        return any(k in name for k in keys)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not matches(n, backbone_names) and not matches(n, linear_proj_names)],
         "lr": lr},
        {"params": [p for n, p in named if matches(n, backbone_names)], "lr": lr_backbone},
        {"params": [p for n, p in named if matches(n, linear_proj_names)], "lr": lr * lr_linear_proj_mult},
    ]


def build_criterion(config: DetrConfig, args: Optional[argparse.Namespace] = None) -> SetCriterion:
    a = args if args is not None else get_args_parser().parse_args([])
    matcher = HungarianMatcher(a.set_cost_class, a.set_cost_bbox, a.set_cost_giou, a.focal_alpha)
    weights = build_weight_dict(
        config.dec_layers, config.two_stage, config.aux_loss, a.cls_loss_coef, a.bbox_loss_coef, a.giou_loss_coef
    )
    return SetCriterion(config.num_classes, matcher, weights, focal_alpha=a.focal_alpha)


def build_data(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(train dataset, val dataset, num_classes) for ``args.dataset_file``."""
    if args.dataset_file == "synthetic":
        spec = SyntheticSpec(num_classes=args.synthetic_classes, image_size=args.synthetic_image_size,
                             size_jitter=0.15, seed=args.seed)
        if distributed.is_main_process():
            ensure_synthetic_dataset(args.synthetic_root, {"train": args.synthetic_train_images,
                                                           "val": args.synthetic_val_images}, spec)
        if distributed.is_dist_avail_and_initialized():
            torch.distributed.barrier()  # the others wait for rank 0 to write it
        root = args.synthetic_root
        scale = args.image_scale if args.image_scale is not None else args.synthetic_image_size / 800
    else:
        if not args.coco_path:
            raise SystemExit("--dataset_file coco needs --coco_path")
        root, scale = args.coco_path, args.image_scale if args.image_scale is not None else 1.0
    train = build_dataset("train", root, scale=scale, augment=args.augment)
    val = build_dataset("val", root, scale=scale)
    num_classes = args.num_classes or max(train.coco.getCatIds()) + 1
    return train, val, num_classes


def make_loaders(args: argparse.Namespace, train_set: Any, val_set: Any) -> tuple[DataLoader, DataLoader, Any]:
    if distributed.is_dist_avail_and_initialized():
        train_sampler: Any = DistributedSampler(train_set, shuffle=True, seed=args.seed)
        val_sampler: Any = DistributedSampler(val_set, shuffle=False)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        train_sampler, val_sampler = RandomSampler(train_set, generator=generator), SequentialSampler(val_set)
    batch_sampler = torch.utils.data.BatchSampler(train_sampler, args.batch_size, drop_last=True)
    common = dict(collate_fn=collate_fn, num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **common)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, drop_last=False, **common)
    return train_loader, val_loader, train_sampler


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = distributed.init_distributed(args.device)
    seed_everything(args.seed + distributed.get_rank())
    train_set, val_set, num_classes = build_data(args)
    config = config_from_args(args, num_classes)
    # record the effective model settings in args, which checkpoints store (config_from_checkpoint reads them)
    for field in (*CONFIG_FIELDS, "num_classes"):
        setattr(args, field, getattr(config, field))
    model = build_model(config).to(device)
    if args.pretrained_backbone:
        from .backbone import load_imagenet_weights
        load_imagenet_weights(model.backbone[0].body, args.pretrained_backbone)
    criterion = build_criterion(config, args)
    postprocess = PostProcess()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, args.lr_backbone, args.lr_linear_proj_mult), lr=args.lr,
        weight_decay=args.weight_decay,
    )
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    model_without_ddp = model
    if distributed.is_dist_avail_and_initialized():
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters,
        )

    if args.resume:
        ckpt = read_checkpoint(args.resume)
        load_weights(model_without_ddp, ckpt, source=args.resume)
        if not args.eval and "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            args.start_epoch = ckpt["epoch"] + 1

    train_loader, val_loader, train_sampler = make_loaders(args, train_set, val_set)
    main_process = distributed.is_main_process()
    if main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        print(f"variant {args.variant}: {n_params:,} trainable parameters, {num_classes} classes, "
              f"{len(train_set)} train / {len(val_set)} val images, {distributed.get_world_size()} process(es) "
              f"on {device}")

    if args.eval:
        stats, _ = evaluate(model, postprocess, val_loader, val_set.coco, device, amp=args.amp)
        _print_stats(stats)
        distributed.cleanup()
        return {"test": stats}

    log_path = os.path.join(args.output_dir, "log.txt")
    result: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(args.start_epoch, args.epochs):
        if isinstance(train_sampler, DistributedSampler):
            train_sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, args.clip_max_norm, scaler, args.amp,
            args.print_freq, args.max_steps_per_epoch,
        )
        lr_scheduler.step()
        if main_process:
            save_checkpoint(os.path.join(args.output_dir, "checkpoint.pth"), model_without_ddp, optimizer,
                            lr_scheduler, epoch, args)
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 5 == 0:
                save_checkpoint(os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"), model_without_ddp,
                                optimizer, lr_scheduler, epoch, args)
        last = epoch + 1 == args.epochs
        test_stats: dict[str, float] = {}
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            test_stats, _ = evaluate(model, postprocess, val_loader, val_set.coco, device, amp=args.amp)
            if main_process:
                _print_stats(test_stats)
        result = {"epoch": epoch, "n_parameters": n_params, **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()}}
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(result) + "\n")
    if main_process:
        print(f"training took {time.perf_counter() - start:.0f}s; checkpoints and log.txt in {args.output_dir}")
    distributed.cleanup()
    return result


def _print_stats(stats: dict[str, float]) -> None:
    print("  ".join(f"{k} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
