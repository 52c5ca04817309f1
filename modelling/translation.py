"""Image-to-image translation networks: pix2pix's U-Net generator and PatchGAN discriminator, CycleGAN's ResNet
generator (and the pair of them that a CycleGAN snapshot holds).

Papers: Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks", arXiv 1611.07004
(U-Net G: encoder C64-C128-C256-C512-C512-C512-C512-C512, 4x4 stride-2 convs, LReLU 0.2, no norm on the first layer;
decoder CD512-CD512-CD512-C512-C256-C128-C64, ReLU, dropout 0.5 in the first three; skip connections concatenate
the mirrored encoder maps; tanh output. 70x70 PatchGAN D: C64-C128-C256-C512, then a conv to 1 channel);
Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks", arXiv 1703.10593
(ResNet G: c7s1-64, d128, d256, R256 x 9 (x 6 at 128 px), u128, u64, c7s1-3, reflection padding, instance norm).
Reference code read for facts: gau-nernst/gan `modelling/pix2pix.py`, `modelling/cyclegan.py` (instance norm,
no dropout by default); junyanz/pytorch-CycleGAN-and-pix2pix
(no norm on the innermost encoder layer: a 1x1 map has no spatial statistics; init N(0, 0.02)).

Sizes: `depth` encoder levels take the U-Net from S to S / 2^depth (default log2 S: a 1x1 bottleneck, 8 levels at
256 px as in the paper, 5 at 32 px); channels base_dim * min(2^i, 8). The PatchGAN with `n_layers` stride-2 convs
sees 16 (1), 34 (2), 70 (3, default) or 142 (4) pixel patches and outputs a (N, h, w) map of logits,
h = S / 2^n_layers - 2.
Deviations: instance norm by default in every network (batch-size independent; the CycleGAN paper's choice and
gau-nernst's for pix2pix; `norm="batch"` gives pix2pix's BatchNorm). Not implemented: the 1x1 PixelGAN and 286x286
patch variants beyond `n_layers`, CycleGAN's 128 px "6 blocks" preset other than by `n_blocks`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelling.common import init_dcgan

NORMS = ("instance", "batch", "none")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {list(NORMS)}")
    return {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d, "none": lambda c: nn.Identity()}[kind](ch)


class UNetGenerator(nn.Module):
    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        base_dim: int = 64,
        depth: int | None = None,  # encoder levels; default log2(img_size), down to 1x1
        norm: str = "instance",
        dropout: float = 0.5,  # in the first three decoder layers (the paper's noise source)
    ):
        super().__init__()
        depth = depth or (int(math.log2(img_size)) if img_size > 0 else 0)
        if depth < 2 or img_size % 2**depth:
            raise ValueError(f"unet needs img_size divisible by 2^depth with depth >= 2, got {img_size}, {depth}")
        self.img_size, self.in_channels, self.out_channels = img_size, in_channels, out_channels
        ch = [base_dim * min(2**i, 8) for i in range(depth)]
        bias = norm != "batch"  # a BatchNorm's shift replaces the conv bias
        self.down = nn.ModuleList()
        for i in range(depth):
            plain = i == 0 or i == depth - 1  # no norm on the first layer nor on the innermost (1x1) one
            conv = nn.Conv2d(in_channels if i == 0 else ch[i - 1], ch[i], 4, 2, 1, bias=bias or plain)
            self.down.append(nn.Sequential(conv, nn.Identity() if plain else _norm(norm, ch[i])))
        self.up = nn.ModuleList()
        for i in range(depth):  # up[i] maps level i back to level i - 1 (i = 0: the output image)
            in_ch = ch[i] if i == depth - 1 else 2 * ch[i]  # below the innermost level: concatenated skip
            if i == 0:
                self.up.append(nn.ConvTranspose2d(in_ch, out_channels, 4, 2, 1))
                continue
            layers = [nn.ConvTranspose2d(in_ch, ch[i - 1], 4, 2, 1, bias=bias), _norm(norm, ch[i - 1])]
            if i >= depth - 3 and dropout > 0:  # the three innermost decoder layers: CD512 x 3
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        init_dcgan(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, layer in enumerate(self.down):
            x = layer(x if i == 0 else F.leaky_relu(x, 0.2))
            skips.append(x)  # level i: (N, ch[i], S / 2^(i+1), S / 2^(i+1))
        for i in reversed(range(len(self.up))):
            x = self.up[i](F.relu(x))
            if i > 0:
                x = torch.cat([x, skips[i - 1]], dim=1)  # U-Net skip: the mirrored encoder map
        return torch.tanh(x)


class PatchDiscriminator(nn.Module):
    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 3,
        cond_channels: int = 0,  # pix2pix: the input image is concatenated to the judged image
        base_dim: int = 64,
        n_layers: int = 3,  # stride-2 convs; 3 = the 70x70 PatchGAN
        norm: str = "instance",
    ):
        super().__init__()
        if n_layers < 1 or img_size // 2**n_layers < 3:
            raise ValueError(f"patch D with n_layers {n_layers} needs img_size >= {3 * 2 ** max(n_layers, 1)}")
        self.img_size, self.in_channels, self.cond_channels = img_size, in_channels, cond_channels
        bias = norm != "batch"
        layers, ch = [nn.Conv2d(in_channels + cond_channels, base_dim, 4, 2, 1), nn.LeakyReLU(0.2)], base_dim
        for n in range(1, n_layers + 1):
            out, stride = base_dim * min(2**n, 8), 2 if n < n_layers else 1  # the last one keeps the size
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, imgs: torch.Tensor, conds: torch.Tensor | None = None) -> torch.Tensor:
        """Patch logits (N, h, w); `conds` (pix2pix's input images) are concatenated along the channels."""
        x = imgs if conds is None else torch.cat([conds, imgs], dim=1)
        return self.net(x).squeeze(1)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), _norm(norm, ch), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), _norm(norm, ch),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        base_dim: int = 64,
        n_blocks: int = 9,  # the paper: 9 at 256 px, 6 at 128 px
        norm: str = "instance",
    ):
        super().__init__()
        if img_size < 8 or img_size % 4:
            raise ValueError(f"resnet generator needs img_size divisible by 4 and >= 8, got {img_size}")
        self.img_size, self.in_channels, self.out_channels = img_size, in_channels, out_channels
        b = base_dim
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, b, 7), _norm(norm, b), nn.ReLU()]  # c7s1-64
        for ch in (b, 2 * b):  # d128, d256
            layers += [nn.Conv2d(ch, 2 * ch, 3, 2, 1), _norm(norm, 2 * ch), nn.ReLU()]
        layers += [ResnetBlock(4 * b, norm) for _ in range(n_blocks)]  # R256 x n_blocks
        for ch in (4 * b, 2 * b):  # u128, u64
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1), _norm(norm, ch // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(b, out_channels, 7), nn.Tanh()]  # c7s1-3
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGenerators(nn.Module):
    """CycleGAN's two generators, G: A -> B (`ab`) and F: B -> A (`ba`); `forward(x, reverse=True)` runs F. This is
    what a CycleGAN snapshot holds, so `sample.py --input_dir` can translate either way."""

    reversible = True

    def __init__(self, img_size: int = 256, a_channels: int = 3, b_channels: int = 3, **resnet_kwargs):
        super().__init__()
        self.img_size, self.in_channels, self.out_channels = img_size, a_channels, b_channels
        self.ab = ResnetGenerator(img_size, a_channels, b_channels, **resnet_kwargs)
        self.ba = ResnetGenerator(img_size, b_channels, a_channels, **resnet_kwargs)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        return self.ba(x) if reverse else self.ab(x)
