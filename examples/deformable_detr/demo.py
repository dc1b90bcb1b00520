"""The demo: train a small Deformable DETR from scratch on synthetic shapes, on a CPU.

    python -m examples.deformable_detr.demo                  # DEFAULT_STEPS steps: about 4 minutes on 2 idle cores
    python -m examples.deformable_detr.demo --seconds 60     # a time budget instead (results then vary by machine)

It generates the synthetic dataset (COCO format, fixed seed), times a few
training steps with the msda kernels and with the pure-PyTorch reference op
(the same model and batch), trains for a fixed number of steps with fixed
seeds (so every machine reaches the same AP, a slow one later; it prints the
remaining time as it goes), evaluates on held-out images with pycocotools,
prints AP/AP50/AP75/APs/APm/APl, saves the checkpoint (with the class names
and image size that ``predict`` needs), a picture of predicted boxes and
``results.json``, and prints the ``predict`` command that runs on the checkpoint.

No pretrained weights are used (none can be downloaded): the model is small
(ResNet-18 at a quarter of the width, 2 encoder and 3 decoder layers, 128 px
images) but keeps the structure of the chosen variant.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make a CPU shared with anything else
# crawl (measured: 6.7 s instead of 0.14 s a step with 2 threads on 2 busy
# cores). Sleeping waits cost little on an idle machine. This only takes effect
# when set before torch is first imported, as ``python -m ...demo`` does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from typing import Any

import torch

import msda
from msda import _extension

from .configs import VARIANTS, DetrConfig, config_for_variant
from .data import SHAPES, SyntheticSpec, build_dataset, collate_fn, ensure_synthetic_dataset
from .deformable_detr import build_model
from .reference_op import reference_op
from .draw import draw_detections
from .engine import evaluate, move_targets, train_one_epoch
from .losses import total_loss
from .postprocess import PostProcess
from .checkpoint import save_checkpoint
from .train import DEFAULT_OUTPUT_ROOT, build_criterion, param_groups, seed_everything
from .optional import needs_extra

with needs_extra():
    from PIL import Image

__all__ = ["demo_config", "reference_op", "time_training_steps", "main"]


def demo_config(variant: str, num_classes: int, **overrides: Any) -> DetrConfig:
    """The demo's small model: the variant's structure at a CPU-trainable size."""
    small = dict(
        num_classes=num_classes,
        backbone="resnet18",
        backbone_width=16,
        frozen_stem_and_layer1=False,  # nothing is pretrained: every layer must learn
        hidden_dim=64,
        nheads=4,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=128,
        dropout=0.0,
        enc_n_points=4,
        dec_n_points=4,
        num_queries=30,
        input_proj_groups=16,
    )
    return config_for_variant(variant, **{**small, **overrides})


def time_training_steps(model: torch.nn.Module, criterion: Any, batch: tuple, steps: int, lr: float) -> float:
    """Median seconds of a full training step (forward, loss, backward, AdamW) on a copy of ``model``."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    images, mask, targets = batch
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, lazy init) and is not counted
        start = time.perf_counter()
        loss = total_loss(criterion(model(images, mask), targets), criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


# Training steps by default: about 4 minutes on the 2-core development VM when
# it is idle (README "Demo" gives the measured rate and the AP this reaches).
DEFAULT_STEPS = 1600
PROGRAM = "python -m examples.deformable_detr.demo"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM,
                                description="Deformable DETR demo: train from scratch on synthetic shapes")
    p.add_argument("--variant", default="two_stage", choices=list(VARIANTS),
                   help="two_stage learns fastest from scratch; every variant trains")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {DEFAULT_STEPS}: the same result on every machine)")
    budget.add_argument("--seconds", "--train_seconds", dest="seconds", type=float, default=None,
                        help="train for this many seconds instead of a number of steps (the result then "
                             "depends on the machine's speed)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=3, help=f"shape classes, the first of {', '.join(SHAPES)}")
    p.add_argument("--train_images", type=int, default=2000)
    p.add_argument("--val_images", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--clip_max_norm", type=float, default=0.1)
    p.add_argument("--augment", default="none", choices=["original", "flip_resize", "none"],
                   help="none learns fastest in a short run (evaluation is at the same size)")
    p.add_argument("--speed_steps", type=int, default=3, help="timed steps per op for the speed comparison (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default=os.path.join(DEFAULT_OUTPUT_ROOT, "demo"))
    p.add_argument("--data_root", default=os.path.join(DEFAULT_OUTPUT_ROOT, "synthetic_demo"))
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model setting, e.g. --model hidden_dim=96 (repeatable)")
    return p


REPORT_EVERY = 100  # steps between progress lines


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def progress_line(done: int, total: int, elapsed: float) -> str:
    """'demo: step 300/900 (33%), 3.41 steps/s, about 2 min 56 s left'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    eta = _duration(left) if math.isfinite(left) else "unknown time"
    return f"demo: step {done}/{total} ({100 * done // total}%), {rate:.2f} steps/s, about {eta} left"


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    fields = {f.name: f.type for f in DetrConfig.__dataclass_fields__.values()}
    overrides: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--model {item}: unknown field {name!r}; fields: {', '.join(fields)}")
        kind = str(fields[name])
        overrides[name] = (value.lower() in ("1", "true", "yes") if "bool" in kind else
                           float(value) if "float" in kind else int(value) if "int" in kind else value)
    return overrides


def _set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int, progress: float, warmup: int) -> None:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% as ``progress`` goes 0 -> 1
    (a short run needs a decay, not the step drop of a 50-epoch schedule)."""
    factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    factor *= min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * factor


def save_prediction_picture(dataset: Any, predictions: dict[int, dict], path: str, class_names: list[str],
                            count: int = 8, threshold: float = 0.3) -> None:
    """A grid of held-out images with their predicted boxes above ``threshold``."""
    tiles = []
    for index in range(min(count, len(dataset))):
        image, target = dataset.load(index)
        pred = predictions[int(target["image_id"])]
        keep = pred["scores"] >= threshold
        tile = draw_detections(image, pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep],
                               class_names, line_width=2)
        tiles.append(tile.resize((tile.width * 2, tile.height * 2), Image.NEAREST))
    columns = 4
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (columns * w, math.ceil(len(tiles) / columns) * h), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    grid.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    wall_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cpu")
    kernels = "cpu" in _extension.KERNEL_DEVICES
    print(f"msda {msda.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"compiled CPU kernels: {'yes' if kernels else 'NO (reference fallback: ' + _extension.UNAVAILABLE_REASON + ')'}")

    # 1. data
    t0 = time.perf_counter()
    spec = SyntheticSpec(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    ensure_synthetic_dataset(args.data_root, {"train": args.train_images, "val": args.val_images}, spec)
    scale = args.image_size / 800  # the original sizes, shrunk: short side 800 -> image_size
    train_set = build_dataset("train", args.data_root, scale=scale, augment=args.augment)
    val_set = build_dataset("val", args.data_root, scale=scale)
    class_names = ["background", *SHAPES[: args.num_classes]]  # category ids start at 1
    print(f"synthetic shapes ({', '.join(SHAPES[: args.num_classes])}): {len(train_set)} train, "
          f"{len(val_set)} held-out images of {args.image_size} px in {args.data_root} "
          f"({time.perf_counter() - t0:.1f}s)")

    # 2. model, loss, optimiser (all parameters learn at lr: nothing is pretrained)
    config = demo_config(args.variant, num_classes=args.num_classes + 1, **_parse_overrides(args.model))
    model = build_model(config).to(device)
    criterion = build_criterion(config)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr), lr=args.lr, weight_decay=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: variant {args.variant}, {n_params:,} parameters, backbone {config.backbone} "
          f"(width {config.backbone_width}), {config.enc_layers} encoder / {config.dec_layers} decoder layers, "
          f"d_model {config.hidden_dim}, {config.num_queries} queries")

    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(args.seed),
    )

    # 3. speed: the same training step with the kernels and with the reference op
    speed: dict[str, Any] = {}
    if args.speed_steps > 0:
        images, mask, targets = next(iter(loader))
        batch = (images, mask, move_targets(targets, device))
        kernel_s = time_training_steps(model, criterion, batch, args.speed_steps, args.lr)
        with reference_op():
            reference_s = time_training_steps(model, criterion, batch, args.speed_steps, args.lr)
        speed = {"kernel_step_s": kernel_s, "reference_step_s": reference_s, "speedup": reference_s / kernel_s,
                 "compiled_kernels": kernels}
        print(f"training step (batch {args.batch_size}): msda kernels {kernel_s * 1000:.0f} ms, reference op "
              f"{reference_s * 1000:.0f} ms -> {reference_s / kernel_s:.2f}x faster")
        seed_everything(args.seed)

    # 4. train: a fixed number of steps, or until the time budget is spent (the lr schedule then
    # follows the elapsed time, so the run decays properly whatever the machine's speed)
    budget = args.seconds
    steps = None if budget is not None else (args.steps or DEFAULT_STEPS)
    print(f"training {f'{steps} steps' if steps else f'for {budget:.0f}s'} with batches of {args.batch_size}"
          f"{' (progress and remaining time every ' + str(REPORT_EVERY) + ' steps)' if steps else ''}")
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    t0 = time.perf_counter()
    done, epoch, history = 0, 0, []

    def progress() -> float:
        return done / steps if steps else (time.perf_counter() - t0) / budget

    def after_step(_: int) -> None:
        nonlocal done
        done += 1
        _set_lr(optimizer, base_lrs, done, progress(), args.warmup_steps)
        if steps and (done % REPORT_EVERY == 0 or done == steps):
            print(progress_line(done, steps, time.perf_counter() - t0), flush=True)

    _set_lr(optimizer, base_lrs, 0, 0.0, args.warmup_steps)
    while progress() < 1.0:
        stats = train_one_epoch(model, criterion, loader, optimizer, device, epoch, args.clip_max_norm,
                                max_steps=steps - done if steps else None, print_freq=REPORT_EVERY,
                                deadline=None if steps else t0 + budget, after_step=after_step)
        history.append(stats)
        epoch += 1
    train_s = time.perf_counter() - t0
    steps = done

    # 5. evaluate on held-out images
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_fn)
    t0 = time.perf_counter()
    ap, predictions = evaluate(model, PostProcess(), val_loader, val_set.coco, device, verbose=False)
    eval_s = time.perf_counter() - t0
    print("held-out synthetic images: " + "  ".join(f"{k} {v:.3f}" for k, v in ap.items()))

    # 6. checkpoint, picture and results
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
    # What predict needs beyond the weights: the names of the classes and the image size trained at.
    save_checkpoint(checkpoint, model, args={
        "class_names": class_names, "short_side": args.image_size, "max_size": round(1333 * scale),
        "nheads": config.nheads, "dropout": config.dropout, "input_proj_groups": config.input_proj_groups,
        "backbone": config.backbone, "num_queries": config.num_queries, "aux_loss": config.aux_loss,
    })
    picture = os.path.join(args.output_dir, "predictions.png")
    save_prediction_picture(val_set, predictions, picture, class_names)
    results = {
        "variant": args.variant, "config": {k: v for k, v in vars(config).items()}, "parameters": n_params,
        "train_steps": steps, "batch_size": args.batch_size, "epochs": epoch, "train_seconds": train_s,
        "steps_per_second": steps / train_s, "seed": args.seed,
        "eval_seconds": eval_s, "final_train_loss": history[-1]["loss"], "ap": ap, "speed": speed,
        "total_seconds": time.perf_counter() - wall_start, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "argv": sys.argv[1:] if argv is None else argv,
        "checkpoint": checkpoint,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if speed:
        print(f"msda kernels made the training step {speed['speedup']:.2f}x faster than the reference op "
              f"({speed['kernel_step_s'] * 1000:.0f} vs {speed['reference_step_s'] * 1000:.0f} ms)")
    images_dir = os.path.join(args.data_root, "val")
    print(f"picture: {picture}; results: {os.path.join(args.output_dir, 'results.json')}")
    predict = ["python", "-m", "examples.deformable_detr.predict", checkpoint, images_dir,
               "--output-dir", os.path.join(args.output_dir, "detections"), "--threshold", "0.3"]
    print(f"checkpoint: {checkpoint}; draw its detections on the held-out images with:\n"
          f"  {shlex.join(predict)}")
    print(f"trained {steps} steps in {_duration(train_s)} ({steps / train_s:.2f} steps/s, "
          f"{torch.get_num_threads()} threads, seed {args.seed}); {time.perf_counter() - wall_start:.0f}s in all")
    print(f"AP50 {ap['AP50']:.3f}, AP {ap['AP']:.3f} on {len(val_set)} held-out images")
    return results


if __name__ == "__main__":
    main()
