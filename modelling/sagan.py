"""SA-GAN generator and discriminator: residual blocks, self-attention, spectral norm in G and D, conditional
BatchNorm in G and a projection discriminator when `n_classes > 0`.

Paper: Zhang et al. 2019, "Self-Attention Generative Adversarial Networks", arXiv 1805.08318 (attention block,
Sec. 3; SN in both networks, hinge loss, TTUR lr 1e-4 / 4e-4, Adam (0, 0.9)). Conditional BN and the projection
discriminator: Miyato & Koyama 2018, arXiv 1802.05637. Reference code read for facts: gau-nernst/gan
`modelling/sagan.py`, ajbrock/BigGAN-PyTorch `layers.py`/`BigGAN.py` (block order, sum pooling, init).

Layout for img_size S (base_dim b, G channels at resolution r: b * min(8, S / r); D mirrors it):
  G: z -> SN dense -> (8b, 4, 4) -> up-blocks [CBN, ReLU, 2x nearest, conv3, CBN, ReLU, conv3; skip 2x + conv1]
     to S, self-attention after the block that reaches `attn_res` (default S / 2) -> BN, ReLU, conv3, tanh.
  D: down-blocks [ReLU (not on the first), conv3, ReLU, conv3, avgpool 2; skip conv1 + avgpool] from S to 4,
     self-attention after the block that reaches `attn_res` -> ReLU -> sum over H, W -> h;
     out = psi(h) + <embed(y), h> (the projection term only when conditional). Output (N,).
Attention as in the paper: f, g, h are bias-free 1x1 convs to C/8, C/8, C/2 with 2x2 max-pooling of g and h,
beta = softmax over keys of f^T g with **no** 1/sqrt(d) scaling (gau-nernst's later scaled_dot_product_attention
scales it, a deviation we do not copy), o = conv1x1(h beta^T), output x + gamma * o with gamma initialised to 0.
The softmax runs in fp32. Init: xavier-uniform weights, zero biases, then SN on every conv, dense and embedding
(the conditional-BN gains are plain per-class parameters, not spectrally normalised, as in BigGAN).
G's BatchNorm tracks running statistics so that samples can use standing statistics
(`modelling.common.recalibrate_batchnorm`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from modelling.common import apply_spectral_norm, at_least_fp32


def _check_size(img_size: int) -> None:
    if img_size < 8 or img_size & (img_size - 1):
        raise ValueError(f"sagan needs a power-of-two img_size >= 8, got {img_size}")


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.xavier_uniform_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class SelfAttention(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.f = nn.Conv2d(ch, ch // 8, 1, bias=False)  # queries
        self.g = nn.Conv2d(ch, ch // 8, 1, bias=False)  # keys
        self.h = nn.Conv2d(ch, ch // 2, 1, bias=False)  # values
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        queries = self.f(x).flatten(2)  # (N, C/8, HW)
        keys = F.max_pool2d(self.g(x), 2).flatten(2)  # (N, C/8, HW/4)
        values = F.max_pool2d(self.h(x), 2).flatten(2)  # (N, C/2, HW/4)
        logits = at_least_fp32(queries).transpose(1, 2) @ at_least_fp32(keys)  # (N, HW, HW/4), no 1/sqrt(d)
        beta = torch.softmax(logits, dim=-1)  # over the keys
        attended = (values @ beta.transpose(1, 2).to(values.dtype)).reshape(n, c // 2, hh, ww)
        return x + self.gamma.to(x.dtype) * self.o(attended)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain (init 1) and bias (init 0); one class when
    unconditional (plain BatchNorm)."""

    def __init__(self, ch: int, n_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=False)
        self.gain = nn.Parameter(torch.ones(max(n_classes, 1), ch))
        self.bias = nn.Parameter(torch.zeros(max(n_classes, 1), ch))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        idx = labels if labels is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.bn(x) * self.gain[idx][:, :, None, None] + self.bias[idx][:, :, None, None]


class GBlock(nn.Module):
    """`norm(ch)` builds the conditional norms (default: per-class CBN); `labels` is whatever they condition on
    (BigGAN passes its per-block conditioning vectors)."""

    def __init__(self, in_ch: int, out_ch: int, n_classes: int, norm=None):
        super().__init__()
        norm = norm or (lambda ch: ConditionalBatchNorm(ch, n_classes))
        self.bn1, self.bn2 = norm(in_ch), norm(out_ch)
        self.conv1, self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, labels)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), labels)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, first: bool):
        super().__init__()
        self.first = first
        self.conv1, self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees the image, not a pre-activation
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(h))), 2)
        return h + F.avg_pool2d(self.skip(x), 2)


class Generator(nn.Module):
    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        z_dim: int = 128,
        base_dim: int = 64,
        n_classes: int = 0,
        attn_res: int | None = None,  # default img_size / 2 (32 at 64x64, as in the paper)
        spectral_norm: bool = True,
    ):
        super().__init__()
        _check_size(img_size)
        self.img_size, self.img_channels, self.z_dim, self.n_classes = img_size, img_channels, z_dim, n_classes
        attn_res = attn_res or img_size // 2
        ch = {r: base_dim * min(8, img_size // r) for r in (2**k for k in range(2, img_size.bit_length()))}
        self.dense = nn.Linear(z_dim, ch[4] * 16)
        self.blocks, self.attn_after = nn.ModuleList(), None
        for r in (2**k for k in range(3, img_size.bit_length())):
            self.blocks.append(GBlock(ch[r // 2], ch[r], n_classes))
            if r == attn_res:
                self.attn_after, self.attention = len(self.blocks) - 1, SelfAttention(ch[r])
        self.out = nn.Sequential(
            nn.BatchNorm2d(ch[img_size]), nn.ReLU(), nn.Conv2d(ch[img_size], img_channels, 3, 1, 1)
        )
        _init(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dense(zs).reshape(zs.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            x = block(x, labels)
            if i == self.attn_after:
                x = self.attention(x)
        return torch.tanh(self.out(x))


class Discriminator(nn.Module):
    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        base_dim: int = 64,
        n_classes: int = 0,
        attn_res: int | None = None,
        spectral_norm: bool = True,
    ):
        super().__init__()
        _check_size(img_size)
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, n_classes
        attn_res = attn_res or img_size // 2
        self.blocks, self.attn_after, in_ch = nn.ModuleList(), None, img_channels
        for r in (img_size // 2**k for k in range(1, img_size.bit_length() - 2)):  # output sizes S/2 .. 4
            out_ch = base_dim * min(8, img_size // (2 * r))
            self.blocks.append(DBlock(in_ch, out_ch, first=not self.blocks))
            if r == attn_res:
                self.attn_after, self.attention = len(self.blocks) - 1, SelfAttention(out_ch)
            in_ch = out_ch
        self.psi = nn.Linear(in_ch, 1)
        self.embed = nn.Embedding(n_classes, in_ch) if n_classes else None
        _init(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = imgs
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.attn_after:
                x = self.attention(x)
        h = F.relu(x).sum(dim=(2, 3))  # sum pooling (N, C)
        out = self.psi(h).flatten()
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)  # the projection term
        return out
