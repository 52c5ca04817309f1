"""SN-GAN's two CIFAR-10 architectures as Generalized EBMs use them: the "standard CNN" (`sngan`) and the ResNet
(`resnet-sn`), each a base generator and an energy network.

Papers: Miyato et al. 2018, "Spectral Normalization for GANs", arXiv 1802.05957 (Tables 3-4 and the ResNet of
App. B); Arbel, Zhou & Gretton 2021, "Generalized Energy Based Models", arXiv 2003.05033 (which trains them).
Reference code read for facts: MichaelArbel/GeneralizedEBM `models/generator.py`, `models/discriminator.py` (itself
adapted from christiancosgrove/pytorch-spectral-normalization-gan).

Layout at 32x32 (C image channels, widths with the default base_dim 64 / width 128):
  sngan G:      Linear z -> 512*4*4, then [BN, ReLU, ConvT k4 s2] 512->256->128->64, BN, ReLU, ConvT k3 s1 64->C, tanh
  sngan E:      SN convs C->64 k3, 64->128 k4s2, 128->128 k3, 128->256 k4s2, 256->256 k3, 256->512 k4s2, 512->512 k3,
                LReLU 0.1, flatten 8192 -> Linear -> 1 (the last layer is *not* spectrally normalised in GEBM)
  resnet-sn G:  Linear z -> 128*4*4, 3 x up-block [BN, ReLU, 2x nearest, conv3, BN, ReLU, conv3; shortcut 2x nearest],
                BN, ReLU, conv3 128->C, tanh (no spectral norm in G despite the name)
  resnet-sn E:  first block [SN conv3, ReLU, SN conv3, avgpool2; shortcut avgpool2, SN conv1] C->128 @16, a down-block
                [ReLU, SN conv3, ReLU, SN conv3, avgpool2; shortcut SN conv1, avgpool2] @8, two plain blocks @8, ReLU,
                global average pool, SN Linear 128 -> 1
Init: xavier-uniform with gain 1 (gain sqrt(2) on the 1x1 shortcuts), biases as PyTorch initialises them.
Deviations: other image sizes (4 * 2^k) add or drop levels; the ResNet energy downsamples to 8x8 (4x4 for 8x8 input)
and pools globally (GEBM's AvgPool2d(8) at 32x32 is the same thing). Not implemented: GEBM's `--bn` and
`--skipinit` options of the ResNet energy (both off in its configs). Every forward takes `(x, labels=None)` like
the DCGAN family; these networks are unconditional.
"""

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _levels(img_size: int, smallest: int = 8) -> int:
    """Number of 2x resolution steps between 4x4 and img_size (4 * 2^k, k >= 1)."""
    k = math.log2(img_size / 4) if img_size >= smallest else 0
    if img_size < smallest or k != int(k):
        raise ValueError(f"need img_size = 4 * 2^k >= {smallest} (8, 16, 32, 64, ...), got {img_size}")
    return int(k)


def _xavier(module: nn.Module, gain: float = 1.0) -> nn.Module:
    # An SN layer's raw weight is parametrizations.weight.original; init it before the power iteration sees it.
    weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
    nn.init.xavier_uniform_(weight, gain)
    return module


