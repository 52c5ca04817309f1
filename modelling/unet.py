# DDPM++ U-Net: Song et al., "Score-Based Generative Modeling through SDEs", arXiv 2011.13456 (Sec. 4.4, App. H),
# in the configuration EDM trains (Karras et al. 2022, arXiv 2206.00364, App. F.2, "DDPM++").
# Reference code read for facts only: NVlabs/edm training/networks.py (SongUNet, UNetBlock), CC-BY-NC-SA.
# Layout: a 3x3 input conv, `num_blocks` residual blocks per resolution, a downsampling residual block between
# resolutions, self-attention at `attn_resolutions`, a mirrored decoder that concatenates the encoder's skips, and a
# GroupNorm-SiLU-3x3 output head. Noise level enters as a positional embedding of c_noise, mapped by a 2-layer MLP
# and added (not FiLM-scaled) inside every block; class labels add a learned embedding to it.
# Deviations: the [1, 1] resampling filter is written as 2x2 average pooling / nearest upsampling (the same
# operator); labels use nn.Embedding (N(0, 1) init) instead of a linear map of one-hot vectors; qkv has plain
# xavier init (EDM scales it by sqrt(0.2)); no augmentation labels, no Fourier embedding, no NCSN++ encoder.
# Odd sizes work when every level halves exactly (28 -> 14 -> 7). Precision: GroupNorm, the attention
# logits/softmax and the output layer always run in fp32, so the network is safe under fp16 autocast.

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelling.common import PositionalEmbedding

