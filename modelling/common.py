"""Pieces every architecture family may use: DCGAN init, spectral normalisation and BatchNorm "standing statistics"."""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

SN_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmaxes, sums and norms that overflow or lose precision; fp32/fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def init_dcgan(module: nn.Module) -> None:
    """DCGAN init (Radford et al. 2016, arXiv 1511.06434, Sec. 4), which pix2pix and CycleGAN keep: conv, dense and
    embedding weights N(0, 0.02), affine BatchNorm/InstanceNorm scales N(1, 0.02), biases 0. Draws in `modules()`
    order, one weight after another, so a model's initial values depend only on its layer order and the seed."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """SN-GAN (arXiv 1802.05957): W / sigma_max(W) on every conv, linear and embedding layer, one power iteration
    per training forward. torch's parametrization reshapes ConvTranspose weights along dim 1 (its output dim)."""
    for m in list(module.modules()):
        if isinstance(m, SN_LAYERS) and not hasattr(m, "parametrizations"):
            spectral_norm(m)
    return module


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs) -> nn.Module:
    """Re-estimate BatchNorm running statistics as exact averages over `inputs` (an iterable of argument tuples),
    then switch to eval mode ("standing statistics", BigGAN arXiv 1809.11096).

    A generator trained with batch statistics gives outputs that depend on the rest of the batch; after this, in
    eval mode, image k depends only on its own latent, which is what per-seed sampling needs. The EMA generator
    in particular never saw its own statistics during training. No-op for models without running statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for args in inputs:
        model(*args)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


def standing_batches(img_size: int, n_images: int = 1024, max_pixels: int = 128 * 64 * 64) -> tuple[int, int]:
    """(n_batches, batch_size) for `latent_batches` that `recalibrate_batchnorm` can run at `img_size`: 8 batches of
    128 up to 64x64, smaller batches above so that one batch holds at most `max_pixels` output pixels (a 512x512
    batch of 128 would need about 9 GB for one activation map of a DCGAN), the same number of images in all."""
    batch_size = max(1, min(128, max_pixels // (img_size * img_size)))
    return -(-n_images // batch_size), batch_size


def latent_batches(z_dim: int, n_classes: int, n_batches: int = 8, batch_size: int = 128, seed: int = 0, device="cpu"):
    """Fixed (zs, labels) batches from their own RNG, e.g. for `recalibrate_batchnorm` of a generator."""
    rng = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        zs = torch.randn(batch_size, z_dim, generator=rng).to(device)
        labels = torch.randint(n_classes, (batch_size,), generator=rng).to(device) if n_classes else None
        yield zs, labels


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar per sample (DDPM++'s noise embedding, endpoint=True):
    frequencies (1/max_positions)^(k/(C/2 - 1)), k = 0..C/2-1, features [cos, sin]. (B,) -> (B, C)."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError(f"num_channels must be even and >= 4, got {num_channels}")
        half = num_channels // 2
        self.register_buffer(
            "freqs", (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / (half - 1)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.float()[:, None] * self.freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=1)
