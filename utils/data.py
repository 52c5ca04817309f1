"""Datasets and the deterministic, resumable stream of training batches.

MNIST-family data is read straight from the IDX files (gzip or raw) so that the copy Debian's `dataset-fashion-mnist`
package installs works without torchvision's folder layout. Lookup order: `--data_dir`, known system locations,
then a torchvision download into `--data_dir`; if all three fail, one `UserError` line names them.

Batches come from `InfiniteSampler`, a pure function of (seed, global position): the permutation of epoch e is
`randperm(n, seed + e)`, and the global batch of step s is positions [s·B·W, (s+1)·B·W) with rank r taking its
contiguous slice. A run resumed at step s therefore sees exactly the batches an uninterrupted run would
(the mid-epoch resume bugs of accelerate #2574/#3158 cannot happen: there is no loader state to restore).

Other datasets served by `build_dataset` (`DATASETS` lists every name):
- `cifar10`: the official *binary* files (`cifar-10-batches-bin/`), never the pickled python version; no download.
- `folder`: every image under `--data_dir`, labelled by first-level subfolder (torchvision ImageFolder convention);
  in memory, or decoded on demand with corrupt files skipped (`in_memory=False`).
- `celeba`: CelebA's aligned-and-cropped JPEGs in torchvision's folder layout, decoded on demand.
- `gaussians`, `rings`: fixed 2-D point sets whose exact population moments `toy_moments` gives, for exact checks.

Memory: an in-memory set is estimated before it is built (`hold_or_defer`). If the set at `img_size` would take more
than `memory_bound()` (a quarter of the available memory, or `GENZOO_DATA_MEMORY`), the images stay as stored and each
batch is resized on demand (folders: decoded on demand), with the same values; if even the stored copy does not fit,
one `UserError` line says how much it needs. Every per-item transform here works item by item, so a batch fitted on
demand equals the same items fitted all at once, and a run keeps its data whichever way it was held.
"""

import gzip
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

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
    if numel == 0:
        raise UserError(f"{path}: the IDX file holds no items (shape {shape})")
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


def to_signed_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1], the range every model here trains on."""
    return images_uint8.float().div_(127.5).sub_(1.0)


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W); indexing with a list returns a whole batch at once.

    Batch indexing avoids one Python call per image, which matters for 32x32 data where a DCGAN step takes
    milliseconds. Images are returned in [-1, 1] as float32. With `fit` (a `FitSize`), `images` are as stored and
    each batch is fitted to the training size when it is read (sets too large to hold at that size)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        n_classes: int,
        classes: list[str] | None = None,
        fit: "FitSize | None" = None,
    ):
        self.images, self.labels, self.n_classes, self.fit = images, labels, n_classes, fit
        self.classes = classes  # class names where the data has them (folder datasets), else None
        self.sample_shape = tuple(images.shape[1:]) if fit is None else fit.shape(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        images = self.images[indices]
        imgs = to_signed_unit(images if self.fit is None else self.fit(images))
        return imgs, self.labels[indices]


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing (so shrinking does not alias).

    Chunked: the float copy of all 50k CIFAR images at 64x64 alone would take 2.4 GB."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return map_chunks(lambda part: _resize_chunk(part, size), images, chunk)


def _resize_chunk(images: torch.Tensor, size: int) -> torch.Tensor:
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def map_chunks(fn: Callable, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`fn` applied to `images` chunk by chunk, written into one preallocated tensor: the float intermediates of one
    chunk at a time, never two copies of the result (torch.cat of the parts would briefly hold both)."""
    first = fn(images[:chunk])
    out = torch.empty((len(images), *first.shape[1:]), dtype=first.dtype)
    out[: len(first)] = first
    for start in range(chunk, len(images), chunk):
        out[start : start + chunk] = fn(images[start : start + chunk])
    return out


