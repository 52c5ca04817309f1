"""Per-step overhead of gan_mnist.py's training loop against a bare PyTorch loop of the same models, batch and losses.

    python benchmarks/bench_gan_step.py --method gan --batch_size 64 --n_steps 300 --warmup 30 --threads 2
    python benchmarks/bench_gan_step.py --conditional ...     # the README's quick start: labels into G and D

The script side runs `gan_mnist.py --ema` in a subprocess, as a user would, and reads its steady-state seconds per
step from stats.jsonl (rows after step `warmup`). Its timer stops before a log row is written and restarts after it,
and with large sample/checkpoint intervals the only save comes after the last row: the number covers the loop
itself (Accelerate wrappers, reseeding, sampler, finite-gradient checks, loss meters), not logging or saving.
The bare side then runs in this process, after the subprocess has exited, and does the same work per step:
D step, G step with D frozen, weight clipping for wgan, and an EMA lerp plus buffer copy into a copy of G; with
--conditional both networks take the real batch's labels, as gan_mnist.py gives them to the fakes too.
The last line printed is the ratio of the two.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import bench_device, run_script, script_then_bare, step_bench_args, timed_seconds, timed_steps  # noqa: E402
from losses import get_gan_loss, gradient_penalty  # noqa: E402
from modelling import build_discriminator, build_generator  # noqa: E402
from utils.data import build_dataset  # noqa: E402
from utils.dist import set_backends  # noqa: E402

set_backends(deterministic=False)  # the script's settings, so that both sides run the same kernels


def script_sec_per_step(args: argparse.Namespace, data_dir: str, log_dir: str) -> float:
    """Run gan_mnist.py and return its mean seconds per step over the steps after `warmup`."""
    total = args.warmup + args.n_steps
    cmd = [
        sys.executable,
        "gan_mnist.py",
        "--data_dir",
        data_dir,
        "--no-download",
        "--n_steps",
        str(total),
        "--batch_size",
        str(args.batch_size),
        "--method",
        args.method,
        "--ema",
        "--log_interval",
        str(args.warmup),
        "--sample_interval",
        str(10 * total),
        "--checkpoint_interval",
        str(10 * total),
        "--loggers",
        "tensorboard",
        "--log_dir",
        log_dir,
        "--log_name",
        "bench",
    ] + (["--conditional"] if args.conditional else [])
    run_script(cmd, args.threads)
    seconds = timed_seconds(Path(log_dir) / "bench" / "stats.jsonl", args.warmup, total, args.batch_size)
    return seconds / args.n_steps


def bare_sec_per_step(args: argparse.Namespace, data_dir: str) -> float:
    """The same D step, G step and EMA update in plain PyTorch; returns seconds per step after `warmup` steps."""
    device = bench_device()
    dataset = build_dataset("mnist", data_dir, 32, download=False)
    images, all_labels = dataset.images.to(device), dataset.labels.to(device)  # uint8 (N, 1, 32, 32), int64 (N,)
    n_classes = 10 if args.conditional else 0
    torch.manual_seed(0)
    gen = build_generator("dcgan", img_size=32, img_channels=1, z_dim=128, n_classes=n_classes, spectral_norm=False)
    disc = build_discriminator(
        "dcgan",
        img_size=32,
        img_channels=1,
        n_classes=n_classes,
        spectral_norm=False,
        norm="none" if args.method == "wgan-gp" else "batch",
    )
    gen, disc = gen.to(device), disc.to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    ema_params, gen_params = list(ema.parameters()), list(gen.parameters())
    optim_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optim_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss_fn, n = get_gan_loss(args.method), args.batch_size

    def step() -> None:
        batch = torch.randint(len(images), (n,), device=device)
        reals, labels = images[batch].float().div_(127.5).sub_(1.0), all_labels[batch] if n_classes else None
        with torch.no_grad():
            fakes = gen(torch.randn(n, 128, device=device), labels)
        loss_d = loss_fn.d_loss(disc(reals, labels), disc(fakes, labels)).mean()
        if args.method == "wgan-gp":
            loss_d = loss_d + 10.0 * gradient_penalty(disc, reals, fakes, labels).mean()
        optim_d.zero_grad(set_to_none=True)
        loss_d.backward()
        optim_d.step()
        if args.method == "wgan":
            with torch.no_grad():
                for p in disc.parameters():
                    p.clamp_(-0.01, 0.01)
        disc.requires_grad_(False)
        loss_g = loss_fn.g_loss(disc(gen(torch.randn(n, 128, device=device), labels), labels)).mean()
        optim_g.zero_grad(set_to_none=True)
        loss_g.backward()
        disc.requires_grad_(True)
        optim_g.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in gen_params], 1.0 - 0.999)
            for ema_b, b in zip(ema.buffers(), gen.buffers(), strict=True):
                ema_b.copy_(b)

    return timed_steps(step, args.warmup, args.n_steps, device) / args.n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="gan", choices=["gan", "wgan-gp", "hinge", "wgan"])
    parser.add_argument("--conditional", action="store_true", help="class-conditional G and D (10 classes)")
    parser.add_argument("--data_dir", default=None, help="MNIST IDX files; default: synthetic, in a temp dir")
    args = step_bench_args(parser, batch_size=64, n_steps=300, warmup=30)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), method {args.method}, batch size {args.batch_size}, "
        f"{args.warmup} warm-up + {args.n_steps} timed steps, EMA on" + (", conditional" if args.conditional else "")
    )

    script, bare = script_then_bare(
        "bench_gan_", args.data_dir, 2048, lambda data, logs: script_sec_per_step(args, data, logs),
        lambda data: bare_sec_per_step(args, data),
    )  # fmt: skip
    print(f"gan_mnist.py: {script * 1000:.2f} ms/step, {1 / script:.1f} steps/s")
    print(f"bare loop:    {bare * 1000:.2f} ms/step, {1 / bare:.1f} steps/s")
    print(f"overhead ratio (gan_mnist.py / bare loop): {script / bare:.3f}")


if __name__ == "__main__":
    main()
