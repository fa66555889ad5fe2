"""Attribute-guided attention (ASEN / ASEN_v2 / AG-MLAN) and the batched ROI zoom of ASEN_v2.

Shapes: feature maps ``[B, C, h, w]``; attribute vectors ``[B, K, e]`` (K attributes per image: 1
for a training triplet, all A for ``embed_all``), so one code path serves both without a Python loop.
Everything here is plain tensor arithmetic (no data-dependent Python branches): it traces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


class AttributeSpatialAttention(nn.Module):
    """ASA: where in the image the attribute is.

    The map is ``softmax_positions(<tanh(conv1x1(x)), tanh(linear(a))> / sqrt(d))``; the output is the
    attention-weighted sum of the (untransformed) features, as in the reference code.
    """

    def __init__(self, in_channels: int, attr_dim: int, common_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, common_dim, kernel_size=1)
        self.attr = nn.Linear(attr_dim, common_dim)
        self.scale = common_dim ** -0.5

    def weights(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Attention over positions: ``x`` [B, C, h, w], ``a`` [B, K, e] -> [B, K, h*w] (rows sum to 1)."""
        keys = torch.tanh(self.conv(x)).flatten(2)  # [B, d, hw]
        query = torch.tanh(self.attr(a))  # [B, K, d]
        return torch.softmax(torch.bmm(query, keys) * self.scale, dim=-1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled features [B, K, C], attention [B, K, h*w])."""
        w = self.weights(x, a)
        pooled = torch.bmm(w, x.flatten(2).transpose(1, 2))
        return pooled, w


class AttributeChannelAttention(nn.Module):
    """ACA: which feature channels matter for the attribute.

    gate = sigmoid(FC(relu(FC([pooled, relu(linear(a))])))), output = pooled * gate.
    """

    def __init__(self, in_channels: int, attr_dim: int, reduction: int = 2):
        super().__init__()
        self.attr = nn.Linear(attr_dim, attr_dim)
        self.fc1 = nn.Linear(in_channels + attr_dim, max(1, in_channels // reduction))
        self.fc2 = nn.Linear(max(1, in_channels // reduction), in_channels)

    def forward(self, pooled: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        gate = torch.cat([pooled, F.relu(self.attr(a))], dim=-1)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return pooled * gate


class PooledSpatialAttention(nn.Module):
    """CBAM-style spatial attention: sigmoid(conv1x1([mean_c, max_c])) over positions.

    Applied to ASA-weighted maps ``x * w`` without materialising them per attribute: for a positive
    weight w at a position, mean_c(x * w) = w * mean_c(x) and max_c(x * w) = w * max_c(x).
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, h, w], ``w`` [B, K, hw] (ASA weights) -> spatial gate [B, K, hw] in (0, 1)."""
        hw = w.shape[-1]
        flat = x.flatten(2)  # [B, C, hw]
        scaled = w * hw  # mean 1 per row: keeps the statistics on the scale of the features
        mean_c = scaled * flat.mean(1, keepdim=True)  # [B, K, hw]
        max_c = scaled * flat.amax(1, keepdim=True)
        stats = torch.stack([mean_c, max_c], dim=2)  # [B, K, 2, hw]
        b, k = w.shape[:2]
        gate = self.conv(stats.reshape(b * k, 2, hw, 1))
        return torch.sigmoid(gate).reshape(b, k, hw)


def minmax_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    out = (flat - lo) / (hi - lo).clamp_min(1e-12)
    return out.reshape(maps.shape)


def roi_boxes(maps: torch.Tensor, image_size: int, threshold: float = 0.1) -> torch.Tensor:
    """Square ROI boxes from attention maps, as ASEN_v2's reference crop does it.

    ``maps`` [N, h, w] -> boxes float [N, 4] (x0, y0, x1, y1) in input pixels. The map is upsampled
    to the input size, min-max normalised and thresholded at ``threshold``; the bounding box of the
    foreground is made square on its longer side around its centre and shifted back inside the image.
    A constant map (no foreground) gives the whole image.
    """
    s = image_size
    up = F.interpolate(maps.unsqueeze(1).float(), size=(s, s), mode="bilinear", align_corners=False).squeeze(1)
    fg = minmax_normalise(up) >= threshold if threshold > 0 else minmax_normalise(up) > 0
    rows = fg.any(dim=2).to(torch.uint8)  # [N, s]
    cols = fg.any(dim=1).to(torch.uint8)
    # First / last foreground row and column (argmax returns the first maximum); all-empty -> 0 / s.
    y0 = rows.argmax(1).float()
    y1 = s - rows.flip(1).argmax(1).float()
    x0 = cols.argmax(1).float()
    x1 = s - cols.flip(1).argmax(1).float()
    side = torch.maximum(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = torch.minimum((cx - side / 2).clamp_min(0), s - side)
    ny0 = torch.minimum((cy - side / 2).clamp_min(0), s - side)
    return torch.stack([nx0, ny0, nx0 + side, ny0 + side], dim=1)


def crop_rois(images: torch.Tensor, boxes: torch.Tensor, size: int, image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Crop and resize boxes out of a batch of images on its device (torchvision ``roi_align``).

    ``images`` [B, 3, S, S]; ``boxes`` [N, 4] in input pixels; ``image_index`` [N] says which image
    each box comes from (default: box i from image i). Differentiable with respect to the images.
    """
    if image_index is None:
        image_index = torch.arange(boxes.shape[0], device=boxes.device)
    rois = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    return roi_align(images, rois.to(images.dtype), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


__all__ = ["AttributeSpatialAttention", "AttributeChannelAttention", "PooledSpatialAttention",
           "minmax_normalise", "roi_boxes", "crop_rois"]
