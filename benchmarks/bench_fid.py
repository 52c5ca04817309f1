"""Feature-extraction throughput of `fid.py --mode gen` (Inception detector) against pytorch-fid on the same images.

    python benchmarks/bench_fid.py --n_images 500 --batch_size 50 --num_workers 0 --threads 2

The real FID Inception weights are not needed: the identical architecture (metrics.detectors.fid_inception_v3) gets
random Kaiming-normal weights (seed 0), saved as <tmp>/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth, so
pytorch-fid finds them in the torch hub cache (TORCH_HOME=<tmp>) and downloads nothing; speed does not depend on the
values. Three runs, one after another: pytorch-fid's CLI (`python -m pytorch_fid --save-stats`, wall time including
start-up and model build), pytorch-fid's calculate_activation_statistics in this process, and fid.py's
compute_statistics in this process (fid.py itself refuses weights that are not the real ones, so it is not run as a
subprocess). The in-process runs are timed after one warm-up batch per model, alternating, best of --repeats. mu and
sigma of fid.py are compared with both pytorch-fid results (max |difference| over max |value|). The last line
printed is the in-process throughput ratio.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fid  # noqa: E402
from benchmarks.timing import thread_env, timed  # noqa: E402
from metrics.detectors import INCEPTION_FILE, fid_inception_v3, load_inception  # noqa: E402
from utils.grid import save_png  # noqa: E402

TOLERANCE = 1e-6  # max relative difference of mu and sigma accepted as "the same statistics"


def random_weights(tmp: Path) -> tuple[Path, dict]:
    """Random FID Inception weights, saved where torch hub (TORCH_HOME=tmp) looks for pytorch-fid's file."""
    torch.manual_seed(0)
    net = fid_inception_v3()
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight)
    path = tmp / "hub" / "checkpoints" / INCEPTION_FILE
    path.parent.mkdir(parents=True)
    state = net.state_dict()
    torch.save(state, path)
    return path, state


def make_images(folder: Path, n: int) -> None:
    """n smooth random 32x32 greyscale blobs (a 4x4 random tensor upsampled), 000000.png, 000001.png, ..."""
    folder.mkdir(parents=True)
    low = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    imgs = (F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1) * 255).round()
    for i, img in enumerate(imgs.to(torch.uint8)):
        save_png(img, folder / f"{i:06d}.png")


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_images", type=int, default=500, help="generated images (ignored with --img_folder)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers, both sides")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads, all runs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating in-process runs per side (best counts)")
    parser.add_argument("--img_folder", default=None, help="existing image folder; default: generated in a temp dir")
    args = parser.parse_args()
    if min(args.n_images, args.batch_size, args.threads, args.repeats) < 1 or args.num_workers < 0:
        parser.error("--n_images, --batch_size, --threads and --repeats must be >= 1, --num_workers >= 0")
    torch.set_num_threads(args.threads)
    import pytorch_fid.fid_score as pfid_score
    import pytorch_fid.inception as pfid_inception

    with tempfile.TemporaryDirectory(prefix="bench_fid_") as tmp_name:
        tmp = Path(tmp_name)
        weights, state = random_weights(tmp)
        folder = Path(args.img_folder) if args.img_folder else tmp / "images"
        if not args.img_folder:
            make_images(folder, args.n_images)
        accelerator = Accelerator(cpu=not torch.accelerator.is_available())
        device = accelerator.device
        cfg = fid.Config(
            mode="gen",
            img_folder=str(folder),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            detector="inception",
        )
        detector = load_inception(str(weights), verify=False).to(device)
        dataset, labels = fid.image_source(cfg)
        files = sorted(p for ext in pfid_score.IMAGE_EXTENSIONS for p in folder.glob(f"*.{ext}"))
        if sorted(map(str, files)) != sorted(map(str, dataset.files)):
            sys.exit(
                f"{folder}: pytorch-fid and fid.py would read different files ({len(files)} vs "
                f"{len(dataset.files)}); use a flat folder of lower-case-suffixed images"
            )
        n = len(files)
        print(
            f"torch {torch.__version__}, {args.threads} thread(s), device {device}, {n} images "
            f"{tuple(dataset.read(0)[1].shape)}, batch size {args.batch_size}, {args.num_workers} worker(s)"
        )

        out = tmp / "pytorch_fid_stats.npz"  # 1. pytorch-fid's CLI, as its users run it
        cmd = [
            sys.executable,
            "-m",
            "pytorch_fid",
            "--save-stats",
            "--device",
            str(device),
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            str(args.num_workers),
            str(folder),
            str(out),
        ]
        env = thread_env(args.threads) | {"TORCH_HOME": str(tmp)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        cli_time = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"pytorch-fid failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        with np.load(out) as f:
            cli_mu, cli_sigma = f["mu"], f["sigma"]
        print(f"pytorch-fid CLI (wall, incl. start-up):  {cli_time:8.2f} s, {n / cli_time:8.2f} images/s")

        pfid_inception.load_state_dict_from_url = lambda *a, **k: state  # 2. pytorch-fid in this process
        model = pfid_inception.InceptionV3([3]).to(device).eval()
        warm = torch.stack([dataset.read(i)[1] for i in range(min(2, n))]).to(device)
        with torch.no_grad():
            model(warm.expand(-1, 3, -1, -1).float() / 255)  # pytorch-fid reads grey PNGs as RGB
            detector(warm)
        # 3. genzoo's fid.py in this process. The two in-process runs alternate `--repeats` times and the fastest of
        # each counts: single runs on a shared CPU drift by +-10 %, which would swamp the comparison.
        pf_times, gz_times = [], []
        for _ in range(args.repeats):
            (pf_mu, pf_sigma), pf_time = timed(
                lambda: pfid_score.calculate_activation_statistics(
                    files, model, args.batch_size, 2048, device, args.num_workers
                ),
                device,
            )
            stats, gz_time = timed(lambda: fid.compute_statistics(cfg, accelerator, detector, dataset, labels), device)
            pf_times.append(pf_time)
            gz_times.append(gz_time)
        pf_time, gz_time = min(pf_times), min(gz_times)
        for name, best, times in (("pytorch-fid", pf_time, pf_times), ("genzoo fid.py", gz_time, gz_times)):
            runs = ", ".join(f"{t:.1f}" for t in times)
            print(f"{name} in-process, best of {args.repeats}: {best:8.2f} s, {n / best:8.2f} images/s  [{runs} s]")

    diffs = {
        "mu vs pytorch-fid in-process": max_rel_diff(stats["mu"], pf_mu),
        "sigma vs pytorch-fid in-process": max_rel_diff(stats["sigma"], pf_sigma),
        "mu vs pytorch-fid CLI .npz": max_rel_diff(stats["mu"], cli_mu),
        "sigma vs pytorch-fid CLI .npz": max_rel_diff(stats["sigma"], cli_sigma),
    }
    for name, value in diffs.items():
        print(f"max relative difference, {name}: {value:.3e}")
    same = max(diffs.values()) <= TOLERANCE
    print(f"statistics identical (max relative difference <= {TOLERANCE:g}): {'yes' if same else 'NO'}")
    print(f"throughput ratio (genzoo fid.py / pytorch-fid, in-process feature extraction): {pf_time / gz_time:.3f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
