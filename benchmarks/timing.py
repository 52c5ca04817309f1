"""Shared by the benchmarks: running a training script as a user would and reading its steady-state time back from
its stats.jsonl, and timing a bare loop in this process with the accelerator's queue drained at both ends."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step_bench_args(parser: argparse.ArgumentParser, batch_size: int, n_steps: int, warmup: int) -> argparse.Namespace:
    """Add the flags both step benchmarks share (batch size, timed and warm-up steps, torch threads), parse the
    command line, refuse counts below 1 and set torch's thread count for both the script and the bare loop."""
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--n_steps", type=int, default=n_steps, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (>= 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads, both sides")
    args = parser.parse_args()
    if min(args.batch_size, args.n_steps, args.warmup, args.threads) < 1:
        parser.error("--batch_size, --n_steps, --warmup and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    return args


def bench_device() -> torch.device:
    """The accelerator if there is one, else the CPU: where a bare loop runs."""
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")


def thread_env(threads: int) -> dict[str, str]:
    """This environment with `threads` CPU threads for torch, so that a subprocess uses what the bare side does."""
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_script(cmd: list[str], threads: int) -> None:
    """Run `cmd` (python, a script of the repository, its flags) from the repository root; exits with the tail of
    its output if it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{cmd[1]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def timed_seconds(stats_path: Path, warmup: int, total: int, batch_size: int) -> float:
    """Seconds the script spent on steps warmup+1..total, from each row's sec/kimg and the steps since the
    previous row; exits with a message if the run did not log its last step."""
    rows = [json.loads(line) for line in Path(stats_path).read_text().splitlines() if line]
    prev, seconds = warmup, 0.0
    for row in rows:
        if row["step"] > warmup:  # each row times the steps since the previous row
            seconds += row["sec_per_kimg"] * (row["step"] - prev) * batch_size / 1000
            prev = row["step"]
    if prev != total:
        sys.exit(f"stats.jsonl has no row at the last step {total}: {[row['step'] for row in rows]}")
    return seconds


def timed(fn: Callable, device: torch.device) -> tuple:
    """(fn(), its wall time in seconds); the device's queue is drained before and after, so that the time covers
    the kernels `fn` launched and nothing queued earlier."""
    sync = torch.accelerator.synchronize if device.type != "cpu" else lambda: None
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def timed_steps(step: Callable[[], None], warmup: int, n_steps: int, device: torch.device) -> float:
    """Seconds of `n_steps` calls of `step`, after `warmup` untimed ones."""

    def run(n: int) -> None:
        for _ in range(n):
            step()

    run(warmup)
    return timed(lambda: run(n_steps), device)[1]


def script_then_bare(prefix: str, data_dir: str | None, n_train: int, script_fn: Callable, bare_fn: Callable) -> tuple:
    """Time the training script (`script_fn(data_dir, log_dir)`), then the bare loop (`bare_fn(data_dir)`), one after
    the other and never side by side, on the same IDX files: `data_dir`, or `n_train` synthetic MNIST images in a
    temporary folder that is removed afterwards. Returns both results."""
    from tests.idx import make_mnist_dir

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data_dir = data_dir or str(make_mnist_dir(Path(tmp) / "data", n_train=n_train))
        script = script_fn(data_dir, str(Path(tmp) / "logs"))
        return script, bare_fn(data_dir)
