"""DCGAN generator and discriminator, with the conditional variant (CGAN adapted to CNNs) built in.

Paper: Radford et al. 2016, "Unsupervised Representation Learning with Deep Convolutional GANs", arXiv 1511.06434.
Conditioning: Mirza & Osindero 2014, arXiv 1411.1784, in gau-nernst/gan's CNN form: G gets concat(z, embed(y));
D gets embed(y) broadcast over H x W as extra input channels (computed without building the broadcast, see
Discriminator._first_conv_with_labels). Each network owns its label embedding.
Reference code read for facts: gau-nernst/gan `modelling/dcgan.py`, `modelling/cgan.py`.

Layout (all kernels 4; stride-2 convs halve, stride-2 transposed convs double):
  G: z (N, z_dim) -> ConvT k4 s1 p0 -> (base * 2^(depth-1), 4, 4) -> ... -> (img_channels, img_size, img_size), tanh
  D: (img_channels, img_size, img_size) -> conv ... -> (base * 2^(depth-1), 4, 4) -> conv k4 s1 p0 -> (N,)
  with depth = log2(img_size / 4); 32x32: G 256@4 -> 128@8 -> 64@16 -> C@32. Channels stop doubling at
  `channel_max` (1024, as Progressive GAN and StyleGAN cap theirs at 512): the paper defines 64x64 only, where it
  does not bind for base_dim <= 128; uncapped, a 512x512 DCGAN would start from 8,192 channels (187M parameters in G).
Deviations from the paper: none in the layers. The first D layer and the last G layer have no norm (the paper's
rule; gau-nernst traced washed-out colours to a BN on D's input). G's BatchNorm tracks running statistics so that
`modelling.common.recalibrate_batchnorm` can give batch-independent samples; D's BatchNorm uses batch statistics
only. `disc norm="none"` is the WGAN-GP critic (a per-sample gradient penalty is invalid with batch statistics).
"""

import math
from itertools import pairwise

import torch
from torch import nn

from modelling.common import apply_spectral_norm, init_dcgan


def _depth(img_size: int) -> int:
    depth = math.log2(img_size / 4) if img_size >= 8 else 0
    if img_size < 8 or depth != int(depth):
        raise ValueError(f"DCGAN needs img_size = 4 * 2^k >= 8 (8, 16, 32, 64, ...), got {img_size}")
    return int(depth)


class _Net(nn.Module):
    """What G and D share: their layer stack `net`, DCGAN init, then optional spectral norm."""

    def _set_net(self, layers: list[nn.Module], spectral_norm: bool) -> None:
        self.net = nn.Sequential(*layers)
        self.reset_parameters()
        if spectral_norm:  # after the init: SN normalises the initialised weights, its vectors drawn last
            apply_spectral_norm(self)

    def reset_parameters(self) -> None:
        init_dcgan(self)


class Generator(_Net):
    def __init__(
        self,
        img_size: int = 32,
        img_channels: int = 1,
        z_dim: int = 128,
        base_dim: int = 64,  # channels of the last hidden map; the first has base_dim * 2^(depth-1)
        n_classes: int = 0,  # > 0: conditional, labels in [0, n_classes)
        label_dim: int = 64,  # size of the label embedding concatenated to z
        spectral_norm: bool = False,  # SA-GAN/BigGAN put SN in G too
        channel_max: int = 1024,  # no hidden map wider than this
    ):
        super().__init__()
        self.img_size, self.img_channels, self.z_dim, self.n_classes = img_size, img_channels, z_dim, n_classes
        depth = _depth(img_size)
        self.embed = nn.Embedding(n_classes, label_dim) if n_classes else None
        in_dim = z_dim + (label_dim if n_classes else 0)
        widths = [min(base_dim * 2**k, channel_max) for k in reversed(range(depth))]  # 4x4 first
        layers = [nn.ConvTranspose2d(in_dim, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for ch, out in pairwise(widths):
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], img_channels, 4, 2, 1), nn.Tanh()]
        self._set_net(layers, spectral_norm)

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            zs = torch.cat([zs, self.embed(labels)], dim=1)
        return self.net(zs[:, :, None, None])  # (N, z, 1, 1) -> (N, C, H, W)


class Discriminator(_Net):
    def __init__(
        self,
        img_size: int = 32,
        img_channels: int = 1,
        base_dim: int = 64,  # channels of the first conv; doubled at every halving
        norm: str = "batch",  # "batch" | "none" (WGAN-GP critic, SN-GAN)
        n_classes: int = 0,
        label_dim: int = 64,  # label embedding channels appended to the image
        spectral_norm: bool = False,
        channel_max: int = 1024,  # no hidden map wider than this
    ):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"unknown DCGAN discriminator norm {norm!r}; valid: ['batch', 'none']")
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, n_classes
        depth = _depth(img_size)
        self.embed = nn.Embedding(n_classes, label_dim) if n_classes else None
        in_ch = img_channels + (label_dim if n_classes else 0)
        widths = [min(base_dim * 2**k, channel_max) for k in range(depth)]  # image size / 2 first
        layers = [nn.Conv2d(in_ch, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        use_bn = norm == "batch"
        for ch, out in pairwise(widths):
            layers += [nn.Conv2d(ch, out, 4, 2, 1, bias=not use_bn)]
            layers += [nn.BatchNorm2d(out, track_running_stats=False)] if use_bn else []
            layers += [nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]  # "flatten and matmul" as a conv over the whole 4x4 map
        self._set_net(layers, spectral_norm)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.net(imgs).flatten()  # (N,)
        return self.net[1:](self._first_conv_with_labels(imgs, self.embed(labels))).flatten()

    def _first_conv_with_labels(self, imgs: torch.Tensor, label_embs: torch.Tensor) -> torch.Tensor:
        """conv(concat(imgs, label_embs broadcast over H x W)) without building the broadcast: the label channels
        are constant over the image, so their share at an output position is the sum, over the kernel taps that
        fall inside the image (padding is zero), of that tap's weights applied to the embedding. Same weights and
        result up to float rounding; the label part costs label_dim * k^2 per output channel and sample instead of
        per output position (the broadcast made the first conv label_dim / img_channels = 64x dearer)."""
        conv, c = self.net[0], self.img_channels
        weight = conv.weight  # read once: spectral norm's parametrization recomputes it on access
        out = nn.functional.conv2d(imgs, weight[:, :c], conv.bias, conv.stride, conv.padding)
        per_tap = torch.einsum("oikl,ni->nokl", weight[:, c:], label_embs).flatten(2)  # (N, out, k*k)
        inside = nn.functional.unfold(  # (1, k*k, H_out*W_out): 1 where a tap lands inside the image
            imgs.new_ones(1, 1, *imgs.shape[2:]), conv.kernel_size, padding=conv.padding, stride=conv.stride
        )
        return out + (per_tap @ inside).view_as(out)
