"""Fréchet distance between image sets: statistics files (.npz) and scores, plus KID, precision/recall and the
class accuracy of conditional samples. Three detectors: `inception` (TF-compatible FID), `fmnist` (FD_cls on
genzoo's classifier, works offline), `pixels` (FD on raw pixels, seed 004's MNIST protocol).

    python fid.py --data_name fashion_mnist --mode=ref --dest=stats/fashion_mnist_ref --detector fmnist
    torchrun --standalone --nproc_per_node=2 fid.py --mode gen --dest stats/<desc> --img_folder images/<desc> \
        --detector fmnist
    python fid.py --mode=fid --ref_path stats/fashion_mnist_ref.npz --stat_path stats/<desc>.npz

Modes `ref` and `gen` shard the images over processes (torchrun / accelerate launch); the sums of features and of
their outer products are all-reduced in float64, so the statistics equal the single-process ones. The .npz files
hold `mu` and `sigma` (pytorch-fid's keys, so files are interchangeable) plus `count`, `detector` and a subset of
features for KID and precision/recall. Data for `ref`: mnist, fashion_mnist (same lookup as the training scripts),
cifar10 (torchvision's folder under --data_dir), celeba (--data_dir/celeba/img_align_celeba), or any image folder.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image, UnidentifiedImageError

from metrics.detectors import build_detector
from metrics.stats import FeatureMoments, frechet_distance, kid, precision_recall
from utils.cli import UserError, parse, user_errors
from utils.data import MNIST_LIKE, build_dataset, celeba_files, centre_square
from utils.tracking import progress

# Statistics are sensitive to reduced precision: no TF32 in the detector pass (EDM and StyleGAN2-ADA do the same).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SCORE_NAMES = {"inception": "FID", "fmnist": "FD_cls", "pixels": "FD_pixels"}


@dataclass
class Config:
    mode: str = field(default="fid", metadata={"choices": ["ref", "gen", "fid"]})
    data_name: str = field(default="", metadata={"help": "ref: mnist, fashion_mnist, cifar10, celeba or a folder"})
    data_dir: str = "data"
    download: bool = field(default=True, metadata={"help": "ref: let torchvision try to download MNIST-family data"})
    split: str = field(default="train", metadata={"choices": ["train", "test"]})
    img_size: int = field(default=32, metadata={"help": "ref: 32 pads 28x28 data; folders are resized to this"})
    img_folder: str = field(default="", metadata={"help": "gen: folder of images (e.g. sample.py's output)"})
    dest: str = field(default="", metadata={"help": "ref/gen: output statistics (.npz added if missing)"})
    ref_path: str = ""
    stat_path: str = ""
    detector: str = field(default="inception", metadata={"choices": ["inception", "fmnist", "pixels"]})
    inception_weights: str = field(default="", metadata={"help": "pt_inception-2015-12-05-6726825d.pth"})
    detector_weights: str = field(default="", metadata={"help": "another classifier snapshot for --detector fmnist"})
    batch_size: int = 250
    max_features: int = field(default=10000, metadata={"help": "features stored for KID and precision/recall"})
    num_workers: int = 0
    kid_pr: bool = field(default=True, metadata={"help": "fid mode: also KID and precision/recall (needs features)"})
    pr_k: int = field(default=3, metadata={"help": "k of the k-NN balls for precision/recall"})


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 (C, H, W); unreadable files are reported by name, not raised in a worker."""

    def __init__(self, files: list[Path], mode: str | None, size: int | None):
        self.files, self.mode, self.size = files, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as img:
                img.load()
                if self.mode is not None:
                    img = img.convert(self.mode)
                elif img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                array = np.asarray(img)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return f"{self.files[i]}: cannot read as an image ({type(e).__name__})"
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if self.size is not None and tuple(tensor.shape[1:]) != (self.size, self.size):
            tensor = centre_square(tensor, self.size)  # the training scripts' crop and filter, so ref = training data
        return tensor


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def image_source(cfg: Config, detector) -> tuple[torch.utils.data.Dataset, list[str]]:
    """The images of `ref` or `gen` mode, as a dataset of uint8 (C, H, W) and one name per image."""
    mode = "RGB" if detector.name == "inception" else None  # pytorch-fid converts every image to RGB
    if cfg.mode == "gen":
        if not cfg.img_folder:
            raise UserError("--mode gen needs --img_folder")
        folder = Path(cfg.img_folder)
        files = list_images(folder)
        info_path = folder / "sample_info.json"
        if info_path.is_file():  # a sample.py folder: the files of its seed range only (not grid.png, not leftovers)
            first, last = json.loads(info_path.read_text())["seeds"]
            files = [p for p in files if p.stem.isdigit() and first <= int(p.stem) <= last]
        return ImageFiles(files, mode, None), [p.stem for p in files]
    if cfg.data_name in MNIST_LIKE:
        if cfg.img_size not in (28, 32):
            raise UserError(f"--img_size for {cfg.data_name}: 28 (native) or 32 (zero-padded), got {cfg.img_size}")
        # The training scripts' own loader, so the reference sees exactly their pixels (28 -> 32 by zero padding).
        data = build_dataset(cfg.data_name, cfg.data_dir, cfg.img_size, cfg.split == "train", cfg.download)
        return _TensorImages(data.images), []
    if cfg.data_name == "cifar10":
        import torchvision

        try:
            data = torchvision.datasets.CIFAR10(cfg.data_dir, train=cfg.split == "train", download=False)
        except RuntimeError:
            raise UserError(
                f"cifar10 not found under --data_dir {cfg.data_dir!r}: put torchvision's "
                "cifar-10-batches-py folder there (no download is attempted)"
            )
        return _TensorImages(torch.from_numpy(data.data).permute(0, 3, 1, 2)), []
    if not cfg.data_name:
        raise UserError("--mode ref needs --data_name (mnist, fashion_mnist, cifar10, celeba or an image folder)")
    files = celeba_files(cfg.data_dir) if cfg.data_name == "celeba" else list_images(Path(cfg.data_name))
    return ImageFiles(files, mode, cfg.img_size), []


