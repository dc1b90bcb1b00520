"""ResNet backbone with frozen BatchNorm, parameter names as torchvision's (so its and the original
Deformable DETR's weights load unchanged), plus the wrapper that returns each level's padding mask.

Only what the detector needs: no avgpool/fc (the original drops them too), dilation for DC5.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["FrozenBatchNorm2d", "ResNet", "Backbone", "load_imagenet_weights"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Detection batches are small (2 images), too small for batch statistics, so the
    ImageNet statistics are kept. ``num_batches_tracked`` of a checkpoint is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: "ResNet v1.5", as torchvision), 1x1 expand (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """The convolutional body of a torchvision ResNet (stem + layer1..4), returning layer2..4.

    Args:
        name: resnet18, resnet34 or resnet50.
        width: stem channels (64 in torchvision); every stage scales with it.
        dilate_last: dilate layer4 (stride 16 instead of 32), the "DC5" option.
    """

    def __init__(self, name: str = "resnet50", width: int = 64, dilate_last: bool = False) -> None:
        super().__init__()
        block, depths = _ARCHS[name]
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in_ch = width
        self._dilation = 1
        self.layer1 = self._make_layer(block, width, depths[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, depths[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, depths[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, depths[3], stride=2, dilate=dilate_last)
        # output channels of layer2, layer3, layer4
        self.channels = [width * m * block.expansion for m in (2, 4, 8)]

    def _make_layer(self, block: type, planes: int, depth: int, stride: int, dilate: bool = False) -> nn.Sequential:
        # As torchvision: a dilated stage's first block keeps the previous dilation, the rest use the new one.
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, planes * block.expansion, stride), FrozenBatchNorm2d(planes * block.expansion)
            )
        blocks = [block(self._in_ch, planes, stride, first_dilation, downsample)]
        self._in_ch = planes * block.expansion
        blocks += [block(self._in_ch, planes, 1, self._dilation, None) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class Backbone(nn.Module):
    """ResNet body plus, for each returned level, the image padding mask resized to it.

    ``self.body`` keeps torchvision names, so in the detector the keys read
    ``backbone.0.body.layer1.0.conv1.weight`` (the detector wraps this in a Sequential
    with the position encoding, as the original).
    """

    def __init__(
        self,
        name: str = "resnet50",
        width: int = 64,
        dilation: bool = False,
        multi_scale: bool = True,
        train_backbone: bool = True,
        frozen_stem_and_layer1: bool = True,
    ) -> None:
        super().__init__()
        self.body = ResNet(name, width, dilate_last=dilation)
        self.multi_scale = multi_scale
        strides = [8, 16, 16 if dilation else 32]
        self.strides = strides if multi_scale else strides[-1:]
        self.num_channels = self.body.channels if multi_scale else self.body.channels[-1:]
        for pname, param in self.body.named_parameters():
            trainable_stage = any(pname.startswith(stage) for stage in ("layer2", "layer3", "layer4"))
            if not train_backbone or (frozen_stem_and_layer1 and not trainable_stage):
                param.requires_grad_(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True at padding -> [(features, mask)] per level."""
        features = self.body(images)
        if not self.multi_scale:
            features = features[-1:]
        return [(f, downsample_mask(mask, f.shape[-2:])) for f in features]


def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    # ATen's nearest rule, floor(i * (float32)(in / out)) capped at in - 1, written out: ONNX's Resize
    # (what F.interpolate exports to) divides by out / in instead and picks the next row at
    # integer ratios (70 -> 5 columns), which moved the exported model's padding by one pixel
    scale = torch.scalar_tensor(in_size, dtype=torch.float32, device=device) / out_size
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long()
    return index.clamp(max=in_size - 1)


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) bool padding mask, as the original
    (``F.interpolate(mask[None].float(), size)``, bit for bit)."""
    rows = _nearest_indices(mask.shape[-2], size[0], mask.device)
    cols = _nearest_indices(mask.shape[-1], size[1], mask.device)
    return mask[:, rows][:, :, cols]


def load_imagenet_weights(resnet: ResNet, path: str) -> None:
    """Load an ImageNet ResNet state_dict (torchvision names, e.g. resnet50-0676ba61.pth) from a file.

    The classifier (``fc.*``) and BatchNorm's ``num_batches_tracked`` are dropped; anything else
    that does not match raises an error listing the keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    result = resnet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the ResNet backbone: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}"
        )
