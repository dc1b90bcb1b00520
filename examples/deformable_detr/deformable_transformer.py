"""The deformable transformer: encoder and decoder built on ``msda.MSDeformAttn``, and the
two-stage proposal generator. Layer and parameter names follow the original so checkpoints load.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msda import MSDeformAttn

from .box_ops import inverse_sigmoid
from .position_encoding import sine_embedding

__all__ = ["DeformableTransformer"]


# The (h, w) of every level: the (L, 2) spatial_shapes tensor, or a sequence of Python ints.
LevelSizes = Union[Tensor, Sequence[Sequence[int]]]


def _level_sizes(spatial_shapes: LevelSizes) -> list[tuple[int, int]]:
    """(h, w) per level. A sequence is used as given, so an export with dynamic image sizes keeps
    them symbolic (reading them back from the tensor would make them data-dependent)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _add_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then the FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, padding_mask: Optional[Tensor],
    ) -> Tensor:
        attended = self.self_attn(_add_pos(src, pos), reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DecoderLayer(nn.Module):
    """Post-norm: query self-attention, deformable cross-attention into the memory, FFN.

    Submodules are declared in the original's order (cross_attn first) so the state_dict matches.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, padding_mask: Optional[Tensor],
    ) -> Tensor:
        q = k = _add_pos(tgt, query_pos)
        # nn.MultiheadAttention is sequence-first here, as in the original
        attended = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            _add_pos(tgt, query_pos), reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def reference_points(spatial_shapes: LevelSizes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid (unpadded) size -> (N, S, L, 2).

        Each point is then scaled by every level's valid ratio: the same image location,
        expressed in each level's padded [0, 1] coordinates.
        """
        device = valid_ratios.device
        points = []
        for lvl, (h, w) in enumerate(_level_sizes(spatial_shapes)):
            # arange + 0.5 equals linspace(0.5, h - 0.5, h) exactly (step 1) and exports with symbolic h
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
        pos: Tensor, padding_mask: Optional[Tensor], level_sizes: Optional[LevelSizes] = None,
    ) -> Tensor:
        """``level_sizes``: the (h, w) of every level as Python (or symbolic) ints, when the caller
        has them; otherwise they are read from ``spatial_shapes``."""
        reference_points = self.reference_points(spatial_shapes if level_sizes is None else level_sizes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return out


class Decoder(nn.Module):
    """Runs the decoder layers, returning every layer's output and reference points.

    ``bbox_embed`` (per-layer box heads, set by the detector under box refinement) moves each
    layer's reference points to its refined boxes (detached: every layer learns its own delta).
    ``class_embed`` is set under two-stage; the decoder only holds it for the encoder proposals.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(
        self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor, padding_mask: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        output = tgt
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            output = layer(output, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:  # 2-d points become boxes: the size comes from the head alone
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            outputs.append(output)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


class DeformableTransformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        enc_layer = EncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = Encoder(enc_layer, num_encoder_layers)
        dec_layer = DecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points)
        self.decoder = Decoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding mask -> (B, 2): unpadded fraction of the width and of the height."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: LevelSizes) -> tuple[Tensor, Tensor]:
        """One proposal box per encoder pixel, in logit space, and the memory that scores them.

        Centre at the pixel centre over the valid size, size 0.05 * 2**level. Proposals touching the
        border (any coordinate outside (0.01, 0.99)) or on padding become +inf, their memory 0.
        """
        n = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(_level_sizes(spatial_shapes)):
            level_mask = padding_mask[:, start : start + h * w].view(n, h, w)
            valid_h = torch.sum(~level_mask[:, :, 0], 1)
            valid_w = torch.sum(~level_mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),  # = linspace(0, h - 1, h)
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(n, 1, 1, 2)
            centres = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            sizes = torch.ones_like(centres) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((centres, sizes), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        query_embed: Optional[torch.Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Per-level (B, C, H, W) features, (B, H, W) masks and position encodings ->
        (hs (layers, B, Q, C), initial reference, per-layer references, encoder class logits or
        None, encoder unsigmoided boxes or None)."""
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        # one scalar_tensor per size, not torch.as_tensor(shapes): under torch.export the sizes stay
        # symbolic (as_tensor would fix them to the example's, losing dynamic image sizes)
        spatial_shapes = torch.stack(
            [torch.scalar_tensor(size, dtype=torch.long, device=src_flat.device) for hw in shapes for size in hw]
        ).view(len(shapes), 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)

        # the Python sizes, not spatial_shapes' values: torch.export keeps them symbolic (dynamic image size)
        memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, mask_flat, shapes)

        batch, _, c = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            assert self.decoder.class_embed is not None and self.decoder.bbox_embed is not None
            output_memory, proposals = self.encoder_proposals(memory, mask_flat, shapes)
            head = self.decoder.num_layers  # the extra head after the decoder's own
            enc_class = self.decoder.class_embed[head](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[head](output_memory) + proposals
            topk = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords)))
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, mask_flat
        )
        return hs, init_reference, inter_references, enc_class, enc_coord_unact

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(B, K, 4) logit-space boxes -> (B, K, 2 * d_model) sine embedding of their sigmoid."""
        num_feats = self.d_model // 2
        return sine_embedding(proposals.sigmoid() * (2 * math.pi), num_feats).flatten(2)
