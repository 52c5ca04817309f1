"""Training throughput (img/s) and peak memory of gan_celeba.py per model under fp32, fp16/bf16 and torch.compile,
with ratios against fp32 printed last.

    python benchmarks/bench_gan_zoo.py --model dcgan --img_size 64 --batch_size 64 --variants fp32 fp16 compile
    python benchmarks/bench_gan_zoo.py --model stylegan2 --img_size 64 --batch_size 32 --variants fp32 fp16 compile
    python benchmarks/bench_gan_zoo.py --model stylegan2 --img_size 32 --variants fp32 bf16 --n_steps 30   # CPU

Each variant runs `gan_celeba.py` in its own subprocess on a synthetic folder of random RGB PNGs (decoding is part of
the measured loop, with --num_workers processes) with the model's default sizes and regularisers, and reads the
steady-state sec/kimg after `--warmup` steps (compilation and cuDNN autotuning happen there) and the peak memory
(GPU allocated, or the process's peak RSS on CPU) from stats.jsonl. fp16 on a CPU computes in fp32 (Accelerate's
rule; the script says so); use bf16 there.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import timed_seconds  # noqa: E402

VARIANTS = {
    "fp32": ["--mixed_precision", "no"],
    "fp16": ["--mixed_precision", "fp16"],
    "bf16": ["--mixed_precision", "bf16"],
    "compile": ["--mixed_precision", "no", "--compile"],
    "fp16+compile": ["--mixed_precision", "fp16", "--compile"],
}


def write_folder(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def run_variant(args, variant: str, data_dir: Path, log_dir: Path) -> tuple[float, float]:
    """(images per second after warm-up, peak memory in GiB) of one gan_celeba.py run."""
    n_steps = args.warmup + args.n_steps
    cmd = [sys.executable, str(ROOT / "gan_celeba.py"), "--dataset", "folder", "--data_dir", str(data_dir)]
    cmd += ["--img_size", str(args.img_size), "--model", args.model, "--batch_size", str(args.batch_size)]
    cmd += ["--n_steps", str(n_steps), "--log_interval", str(args.warmup), "--num_workers", str(args.num_workers)]
    cmd += ["--sample_interval", str(10 * n_steps), "--checkpoint_interval", str(10 * n_steps), "--loggers", "none"]
    cmd += ["--log_dir", str(log_dir), "--log_name", variant, *VARIANTS[variant], *args.extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{variant}: gan_celeba.py failed:\n{result.stderr[-3000:]}")
    stats = log_dir / variant / "stats.jsonl"
    seconds = timed_seconds(stats, args.warmup, n_steps, args.batch_size)
    peak = max(json.loads(line)["mem_gb"] for line in stats.read_text().splitlines() if line)
    return args.n_steps * args.batch_size / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dcgan")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    parser.add_argument("--n_steps", type=int, default=50, help="timed steps")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "compile"], choices=list(VARIANTS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more gan_celeba.py flags, last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "images"
        write_folder(data_dir, max(256, 2 * args.batch_size), args.img_size)
        results = {v: run_variant(args, v, data_dir, Path(tmp) / "logs") for v in args.variants}
    for variant, (img_s, peak) in results.items():
        print(
            f"{args.model} {args.img_size}px batch {args.batch_size} {variant}: {img_s:.1f} img/s, peak {peak:.2f} GiB"
        )
    base = results.get("fp32")
    if base:
        ratios = ", ".join(f"{v} {r[0] / base[0]:.2f}x" for v, r in results.items() if v != "fp32")
        print(f"img/s relative to fp32: {ratios}")


if __name__ == "__main__":
    main()
