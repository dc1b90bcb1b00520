"""Module-level cases: one ``msda.MSDeformAttn`` layer and a 6-layer Deformable DETR encoder.

The encoder layer is Deformable DETR's (post-norm): multi-scale deformable
self-attention with residual and LayerNorm, then an FFN (256 -> 1024 -> 256,
ReLU) with residual and LayerNorm; dropout is left out (it is off at inference
and only adds noise to a timing). Queries are the pixels of every level with
the reference point at their own centre, as in the encoder.

The parameters are the module's own initialisation (points a few pixels around
the reference, along fixed directions) with small random weights added to the
offset and attention projections, so points and weights vary per query the
way a trained model's do, rather than being identical for every query.

For the reference implementation the worker routes the module's op to
``msda.ms_deform_attn_reference`` (see ``use_reference_op``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import msda
import msda.module
from cases import DETR_LEVELS, QUICK_LEVELS, encoder_reference_points, level_tables

# Gives offsets a spread of about 1 pixel (query features have unit scale, 256 channels).
OFFSET_WEIGHT_STD = 1.0 / 16
ATTENTION_WEIGHT_STD = 1.0 / 16


@dataclasses.dataclass(frozen=True)
class ModuleCase:
    name: str
    description: str
    layers: int  # 0: one bare MSDeformAttn, otherwise an encoder stack of this many layers
    levels: tuple[tuple[int, int], ...]
    N: int = 1
    d_model: int = 256
    d_ffn: int = 1024
    M: int = 8
    P: int = 4


MODULE_CASES: dict[str, ModuleCase] = {
    c.name: c
    for c in (
        ModuleCase("module_layer", "one MSDeformAttn, encoder shape, N 1", 0, DETR_LEVELS),
        ModuleCase("encoder_stack", "6-layer Deformable DETR encoder, N 1", 6, DETR_LEVELS),
    )
}
# --quick: tiny maps, and 2 layers instead of 6 (the structure is what a smoke run checks).
QUICK_MODULE_CASES: dict[str, ModuleCase] = {
    name: dataclasses.replace(case, levels=QUICK_LEVELS, layers=min(case.layers, 2))
    for name, case in MODULE_CASES.items()
}


class EncoderLayer(nn.Module):
    """Deformable DETR's encoder layer (post-norm), without dropout."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = msda.MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + attended)
        return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class EncoderStack(nn.Module):
    def __init__(self, case: ModuleCase) -> None:
        super().__init__()
        L = len(case.levels)
        self.layers = nn.ModuleList(
            EncoderLayer(case.d_model, case.d_ffn, L, case.M, case.P) for _ in range(case.layers)
        )

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


class SingleAttention(nn.Module):
    def __init__(self, case: ModuleCase) -> None:
        super().__init__()
        self.attn = msda.MSDeformAttn(case.d_model, len(case.levels), case.M, case.P)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        return self.attn(src + pos, reference_points, src, spatial_shapes, level_start_index)


def build_module(case: ModuleCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SingleAttention(case) if case.layers == 0 else EncoderStack(case)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, msda.MSDeformAttn):
                module.sampling_offsets.weight.normal_(0.0, OFFSET_WEIGHT_STD)
                module.attention_weights.weight.normal_(0.0, ATTENTION_WEIGHT_STD)
    return model


def make_module_inputs(case: ModuleCase, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tables(case.levels, device)
    S = sum(h * w for h, w in case.levels)
    L = len(case.levels)
    ref = encoder_reference_points(case.levels, device)  # (S, 2); the same point on every level
    reference_points = ref[None, :, None, :].expand(case.N, S, L, 2).contiguous()
    src = torch.randn(case.N, S, case.d_model, generator=g).to(device).requires_grad_(True)
    pos = torch.randn(case.N, S, case.d_model, generator=g).to(device)
    grad_output = torch.randn(case.N, S, case.d_model, generator=g).to(device)
    return {
        "src": src,
        "pos": pos,
        "reference_points": reference_points,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "grad_output": grad_output,
    }


def use_reference_op() -> None:
    """Route every MSDeformAttn in this process through the grid_sample reference."""
    msda.module.ms_deform_attn = msda.ms_deform_attn_reference
