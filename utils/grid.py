"""Image quantisation and grids. Every PNG genzoo writes goes through `to_uint8`, so grids, sample folders and the
FID inputs quantise identically: [-1, 1] -> round(x * 127.5 + 127.5) clamped to [0, 255]."""

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> uint8 of the same shape."""
    return (images.float() * 127.5 + 127.5).round_().clamp_(0, 255).to(torch.uint8)


def save_png(image_uint8: torch.Tensor, path: str | Path) -> None:
    """Save one (C, H, W) uint8 image; 1-channel images are written as greyscale PNG."""
    array = image_uint8.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Save a grid of (N, C, H, W) images in [-1, 1] with `nrow` images per row."""
    grid = make_grid(to_uint8(images).cpu(), nrow=nrow, padding=2, pad_value=0)
    save_png(grid[:1] if images.shape[1] == 1 else grid, path)  # make_grid repeats 1-channel input to RGB
