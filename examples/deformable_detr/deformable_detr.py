"""The Deformable DETR detector: backbone, input projections, transformer and prediction heads.

``build_model(config)`` builds any variant (configs.py). Module names and registration order
follow the original, so ``state_dict()`` keys match its checkpoints exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, downsample_mask
from .box_ops import inverse_sigmoid
from .configs import DetrConfig
from .deformable_transformer import DeformableTransformer
from .position_encoding import PositionEmbeddingSine

__all__ = ["MLP", "Joiner", "DeformableDETR", "build_model"]


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Joiner(nn.Sequential):
    """(backbone, position encoding) as a Sequential, which is what puts "backbone.0." in the keys."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):  # type: ignore[override]
        levels = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in levels]
        return levels, pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., ICLR 2021).

    forward(images (B, 3, H, W), mask (B, H, W) bool, True at padding) returns a dict:
      ``pred_logits`` (B, Q, C) class logits (sigmoid, no "no object" class),
      ``pred_boxes`` (B, Q, 4) normalised (cx, cy, w, h),
      ``aux_outputs`` the same for every earlier decoder layer (when aux_loss),
      ``enc_outputs`` the encoder proposals {pred_logits, pred_boxes} (two-stage).
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        self.num_queries = config.num_queries
        self.num_feature_levels = config.num_feature_levels
        self.aux_loss = config.aux_loss
        self.with_box_refine = config.with_box_refine
        self.two_stage = config.two_stage
        hidden_dim = transformer.d_model

        self.transformer = transformer
        class_embed = nn.Linear(hidden_dim, config.num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # registered here (replaced by per-layer lists below) to keep the original state_dict order
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        if not config.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, hidden_dim * 2)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, config)
        self.backbone = backbone

        # Focal-loss prior: every class starts at probability 0.01.
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0.0)

        # One head per decoder layer (+1 for the encoder proposals under two-stage).
        num_pred = config.dec_layers + 1 if config.two_stage else config.dec_layers
        if config.with_box_refine:
            self.class_embed = _clones(class_embed, num_pred)  # type: ignore[assignment]
            self.bbox_embed = _clones(bbox_embed, num_pred)  # type: ignore[assignment]
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            # the same head object repeated: shared weights, listed under every index in state_dict
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])  # type: ignore[assignment]
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])  # type: ignore[assignment]
            self.transformer.decoder.bbox_embed = None
        if config.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    @staticmethod
    def _input_projections(channels: list[int], hidden_dim: int, config: DetrConfig) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level; extra levels: 3x3 stride-2 conv on the previous one."""
        groups = config.input_proj_groups
        projs = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(groups, hidden_dim))
            for c in channels
        ]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            projs.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(groups, hidden_dim),
                )
            )
            in_channels = hidden_dim
        return nn.ModuleList(projs)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict[str, Any]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        elif mask.shape != (images.shape[0], *images.shape[-2:]) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {(images.shape[0], *images.shape[-2:])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        levels, pos = self.backbone(images, mask)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, levels)]
        masks = [m for _, m in levels]
        # Extra levels: the first from the raw last backbone map, the next from the previous projection.
        for lvl in range(len(levels), self.num_feature_levels):
            src = self.input_proj[lvl](levels[-1][0] if lvl == len(levels) else srcs[-1])
            level_mask = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))

        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed
        )

        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                box = delta + reference
            else:  # 2-d reference points only place the centre
                box = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(box.sigmoid())

        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out


def build_model(config: DetrConfig) -> DeformableDETR:
    """Build a randomly initialised detector for ``config`` (load weights with checkpoint.py)."""
    backbone = Backbone(
        config.backbone,
        width=config.backbone_width,
        dilation=config.dilation,
        multi_scale=config.num_feature_levels > 1,
        train_backbone=config.train_backbone,
        frozen_stem_and_layer1=config.frozen_stem_and_layer1,
    )
    joiner = Joiner(backbone, PositionEmbeddingSine(config.hidden_dim // 2, normalize=True))
    transformer = DeformableTransformer(
        d_model=config.hidden_dim,
        nhead=config.nheads,
        num_encoder_layers=config.enc_layers,
        num_decoder_layers=config.dec_layers,
        dim_feedforward=config.dim_feedforward,
        dropout=config.dropout,
        num_feature_levels=config.num_feature_levels,
        dec_n_points=config.dec_n_points,
        enc_n_points=config.enc_n_points,
        two_stage=config.two_stage,
        two_stage_num_proposals=config.num_queries,
    )
    return DeformableDETR(joiner, transformer, config)
