"""sec/kimg and peak memory of diffusion_train.py per network preset, and its loop overhead against a bare loop.

    python benchmarks/bench_diffusion_step.py --model ddpmpp-small --method edm --batch_size 64 --n_steps 40
    python benchmarks/bench_diffusion_step.py --model ddpmpp-cifar --img_size 32 --batch_size 128   # on a GPU

The script side runs `diffusion_train.py` in a subprocess on synthetic MNIST-format data (28 or 32 pixels, one
channel) and reads its steady-state sec/kimg and peak memory (GPU allocated, or the process's peak RSS on CPU) from
stats.jsonl rows after `warmup` steps; grids and checkpoints are pushed past the end. The bare side then runs in
this process, after the subprocess has exited: the same denoiser, loss, Adam step and EMA lerp in plain PyTorch.
The last line printed is the ratio of the two times.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import bench_device, run_script, script_then_bare, step_bench_args, timed_seconds, timed_steps  # noqa: E402
from losses import get_diffusion_loss  # noqa: E402
from modelling import NETWORK_PRESETS, build_denoiser  # noqa: E402
from utils.data import build_dataset  # noqa: E402
from utils.dist import set_backends  # noqa: E402

set_backends(deterministic=False)  # the script's settings, so that both sides run the same kernels


def script_run(args: argparse.Namespace, data_dir: str, log_dir: str) -> tuple[float, float]:
    """Run diffusion_train.py; return (sec/kimg over the steps after `warmup`, peak memory in GiB)."""
    total = args.warmup + args.n_steps
    cmd = [
        sys.executable, "diffusion_train.py", "--dataset", "mnist", "--data_dir", data_dir, "--no-download",
        "--img_size", str(args.img_size), "--model", args.model, "--method", args.method,
        "--batch_size", str(args.batch_size), "--n_steps", str(total), "--log_interval", str(args.warmup),
        "--sample_interval", "0", "--checkpoint_interval", str(10 * total), "--log_dir", log_dir,
        "--log_name", "bench",
    ]  # fmt: skip
    if args.mixed_precision:
        cmd += ["--mixed_precision", args.mixed_precision]
    run_script(cmd, args.threads)
    stats_path = Path(log_dir) / "bench" / "stats.jsonl"
    seconds = timed_seconds(stats_path, args.warmup, total, args.batch_size)
    mem_gb = json.loads(stats_path.read_text().splitlines()[-1])["mem_gb"]
    return seconds / (args.n_steps * args.batch_size / 1000), mem_gb


def bare_sec_per_kimg(args: argparse.Namespace, data_dir: str) -> float:
    device = bench_device()
    images = build_dataset("mnist", data_dir, args.img_size, download=False).images.to(device)
    net, preset = NETWORK_PRESETS[args.model]
    torch.manual_seed(0)
    kwargs = preset | dict(img_size=args.img_size, img_channels=1, n_classes=0)
    denoiser = build_denoiser(args.method, net=net, net_kwargs=kwargs).to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(denoiser.parameters())
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)
    loss_fn, n = get_diffusion_loss(args.method), args.batch_size
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")

    def step() -> None:
        reals = images[torch.randint(len(images), (n,), device=device)].float().div_(127.5).sub_(1.0)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(denoiser, reals).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1e-3)

    return timed_steps(step, args.warmup, args.n_steps, device) / (args.n_steps * n / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpmpp-small", choices=[m for m in NETWORK_PRESETS if m != "mlp"])
    parser.add_argument("--method", default="edm", choices=["edm", "follmer"])
    parser.add_argument("--img_size", type=int, default=28, choices=[28, 32])
    parser.add_argument("--mixed_precision", default=None, choices=["fp16", "bf16"])
    args = step_bench_args(parser, batch_size=64, n_steps=40, warmup=5)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.method} {args.model} at {args.img_size}px, "
        f"batch {args.batch_size}, {args.warmup} warm-up + {args.n_steps} timed steps, "
        f"precision {args.mixed_precision or 'fp32'}"
    )
    (script, mem_gb), bare = script_then_bare(
        "bench_diffusion_", None, 1024, lambda data, logs: script_run(args, data, logs),
        lambda data: bare_sec_per_kimg(args, data),
    )  # fmt: skip
    print(f"diffusion_train.py: {script:.2f} sec/kimg, peak memory {mem_gb:.2f} GiB")
    print(f"bare loop:          {bare:.2f} sec/kimg")
    print(f"overhead ratio (diffusion_train.py / bare loop): {script / bare:.3f}")


if __name__ == "__main__":
    main()
