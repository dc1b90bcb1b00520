"""The named benchmark shapes and their inputs.

Sampling locations are drawn the way a trained Deformable DETR produces them,
because the op's speed depends on where it samples (cache locality), and
uniform random locations describe no real model:

* encoder-style: the queries are the pixels of every level, in memory order,
  each with the reference point at its own pixel centre (Deformable DETR's
  ``get_reference_points``); its points land a few pixels around it on every
  level;
* decoder-style: the queries sit anywhere (uniform reference points, in random
  order) and their points land a few pixels around the reference.

"A few pixels" is a Gaussian offset with a standard deviation of OFFSET_STD_PX
pixels of each level. Attention weights are a softmax over the L*P entries of
random logits, as the module computes them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

# Standard deviation of sampling offsets around the reference point, in pixels
# of each level; trained models spread their points over a few pixels.
OFFSET_STD_PX = 2.0

# Deformable DETR's feature maps for an 800x1333 image (strides 8, 16, 32, 64).
DETR_LEVELS: tuple[tuple[int, int], ...] = ((100, 167), (50, 84), (25, 42), (13, 21))
# Small maps with the same 4-level structure, for --quick smoke runs.
QUICK_LEVELS: tuple[tuple[int, int], ...] = ((16, 24), (8, 12), (4, 6), (2, 3))

QueryStyle = Literal["encoder", "decoder"]


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op-level benchmark shape."""

    name: str
    description: str
    N: int
    M: int
    D: int
    P: int
    levels: tuple[tuple[int, int], ...]
    query_style: QueryStyle
    decoder_queries: int = 0  # Lq for decoder-style cases; encoder-style uses Lq = S

    @property
    def L(self) -> int:
        return len(self.levels)

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def Lq(self) -> int:
        return self.S if self.query_style == "encoder" else self.decoder_queries

    def dims(self) -> dict[str, int]:
        return {"N": self.N, "S": self.S, "Lq": self.Lq, "M": self.M, "D": self.D, "L": self.L, "P": self.P}


def _op_cases(levels: tuple[tuple[int, int], ...], decoder_lq: int, dino_lq: int) -> dict[str, OpCase]:
    single = levels[:1]
    cases = [
        OpCase("encoder_n1", "encoder, N 1 (Lq = S)", 1, 8, 32, 4, levels, "encoder"),
        OpCase("encoder_n2", "encoder, N 2 (Lq = S)", 2, 8, 32, 4, levels, "encoder"),
        OpCase("decoder", f"decoder, Lq {decoder_lq}, N 2", 2, 8, 32, 4, levels, "decoder", decoder_lq),
        OpCase("dino_decoder", f"DINO-like decoder, Lq {dino_lq}, N 2", 2, 8, 32, 4, levels, "decoder", dino_lq),
        OpCase("single_scale", "single level, L 1, encoder queries, N 1", 1, 8, 32, 4, single, "encoder"),
        OpCase("wide_heads", f"M 1, D 256, decoder queries Lq {decoder_lq}, N 1", 1, 1, 256, 4, levels, "decoder",
               decoder_lq),
    ]
    return {c.name: c for c in cases}


OP_CASES: dict[str, OpCase] = _op_cases(DETR_LEVELS, decoder_lq=300, dino_lq=900)
QUICK_OP_CASES: dict[str, OpCase] = _op_cases(QUICK_LEVELS, decoder_lq=30, dino_lq=90)


def level_tables(levels: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial_shapes, level_start_index) as int64 tensors on ``device``."""
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def encoder_reference_points(levels: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """(S, 2) normalised (x, y) pixel centres of every level, in memory order."""
    points = []
    for h, w in levels:
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1))
    return torch.cat(points, dim=0)


def reference_points(case: OpCase, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(N, Lq, 2) normalised reference points of the queries."""
    if case.query_style == "encoder":
        return encoder_reference_points(case.levels, device).expand(case.N, -1, -1).contiguous()
    return torch.rand(case.N, case.Lq, 2, generator=generator).to(device)


def make_op_inputs(
    case: OpCase, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """value, level tables, locations, weights and a grad_output for one case."""
    g = torch.Generator().manual_seed(seed)
    N, Lq, M, D, L, P = case.N, case.Lq, case.M, case.D, case.L, case.P
    spatial_shapes, level_start_index = level_tables(case.levels, device)
    value = torch.randn(N, case.S, M, D, generator=g).to(device, dtype)
    ref = reference_points(case, g, device)  # (N, Lq, 2)
    # Offsets in pixels of each level, converted to normalised units per level.
    wh = torch.tensor([[w, h] for h, w in case.levels], dtype=torch.float32, device=device)  # (L, 2)
    offsets_px = torch.randn(N, Lq, M, L, P, 2, generator=g).to(device) * OFFSET_STD_PX
    locations = ref[:, :, None, None, None, :] + offsets_px / wh[:, None, :]
    logits = torch.randn(N, Lq, M, L * P, generator=g).to(device)
    weights = torch.softmax(logits, dim=-1).view(N, Lq, M, L, P)
    grad_output = torch.randn(N, Lq, M * D, generator=g).to(device, dtype)
    return {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": locations.to(dtype),
        "attention_weights": weights.to(dtype),
        "grad_output": grad_output,
    }
