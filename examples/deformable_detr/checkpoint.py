"""Reading and writing checkpoints in the original Deformable DETR format.

A checkpoint is a dict with ``model`` (the state_dict), ``optimizer``, ``lr_scheduler``, ``epoch``
and ``args`` (an ``argparse.Namespace``). Files are read with ``torch.load(weights_only=True)``,
allowing exactly one extra class, ``argparse.Namespace``: nothing else in a file can run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from typing import Any, Optional

import torch
from torch import nn

from .configs import DetrConfig, config_for_variant

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "state_dict_of",
    "infer_variant",
    "variant_of_config",
    "checkpoint_fields",
    "config_from_checkpoint",
    "load_weights",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

# Keys of the classification heads: the only ones whose shape depends on the number of classes.
_CLASS_HEAD_PREFIXES = ("class_embed.", "transformer.decoder.class_embed.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely (weights only, plus argparse.Namespace for ``args``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; say which file and why
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict (with 'model') or a state_dict, got {type(ckpt).__name__}")
    return ckpt


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state_dict inside a checkpoint dict (``ckpt['model']``), or the dict itself."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no state_dict: expected a dict of tensors under 'model'")
    return state


def infer_variant(state: dict[str, torch.Tensor], args: Optional[argparse.Namespace] = None) -> str:
    """Which published variant a state_dict belongs to, from its keys (and args for DC5)."""
    if "transformer.level_embed" not in state:
        raise CheckpointError("not a Deformable DETR state_dict: no 'transformer.level_embed'")
    if "transformer.enc_output.weight" in state:
        return "two_stage"
    if "transformer.decoder.bbox_embed.0.layers.0.weight" in state:
        return "box_refine"
    if state["transformer.level_embed"].shape[0] == 1:
        return "single_scale_dc5" if getattr(args, "dilation", False) else "single_scale"
    return "base"


def variant_of_config(config: DetrConfig) -> str:
    """The published variant whose structure ``config`` has (sizes aside)."""
    if config.two_stage:
        return "two_stage"
    if config.with_box_refine:
        return "box_refine"
    if config.num_feature_levels == 1:
        return "single_scale_dc5" if config.dilation else "single_scale"
    return "base"


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def checkpoint_fields(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The DetrConfig fields a checkpoint was trained with, except the variant's flags: sizes and
    levels from its tensors, what tensors cannot tell (heads, DC5, dropout) from its ``args``."""
    state = state_dict_of(ckpt)
    args = ckpt.get("args")
    infer_variant(state, args)  # a Deformable DETR state_dict at all?
    hidden_dim = state["transformer.level_embed"].shape[1]
    levels = state["transformer.level_embed"].shape[0]
    nheads = int(getattr(args, "nheads", 8))
    enc_offsets = state["transformer.encoder.layers.0.self_attn.sampling_offsets.bias"].shape[0]
    dec_offsets = state["transformer.decoder.layers.0.cross_attn.sampling_offsets.bias"].shape[0]
    conv1 = state["backbone.0.body.conv1.weight"].shape[0]
    backbone = getattr(args, "backbone", None)
    if backbone is None:
        if "backbone.0.body.layer1.0.conv3.weight" in state:
            backbone = "resnet50"
        else:
            backbone = "resnet34" if "backbone.0.body.layer1.2.conv1.weight" in state else "resnet18"
    fields = dict(
        num_classes=state["class_embed.0.weight"].shape[0],
        backbone=backbone,
        backbone_width=conv1,
        dilation=bool(getattr(args, "dilation", False)),
        num_feature_levels=levels,
        hidden_dim=hidden_dim,
        nheads=nheads,
        enc_layers=_count(state, "transformer.encoder.layers."),
        dec_layers=_count(state, "transformer.decoder.layers."),
        dim_feedforward=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        dropout=float(getattr(args, "dropout", 0.1)),
        enc_n_points=enc_offsets // (nheads * levels * 2),
        dec_n_points=dec_offsets // (nheads * levels * 2),
        num_queries=(
            state["query_embed.weight"].shape[0]
            if "query_embed.weight" in state
            else int(getattr(args, "num_queries", 300))
        ),
        input_proj_groups=int(getattr(args, "input_proj_groups", 32)),
        aux_loss=bool(getattr(args, "aux_loss", True)),
    )
    return fields


def config_from_checkpoint(ckpt: dict[str, Any], **overrides: Any) -> DetrConfig:
    """The DetrConfig that a checkpoint was trained with (checkpoint_fields and its variant)."""
    variant = infer_variant(state_dict_of(ckpt), ckpt.get("args"))
    fields = {**checkpoint_fields(ckpt), **overrides}
    try:
        return config_for_variant(variant, **fields)
    except ValueError as exc:  # e.g. a backbone this example does not implement
        raise CheckpointError(f"checkpoint needs an unsupported configuration: {exc}") from exc


