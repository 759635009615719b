"""Camera images for π0: uint8 HWC -> float in [-1, 1] at the model's resolution, and openpi's training augmentation.

The model calls `to_model_images` itself (so it accepts uint8 or float images); `augment_images` is a separate
training-time transform applied by the data pipeline before the batch reaches the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_model_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 in [0, 255] or float in [-1, 1] -> (B, 3, size, size) float in [-1, 1], as SigLIP expects.

    Non-square or other-sized images are resized keeping their aspect ratio and padded with black (openpi's
    resize_with_pad). The resize is skipped when the shape already matches (static shapes: no data-dependent branch).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) RGB, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    elif not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    images = images.permute(0, 3, 1, 2)  # (B, 3, H, W)
    if images.shape[-2:] != (size, size):
        images = resize_with_pad(images, size)
    return images


def resize_with_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> (B, 3, size, size): longest side to `size`, centred, padded with -1 (black)."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)


def augment_images(
    images: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
    crop_scale: float = 0.95,
    max_rotation_deg: float = 5.0,
    brightness: float = 0.3,
    contrast: float = 0.4,
    saturation: float = 0.5,
) -> dict[str, torch.Tensor]:
    """openpi's default training augmentation, one random draw per image.

    Cameras whose name contains 'wrist' get colour jitter only; the others also get a random crop of 95% of the
    side resized back to full size and a rotation within +-5 degrees. Colour jitter follows torchvision's
    semantics: brightness, contrast and saturation factors uniform in [1 - x, 1 + x].

    images: camera -> (B, H, W, 3) uint8 or float in [-1, 1]. Returns camera -> (B, H, W, 3) float in [-1, 1].
    """
    out = {}
    for camera, image in images.items():
        if image.dtype == torch.uint8:
            image = image.float() / 127.5 - 1.0
        x = (image.permute(0, 3, 1, 2) + 1.0) / 2.0  # (B, 3, H, W) in [0, 1]
        if "wrist" not in camera:
            x = _random_crop_rotate(x, crop_scale, max_rotation_deg, generator)
        x = _color_jitter(x, brightness, contrast, saturation, generator)
        out[camera] = (x * 2.0 - 1.0).permute(0, 2, 3, 1)
    return out


def _uniform(low: float, high: float, n: int, like: torch.Tensor, generator) -> torch.Tensor:
    """(n,) uniform draws on the CPU generator, moved to `like`'s device and dtype."""
    return (low + (high - low) * torch.rand(n, generator=generator)).to(like)


def _random_crop_rotate(x: torch.Tensor, crop_scale: float, max_rotation_deg: float, generator) -> torch.Tensor:
    """Crop a random square of `crop_scale` of the side, resize it back and rotate it, as one affine resampling."""
    batch = x.shape[0]
    angle = _uniform(-max_rotation_deg, max_rotation_deg, batch, x, generator) * math.pi / 180
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: the crop window is crop_scale wide and
    # its centre moves by up to (1 - crop_scale) so that it stays inside the image.
    shift_x = _uniform(crop_scale - 1, 1 - crop_scale, batch, x, generator)
    shift_y = _uniform(crop_scale - 1, 1 - crop_scale, batch, x, generator)
    cos, sin = torch.cos(angle) * crop_scale, torch.sin(angle) * crop_scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, generator) -> torch.Tensor:
    batch = x.shape[0]
    b = _uniform(1 - brightness, 1 + brightness, batch, x, generator).view(batch, 1, 1, 1)
    c = _uniform(1 - contrast, 1 + contrast, batch, x, generator).view(batch, 1, 1, 1)
    s = _uniform(1 - saturation, 1 + saturation, batch, x, generator).view(batch, 1, 1, 1)
    x = (x * b).clamp(0, 1)
    mean = _grayscale(x).mean(dim=(2, 3), keepdim=True)
    x = (mean + c * (x - mean)).clamp(0, 1)
    gray = _grayscale(x)
    return (gray + s * (x - gray)).clamp(0, 1)
