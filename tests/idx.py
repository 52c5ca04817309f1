"""Write small MNIST-format (IDX) datasets for tests: the real file format, synthetic content."""

import gzip
import struct
from pathlib import Path

import torch


def write_idx(path: Path, array: torch.Tensor, compress: bool = True) -> Path:
    """IDX: two zero bytes, dtype code 0x08 (uint8), ndim, big-endian int32 dims, then the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    path = Path(str(path) + ".gz") if compress else Path(path)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def synthetic_digits(n: int, seed: int = 0, n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 uint8 images of a bright square whose position encodes the class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(n_classes, (n,), generator=g)
    images = torch.randint(0, 40, (n, 28, 28), generator=g).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        r, c = 4 + 2 * (y // 5) * 4, 4 + (y % 5) * 4
        images[i, r : r + 8, c : c + 8] = 230
    return images, labels


def make_mnist_dir(root: Path, n_train: int = 256, n_test: int = 64, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress)
    return root
