"""Datasets and the deterministic, resumable stream of training batches.

MNIST-family data is read straight from the IDX files (gzip or raw) so that the copy Debian's `dataset-fashion-mnist`
package installs works without torchvision's folder layout. Lookup order: `--data_dir`, known system locations,
then a torchvision download into `--data_dir`; if all three fail, one `UserError` line names them.

Batches come from `InfiniteSampler`, a pure function of (seed, global position): the permutation of epoch e is
`randperm(n, seed + e)`, and the global batch of step s is positions [s·B·W, (s+1)·B·W) with rank r taking its
contiguous slice. A run resumed at step s therefore sees exactly the batches an uninterrupted run would
(the mid-epoch resume bugs of accelerate #2574/#3158 cannot happen: there is no loader state to restore).
"""

import gzip
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.cli import UserError

# Name -> (torchvision class name, folder names used by Debian / common mirrors, classes).
MNIST_LIKE = {
    "mnist": ("MNIST", ["mnist"], 10),
    "fashion_mnist": ("FashionMNIST", ["fashion-mnist", "fashion_mnist"], 10),
}
SYSTEM_DIRS = ["/usr/share/datasets"]
_IDX_DTYPES = {0x08: torch.uint8}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (LeCun's MNIST format: magic, dims as big-endian int32, then the raw array)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    numel = 1
    for d in shape:
        numel *= d
    if len(data) - header != numel:
        raise UserError(f"{path}: IDX header announces {shape} = {numel} bytes but the file holds {len(data) - header}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(name: str, data_dir: str | None) -> list[Path]:
    tv_name, folders, _ = MNIST_LIKE[name]
    dirs = []
    if data_dir:
        root = Path(data_dir)
        dirs += [root, root / tv_name / "raw"] + [root / f for f in folders]
    dirs += [Path(s) / f for s in SYSTEM_DIRS for f in folders]
    return dirs


def _find_idx_dir(name: str, data_dir: str | None, train: bool) -> Path | None:
    split = "train" if train else "t10k"
    for folder in _candidate_dirs(name, data_dir):
        if _idx_path(folder, f"{split}-images-idx3-ubyte") and _idx_path(folder, f"{split}-labels-idx1-ubyte"):
            return folder
    return None


def load_mnist_like(name: str, data_dir: str | None, train: bool = True, download: bool = True):
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for `name`, looking in the three places in order."""
    if name not in MNIST_LIKE:
        raise UserError(f"unknown dataset {name!r}; valid: {sorted(MNIST_LIKE)}")
    folder = _find_idx_dir(name, data_dir, train)
    download_error = "not tried (--no-download)"
    if folder is None and download:
        import torchvision

        try:
            getattr(torchvision.datasets, MNIST_LIKE[name][0])(data_dir or "data", train=train, download=True)
            folder = _find_idx_dir(name, data_dir or "data", train)
        except Exception as e:  # any network/IO failure: report it in the one-line message below
            download_error = f"failed: {str(e).splitlines()[0]}"
    if folder is None:
        package = "apt-get install dataset-fashion-mnist" if name == "fashion_mnist" else "a system copy"
        raise UserError(
            f"{name} not found. Get it one of three ways: (1) put the IDX files (train-images-idx3-ubyte.gz, "
            f"train-labels-idx1-ubyte.gz, t10k-*) in --data_dir (now {data_dir!r}); (2) {package} under "
            f"{SYSTEM_DIRS[0]}/{MNIST_LIKE[name][1][0]}; (3) let torchvision download it into --data_dir "
            f"(download {download_error})"
        )
    split = "train" if train else "t10k"
    images = read_idx(_idx_path(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(folder, f"{split}-labels-idx1-ubyte")).long()
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    if int(labels.max()) >= MNIST_LIKE[name][2]:
        raise UserError(f"{folder}: label {int(labels.max())} out of range for {name}")
    return images, labels


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W); indexing with a list returns a whole batch at once.

    Batch indexing avoids one Python call per image, which matters for 32x32 data where a DCGAN step takes
    milliseconds. Images are returned in [-1, 1] as float32.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n_classes: int):
        self.images, self.labels, self.n_classes = images, labels, n_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        imgs = self.images[indices].float().div_(127.5).sub_(1.0)
        return imgs, self.labels[indices]


def build_dataset(name: str, data_dir: str | None, img_size: int, train: bool = True, download: bool = True):
    """MNIST-like data at `img_size`: 28 -> 32 by zero padding (2 pixels a side, as DCGAN on MNIST does), else
    resized with antialiasing."""
    images, labels = load_mnist_like(name, data_dir, train, download)
    images = images[:, None]  # (N, 1, 28, 28)
    if img_size == 32:
        images = F.pad(images, (2, 2, 2, 2))
    elif img_size != images.shape[-1]:
        resized = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageTensorDataset(images.contiguous(), labels, MNIST_LIKE[name][2])


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields this rank's list of indices for every step from `start_step` on (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self):
        step, cache = self.start_step, {}
        while True:
            pos = (step * self.world_size + self.rank) * self.batch_size
            end, parts = pos + self.batch_size, []
            while pos < end:  # a batch may straddle two epochs
                epoch, offset = divmod(pos, self.n)
                if epoch not in cache:
                    cache = {epoch: self._perm(epoch)}
                take = min(end - pos, self.n - offset)
                parts.append(cache[epoch][offset : offset + take])
                pos += take
            yield torch.cat(parts).tolist()
            step += 1


def make_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, start_step: int, num_workers: int = 0):
    """An endless DataLoader of (reals, labels) per step; `batch_size` is per process."""
    sampler = InfiniteSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
    # batch_size=None: the sampler already yields whole batches, which the dataset indexes in one call.
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process at one step. Reseeding from (seed, rank, step) makes every random draw of a step a
    pure function of the step, so a resumed run repeats the uninterrupted one bit for bit without storing RNG state
    (EDM2's scheme)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**63 - 1)
