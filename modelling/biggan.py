"""BigGAN generator: SA-GAN's residual generator with a shared class embedding, hierarchical latents feeding every
conditional BatchNorm, spectral norm and orthogonal init. Its discriminator is SA-GAN's projection discriminator
(`modelling/sagan.py`, registered under "biggan" in `modelling/__init__.py`).

Paper: Brock, Donahue & Simonyan 2019, "Large Scale GAN Training for High Fidelity Natural Image Synthesis",
arXiv 1809.11096 (Sec. 3: shared embedding, hierarchical latent space, orthogonal regularisation (in
`losses/auxiliary.py`), truncation trick (in `sampling.truncated_latents`); App. B: architecture).
Reference code read for facts: ajbrock/BigGAN-PyTorch `BigGAN.py` (Generator, hierarchical z), `layers.py` (ccbn,
SNLinear), `utils.py` (ortho).

Layout for img_size S (n_blocks = log2(S / 4) up-blocks; base_dim ch; channels at resolution r: ch * min(16, S / r),
BigGAN's 128 px table):
  z (N, z_dim) split into n_blocks + 1 chunks; chunk 0 -> SN linear -> (16ch, 4, 4) at 128 px;
  block i: SA-GAN's GBlock [CBN, ReLU, 2x nearest, conv3, CBN, ReLU, conv3; skip 2x + conv1], both CBNs
  conditioned on c_i = concat(shared(y), chunk i+1); self-attention after the block that reaches `attn_res`
  (default S / 2, 64 at 128 px as in the paper); then BN, ReLU, conv3, tanh.
CBN (BigGAN's ccbn): BatchNorm without affine parameters, then x * (1 + W_g c) + W_b c with bias-free SN linears.
The shared embedding (n_classes x shared_dim; one row when unconditional) is the one layer without SN, as in
BigGAN-PyTorch. Init: orthogonal for every conv, linear and embedding (BigGAN-PyTorch's default), biases 0.
Deviations: z_dim need not be a multiple of n_blocks + 1: the chunks are `torch.tensor_split`'s (sizes differ by at
most 1), where BigGAN-PyTorch truncates z_dim to a multiple. No BigGAN-deep, no ch-multiplier tables per
resolution beyond the formula above. BatchNorm tracks running statistics for standing statistics at sampling.
"""

from functools import partial

import torch
from torch import nn

from modelling.common import apply_spectral_norm
from modelling.sagan import GBlock, SelfAttention, _check_size


class LinearConditionalBatchNorm(nn.Module):
    """BatchNorm (no affine) scaled by 1 + W_g c and shifted by W_b c, from a conditioning vector c (N, cond_dim)."""

    def __init__(self, ch: int, cond_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=False)
        self.gain, self.bias = nn.Linear(cond_dim, ch, bias=False), nn.Linear(cond_dim, ch, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class Generator(nn.Module):
    truncates_latents = True  # sampling.gan_images: the truncation trick resamples z, not a mapping network's w

    def __init__(
        self,
        img_size: int = 128,
        img_channels: int = 3,
        z_dim: int = 120,  # split over n_blocks + 1 chunks (120 = 6 x 20 at 128 px, the paper's)
        base_dim: int = 96,  # "ch"; the paper's 128 px model uses 96
        n_classes: int = 0,  # 0: unconditional (one shared embedding row)
        shared_dim: int = 128,  # size of the shared class embedding
        attn_res: int | None = None,  # default img_size / 2
        spectral_norm: bool = True,
    ):
        super().__init__()
        _check_size(img_size)
        self.img_size, self.img_channels, self.z_dim, self.n_classes = img_size, img_channels, z_dim, n_classes
        resolutions = [2**k for k in range(3, img_size.bit_length())]  # block outputs 8 .. S
        if z_dim < len(resolutions) + 1:
            raise ValueError(f"biggan needs z_dim >= {len(resolutions) + 1} (one chunk per block + 1), got {z_dim}")
        self.chunks = [len(c) for c in torch.arange(z_dim).tensor_split(len(resolutions) + 1)]
        ch = {r: base_dim * min(16, img_size // r) for r in [4, *resolutions]}
        attn_res = attn_res or img_size // 2
        self.dense = nn.Linear(self.chunks[0], ch[4] * 16)
        self.blocks, self.attn_after = nn.ModuleList(), None
        for i, r in enumerate(resolutions):
            norm = partial(LinearConditionalBatchNorm, cond_dim=shared_dim + self.chunks[i + 1])
            self.blocks.append(GBlock(ch[r // 2], ch[r], 0, norm=norm))
            if r == attn_res:
                self.attn_after, self.attention = i, SelfAttention(ch[r])
        self.out = nn.Sequential(
            nn.BatchNorm2d(ch[img_size]), nn.ReLU(), nn.Conv2d(ch[img_size], img_channels, 3, 1, 1)
        )
        self.reset_parameters()
        if spectral_norm:
            apply_spectral_norm(self)
        # Built after SN: the shared embedding stays a plain lookup table (BigGAN-PyTorch).
        self.shared = nn.Embedding(max(n_classes, 1), shared_dim)
        nn.init.orthogonal_(self.shared.weight)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                nn.init.orthogonal_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.zeros(zs.shape[0], dtype=torch.long, device=zs.device)
        chunks = zs.split(self.chunks, dim=1)  # hierarchical latents: chunk 0 -> dense, chunk i+1 -> block i
        shared = self.shared(labels)  # (N, shared_dim), computed once and reused by every block
        x = self.dense(chunks[0]).reshape(zs.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            x = block(x, torch.cat([shared, chunks[i + 1]], dim=1))
            if i == self.attn_after:
                x = self.attention(x)
        return torch.tanh(self.out(x))
