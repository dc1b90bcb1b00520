"""Draw detections on an image with PIL only."""

from __future__ import annotations

from typing import Sequence

import torch

from .optional import needs_extra

with needs_extra():
    from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_detections"]

# A fixed palette, so one class has the same colour in every image.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def _as_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return list(values)


def draw_detections(
    image: Image.Image,
    boxes_xyxy,
    labels,
    scores,
    class_names: Sequence[str] | dict[int, str] | None = None,
    line_width: int = 0,
) -> Image.Image:
    """Return a copy of ``image`` with each box outlined and captioned "name score".

    Args:
        image: a PIL image (any mode; drawn in RGB).
        boxes_xyxy: (K, 4) absolute (x0, y0, x1, y1), tensor or sequence.
        labels: (K,) class indices.
        scores: (K,) scores in [0, 1].
        class_names: index -> name (list or dict); a missing or empty name shows the index.
        line_width: box outline width; 0 picks one from the image size.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = line_width or max(1, round(max(out.size) / 400))
    for box, label, score in zip(_as_list(boxes_xyxy), _as_list(labels), _as_list(scores)):
        label = int(label)
        name = ""
        if isinstance(class_names, dict):
            name = class_names.get(label, "")
        elif class_names is not None and 0 <= label < len(class_names):
            name = class_names[label]
        caption = f"{name or label} {float(score):.2f}"
        colour = _PALETTE[label % len(_PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=width)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), caption, font=font)
        tw, th = tx1 - tx0 + 2, ty1 - ty0 + 2
        # Caption above the box when there is room, inside it otherwise; always
        # inside the picture (a box may touch or cross its border).
        cx = min(max(0.0, x0), max(0.0, out.width - tw))
        cy = y0 - th if y0 - th >= 0 else y0
        cy = min(max(0.0, cy), max(0.0, out.height - th))
        draw.rectangle([cx, cy, cx + tw, cy + th], fill=colour)
        # black text on light colours, white on dark ones (ITU-R 601 luma)
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((cx + 1 - tx0, cy + 1 - ty0), caption, fill=(0, 0, 0) if luma > 128 else (255, 255, 255), font=font)
    return out
