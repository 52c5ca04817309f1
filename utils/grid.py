"""Image quantisation and grids. Every PNG genzoo writes goes through `to_uint8`, so grids, sample folders and the
FID inputs quantise identically: [-1, 1] -> round(x * 127.5 + 127.5) clamped to [0, 255]."""

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from utils.cli import UserError


def check_finite(samples: torch.Tensor, what: str = "the generated samples") -> None:
    """A diverged model outputs NaN/inf, which quantise to black pixels without a word: stop with one line."""
    if not torch.isfinite(samples).all():
        raise UserError(f"{what} contain non-finite values (NaN/inf): the model has diverged")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> uint8 of the same shape; non-finite input is refused (`check_finite`)."""
    check_finite(images)
    return (images.float() * 127.5 + 127.5).round_().clamp_(0, 255).to(torch.uint8)


def save_png(image_uint8: torch.Tensor, path: str | Path) -> None:
    """Save one (C, H, W) uint8 image; 1-channel images are written as greyscale PNG."""
    array = image_uint8.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def grid_image(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> one uint8 (C, H', W') grid with `nrow` images per row."""
    grid = make_grid(to_uint8(images).cpu(), nrow=nrow, padding=2, pad_value=0)
    return grid[:1] if images.shape[1] == 1 else grid  # make_grid repeats 1-channel input to RGB


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Save a grid of (N, C, H, W) images in [-1, 1] with `nrow` images per row."""
    save_png(grid_image(images, nrow), path)


def save_scatter(points: torch.Tensor, path: str | Path, extent: float = 5.0, size: int = 256) -> None:
    """Save 2-D points (N, 2) as a size x size greyscale density image over [-extent, extent]², y up."""
    save_png(scatter_image(points, extent, size), path)


def save_animation(frames: list[torch.Tensor], path: str | Path, frame_ms: int = 80, hold_ms: int = 1000) -> None:
    """Save uint8 (C, H, W) frames as an animated GIF or WebP (by the suffix), looping, the last frame held longer."""
    arrays = [f.permute(1, 2, 0).cpu().numpy() for f in frames]
    images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    durations = [frame_ms] * (len(images) - 1) + [hold_ms]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def scatter_image(points: torch.Tensor, extent: float = 5.0, size: int = 256) -> torch.Tensor:
    """2-D points (N, 2) -> a uint8 (1, size, size) density image over [-extent, extent]², y up, white background."""
    check_finite(points)
    xy = points.detach().float().cpu()
    ij = ((xy + extent) / (2 * extent) * size).floor().long()
    inside = ((ij >= 0) & (ij < size)).all(dim=1)
    counts = torch.zeros(size, size)
    counts.index_put_((size - 1 - ij[inside, 1], ij[inside, 0]), torch.ones(int(inside.sum())), accumulate=True)
    image = 255 * (1 - (counts / counts.max().clamp(min=1)).sqrt())  # white background, dark where dense
    return image.round().to(torch.uint8)[None]