class _TensorImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def intended_labels(folder: Path, names: list[str]) -> list[int] | None:
    """Class of each generated image from sample.py's sample_info.json (--class_label, else seed mod n_classes)."""
    info_path = folder / "sample_info.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    n_classes = info.get("n_classes", 0)
    if not n_classes or not all(name.isdigit() for name in names):
        return None
    return [info["class_label"] if info.get("class_label") is not None else int(n) % n_classes for n in names]


def compute_statistics(cfg: Config, accelerator: Accelerator, detector, dataset, names: list[str]) -> dict:
    labels = intended_labels(Path(cfg.img_folder), names) if cfg.mode == "gen" and hasattr(detector, "logits") else None
    n = len(dataset)
    # Every process takes every world_size-th image; a fixed subset of indices keeps its features for KID/PR.
    my_indices = list(range(accelerator.process_index, n, accelerator.num_processes))
    keep = set(torch.randperm(n, generator=torch.Generator().manual_seed(0))[: cfg.max_features].tolist())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, my_indices),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=list,
    )
    moments, kept, correct, shape, position = None, [], 0, None, 0
    for batch in progress(loader, accelerator.is_main_process, desc=f"{detector.name} features"):
        for item in batch:
            if isinstance(item, str):
                raise UserError(item)
            if shape is None:
                shape = tuple(item.shape)
            elif tuple(item.shape) != shape:
                raise UserError(
                    f"images of different sizes or channel counts: {shape} and {tuple(item.shape)}; "
                    "resize them first (FID statistics need one input size)"
                )
        imgs = torch.stack(batch).to(accelerator.device)
        with torch.no_grad():
            feats = detector(imgs).double()
            if labels is not None:
                batch_labels = torch.tensor([labels[i] for i in my_indices[position : position + len(batch)]])
                correct += (detector.logits(imgs).argmax(1).cpu() == batch_labels).sum().item()
        if moments is None:
            moments = FeatureMoments(feats.shape[1])
        moments.update(feats)
        for row, index in zip(feats.cpu(), my_indices[position : position + len(batch)], strict=True):
            if index in keep:
                kept.append((index, row.float().numpy()))
        position += len(batch)
    if moments is None:  # more processes than images: this rank saw none, but must still join the all-reduce
        dim = detector.dim or int(np.prod(dataset[0].shape))
        moments = FeatureMoments(dim)
    moments.all_reduce(accelerator)
    kept = sorted(gather_object(kept), key=lambda pair: pair[0])
    correct = int(accelerator.reduce(torch.tensor(correct, device=accelerator.device), reduction="sum").item())
    if moments.n < 2:
        raise UserError(f"{moments.n} image(s): a covariance needs at least 2")
    mu, sigma = moments.mean_cov()
    stats = {
        "mu": mu,
        "sigma": sigma,
        "count": np.int64(moments.n),
        "detector": np.str_(detector.name),
        "features": np.array([row for _, row in kept], dtype=np.float32).reshape(len(kept), moments.dim),
    }
    if labels is not None:
        stats["accuracy"] = np.float64(correct / moments.n)
    return stats


