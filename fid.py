"""Fréchet distance between image sets: statistics files (.npz) and scores, plus KID, precision/recall and the
class accuracy of conditional samples. Three detectors: `inception` (TF-compatible FID), `fmnist` (FD_cls on
genzoo's classifier, works offline), `pixels` (FD on raw pixels, CharacteristicGenerator's MNIST protocol).

    python fid.py --data_name fashion_mnist --mode=ref --dest=stats/fashion_mnist_ref --detector fmnist
    torchrun --standalone --nproc_per_node=2 fid.py --mode gen --dest stats/<desc> --img_folder images/<desc> \
        --detector fmnist
    python fid.py --mode=fid --ref_path stats/fashion_mnist_ref.npz --stat_path stats/<desc>.npz

Modes `ref` and `gen` shard the images over processes (torchrun / accelerate launch); the sums of features and of
their outer products are all-reduced in float64, so the statistics equal the single-process ones. The .npz files
hold `mu` and `sigma` (pytorch-fid's keys, so files are interchangeable) plus `count`, `detector` and a subset of
features for KID and precision/recall. Data for `ref`: mnist, fashion_mnist, cifar10 (the binary batches), celeba or
any image folder, found and decoded exactly as the training scripts find and decode them (utils/data.py: the same
lookup, the same image reader, crop and filter, corrupt files skipped with a warning); `gen` reads a folder of
generated images with the same reader, strictly (an unreadable file stops with one line).
"""

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from metrics.detectors import build_detector
from metrics.evaluate import dataset_batches, feature_statistics
from metrics.stats import frechet_distance, kid, precision_recall
from utils.ckpt import write_atomic
from utils.cli import UserError, script_cli
from utils.data import DATASETS, TOY_DATASETS, ImageFileDataset, build_dataset, image_files

# Statistics are sensitive to reduced precision: no TF32 in the detector pass (EDM and StyleGAN2-ADA do the same).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

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


def read_sample_info(folder: Path) -> dict | None:
    """sample.py's sample_info.json of a folder (None if it has none); a damaged one gives one line."""
    path = folder / "sample_info.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        first, last = (int(s) for s in info["seeds"])
        return {
            "seeds": (first, last),
            "n_classes": int(info.get("n_classes") or 0),
            "class_label": info.get("class_label"),
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged sample_info.json ({type(e).__name__}); rerun sample.py or delete the file")


def image_source(cfg: Config) -> tuple[torch.utils.data.Dataset, list[int] | None]:
    """The images of `ref` or `gen` mode, and for a conditional sample.py folder the intended class of each image."""
    if cfg.mode == "gen":
        if not cfg.img_folder:
            raise UserError("--mode gen needs --img_folder")
        folder = Path(cfg.img_folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
        files, info = image_files(folder), read_sample_info(folder)
        if info is not None:  # a sample.py folder: the files of its seed range only (not grid.png, not leftovers)
            first, last = info["seeds"]
            files = [p for p in files if p.stem.isdigit() and first <= int(p.stem) <= last]
        if not files:
            raise UserError(f"{folder}: no image files in it")
        labels = None
        if info is not None and info["n_classes"]:
            fixed = info["class_label"]
            labels = [fixed if fixed is not None else int(p.stem) % info["n_classes"] for p in files]
        zeros = torch.zeros(len(files), dtype=torch.int64)
        return ImageFileDataset(files, zeros, 0, None, strict=True), labels
    if not cfg.data_name:
        raise UserError("--mode ref needs --data_name (mnist, fashion_mnist, cifar10, celeba or an image folder)")
    if cfg.data_name in TOY_DATASETS:
        raise UserError(f"--data_name {cfg.data_name}: 2-D points, not images")
    # A dataset name, else a folder: the training scripts' own lookup and decoding, so ref = training pixels.
    name, data_dir = (cfg.data_name, cfg.data_dir) if cfg.data_name in DATASETS else ("folder", cfg.data_name)
    return build_dataset(name, data_dir, cfg.img_size, cfg.split == "train", cfg.download, in_memory=False), None


def compute_statistics(cfg: Config, accelerator: Accelerator, detector, dataset, labels: list[int] | None) -> dict:
    """The dataset's images as uint8 (every process takes every world_size-th one) through the detector."""
    rank, world = accelerator.process_index, accelerator.num_processes

    def batches():
        for indices, images, _ in dataset_batches(dataset, rank, world, cfg.batch_size, num_workers=cfg.num_workers):
            yield indices, images, None if labels is None else torch.tensor([labels[i] for i in indices])

    return feature_statistics(accelerator, detector, batches(), len(dataset), cfg.max_features)


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
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"--{what} {path}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d) statistics")
    return stats


def report(cfg: Config) -> None:
    ref, gen = load_stats(cfg.ref_path, "ref_path"), load_stats(cfg.stat_path, "stat_path")
    if ref["detector"] != gen["detector"]:
        raise UserError(
            f"statistics from different detectors: {cfg.ref_path} is {ref['detector']!r}, "
            f"{cfg.stat_path} is {gen['detector']!r}"
        )
    if ref["mu"].shape != gen["mu"].shape:
        raise UserError(
            f"statistics of different dimensions: {cfg.ref_path} has mu {ref['mu'].shape}, "
            f"{cfg.stat_path} has mu {gen['mu'].shape}"
        )
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
        dataset, labels = image_source(cfg)
    stats = compute_statistics(cfg, accelerator, detector, dataset, labels)
    if accelerator.is_main_process:
        dest = Path(cfg.dest if cfg.dest.endswith(".npz") else cfg.dest + ".npz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **stats)
        write_atomic(dest, buffer.getvalue())  # a reader never sees half a file
        extra = f", class accuracy {float(stats['accuracy']):.4f}" if "accuracy" in stats else ""
        print(
            f"wrote {dest}: {int(stats['count'])} images, {detector.name} features of dimension "
            f"{stats['mu'].shape[0]}{extra}"
        )


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
