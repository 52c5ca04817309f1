"""LPIPS distance for training: Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", arXiv 1801.03924. Used as the distance of characteristic distillation (Ding et al. 2024,
CharacteristicGenerator).

Built on the `lpips` PyPI package (richzhang/PerceptualSimilarity), VGG variant, version 0.1: its linear heads ship
inside the wheel; the VGG16 backbone is torchvision's ImageNet file `vgg16-397923af.pth` (SHA-256 prefix 397923af),
read from `--lpips_weights` or the torch hub cache with `torch.load(weights_only=True)` and never downloaded.

Deviations from CharacteristicGenerator, which uses piq's LPIPS:
- piq replaces VGG's max pooling by 2x2 average pooling and downloads its own `lpips_weights.pt`; genzoo keeps the
  standard max-pool VGG and the lpips package's heads, so its numbers are those of the LPIPS paper, not piq's.
- CharacteristicGenerator resizes to 224 any image smaller than 256; genzoo resizes only images smaller than
  `resize` (the same for the 28 and 32 pixel images used here). Both repeat grey channels to RGB and feed
  ImageNet-normalised inputs (lpips's ScalingLayer on [-1, 1] is piq's mean/std on [0, 1]).
"""

import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from utils.ckpt import pretrained_file
from utils.cli import UserError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def _vgg16_features(state) -> dict:
    """The `features.*` tensors of a torchvision VGG16 state dict, names and shapes checked against a vgg16 built on
    the meta device (free), so that a bad file fails before the 2 s build of the real network."""
    if not isinstance(state, dict):
        raise TypeError(f"a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None).state_dict()
    features = {}
    for key, param in reference.items():
        if key.startswith("features."):
            if key not in state:
                raise KeyError(f"no {key}")
            if state[key].shape != param.shape:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
            features[key] = state[key]
    return features


def load_lpips(path: str | None = None, verify: bool = True, resize: int | None = 224) -> "LPIPSDistance":
    """LPIPS (VGG, v0.1) with torchvision's VGG16 backbone. `verify=False` only for tests with random weights."""
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the lpips package: pip install lpips (or train with --loss pseudo_huber / l2)")
    weights = pretrained_file(
        path, VGG16_FILE, VGG16_SHA256_PREFIX, VGG16_URL, "--lpips_weights", "torchvision's VGG16 (LPIPS)",
        "; or train with --loss pseudo_huber / l2", verify,
    )  # fmt: skip
    try:
        # A plain state dict: nothing unpickled. Unpickling refused, wrong keys or shapes: one line, not a traceback.
        features = _vgg16_features(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:
        raise UserError(f"{weights}: not a torchvision VGG16 state dict ({type(e).__name__}: {str(e).splitlines()[0]})")
    # pretrained=True loads the linear heads shipped in the wheel; pnet_rand=True keeps torchvision from downloading
    # VGG. lpips still passes torchvision the deprecated `pretrained=` argument: silence that warning only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits torchvision's `features` into slice1..slice5 (features[0:4], [4:9], [9:16], [16:23], [23:30])
    # and keeps each module's index as its child name: `slice3.10.weight` is `features.10.weight`.
    net.net.load_state_dict({key: features["features." + key.split(".", 1)[1]] for key in net.net.state_dict()})
    return LPIPSDistance(net, resize)


class LPIPSDistance(nn.Module):
    """Frozen LPIPS: `forward(x, y)` takes images in [-1, 1], (N, 1 or 3, H, W), and returns the distance (N,)."""

    def __init__(self, net: nn.Module, resize: int | None = 224):
        super().__init__()
        self.net, self.resize = net, resize
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPSDistance":
        return super().train(False)  # a parent's .train() must not switch on the dropout in lpips's linear heads

    def _prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes 1- or 3-channel images, got {imgs.shape[1]}")
        imgs = imgs.float()
        if self.resize and imgs.shape[-2] < self.resize:
            imgs = F.interpolate(imgs, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return imgs.expand(-1, 3, -1, -1)  # greyscale -> RGB, as CharacteristicGenerator repeats channels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # fp32 under autocast too: lpips unit-normalises features with eps 1e-10 (0 in fp16), and their squared
        # norms over 512 channels can overflow fp16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(self._prepare(x), self._prepare(y)).reshape(-1)  # (N, 1, 1, 1) -> (N,)