class FitSize:
    """uint8 (N, C, h, w) as stored -> uint8 (N, C, size, size): zero padding of `pad` pixels a side (MNIST's
    28 -> 32), else `_resize`. Item by item (interpolation does not mix images), so any batch gives the same
    values as the whole set fitted at once. A class, not a closure, so that DataLoader workers can pickle it."""

    def __init__(self, size: int, pad: int = 0):
        self.size, self.pad = size, pad

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return (*stored[:-2], self.size, self.size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.pad:
            return F.pad(images, (self.pad,) * 4)
        return _resize(images, self.size)


# ------------------------------------------------------------------------------ memory bound of in-memory sets
MEMORY_ENV = "GENZOO_DATA_MEMORY"  # bytes an in-memory set may take, e.g. 2G or 500M (overrides the fraction)
MEMORY_FRACTION = 0.25  # of the available memory: the rest is for models, activations, workers, other processes
FALLBACK_BOUND = 2 * 2**30  # where the available memory cannot be read
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping: /proc/meminfo's MemAvailable (Linux), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_bound() -> tuple[int, str]:
    """(bytes an in-memory data set may take, where that figure comes from, for messages)."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.lower())
        if not match:
            raise UserError(f"{MEMORY_ENV}={text!r}: give a size in bytes, e.g. 500M or 2G")
        return int(float(match[1]) * _UNITS[match[2]]), f"{MEMORY_ENV}={text}"
    available = available_memory()
    if available is None:
        return FALLBACK_BOUND, f"the fallback bound (available memory unknown; set {MEMORY_ENV} to change it)"
    source = f"{MEMORY_FRACTION:.0%} of the {format_bytes(available)} available; set {MEMORY_ENV} to change it"
    return int(MEMORY_FRACTION * available), source


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def hold_or_defer(what: str, stored_bytes: int, fitted_bytes: int) -> bool:
    """Whether to hold data set `what` in memory at its training size (`fitted_bytes`, derived copies included):
    True if that fits `memory_bound()`; False (fit each batch on demand; one note on stderr) if only the copy as
    stored (`stored_bytes`) fits; a one-line UserError if not even that fits."""
    bound, source = memory_bound()
    if stored_bytes > bound:
        raise UserError(
            f"{what} needs {format_bytes(stored_bytes)} in memory even as stored, over the "
            f"{format_bytes(bound)} allowed for data sets ({source}); free memory, or pass "
            f"{MEMORY_ENV}={math.ceil(stored_bytes / 2**20)}M if the machine can spare it"
        )
    if fitted_bytes <= bound:
        return True
    print(
        f"note: {what} would take {format_bytes(fitted_bytes)} in memory, over the {format_bytes(bound)} allowed "
        f"for data sets ({source}): each batch is resized when it is read instead (same values)",
        file=sys.stderr,
    )
    return False


def fitted_images(what: str, images: torch.Tensor, fit: FitSize, copies: int = 1):
    """(images, fit still to apply): `images` (uint8, as stored) fitted now if `copies` sets of them at the fitted
    size fit in memory (`hold_or_defer`), else as stored with `fit` for each batch."""
    fitted_bytes = copies * len(images) * math.prod(fit.shape(tuple(images.shape[1:])))
    if hold_or_defer(what, images.numel() * images.element_size(), fitted_bytes):
        return fit(images).contiguous(), None
    return images, fit


# ---------------------------------------------------------------------------------------------------- CIFAR-10
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then R, G, B planes of 32x32, row-major


def read_cifar10_bin(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 binary batch file: (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})")
    if not data or len(data) % _CIFAR_RECORD:
        raise UserError(
            f"{path}: {len(data)} bytes is not a positive multiple of {_CIFAR_RECORD} (1 label byte + 3x32x32 "
            f"pixels per record): not a CIFAR-10 binary batch, or truncated"
        )
    records = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, _CIFAR_RECORD)
    labels = records[:, 0].long()
    if int(labels.max()) >= 10:
        raise UserError(f"{path}: label {int(labels.max())} out of range for cifar10 (is this CIFAR-100?)")
    return records[:, 1:].reshape(-1, 3, 32, 32).clone(), labels


def _cifar10_files(folder: Path, train: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    if not train:
        return [folder / "test_batch.bin"] if (folder / "test_batch.bin").is_file() else []
    # (length, name) sorts data_batch_2 before data_batch_10
    return sorted((p for p in folder.glob("data_batch_*.bin") if p.is_file()), key=lambda p: (len(p.name), p.name))


def _cifar10_dirs(data_dir: str | None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs += [Path(data_dir), Path(data_dir) / "cifar-10-batches-bin"]
    for s in SYSTEM_DIRS:
        dirs += [Path(s) / "cifar10", Path(s) / "cifar10" / "cifar-10-batches-bin", Path(s) / "cifar-10-batches-bin"]
    return dirs


def load_cifar10(data_dir: str | None, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 3, 32, 32), labels int64 (N,)) from the first folder of `_cifar10_dirs` holding
    the split. There is no download: torchvision only fetches the pickled version, and unpickling can run code."""
    dirs = _cifar10_dirs(data_dir)
    files = next((f for f in (_cifar10_files(d, train) for d in dirs) if f), None)
    if files is None:
        pickled = [str(d) for d in dirs if (d / "cifar-10-batches-py").is_dir() or (d / "data_batch_1").is_file()]
        hint = f"; the pickled python version found in {pickled[0]} is not read" if pickled else ""
        raise UserError(
            f"cifar10 ({'train' if train else 'test'} split) not found: put the binary files (data_batch_1.bin ... "
            f"data_batch_5.bin, test_batch.bin) in --data_dir (now {data_dir!r}) or its cifar-10-batches-bin/, or in "
            f"{SYSTEM_DIRS[0]}/cifar10; they come from extracting {CIFAR10_URL}{hint}"
        )
    parts = [read_cifar10_bin(f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------------------------------- folder of images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAY_MODES = {"L", "1", "I;16", "I;16L", "I;16B", "I"}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I"}


def image_files(root: Path) -> list[Path]:
    """Image files under `root`, sorted by path parts. Hidden files and folders are skipped: macOS copies leave
    `._name.jpg` resource forks that are not images."""
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel) and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def read_image(path: Path, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """The one image reader of genzoo (training data, fid.py's reference and generated images): uint8 (C, H, W).

    C is `channels` if given, else 1 for grayscale modes (8-, 16- and 1-bit) and 3 for everything else (palette,
    RGBA, CMYK ... converted as PIL converts to RGB). 16-bit grey is mapped onto 0..255 (PIL's convert("L") would
    clip it). With `size`, the centre square resized to size x size (`centre_square`). Anything unreadable (not an
    image, truncated, a decompression bomb) raises one UserError line naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and is reported by name
            if img.mode in _WIDE_GRAY_MODES:
                wide = np.asarray(img).astype(np.float64) / 257.0
                pixels = wide.round().clip(0, 255).astype(np.uint8)[None]
            elif img.mode in _GRAY_MODES:
                pixels = np.asarray(img.convert("L"))[None]
            else:
                pixels = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    # UnidentifiedImageError (not an image) and truncated data are OSErrors; PIL raises the others on odd headers
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: cannot read this image ({type(e).__name__}: {detail}); remove or replace it")
    image = torch.from_numpy(pixels.copy())
    if channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)  # gray -> RGB repeats the channel, as PIL's convert does
    elif channels == 1 and image.shape[0] == 3:
        image = torch.from_numpy(np.asarray(Image.fromarray(pixels.transpose(1, 2, 0)).convert("L")).copy())[None]
    return centre_square(image, size) if size is not None else image


def centre_square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> the centred square, resized to (C, size, size) with `_resize` (the one image filter of
    the training data and of fid.py's reference statistics)."""
    h, w = pixels.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(pixels[None, :, top : top + side, left : left + side], size)[0]


def image_channels(files: list[Path]) -> int:
    """1 if every file is grayscale, else 3 (read from the headers only; stops at the first colour image).
    Files whose header cannot be read are left to the decoder, which reports them."""
    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in _GRAY_MODES:
                    return 3
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    return 1


def _folder_labels(root: Path, files: list[Path]) -> tuple[list[str], torch.Tensor]:
    """torchvision ImageFolder labels: if every image lies inside a first-level subfolder, the classes are the
    sorted names of those subfolders (ones without images are not classes); otherwise no classes, labels 0."""
    rel = [f.relative_to(root).parts for f in files]
    if all(len(parts) > 1 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        index = {c: i for i, c in enumerate(classes)}
        return classes, torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64)
    return [], torch.zeros(len(files), dtype=torch.int64)


def _folder_files(data_dir: str | None) -> tuple[Path, list[Path]]:
    if not data_dir:
        raise UserError("dataset 'folder' needs --data_dir, the folder of images")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir {data_dir}: no such folder")
    files = image_files(root)
    if not files:
        raise UserError(f"--data_dir {data_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    return root, files


class ImageFileDataset(torch.utils.data.Dataset):
    """Images decoded from their files on demand (datasets too large to hold in memory: CelebA is 2.5 GB at 64x64
    and 40 GB at 256x256) with `read_image`: 1 channel if every file is grayscale, else RGB; the centre square
    resized to `img_size` (None: as stored, for generated images). Indexing with a list returns a batch in [-1, 1]
    and its labels.

    Corrupt files are skipped, not fatal: an unreadable image is replaced by the next readable file in the list,
    with that file's own label (deterministic, so resume stays exact), and each one is reported once per process
    with a running count on stderr. `strict=True` (generated images, which must all be there) raises instead. At
    construction the first readable file is looked for, so a folder of unreadable files stops at once."""

    def __init__(
        self,
        files: list[Path],
        labels: torch.Tensor,
        n_classes: int,
        img_size: int | None,
        classes: list[str] | None = None,
        channels: int | None = None,
        strict: bool = False,
    ):
        self.files, self.labels, self.n_classes, self.classes = files, labels, n_classes, classes
        self.img_size, self.strict, self.skipped = img_size, strict, set()
        self.channels = channels or image_channels(files)
        self.sample_shape = (self.channels, img_size, img_size) if img_size else None
        for i in range(min(len(files), 100)):
            if self._decode(i, report=strict) is not None:  # strict: the first unreadable file says why
                return
        raise UserError(f"none of the first {min(len(files), 100)} images can be read, e.g. {files[0]}")

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, i: int, report: bool = True) -> torch.Tensor | None:
        try:
            return read_image(self.files[i], self.img_size, self.channels)
        except UserError as e:
            if self.strict and report:
                raise
            if report and i not in self.skipped:
                self.skipped.add(i)
                # tqdm.write: a line of its own even while a progress bar is drawn on the same stream
                tqdm.write(f"warning: skipped {e} ({len(self.skipped)} unreadable so far)", file=sys.stderr)
            return None

    def read(self, i: int) -> tuple[int, torch.Tensor]:
        """(index actually read, uint8 image): item i, or the next readable one if it is unreadable."""
        for j in range(i, i + len(self.files)):
            image = self._decode(j % len(self.files))
            if image is not None:
                return j % len(self.files), image
        raise UserError("no readable image left in the dataset")

    def __getitem__(self, indices):
        read = [self.read(i) for i in indices]
        shapes = sorted({tuple(image.shape) for _, image in read})
        if len(shapes) > 1:  # only without img_size (generated images are read as stored)
            raise UserError(f"images of different sizes or channel counts: {shapes}; resize them to one size first")
        sources = torch.tensor([j for j, _ in read], dtype=torch.int64)
        return to_signed_unit(torch.stack([image for _, image in read])), self.labels[sources]


def image_file_dataset(data_dir: str | None, img_size: int) -> ImageFileDataset:
    root, files = _folder_files(data_dir)
    classes, labels = _folder_labels(root, files)
    return ImageFileDataset(files, labels, len(classes), img_size, classes or None)


def load_image_folder(data_dir: str | None, img_size: int) -> ImageTensorDataset | ImageFileDataset:
    """Every readable image under `data_dir` (recursively), decoded once by `ImageFileDataset` and held in memory;
    unreadable files are skipped with the same warning. Labels as `_folder_labels`. If the decoded set would not
    fit `memory_bound()`, the readable files are decoded on demand instead (same items, same order, same values)."""
    files = image_file_dataset(data_dir, img_size)
    fitted_bytes = len(files) * files.channels * img_size**2
    hold = hold_or_defer(f"folder {data_dir} ({len(files)} images at {img_size}x{img_size})", 0, fitted_bytes)
    readable, decoded = [], []
    for i in range(len(files)):
        image = files._decode(i)
        if image is not None:
            readable.append(i)
            if hold:
                decoded.append(image)
    labels = files.labels[readable]
    if not hold:
        kept = [files.files[i] for i in readable]
        return ImageFileDataset(kept, labels, files.n_classes, img_size, files.classes, files.channels)
    return ImageTensorDataset(torch.stack(decoded).contiguous(), labels, files.n_classes, files.classes)


def select_class(dataset, label: int):
    """Ganzo's `--image-class`: the images of one label only (an unconditional model of one class). Labels keep their
    values, so the class names and `n_classes` still describe the original data."""
    n_classes = getattr(dataset, "n_classes", 0)
    if not n_classes or not isinstance(dataset, (ImageTensorDataset, ImageFileDataset)):
        raise UserError("--image_class needs image data with labels (MNIST-like, cifar10, a folder of class folders)")
    if not 0 <= label < n_classes:
        names = f" ({', '.join(dataset.classes)})" if dataset.classes else ""
        raise UserError(f"--image_class {label}: the labels are 0..{n_classes - 1}{names}")
    keep = (dataset.labels == label).nonzero().flatten()
    if isinstance(dataset, ImageTensorDataset):
        return ImageTensorDataset(dataset.images[keep], dataset.labels[keep], n_classes, dataset.classes, dataset.fit)
    files = [dataset.files[i] for i in keep.tolist()]
    return ImageFileDataset(files, dataset.labels[keep], n_classes, dataset.img_size, dataset.classes, dataset.channels)


# ---------------------------------------------------------------------------------------------------- CelebA
CELEBA_FOLDER = "img_align_celeba"  # the aligned-and-cropped 178x218 JPEGs (torchvision's layout: <root>/celeba/)


def celeba_dataset(data_dir: str | None, img_size: int) -> ImageFileDataset:
    """CelebA's aligned-and-cropped images, read from torchvision's layout (<data_dir>/celeba/img_align_celeba)
    or the bare folder, without torchvision's MD5 check of the annotation files (an images-only copy works).
    All 202,599 images, no labels (gau-nernst/gan trains unconditionally); centre square, then resized."""
    files = celeba_files(data_dir)
    return ImageFileDataset(files, torch.zeros(len(files), dtype=torch.int64), 0, img_size, channels=3)


def celeba_files(data_dir: str | None) -> list[Path]:
    """The sorted image files of the first CelebA folder found (also fid.py's reference)."""
    roots = [Path(data_dir)] if data_dir else []
    roots += [Path(s) for s in SYSTEM_DIRS]
    candidates = [r / sub for r in roots for sub in (CELEBA_FOLDER, f"celeba/{CELEBA_FOLDER}")]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise UserError(
            f"celeba not found: put {CELEBA_FOLDER}/ (from img_align_celeba.zip, the aligned-and-cropped JPEGs) in "
            f"--data_dir (now {data_dir!r}) or in its celeba/ subfolder (torchvision's layout); looked in "
            f"{', '.join(map(str, candidates))}. CelebA has no reliable automatic download (Google Drive quotas)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no images in it")
    return files


# ------------------------------------------------------------------------------------------------ 2-D toy data
TOY_DATASETS = {"gaussians": 5, "rings": 3}  # name -> number of classes (modes / rings)
GAUSSIANS_RADIUS, GAUSSIANS_STD = 3.0, 0.5
RING_RADII, RING_NOISE = (1.0, 2.0, 3.0), 0.05
# Fixed seeds, independent of any run's --seed, so every run trains and evaluates on the same points.
_TOY_SPLITS = {True: (100_000, 1_000_003), False: (10_000, 2_000_003)}  # train -> (n, seed)


def _gaussian_centres() -> torch.Tensor:
    angles = -2 * math.pi * torch.arange(TOY_DATASETS["gaussians"], dtype=torch.float64) / TOY_DATASETS["gaussians"]
    return GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def toy_points(name: str, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed point set of a toy dataset: (points float32 (N, 2), labels int64 (N,))."""
    if name not in TOY_DATASETS:
        raise UserError(f"unknown toy dataset {name!r}; valid: {sorted(TOY_DATASETS)}")
    n, seed = _TOY_SPLITS[train]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(TOY_DATASETS[name], (n,), generator=g)
    if name == "gaussians":
        points = _gaussian_centres()[labels] + GAUSSIANS_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        theta = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        radius = torch.tensor(RING_RADII, dtype=torch.float64)[labels]
        radius = radius + RING_NOISE * torch.randn(n, generator=g, dtype=torch.float64)
        points = radius[:, None] * torch.stack([theta.cos(), theta.sin()], dim=1)
    return points.float(), labels


def toy_moments(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact population (mean (2,), covariance (2, 2)) of a toy distribution, float64, in closed form."""
    eye = torch.eye(2, dtype=torch.float64)
    if name == "gaussians":
        # Equal-weight mixture: mean = average centre = 0 (K >= 2 equally spaced points on a circle sum to 0);
        # cov = component cov + average c c^T = std^2 I + R^2/2 I (for K >= 3 equally spaced angles).
        return torch.zeros(2, dtype=torch.float64), (GAUSSIANS_STD**2 + GAUSSIANS_RADIUS**2 / 2) * eye
    if name == "rings":
        # Uniform angle: mean 0, cov = E[r^2]/2 I, with E[r^2] = R^2 + noise^2 per ring, averaged over rings.
        second = sum(r**2 + RING_NOISE**2 for r in RING_RADII) / len(RING_RADII)
        return torch.zeros(2, dtype=torch.float64), second / 2 * eye
    raise UserError(f"unknown toy dataset {name!r}; valid: {sorted(TOY_DATASETS)}")


def mode_frequencies(points: torch.Tensor, radius_in_std: float = 3.0) -> tuple[torch.Tensor, float]:
    """For points meant to follow `gaussians`: the fraction of all points that lie within `radius_in_std` standard
    deviations of each mode (5,), and the fraction near none (a 2-D Gaussian puts 1 - exp(-r²/2) inside r std: 98.9 %
    at 3). A perfect sampler gives 0.2 x 0.989 per mode."""
    d = torch.cdist(points.double().reshape(-1, 2), _gaussian_centres())  # (N, 5)
    dist, mode = d.min(dim=1)
    near = dist <= radius_in_std * GAUSSIANS_STD
    freqs = torch.bincount(mode[near], minlength=d.shape[1]).double() / len(d)
    return freqs, float((~near).double().mean())


class PointDataset(torch.utils.data.Dataset):
    """2-D points held in memory; indexing with a list returns a whole batch (points, labels), unscaled."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, n_classes: int):
        self.points, self.labels, self.n_classes = points, labels, n_classes
        self.sample_shape = tuple(points.shape[1:])

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, indices):
        return self.points[indices], self.labels[indices]


DATASETS = sorted([*MNIST_LIKE, "cifar10", "folder", "celeba", *TOY_DATASETS])


def build_dataset(
    name: str, data_dir: str | None, img_size: int, train: bool = True, download: bool = True, in_memory: bool = True
) -> ImageTensorDataset | ImageFileDataset | PointDataset:
    """Dataset `name` (one of `DATASETS`) at `img_size`.

    MNIST-like: 28 -> 32 by zero padding (2 pixels a side, as DCGAN on MNIST does), else resized with antialiasing.
    cifar10: 32 as is, else resized. folder: centre square resized; `train` is ignored (a folder has no splits);
    `in_memory=False` decodes files on demand and skips corrupt ones (`ImageFileDataset`). celeba: always on demand.
    Toy point sets ignore `data_dir`, `img_size` and `download`. Only MNIST-like data is ever downloaded."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {DATASETS}")
    if name in TOY_DATASETS:
        return PointDataset(*toy_points(name, train), TOY_DATASETS[name])
    if name == "cifar10":
        images, labels = load_cifar10(data_dir, train)
        images, fit = fitted_images(f"cifar10 at {img_size}x{img_size}", images, FitSize(img_size))
        return ImageTensorDataset(images, labels, 10, fit=fit)
    if name == "folder":
        return load_image_folder(data_dir, img_size) if in_memory else image_file_dataset(data_dir, img_size)
    if name == "celeba":
        return celeba_dataset(data_dir, img_size)
    images, labels, fit = mnist_like_images(name, data_dir, img_size, train, download)
    return ImageTensorDataset(images, labels, MNIST_LIKE[name][2], fit=fit)


def mnist_like_images(name: str, data_dir: str | None, img_size: int, train: bool, download: bool, copies: int = 1):
    """(images uint8 (N, 1, ., .), labels, fit still to apply) of an MNIST-like set at `img_size` (28 -> 32 by zero
    padding, else resized), held at that size if `copies` sets of it fit in memory (`fitted_images`)."""
    images, labels = load_mnist_like(name, data_dir, train, download)
    fit = FitSize(img_size, pad=2) if img_size == 32 else FitSize(img_size)
    what = f"{name} ({'train' if train else 'test'}) at {img_size}x{img_size}"
    images, fit = fitted_images(what, images[:, None], fit, copies)
    return images, labels, fit


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


def conditioning_classes(cfg, dataset) -> int:
    """The number of classes a run conditions on: the dataset's with --conditional (refused for unlabelled data),
    else 0."""
    if cfg.conditional and not dataset.n_classes:
        raise UserError(f"--conditional needs class labels, and {cfg.dataset} at {cfg.data_dir} has none")
    return dataset.n_classes if cfg.conditional else 0


def train_batches(dataset, cfg, accelerator, start_step: int, num_workers: int = 0):
    """This process's endless batches in a training run: `cfg.batch_size` per process, its share of an order that is
    a pure function of (cfg.seed, position), from batch `start_step` on (a resumed run goes on where it stopped)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    return iter(make_loader(dataset, cfg.batch_size, rank, world, cfg.seed, start_step, num_workers))


def to_device(batch: tuple, device, labels: bool = True) -> tuple:
    """A loader's (reals, labels) on `device`; the labels are None where the training is unconditional."""
    reals, ys = batch
    return reals.to(device, non_blocking=True), ys.to(device, non_blocking=True) if labels else None


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process at one step. Reseeding from (seed, rank, step) makes every random draw of a step a
    pure function of the step, so a resumed run repeats the uninterrupted one bit for bit without storing RNG state
    (EDM2's scheme)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**63 - 1)
