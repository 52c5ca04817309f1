"""A small CNN classifier for 32x32 greyscale images, used by genzoo as an offline feature extractor (FD_cls).

Not from a paper: a VGG-style stack (3x3 conv, BatchNorm, ReLU, max-pooling; three stages) sized to train on a
CPU in minutes and reach > 90 % test accuracy on Fashion-MNIST. `features()` returns the penultimate `feat_dim`-d layer
(after its ReLU), the role Inception's pool3 plays in FID.
"""

import torch
from torch import nn


def _stage(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


class Classifier(nn.Module):
    def __init__(
        self,
        img_size: int = 32,
        img_channels: int = 1,
        n_classes: int = 10,
        width: int = 16,  # channels of the first stage; doubled per stage (3 stages)
        feat_dim: int = 128,  # size of the penultimate (feature) layer
        dropout: float = 0.3,
    ):
        super().__init__()
        if img_size % 8:
            raise ValueError(f"Classifier needs img_size divisible by 8, got {img_size}")
        self.img_size, self.img_channels, self.n_classes, self.feat_dim = img_size, img_channels, n_classes, feat_dim
        self.trunk = nn.Sequential(
            *_stage(img_channels, width), *_stage(width, 2 * width), *_stage(2 * width, 4 * width)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * (img_size // 8) ** 2, feat_dim), nn.ReLU(True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_dim, n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feat_dim)."""
        return self.embed(self.trunk(imgs))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))  # (N, n_classes) logits