def load_stats(path: str, what: str) -> dict:
    if not path:
        raise UserError(f"--mode fid needs --{what}")
    try:
        with np.load(path, allow_pickle=False) as f:  # .npz of plain arrays: nothing is unpickled
            stats = {k: f[k] for k in f.files}
    except (OSError, ValueError, TypeError, AttributeError, EOFError) as e:  # missing, not an .npz, truncated
        raise UserError(f"--{what} {path}: not a readable .npz statistics file ({e})")
    if "mu" not in stats or "sigma" not in stats:
        raise UserError(f"--{what} {path}: no 'mu'/'sigma' arrays in it")
    stats["detector"] = str(stats.get("detector", "inception"))  # pytorch-fid's files are Inception statistics
    return stats


def report(cfg: Config) -> None:
    ref, gen = load_stats(cfg.ref_path, "ref_path"), load_stats(cfg.stat_path, "stat_path")
    if ref["detector"] != gen["detector"]:
        raise UserError(
            f"statistics from different detectors: {cfg.ref_path} is {ref['detector']!r}, "
            f"{cfg.stat_path} is {gen['detector']!r}"
        )
    if ref["mu"].shape != gen["mu"].shape:
        raise UserError(f"statistics of different dimensions: {ref['mu'].shape[0]} vs {gen['mu'].shape[0]}")
    name = SCORE_NAMES.get(gen["detector"], "FD")
    counts = f"ref {int(ref.get('count', -1))} images, gen {int(gen.get('count', -1))} images"
    print(
        f"{name} ({gen['detector']}): {frechet_distance(ref['mu'], ref['sigma'], gen['mu'], gen['sigma']):.6f}"
        f"   [{counts}]"
    )
    if cfg.kid_pr and "features" in ref and "features" in gen:
        fewest = min(len(ref["features"]), len(gen["features"]))
        if fewest <= cfg.pr_k:
            print(f"KID and precision/recall skipped: {fewest} stored features, need more than --pr_k {cfg.pr_k}")
        else:
            kid_mean, kid_std = kid(ref["features"], gen["features"])
            precision, recall = precision_recall(ref["features"], gen["features"], k=cfg.pr_k)
            sizes = f"[{len(ref['features'])} ref vs {len(gen['features'])} gen features]"
            print(f"KID: {kid_mean:.6f} ± {kid_std:.6f}   precision: {precision:.4f}   recall: {recall:.4f}   {sizes}")
    if "accuracy" in gen:
        print(f"class accuracy of the intended labels: {float(gen['accuracy']):.4f}")


def main(cfg: Config) -> None:
    if cfg.batch_size < 1 or cfg.max_features < 0 or cfg.pr_k < 1:
        raise UserError("--batch_size and --pr_k must be >= 1, --max_features >= 0")
    if cfg.mode == "fid":
        report(cfg)
        return
    if not cfg.dest:
        raise UserError(f"--mode {cfg.mode} needs --dest (where to write the .npz statistics)")
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # CPU-only torchrun: shard over gloo
    detector_weights = cfg.inception_weights if cfg.detector == "inception" else cfg.detector_weights
    detector = build_detector(cfg.detector, detector_weights or None).to(accelerator.device)
    with accelerator.main_process_first():  # only one process downloads MNIST-family data
        dataset, names = image_source(cfg, detector)
    stats = compute_statistics(cfg, accelerator, detector, dataset, names)
    if accelerator.is_main_process:
        dest = Path(cfg.dest if cfg.dest.endswith(".npz") else cfg.dest + ".npz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        with open(tmp, "wb") as f:
            np.savez(f, **stats)
        os.replace(tmp, dest)  # atomic: a reader never sees half a file
        extra = f", class accuracy {float(stats['accuracy']):.4f}" if "accuracy" in stats else ""
        print(
            f"wrote {dest}: {int(stats['count'])} images, {detector.name} features of dimension "
            f"{stats['mu'].shape[0]}{extra}"
        )


if __name__ == "__main__":
    with user_errors():
        main(parse(Config, description=__doc__.split("\n")[0]))
