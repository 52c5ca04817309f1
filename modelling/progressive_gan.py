"""Progressive GAN generator and discriminator, with growing and fade-in.

Paper: Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and Variation",
arXiv 1710.10196 (Table 2 layout; equalized LR, pixel norm, minibatch stddev).
Reference code read for facts: gau-nernst/gan (2023) `modelling/progressive_gan.py`, `nvidia_ops.py`;
NVIDIA's `process_reals`/`lod` logic as described in the StyleGAN2-ADA reference notes.

Layout, for resolution r the channels are min(channel_base / r, channel_max) (paper: base 32768, max 512):
  G: z -> PixelNorm -> dense to (C, 4, 4) (gain sqrt(2)/4, as NVIDIA's code) -> conv3 -> [nearest 2x, conv3, conv3]
     per resolution -> toRGB 1x1 (linear, no tanh); PixelNorm after every conv, LReLU 0.2 everywhere.
  D: fromRGB 1x1 -> [conv3, conv3, 2x2 average pool] per resolution -> minibatch stddev -> conv3 -> dense over the
     4x4 map -> dense to 1. Output (N,).
Growing: `set_growth(g)` with g in [0, depth], depth = log2(img_size / 4). Levels 0..floor(g) are stable; a
fractional part alpha fades in level floor(g) + 1: G outputs (1 - alpha) * up2(toRGB_old) + alpha * toRGB_new, D
reads (1 - alpha) * fromRGB_old(avgpool(x)) + alpha * block_new(fromRGB_new(x)). `growth` is a buffer (saved with the
weights; snapshots sample at the stage they were taken). Images always have the full `img_size`: G upsamples its
current output (nearest) and D average-pools its input to the current resolution, which is NVIDIA's `lod` scheme,
so the data pipeline, grids and samplers never change size. `fade_reals` cross-fades the reals the same way.
The training script resets both optimizers' state whenever a level starts or finishes fading in (`stage_changed`,
NVIDIA's `reset_opt_for_new_lod`).
`growing=False` builds the full-resolution network only (no lower-level toRGB/fromRGB, which would otherwise sit
unused and stop DDP, whose reducer waits for every parameter's gradient); StyleGAN's D is built that way.
Deviations: StyleGAN2-ADA's gain convention (see `nvidia_ops`; equivalent for LReLU); D's optional blur (StyleGAN's
discriminator is this one with `blur_filter=[1, 2, 1]`: blur -> conv3 -> 2x2 average pool); unconditional only.
Conv + 2x2 average pool runs as one stride-2 conv with the box-filtered kernel (`nvidia_ops.EqualizedConv2d`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelling.nvidia_ops import (
    DiscriminatorEpilogue,
    EqualizedConv2d,
    EqualizedLinear,
    PixelNorm,
    level_channels,
    lrelu,
)


def growth_at(nimg: float, fade_nimg: float, depth: int) -> float:
    """The growth stage after `nimg` images (paper Sec. 3 / App. A: 800k images fading + 800k stabilising per level):
    level 0 trains for `fade_nimg` images; every later level fades in over `fade_nimg` images, then trains stably
    for `fade_nimg` more. A pure function of the images seen, so a resumed run re-enters the same stage exactly.
    `fade_nimg <= 0` means no growing (full resolution from the start)."""
    if fade_nimg <= 0:
        return float(depth)
    phases = nimg / fade_nimg - 1
    if phases < 0:
        return 0.0
    level, within = divmod(phases, 2)
    return min(float(depth), level + min(within, 1.0))


def stage_changed(prev_growth: float, growth: float) -> bool:
    """Whether a level started or finished fading in between two stages: floor or ceil of the stage changed.
    NVIDIA resets the optimizers' state then (`reset_opt_for_new_lod`, on the same test of its `lod`); as a
    function of two stages of the schedule it gives a resumed run the same resets as an uninterrupted one."""
    return math.floor(prev_growth) != math.floor(growth) or math.ceil(prev_growth) != math.ceil(growth)


class Growing(nn.Module):
    """The growth state shared by G and D: a float buffer plus the Python level/fading flags derived from it
    (Python values keep torch.compile graphs static within a phase). A network built with `growing=False` has only
    its full-resolution level and stays at growth = depth."""

    def __init__(self, depth: int, growing: bool):
        super().__init__()
        self.depth, self.growing = depth, growing
        self.levels = list(range(depth + 1)) if growing else [depth]  # the levels whose toRGB/fromRGB exist
        self.register_buffer("growth", torch.tensor(float(depth)))
        self._set_flags(float(depth))
        # A loaded state dict brings its own stage (reading the buffer costs a device sync, once per load).
        self.register_load_state_dict_post_hook(lambda module, _: module._set_flags(float(module.growth)))

    def _set_flags(self, growth: float) -> None:
        lowest = self.levels[0]
        if not lowest <= growth <= self.depth:
            built = "" if self.growing else " (built with growing=False)"
            raise ValueError(f"growth must be in [{lowest}, {self.depth}]{built}, got {growth}")
        self.level, self.fading = int(growth), growth > int(growth)

    def set_growth(self, growth: float) -> None:
        self._set_flags(growth)
        self.growth.fill_(growth)

    def alpha(self) -> torch.Tensor:
        return self.growth - self.level  # a tensor: changes every step without recompiling

    @property
    def resolution(self) -> int:
        """The resolution of the top level in use (the one fading in, if any)."""
        return 4 * 2 ** (self.level + self.fading)


class Generator(Growing):
    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        z_dim: int = 512,
        channel_base: int = 32768,
        channel_max: int = 512,
        growing: bool = True,  # False: full resolution only, the lower levels' toRGB are not built
        n_classes: int = 0,
    ):
        if n_classes:
            raise ValueError("progressive_gan is unconditional (use dcgan or sagan with --conditional)")
        ch = level_channels(img_size, channel_base, channel_max, "progressive_gan")
        depth = len(ch) - 1
        super().__init__(depth, growing)
        self.img_size, self.img_channels, self.z_dim, self.n_classes = img_size, img_channels, z_dim, 0
        self.norm = PixelNorm()
        # NVIDIA's gain sqrt(2)/4 for this layer (sqrt(2) is in `lrelu`): same images at init (PixelNorm follows),
        # but its equalized learning rate and the weight of its bias differ from a gain-sqrt(2) layer.
        self.dense = EqualizedLinear(z_dim, ch[0] * 16, gain=0.25)
        self.conv4 = EqualizedConv2d(ch[0], ch[0], 3)
        self.blocks = nn.ModuleList([nn.Identity()])  # level 0 is dense + conv4
        for i in range(1, depth + 1):
            self.blocks.append(nn.ModuleList([EqualizedConv2d(ch[i - 1], ch[i], 3), EqualizedConv2d(ch[i], ch[i], 3)]))
        # Keyed by level ("0", "1", ...): the same state-dict keys as a list when every level is built.
        self.to_rgb = nn.ModuleDict({str(i): EqualizedConv2d(ch[i], img_channels, 1) for i in self.levels})

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        for conv in self.blocks[i]:
            x = self.norm(lrelu(conv(x)))
        return x

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(lrelu(self.dense(self.norm(zs))).reshape(zs.shape[0], -1, 4, 4))
        x = self.norm(lrelu(self.conv4(x)))
        for i in range(1, self.level + 1):
            x = self._block(i, x)
        img = self.to_rgb[str(self.level)](x)
        if self.fading:
            new = self.to_rgb[str(self.level + 1)](self._block(self.level + 1, x))
            img = torch.lerp(F.interpolate(img, scale_factor=2, mode="nearest"), new, self.alpha().to(new.dtype))
        return F.interpolate(img, scale_factor=self.img_size // img.shape[-1], mode="nearest")


class Discriminator(Growing):
    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        channel_base: int = 32768,
        channel_max: int = 512,
        mbstd_group: int = 4,
        blur_filter: list[int] | None = None,  # StyleGAN: [1, 2, 1] before every downsampling conv
        growing: bool = True,  # False: full resolution only, the lower levels' fromRGB are not built
        n_classes: int = 0,
    ):
        if n_classes:
            raise ValueError("this discriminator is unconditional (use dcgan or sagan with --conditional)")
        ch = level_channels(img_size, channel_base, channel_max, "progressive_gan")
        depth = len(ch) - 1
        super().__init__(depth, growing)
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, 0
        self.from_rgb = nn.ModuleDict({str(i): EqualizedConv2d(img_channels, ch[i], 1) for i in self.levels})
        self.blocks = nn.ModuleList([nn.Identity()])
        for i in range(1, depth + 1):
            down = EqualizedConv2d(ch[i], ch[i - 1], 3, down=2, blur_filter=blur_filter)
            self.blocks.append(nn.ModuleList([EqualizedConv2d(ch[i], ch[i], 3), down]))
        self.epilogue = DiscriminatorEpilogue(ch[0], mbstd_group)

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        for conv in self.blocks[i]:
            h = lrelu(conv(h))
        return h

    def _at(self, x: torch.Tensor, res: int) -> torch.Tensor:
        return F.avg_pool2d(x, self.img_size // res) if res < x.shape[-1] else x

    def fade_reals(self, reals: torch.Tensor) -> torch.Tensor:
        """Reals as the current G can draw them: box-downsampled to the current resolution and, while a level
        fades in, cross-faded with their half-resolution copy (NVIDIA's `process_reals`). Full size out."""
        x = self._at(reals, self.resolution)
        if self.fading:
            x = torch.lerp(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2), x, self.alpha().to(x.dtype))
        return F.interpolate(x, scale_factor=self.img_size // x.shape[-1], mode="nearest")

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        top = self.level + self.fading
        x = self._at(imgs, 4 * 2**top)
        h = lrelu(self.from_rgb[str(top)](x))
        h = self._block(top, h) if top else h
        if self.fading:
            old = lrelu(self.from_rgb[str(top - 1)](F.avg_pool2d(x, 2)))
            h = torch.lerp(old, h, self.alpha().to(h.dtype))
        for i in range(top - 1, 0, -1):
            h = self._block(i, h)
        return self.epilogue(h)