# Named sizes. "cifar" is EDM's DDPM++ for CIFAR-10; "mnist" is the characteristic-learning teacher for 28x28
# (Ding et al. 2024, arXiv 2405.05512); "small" is GPM's MNIST score network (16 channels, one block per
# resolution) without dropout, which trains on a 2-core CPU in minutes.
PRESETS = {
    "cifar": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13),
    "mnist": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=4, attn_resolutions=(14, 16), dropout=0.1),
    "small": dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(14, 16), dropout=0.0),
}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (EDM: eps 1e-6, at most 32 groups of >= 4 channels)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(num_groups=max(1, min(32, channels // 4)), num_channels=channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class UNetBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        two_time: bool = False,
    ):
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = GroupNorm32(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels)
        self.affine_s = nn.Linear(emb_channels, out_channels) if two_time else None  # characteristic: target time
        self.norm1 = GroupNorm32(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection on the skip path whenever the shape changes.
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels or up or down else None
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm32(out_channels)
            self.qkv = nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_s: torch.Tensor | None = None) -> torch.Tensor:
        orig = x
        x = self.conv0(self.resample(F.silu(self.norm0(x))))
        shift = self.affine(emb) if self.affine_s is None else self.affine(emb) + self.affine_s(emb_s)
        x = x + shift[:, :, None, None].to(x.dtype)
        x = self.conv1(self.dropout(F.silu(self.norm1(x))))
        skip = self.resample(orig)
        x = (x + (self.skip(skip) if self.skip is not None else skip)) * math.sqrt(0.5)  # keeps unit variance
        if self.attention:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
            # Logits and softmax in fp32: under fp16 autocast, q.k over 256 positions overflows easily (EDM's
            # AttentionOp does the same).
            with torch.autocast(device_type=x.device.type, enabled=False):
                weights = torch.einsum("bci,bcj->bij", q.float(), k.float() / math.sqrt(c)).softmax(dim=2)
                attended = torch.einsum("bij,bcj->bci", weights, v.float())
            x = (x + self.proj(attended.to(x.dtype).reshape(b, c, h, w))) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    def __init__(
        self,
        img_size: int = 32,  # input and output resolution
        img_channels: int = 3,
        n_classes: int = 0,  # 0 = unconditional
        model_channels: int = 128,  # channels at the first resolution, before channel_mult
        channel_mult: tuple[int, ...] = (1, 2, 2),  # per-resolution multipliers; len = number of resolutions
        channel_mult_emb: int = 4,  # embedding width = model_channels * channel_mult_emb
        num_blocks: int = 4,  # residual blocks per resolution
        attn_resolutions: tuple[int, ...] = (16,),  # resolutions that get self-attention
        dropout: float = 0.1,
        two_time: bool = False,  # characteristic generator: a second time input s (CharacteristicGenerator's traj_mode)
    ):
        super().__init__()
        levels = len(channel_mult)
        if img_size % 2 ** (levels - 1):
            raise ValueError(f"img_size {img_size} does not halve exactly {levels - 1} times (channel_mult)")
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, n_classes
        self.sample_shape = (img_channels, img_size, img_size)
        emb_channels = model_channels * channel_mult_emb

        # Noise-level (and label) embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = nn.Embedding(n_classes, model_channels) if n_classes else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        # Two-time networks embed the target time s like t: two more mapping layers, and a second affine per block
        # whose output is added to the t-affine's.
        self.two_time = two_time
        if two_time:
            self.map_layer0_s = nn.Linear(model_channels, emb_channels)
            self.map_layer1_s = nn.Linear(emb_channels, emb_channels)

        def block(cin: int, cout: int, **kwargs) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels, dropout=dropout, two_time=two_time, **kwargs)

        # Encoder: remember every output's width, the decoder concatenates them back in reverse order.
        self.enc = nn.ModuleList()
        skip_channels, cout = [], model_channels
        for level, mult in enumerate(channel_mult):
            res = img_size >> level
            if level == 0:
                self.enc.append(nn.Conv2d(img_channels, cout, 3, padding=1))
            else:
                self.enc.append(block(cout, cout, down=True))
            skip_channels.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(block(cin, cout, attention=res in attn_resolutions))
                skip_channels.append(cout)

        # Decoder: two blocks at the bottom (the first with attention), then num_blocks + 1 per level.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_size >> level
            if level == levels - 1:
                self.dec.append(block(cout, cout, attention=True))
                self.dec.append(block(cout, cout))
            else:
                self.dec.append(block(cout, cout, up=True))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec.append(block(cin, cout, attention=attention))
        self.out_norm = GroupNorm32(cout)
        self.out_conv = nn.Conv2d(cout, img_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-uniform weights and zero biases; the last layer of every residual branch starts near zero
        # (x 1e-5) so each block is close to the identity at initialisation (EDM's init_zero).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, UNetBlock):
                    m.conv1.weight.mul_(1e-5)
                    if m.attention:
                        m.proj.weight.mul_(1e-5)
            self.out_conv.weight.mul_(1e-5)
            # The s-branch starts at zero, so a two-time network initialised from a one-time one computes exactly
            # the same function (CharacteristicGenerator initialises it xavier-uniform instead; see the README).
            for m in self.modules():
                if isinstance(m, UNetBlock) and m.affine_s is not None:
                    m.affine_s.weight.zero_()

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The output layer's weight: characteristic distillation balances its loss terms by their gradients here."""
        return self.out_conv.weight

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        c_noise_s: torch.Tensor | None = None,  # two-time networks: the target time's c_noise
    ) -> torch.Tensor:
        label_emb = 0
        if self.map_label is not None:
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels")
            label_emb = self.map_label(labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(self.map_noise(c_noise) + label_emb))))
        emb_s = None
        if self.two_time:  # labels enter both embeddings
            emb_s = F.silu(self.map_layer1_s(F.silu(self.map_layer0_s(self.map_noise(c_noise_s) + label_emb))))

        skips = []
        for block in self.enc:
            x = block(x) if isinstance(block, nn.Conv2d) else block(x, emb, emb_s)
            skips.append(x)
        for block in self.dec:
            if x.shape[1] != block.conv0.in_channels:  # the blocks after the resampling one take a skip
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, emb_s)
        # The output layer runs in fp32 under fp16/bf16 autocast: characteristic distillation's adaptive weight is
        # the norm of gradients with respect to its weight, and in fp16 the per-element gradients of a loss averaged
        # over a batch (~1e-5 and below) are subnormal or zero.
        with torch.autocast(x.device.type, enabled=False):
            return self.out_conv(F.silu(self.out_norm(x)).float())