class Generator(nn.Module):
    """`sngan`: SN-GAN's standard CNN generator (DCGAN-like, dense first layer)."""

    def __init__(self, img_size: int = 32, img_channels: int = 3, z_dim: int = 100, base_dim: int = 64):
        super().__init__()
        self.img_size, self.img_channels, self.z_dim, self.n_classes = img_size, img_channels, z_dim, 0
        levels = _levels(img_size)
        self.ch = base_dim * 2**levels  # 512 at 32x32
        self.dense = nn.Linear(z_dim, self.ch * 16)
        layers, ch = [], self.ch
        for _ in range(levels):
            layers += [nn.BatchNorm2d(ch), nn.ReLU(), nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1)]
            ch //= 2
        layers += [nn.BatchNorm2d(ch), nn.ReLU(), nn.ConvTranspose2d(ch, img_channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
                _xavier(m)

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.dense(zs).view(-1, self.ch, 4, 4))  # (N, C, H, W)


class Energy(nn.Module):
    """`sngan`: SN-GAN's standard CNN discriminator as an energy (raw scalar output, no sigmoid)."""

    def __init__(self, img_size: int = 32, img_channels: int = 3, base_dim: int = 64, leak: float = 0.1):
        super().__init__()
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, 0
        layers, ch = [spectral_norm(_xavier(nn.Conv2d(img_channels, base_dim, 3, 1, 1))), nn.LeakyReLU(leak)], base_dim
        for _ in range(_levels(img_size)):
            layers += [spectral_norm(_xavier(nn.Conv2d(ch, ch * 2, 4, 2, 1))), nn.LeakyReLU(leak)]
            layers += [spectral_norm(_xavier(nn.Conv2d(ch * 2, ch * 2, 3, 1, 1))), nn.LeakyReLU(leak)]
            ch *= 2
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.fc = _xavier(nn.Linear(ch * 16, 1))  # GEBM leaves this layer without spectral norm

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.net(x)).flatten()  # (N,)


class _UpBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.BatchNorm2d(ch), nn.ReLU(), nn.Upsample(scale_factor=2), _xavier(nn.Conv2d(ch, ch, 3, 1, 1)),
            nn.BatchNorm2d(ch), nn.ReLU(), _xavier(nn.Conv2d(ch, ch, 3, 1, 1)),
        )  # fmt: skip
        self.skip = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class ResNetGenerator(nn.Module):
    """`resnet-sn`: SN-GAN's ResNet generator (CIFAR-10)."""

    def __init__(self, img_size: int = 32, img_channels: int = 3, z_dim: int = 100, width: int = 128):
        super().__init__()
        self.img_size, self.img_channels, self.z_dim, self.n_classes, self.width = (
            img_size,
            img_channels,
            z_dim,
            0,
            width,
        )
        self.dense = _xavier(nn.Linear(z_dim, width * 16))
        blocks = [_UpBlock(width) for _ in range(_levels(img_size))]
        final = _xavier(nn.Conv2d(width, img_channels, 3, 1, 1))
        self.net = nn.Sequential(*blocks, nn.BatchNorm2d(width), nn.ReLU(), final, nn.Tanh())

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.dense(zs).view(-1, self.width, 4, 4))  # (N, C, H, W)


class _DownBlock(nn.Module):
    """Residual block of the energy; `first` skips the leading ReLU (raw pixels) and pools before its shortcut."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False):
        super().__init__()
        conv1, conv2 = (spectral_norm(_xavier(nn.Conv2d(a, c_out, 3, 1, 1))) for a in (c_in, c_out))
        layers = ([] if first else [nn.ReLU()]) + [conv1, nn.ReLU(), conv2] + ([nn.AvgPool2d(2)] if down else [])
        self.main = nn.Sequential(*layers)
        if not down:
            self.skip = nn.Identity()
        else:
            shortcut = spectral_norm(_xavier(nn.Conv2d(c_in, c_out, 1), math.sqrt(2)))
            self.skip = nn.Sequential(nn.AvgPool2d(2), shortcut) if first else nn.Sequential(shortcut, nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class ResNetEnergy(nn.Module):
    """`resnet-sn`: SN-GAN's ResNet discriminator (CIFAR-10) as an energy."""

    def __init__(self, img_size: int = 32, img_channels: int = 3, width: int = 128):
        super().__init__()
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, 0
        n_down = max(_levels(img_size) - 1, 1)  # down to 8x8 (32x32: two down-blocks, as GEBM)
        blocks = [_DownBlock(img_channels, width, down=True, first=True)]
        blocks += [_DownBlock(width, width, down=True) for _ in range(n_down - 1)]
        blocks += [_DownBlock(width, width, down=False) for _ in range(2)]
        self.net = nn.Sequential(*blocks, nn.ReLU())
        self.fc = spectral_norm(_xavier(nn.Linear(width, 1)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.net(x).mean(dim=(2, 3))).flatten()  # global average pool, (N,)
