"""One training epoch and one evaluation pass, with a text progress bar.

Both work the same in one process and under torchrun: losses are averaged
over processes for the log, predictions are gathered for COCO evaluation.
Automatic mixed precision (float16 autocast and a gradient scaler) is used
when ``amp`` is set, on CUDA only.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import distributed
from .evaluate import CocoEvaluator
from .losses import SetCriterion, total_loss

__all__ = ["Progress", "train_one_epoch", "evaluate", "move_targets"]


class Progress:
    """A one-line progress bar on a terminal, a line every ``print_freq`` steps otherwise.

    Prints on the main process only.
    """

    def __init__(self, total: Optional[int], header: str, print_freq: int = 10, width: int = 20) -> None:
        self.total, self.header, self.print_freq, self.width = total, header, print_freq, width
        self.start = time.perf_counter()
        self.enabled = distributed.is_main_process()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, meters: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step + 1
        last = self.total is not None and done == self.total
        if not self.tty and done % self.print_freq and not last and done != 1:
            return
        elapsed = time.perf_counter() - self.start
        if self.total:
            filled = int(self.width * done / self.total)
            eta = elapsed / done * (self.total - done)
            position = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} eta {eta:4.0f}s"
        else:
            position = f"{done}"
        stats = "  ".join(f"{k} {v:.4g}" for k, v in meters.items())
        line = f"{self.header} {position}  {stats}  ({elapsed:.0f}s)"
        if self.tty:
            print("\r" + line, end="\n" if last else "", flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


def move_targets(targets: Iterable[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    max_norm: float = 0.1,
    scaler: Optional["torch.amp.GradScaler"] = None,
    amp: bool = False,
    print_freq: int = 10,
    max_steps: Optional[int] = None,
    deadline: Optional[float] = None,
    after_step: Optional[Any] = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader`` (or ``max_steps`` steps, or until
    ``time.perf_counter()`` passes ``deadline``); return the mean of each logged value.

    ``after_step(step)`` is called after each optimiser step (the demo uses it
    for a per-step learning-rate schedule).
    """
    model.train()
    criterion.train()
    use_amp = amp and device.type == "cuda"
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    progress = Progress(total, f"Epoch [{epoch}]", print_freq)
    sums: dict[str, float] = {}
    steps = 0
    for step, (images, mask, targets) in enumerate(data_loader):
        if (max_steps is not None and step >= max_steps) or (deadline is not None and time.perf_counter() > deadline):
            break
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = move_targets(targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(images, mask)
        loss_dict = criterion(outputs, targets)  # the criterion computes in float32
        loss = total_loss(loss_dict, criterion.weight_dict)

        logged = distributed.reduce_dict_mean({k: v.detach() for k, v in loss_dict.items()})
        logged_loss = total_loss(logged, criterion.weight_dict).item()
        if not math.isfinite(logged_loss):
            raise FloatingPointError(f"loss is {logged_loss} at epoch {epoch} step {step}; losses: "
                                     f"{ {k: v.item() for k, v in logged.items()} }")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and use_amp:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = _clip(model, max_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            grad_norm = _clip(model, max_norm)
            optimizer.step()
        if after_step is not None:
            after_step(step)

        meters = {
            "loss": logged_loss,
            "loss_ce": logged["loss_ce"].item(),
            "loss_bbox": logged["loss_bbox"].item(),
            "loss_giou": logged["loss_giou"].item(),
            "class_error": logged["class_error"].item(),
            "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"],
        }
        for k, v in meters.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        progress.update(step, meters)
    progress.close()
    return {k: v / max(steps, 1) for k, v in sums.items()} | {"steps": steps}


def _clip(model: nn.Module, max_norm: float) -> float:
    parameters = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in parameters]))) if parameters else 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocess: nn.Module,
    data_loader: Iterable,
    coco_gt: Any,
    device: torch.device,
    amp: bool = False,
    verbose: bool = True,
    print_freq: int = 10,
) -> tuple[dict[str, float], dict[int, dict[str, torch.Tensor]]]:
    """Predict every image of ``data_loader`` and score with COCOeval.

    Returns (``{"AP", "AP50", ...}``, this process's predictions by image id).
    """
    model.eval()
    evaluator = CocoEvaluator(coco_gt)
    use_amp = amp and device.type == "cuda"
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    progress = Progress(total, "Eval", print_freq)
    all_predictions: dict[int, dict[str, torch.Tensor]] = {}
    for step, (images, mask, targets) in enumerate(data_loader):
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess(outputs, sizes)
        predictions = {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}
        evaluator.update(predictions)
        all_predictions.update(predictions)
        progress.update(step, {})
    progress.close()
    return evaluator.summarize(verbose=verbose), all_predictions