def _reinit_class_heads(model: nn.Module) -> None:
    """Fresh class heads (default Linear init, bias at the focal-loss prior 0.01)."""
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for head in {id(m): m for m in model.class_embed}.values():  # shared heads once
        head.reset_parameters()
        nn.init.constant_(head.bias, prior_bias)


# Keys listed per kind in a mismatch error: a whole state_dict of names says less than a few and a count.
_KEYS_SHOWN = 5


def _some(keys: list[str]) -> str:
    shown = repr(keys[:_KEYS_SHOWN])
    return shown if len(keys) <= _KEYS_SHOWN else f"{shown} and {len(keys) - _KEYS_SHOWN} more"


def load_weights(model: nn.Module, ckpt_or_state: dict[str, Any], source: str = "checkpoint") -> list[str]:
    """Load a checkpoint (dict with 'model') or a state_dict into ``model``, strictly.

    If only the number of classes differs, the class heads are re-initialised (for fine-tuning
    on another dataset) and a message says so. Any other difference raises CheckpointError
    naming the variant the checkpoint's keys belong to and listing the first few missing,
    unexpected and mis-shaped keys with their counts.

    Returns:
        messages describing what was adapted (empty when everything loaded as is).
    """
    ckpt = ckpt_or_state if "model" in ckpt_or_state else {"model": ckpt_or_state}
    state = dict(state_dict_of(ckpt))
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    class_mismatch = [k for k in mismatched if k.startswith(_CLASS_HEAD_PREFIXES)]
    other_mismatch = [k for k in mismatched if k not in class_mismatch]
    if missing or unexpected or other_mismatch:
        lines = [f"{source} does not fit the model"]
        config = getattr(model, "config", None)
        try:
            theirs = infer_variant(state, ckpt.get("args"))
        except CheckpointError:
            theirs = None
        if config is not None and theirs is not None and theirs != variant_of_config(config):
            lines.append(
                f"  the checkpoint is variant {theirs!r}, the model is {variant_of_config(config)!r} "
                f"(build the model with variant {theirs!r})"
            )
        elif theirs is not None:
            same = ", as the model's: the sizes differ" if config is not None else ""
            lines.append(f"  the checkpoint's keys are those of variant {theirs!r}{same}")
        else:
            lines.append("  the checkpoint's keys are not those of a Deformable DETR variant")
        lines.append(f"  missing keys ({len(missing)}): {_some(missing)}")
        lines.append(f"  unexpected keys ({len(unexpected)}): {_some(unexpected)}")
        if other_mismatch:
            shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in other_mismatch]
            lines.append(f"  mis-shaped keys ({len(shapes)}): {_some(shapes)}")
        raise CheckpointError("\n".join(lines))
    messages = []
    if class_mismatch:
        theirs_c = state[class_mismatch[0]].shape[0]
        ours_c = own[class_mismatch[0]].shape[0]
        for k in list(state):
            if k.startswith(_CLASS_HEAD_PREFIXES):
                del state[k]
        messages.append(
            f"{source} has {theirs_c} classes, the model {ours_c}: class heads re-initialised, "
            f"everything else loaded"
        )
        _reinit_class_heads(model)
        result = model.load_state_dict(state, strict=False)
        assert all(k.startswith(_CLASS_HEAD_PREFIXES) for k in result.missing_keys) and not result.unexpected_keys
    else:
        model.load_state_dict(state, strict=True)
    for message in messages:
        log.warning(message)
    return messages


def _as_namespace(args: Any, model: nn.Module) -> argparse.Namespace:
    if isinstance(args, argparse.Namespace):
        return args
    fields: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        fields.update(dataclasses.asdict(config))
    if isinstance(args, dict):
        fields.update(args)
    elif args is not None:
        raise TypeError(f"args must be an argparse.Namespace, a dict or None, got {type(args).__name__}")
    return argparse.Namespace(**fields)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr_scheduler: Any = None,
    epoch: Optional[int] = None,
    args: Any = None,
) -> None:
    """Write a checkpoint in the original format; ``args`` defaults to the model's config fields.

    Unwraps DistributedDataParallel (``.module``) so keys never carry a "module." prefix.
    """
    model = getattr(model, "module", model)
    ckpt: dict[str, Any] = {"model": model.state_dict(), "args": _as_namespace(args, model)}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if lr_scheduler is not None:
        ckpt["lr_scheduler"] = lr_scheduler.state_dict()
    if epoch is not None:
        ckpt["epoch"] = epoch
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
