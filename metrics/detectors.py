"""Feature detectors for fid.py. Each takes uint8 images (N, C, H, W), exactly as saved in PNG files.

- `inception`: the TensorFlow FID Inception (pool3, 2048-d) of TTUR / pytorch-fid, assembled from torchvision's
  Inception3 and pytorch-fid's patched blocks (FIDInceptionA/C/E_1/E_2), input resized to 299 with bilinear
  interpolation (align_corners=False) and scaled to [-1, 1], as pytorch-fid does. Weights: the file
  `pt_inception-2015-12-05-6726825d.pth` (SHA-256 prefix 6726825d) from `--inception_weights` or the torch hub cache,
  loaded with `torch.load(weights_only=True)`; never downloaded, never substituted by ImageNet weights.
- `fmnist`: genzoo's Fashion-MNIST classifier (modelling/classifier.py, trained by train_detector.py), its 128-d
  penultimate layer; its weights ship beside this file (fmnist_cnn.safetensors), checked against their SHA-256 so
  numbers are comparable across machines.
- `pixels`: raw pixels scaled to [0, 1], flattened (the protocol of CharacteristicGenerator's MNIST table).
- `points`: the coordinates of 2-D toy samples (the in-loop `fd_points` metric of the training scripts).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelling import build_classifier
from utils.ckpt import load_snapshot, pretrained_file, tensors_sha256
from utils.cli import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
FMNIST_FILE = Path(__file__).resolve().parent / "fmnist_cnn.safetensors"
# SHA-256 of the shipped detector's tensors (utils.ckpt.tensors_sha256, in name order): reproduced by
# train_detector.py, unlike the file's own hash, whose header order varies from one write to the next.
FMNIST_WEIGHTS_SHA256 = "e1dc6e5a14ccc32c896a34c359c2422c0dafd292a8003ca5e9554c4828933245"


def fid_inception_v3() -> nn.Module:
    """The FID Inception architecture with random weights: torchvision's Inception3 (1008 classes, no aux head)
    with the blocks pytorch-fid patches to match the TF graph (average pools without padding, max pool in E_2)."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    for name, block in {
        "Mixed_5b": FIDInceptionA(192, pool_features=32), "Mixed_5c": FIDInceptionA(256, pool_features=64),
        "Mixed_5d": FIDInceptionA(288, pool_features=64), "Mixed_6b": FIDInceptionC(768, channels_7x7=128),
        "Mixed_6c": FIDInceptionC(768, channels_7x7=160), "Mixed_6d": FIDInceptionC(768, channels_7x7=160),
        "Mixed_6e": FIDInceptionC(768, channels_7x7=192), "Mixed_7b": FIDInceptionE_1(1280),
        "Mixed_7c": FIDInceptionE_2(2048),
    }.items():  # fmt: skip
        setattr(net, name, block)
    return net


class InceptionDetector(nn.Module):
    name, dim = "inception", 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        self.layers = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool(),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool(),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.eval().requires_grad_(False)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() / 255  # what ToTensor gives pytorch-fid from the same PNG
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # greyscale -> RGB, as PIL's convert("RGB") does
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers(2 * x - 1).flatten(1)  # (N, 2048)


def load_inception(path: str | None = None, verify: bool = True) -> InceptionDetector:
    """Build the FID Inception and load its weights. `verify=False` only for tests with random weights."""
    weights = pretrained_file(
        path, INCEPTION_FILE, INCEPTION_SHA256_PREFIX, INCEPTION_URL, "--inception_weights", "the FID Inception",
        "; or measure offline with --detector fmnist", verify,
    )  # fmt: skip
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)  # a plain state dict: nothing unpickled
        net = fid_inception_v3()
        net.load_state_dict(state)
    except Exception as e:  # unpickling refused, wrong keys or shapes: one line, not a traceback
        raise UserError(f"{weights}: not an FID Inception state dict ({type(e).__name__}: {str(e).splitlines()[0]})")
    return InceptionDetector(net)


class ClassifierDetector(nn.Module):
    """Penultimate features and logits of a genzoo classifier snapshot, on 1-channel 32x32 (or 28x28) images."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net, self.name, self.dim, self.n_classes = (
            net.eval().requires_grad_(False),
            name,
            net.feat_dim,
            net.n_classes,
        )

    def _prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.shape[1] != self.net.img_channels:
            raise UserError(f"--detector {self.name} takes {self.net.img_channels}-channel images, got {imgs.shape[1]}")
        if imgs.shape[-1] == 28 and self.net.img_size == 32:
            imgs = F.pad(imgs, (2, 2, 2, 2))  # MNIST-family data at its native size: the same padding as training
        if imgs.shape[-1] != self.net.img_size or imgs.shape[-2] != self.net.img_size:
            raise UserError(
                f"--detector {self.name} takes {self.net.img_size}x{self.net.img_size} images, got "
                f"{imgs.shape[-2]}x{imgs.shape[-1]}"
            )
        return imgs.float() / 127.5 - 1

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net.features(self._prepare(imgs))

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(imgs))


def load_classifier(path: str | None = None) -> ClassifierDetector:
    weights = Path(path) if path else FMNIST_FILE
    meta, state = load_snapshot(weights)
    digest = tensors_sha256(sorted(state.items()))
    if path is None and digest != FMNIST_WEIGHTS_SHA256:
        raise UserError(
            f"{weights} is not the shipped detector (weights SHA-256 {digest[:16]}... instead of "
            f"{FMNIST_WEIGHTS_SHA256[:16]}...): restore it with git, or pass --detector_weights to use another file"
        )
    if meta["kind"] != "classifier":
        raise UserError(f"{weights}: a {meta['kind']!r} snapshot, not a classifier")
    net = build_classifier(meta["model"], **meta["model_kwargs"])
    net.load_state_dict(state)
    return ClassifierDetector(net, "fmnist")


class PixelDetector(nn.Module):
    name, dim = "pixels", None  # the dimension is the image's C*H*W

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs.flatten(1).float() / 255


class PointDetector(nn.Module):
    """2-D toy data: the coordinates themselves are the features (FD of the sample cloud, in float64)."""

    name, dim = "points", None

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points.flatten(1).double()


DETECTORS = ["fmnist", "inception", "pixels", "points"]


def build_detector(name: str, weights: str | None = None) -> nn.Module:
    if name == "inception":
        return load_inception(weights)
    if name == "fmnist":
        return load_classifier(weights)
    if name == "pixels":
        return PixelDetector()
    if name == "points":
        return PointDetector()
    raise UserError(f"unknown detector {name!r}; valid: {DETECTORS}")
