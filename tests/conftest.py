import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.idx import make_mnist_dir

# One torch thread in the test process too, with or without pytest-xdist: the scripts a test starts get
# OMP_NUM_THREADS=1 (script_env below), CPU fp32 sums depend on the thread count, and a test that compares an
# in-process run with a launched one bit for bit must not depend on how pytest itself was started.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# Tiny DCGAN so a script-level step takes milliseconds on a CPU.
TINY = ["--batch_size", "8", "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs", '{"base_dim": 8}', "--z_dim", "16"]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """MNIST in its real IDX format (gzip), synthetic content: 256 train / 64 test images."""
    return make_mnist_dir(tmp_path_factory.mktemp("mnist"))


def script_env(env: dict | None = None) -> dict:
    """The environment of every process a test starts: one torch thread (CPU fp32 sums depend on the thread count,
    so runs that a test compares bit for bit must all use the same; and pytest-xdist already runs a worker per
    core), unbuffered output (a test may read a script's progress as it happens)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=script_env(env))


def start(cmd: list[str]) -> subprocess.Popen:
    """A process the test drives by what it prints (stdout, with stderr merged in, read line by line)."""
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=script_env()
    )


def kill_after_line(process: subprocess.Popen, prefix: str) -> list[str]:
    """SIGKILL `process` as soon as it prints a line starting with `prefix`: a moment picked by progress, not by
    wall time. Returns the lines read; fails the test if the process ended without printing it."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.close()
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"never printed {prefix!r}:\n{''.join(lines[-40:])}"
    return lines


def run_script(script: str, *args: str, ok: bool = True, launcher: list[str] | None = None, **kw):
    """Run a top-level script the way a user does; with ok=True, fail the test with its output on error."""
    result = run((launcher or [sys.executable]) + [str(REPO / script), *map(str, args)], **kw)
    if ok and result.returncode != 0:
        pytest.fail(
            f"{script} exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}"
        )
    return result


def train(mnist_dir: Path, log_dir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_script(
        "gan_mnist.py", "--data_dir", mnist_dir, "--no-download", "--log_dir", log_dir, *TINY, *args, **kw
    )


def read_stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def assert_same_images(folder_a: Path, folder_b: Path) -> int:
    """The same seed's PNG in two folders written with different batch sizes or process counts: the latents are
    bit-equal (one generator per seed), but the hardware does not promise bit-equal fp32 convolutions across batch
    shapes and thread counts (environment.md), and a last-bit difference can flip a pixel's 8-bit rounding. So:
    the same files, every pixel within one level, and at most 0.1 % of the pixels off by one (a wrong seed, label
    or latent changes nearly all of them). Returns the number of files."""
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in folder_a.glob("0*.png"))
    assert names == sorted(p.name for p in folder_b.glob("0*.png"))
    a, b = (np.stack([np.asarray(Image.open(f / n), dtype=np.int16) for n in names]) for f in (folder_a, folder_b))
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())
    return len(names)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: non-zero exit, no traceback, one line on stderr that says what is wrong."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def cli_error(cli, argv: list[str], capsys) -> str:
    """Run a script's `cli(argv)` in-process and return its one error line: exit code 2, exactly one "error:" line
    on stderr, and no exception other than the SystemExit that `user_errors` turns a UserError into."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def random_denoiser(method: str, net: str, net_kwargs: dict, std: float = 0.3):
    """A denoiser in eval mode with every parameter drawn from N(0, std²) after torch.manual_seed(0): an O(1)
    network output, as a trained teacher has (the init zeroes the last layer of every residual branch)."""
    from modelling import build_denoiser

    torch.manual_seed(0)
    denoiser = build_denoiser(method, net=net, net_kwargs=net_kwargs).eval()
    with torch.no_grad():
        for p in denoiser.parameters():
            p.normal_(std=std)
    return denoiser
