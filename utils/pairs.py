"""Data for image-to-image translation (translate.py): paired and unpaired image folders, and the two offline demos
built from Fashion-MNIST on the fly. Images go through `utils.data.read_image` (the one reader) and come out in
[-1, 1]; indexing with a list of indices returns a whole batch, as every genzoo dataset does.

Paired (pix2pix), `--dataset paired --data_dir D`:
- D/A/ and D/B/ with matching file names (relative path without extension), e.g. D/A/x.jpg <-> D/B/x.png; or
- every image under D holds the pair side by side, A on the left half and B on the right (pix2pix's own
  datasets: facades, edges2shoes, maps ...).
Unpaired (CycleGAN), `--dataset unpaired --data_dir D`: D/A/ and D/B/ (or CycleGAN's D/trainA/, D/trainB/), any
number of images in each; an evaluation folder uses D/A, D/B or D/testA, D/testB.
Demos (no files needed beyond Debian's `dataset-fashion-mnist`):
- `fashion_mnist_edges` (paired): the input is the Sobel edge map of a Fashion-MNIST image (white edges on black,
  |grad| > EDGE_THRESHOLD on the [0, 1] image), the target the image itself; test split for evaluation. Edge maps are
  computed chunk by chunk and stored as uint8, or per batch where the set would not fit memory (`EdgePairs`);
- `fashion_mnist_sneakers_boots` (unpaired): A = sneakers (label 7), B = ankle boots (label 9).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.cli import UserError
from utils.data import (
    FitSize,
    ImageFileDataset,
    ImageTensorDataset,
    build_dataset,
    centre_square,
    image_channels,
    image_files,
    map_chunks,
    mnist_like_images,
    read_image,
    select_class,
    to_signed_unit,
)

EDGE_THRESHOLD = 1.0  # Sobel magnitude on [0, 1] pixels; a full 0 -> 1 step edge gives 4
SNEAKER, ANKLE_BOOT = 7, 9  # Fashion-MNIST labels
DEMOS = ("fashion_mnist_edges", "fashion_mnist_sneakers_boots")


def sobel_edges(images_uint8: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> uint8 edge maps (0 or 255) where the Sobel gradient magnitude of the [0, 1] image exceeds
    `threshold` (replicate padding, so the border adds no edge). Written with shifted slices rather than a convolution,
    so that each image's edges are the same bits whatever batch it is computed in."""
    x = F.pad(images_uint8.float() / 255, (1, 1, 1, 1), mode="replicate")
    h, w = images_uint8.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:  # the neighbour at offset (dy, dx) of every pixel
        return x[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    grad_x = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    grad_y = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return ((grad_x.square() + grad_y.square()).sqrt() > threshold).to(torch.uint8) * 255


class EdgePairs(torch.utils.data.Dataset):
    """The `fashion_mnist_edges` pairs (edge map, image), or (image, edge map) when `reverse`, -> ([-1, 1], [-1, 1]).

    `fit` None: `images` uint8 (N, 1, H, W) at the training size, their edge maps computed now chunk by chunk and
    held as uint8. Else `images` as stored, fitted and edged per batch when read (same values: both are item by
    item)."""

    def __init__(self, images: torch.Tensor, fit: FitSize | None = None, reverse: bool = False):
        self.images, self.fit, self.reverse = images, fit, reverse
        self.edges = map_chunks(sobel_edges, images) if fit is None else None
        self.in_channels = self.out_channels = 1
        self.sample_shape = tuple(images.shape[1:]) if fit is None else fit.shape(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        images = self.images[indices]
        if self.fit is None:
            edges = self.edges[indices]
        else:
            images = self.fit(images)
            edges = sobel_edges(images)
        pair = (images, edges) if self.reverse else (edges, images)
        return to_signed_unit(pair[0]), to_signed_unit(pair[1])


class PairedFileDataset(torch.utils.data.Dataset):
    """Pairs decoded from their files on demand: `files_b` None means A|B side by side in each of `files_a` (B|A
    with `swap`). Each half is centre-cropped to a square and resized to `img_size`. An unreadable pair is replaced
    by the next readable one (deterministic, so resume stays exact) and reported once per process, as
    `ImageFileDataset` does."""

    def __init__(
        self, files_a: list[Path], files_b: list[Path] | None, img_size: int, channels: tuple[int, int], swap=False
    ):
        self.files_a, self.files_b, self.img_size, self.swap, self.skipped = files_a, files_b, img_size, swap, set()
        self.in_channels, self.out_channels = channels
        self.sample_shape = (self.out_channels, img_size, img_size)
        if all(self._decode(i) is None for i in range(min(len(files_a), 100))):
            raise UserError(f"none of the first {min(len(files_a), 100)} image pairs can be read, e.g. {files_a[0]}")

    def __len__(self) -> int:
        return len(self.files_a)

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            if self.files_b is None:
                both = read_image(self.files_a[i], channels=self.in_channels)  # (C, H, 2W): A | B
                if both.shape[2] < 2:
                    raise UserError(f"{self.files_a[i]}: too narrow to hold two images side by side")
                half = both.shape[2] // 2
                a, b = (centre_square(x, self.img_size) for x in (both[:, :, :half], both[:, :, half : 2 * half]))
                return (b, a) if self.swap else (a, b)
            a = read_image(self.files_a[i], self.img_size, self.in_channels)
            return a, read_image(self.files_b[i], self.img_size, self.out_channels)
        except UserError as e:
            if i not in self.skipped:
                self.skipped.add(i)
                tqdm.write(f"warning: skipped {e} ({len(self.skipped)} unreadable so far)", file=sys.stderr)
            return None

    def __getitem__(self, indices):
        pairs = []
        for i in indices:
            for j in range(i, i + len(self)):
                pair = self._decode(j % len(self))
                if pair is not None:
                    break
            else:
                raise UserError("no readable image pair left in the dataset")
            pairs.append(pair)
        return tuple(to_signed_unit(torch.stack([p[k] for p in pairs])) for k in (0, 1))


def _folder(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _images(folder: Path) -> list[Path]:
    files = image_files(folder)
    if not files:
        raise UserError(f"{folder}: no image files in it or below it")
    return files


def paired_folder(data_dir: str, img_size: int, reverse: bool = False) -> PairedFileDataset:
    """A paired folder (see the module docstring); `reverse` swaps A and B (pix2pix's --direction BtoA)."""
    root = Path(data_dir)
    if not data_dir or not root.is_dir():
        raise UserError(f"--data_dir {data_dir!r}: no such folder (a paired dataset: A/ and B/, or A|B images)")
    folder_a, folder_b = _folder(root, ("A",)), _folder(root, ("B",))
    if folder_a is None or folder_b is None:  # side by side
        files = _images(root)
        return PairedFileDataset(files, None, img_size, (image_channels(files),) * 2, swap=reverse)
    files_a, files_b = _images(folder_a), _images(folder_b)
    key_a = {f.relative_to(folder_a).with_suffix(""): f for f in files_a}
    key_b = {f.relative_to(folder_b).with_suffix(""): f for f in files_b}
    for name, own, other in (("A", key_a, key_b), ("B", key_b, key_a)):
        alone = sorted(set(own) - set(other))
        if alone:
            raise UserError(
                f"{root}: {len(alone)} image(s) in {name}/ have no partner of the same name in the other folder, "
                f"e.g. {alone[0]}; paired data needs one B image per A image"
            )
    keys = sorted(key_a)
    files_a, files_b = [key_a[k] for k in keys], [key_b[k] for k in keys]
    if reverse:
        files_a, files_b = files_b, files_a
    return PairedFileDataset(files_a, files_b, img_size, (image_channels(files_a), image_channels(files_b)))


def unpaired_folders(data_dir: str, img_size: int, test: bool = False) -> tuple[ImageFileDataset, ImageFileDataset]:
    """The A and B image folders of an unpaired dataset (train: A/ B/ or trainA/ trainB/; test: testA/ testB/
    first), decoded on demand, corrupt files skipped as in `ImageFileDataset`."""
    root = Path(data_dir)
    order = ("testA", "A", "trainA") if test else ("A", "trainA")
    folder_a, folder_b = _folder(root, order), _folder(root, tuple(n[:-1] + "B" for n in order))
    if not data_dir or folder_a is None or folder_b is None:
        raise UserError(
            f"--data_dir {data_dir!r}: an unpaired dataset needs two folders, A/ and B/ (or trainA/ trainB/)"
        )
    domains = []
    for folder in (folder_a, folder_b):
        files = _images(folder)
        domains.append(ImageFileDataset(files, torch.zeros(len(files), dtype=torch.int64), 0, img_size))
    return domains[0], domains[1]


def fashion_mnist_edges(data_dir: str, img_size: int, train: bool, download: bool, reverse: bool = False) -> EdgePairs:
    """The paired demo; `reverse` swaps inputs and targets (image -> edges, pix2pix's --direction BtoA)."""
    images, _, fit = mnist_like_images("fashion_mnist", data_dir, img_size, train, download, copies=2)
    return EdgePairs(images, fit, reverse)


def fashion_mnist_sneakers_boots(
    data_dir: str, img_size: int, train: bool, download: bool
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    data = build_dataset("fashion_mnist", data_dir, img_size, train=train, download=download)
    return select_class(data, SNEAKER), select_class(data, ANKLE_BOOT)


# Random jitter and mirroring: pix2pix (Isola et al. 2017, App. 6.2: "resizing the 256 x 256 input images to 286 x
# 286 and then randomly cropping back to size 256 x 256", plus mirroring) and CycleGAN (Zhu et al. 2017, App. 7.1)
# train with them; their reference code's default `--preprocess resize_and_crop` with `no_flip` false. One draw per
# pair (the aligned dataset's shared transform parameters); CycleGAN's domains each get their own draw.
def jitter_size(img_size: int) -> int:
    """The load size before the crop: 286 for 256 px crops, the same ratio at other sizes."""
    return round(img_size * 286 / 256)


def random_jitter(images: tuple[torch.Tensor, ...], load_size: int, generator=None) -> tuple[torch.Tensor, ...]:
    """Batches (N, C_k, S, S) in [-1, 1] that belong together (a pair's input and target): each sample is resized to
    `load_size` (bicubic, as the reference), an S x S square is cut at a random offset and flipped left-right with
    probability 1/2. Sample i of every tensor gets the same offset and flip. The draws come from `generator` (default:
    the global CPU RNG, which the training loop reseeds every step, so a resume repeats them)."""
    n, size = images[0].shape[0], images[0].shape[-1]
    offsets = torch.randint(load_size - size + 1, (n, 2), generator=generator).tolist()  # (top, left) per sample
    flips = torch.rand(n, generator=generator) < 0.5
    out = []
    for batch in images:
        big = F.interpolate(batch, size=(load_size, load_size), mode="bicubic", align_corners=False).clamp_(-1, 1)
        crops = torch.stack([big[i, :, top : top + size, left : left + size] for i, (top, left) in enumerate(offsets)])
        out.append(torch.where(flips.to(batch.device)[:, None, None, None], crops.flip(-1), crops))
    return tuple(out)
