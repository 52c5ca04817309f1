"""Every family's training speed and peak memory, its overhead against a bare PyTorch loop where one exists, and
sample.py / fid.py throughput, in one command; writes results.json and results.md (a table the README can include).

    python benchmarks/run_all.py --out benchmarks/results/h200          # everything, paper-sized batches
    python benchmarks/run_all.py --quick --out benchmarks/results/quick  # few steps, small batches (< 8 min, one GPU)
    python benchmarks/run_all.py --quick --only dcgan32,edm-small --batch_size 8 --n_steps 4 --warmup 2 --out /tmp/b

Training cases run their script in a subprocess, as a user would, for `warmup` untimed plus `n_steps` timed steps on
synthetic data (MNIST-format IDX files from tests/idx.py, random RGB PNGs from bench_gan_zoo.py; speed does not
depend on the content), with one log row at the end of the warm-up and sample grids and checkpoints pushed past the
end. img/s and sec/kimg are the steady state after the warm-up, read back from stats.jsonl (benchmarks/timing.py);
peak memory is the script's own `mem_gb` (GPU allocated, or the process's peak RSS on a CPU). For gan_mnist.py and
diffusion_train.py the bare loops of bench_gan_step.py / bench_diffusion_step.py then run in this process on the
same data, batch and step counts, never at the same time as the script; "ratio" is script time / bare time (1.00 =
no overhead). sample.py's img/s is its own timer (network and solver, no PNG writing), from sample_info.json;
fid.py's is bench_fid.py's in-process feature extraction, with its ratio against pytorch-fid's on the same images.

Variants: fp32 always; fp16, bf16 and torch.compile only with CUDA (on a CPU they are recorded as "not run: no GPU",
never timed); --quick times fp32 and bf16 only. No script has a channels_last option: that variant is recorded as
not run. A case that fails becomes an error row with its command and the end of its output; the suite goes on.
"""

import argparse
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_diffusion_step, bench_gan_step  # noqa: E402
from benchmarks.bench_gan_zoo import VARIANTS as PRECISION_FLAGS  # noqa: E402
from benchmarks.bench_gan_zoo import write_folder  # noqa: E402
from benchmarks.timing import thread_env, timed_seconds  # noqa: E402
from tests.idx import make_mnist_dir  # noqa: E402

ALL_VARIANTS = ["fp32", "fp16", "bf16", "compile", "channels_last"]
# --quick keeps within minutes on one GPU: every script starts a process per variant, and compiling alone takes
# minutes; bf16 is the mixed precision the house style prefers.
QUICK_VARIANTS = ("fp32", "bf16")
STEPS = {"full": (20, 100), "quick": (3, 10)}  # (untimed warm-up, timed) steps per training run
N_TRAIN_IMAGES = 1024  # synthetic training set: enough distinct batches, small enough to write in a second
ERROR_TAIL = 600  # characters of a failed command's output kept in its row


class CaseError(RuntimeError):
    """A case's command failed (non-zero exit or timeout); the message holds the end of its output."""


@dataclass
class Bench:
    """What every case shares: the options, the work folder, the device and the data, made once when first needed."""

    args: argparse.Namespace
    work: Path
    cuda: bool = field(default_factory=torch.cuda.is_available)
    last_cmd: list[str] | None = None  # the newest command run: an error row names it even if parsing failed

    @property
    def device(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name()
        return f"cpu ({self.args.threads} thread{'s' if self.args.threads > 1 else ''})"

    @property
    def steps(self) -> tuple[int, int]:
        warmup, timed = STEPS["quick" if self.args.quick else "full"]
        return self.args.warmup or warmup, self.args.n_steps or timed

    @property
    def workers(self) -> int:
        return min(4, self.args.threads)  # gan_celeba.py's default, or fewer on a machine with fewer threads

    def batch(self, full: int, quick: int) -> int:
        return self.args.batch_size or (quick if self.args.quick else full)

    @cached_property
    def mnist(self) -> str:
        return str(make_mnist_dir(self.work / "data" / "mnist", n_train=N_TRAIN_IMAGES))

    @cached_property
    def rgb64(self) -> str:
        write_folder(self.work / "data" / "rgb64", N_TRAIN_IMAGES // 4, 64)  # decoded every step: fewer files do
        return str(self.work / "data" / "rgb64")

    @cached_property
    def edm_snapshot(self) -> str:
        """A tiny EDM run (ddpmpp-small, 32 px, two steps): the teacher of distillation, ScoreGAN's data score and
        what sample.py samples from. Its quality does not matter to a speed measurement, its format does."""
        cmd = [sys.executable, "diffusion_train.py", "--method", "edm", "--dataset", "mnist", "--data_dir", self.mnist]
        cmd += ["--no-download", "--img_size", "32", "--model", "ddpmpp-small", "--batch_size", "8", "--n_steps", "2"]
        cmd += ["--sample_interval", "0", "--loggers", "none", "--log_dir", str(self.work), "--log_name", "edm_teacher"]
        run(self, cmd)
        return str(self.work / "edm_teacher")

    def env(self) -> dict[str, str]:
        return thread_env(self.args.threads)


def run(bench: Bench, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run one command from the repository root; a non-zero exit or a timeout raises CaseError with its output."""
    bench.last_cmd = cmd
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=bench.env(), capture_output=True, text=True, timeout=bench.args.timeout
        )
    except subprocess.TimeoutExpired:
        raise CaseError(f"timed out after {bench.args.timeout} s") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-ERROR_TAIL:]
        raise CaseError(f"exit {proc.returncode}: {tail}")
    return proc


# ------------------------------------------------------------------------------------------------ training cases
@dataclass
class Case:
    """One training benchmark: the script, its flags (`{b.mnist}`-style fields name the shared Bench's data and
    snapshot, made when first used), the --batch_size values (full, quick), and the bare loop to compare with."""

    script: str
    flags: str
    batch: tuple[int, int]
    bare: Callable[[Bench, str, int], float | None] | None = None  # (bench, variant, batch) -> bare sec/kimg


def bare_gan(conditional: bool) -> Callable[[Bench, str, int], float | None]:
    """bench_gan_step.py's loop mirrors `gan_mnist.py --method gan --ema [--conditional]` at the default sizes, in
    fp32 only."""

    def bare(bench: Bench, variant: str, batch: int) -> float | None:
        if variant != "fp32":
            return None
        warmup, timed = bench.steps
        args = argparse.Namespace(
            method="gan", conditional=conditional, batch_size=batch, n_steps=timed, warmup=warmup
        )  # fmt: skip
        return bench_gan_step.bare_sec_per_step(args, bench.mnist) / (batch / 1000)

    return bare


def bare_diffusion(model: str, img_size: int) -> Callable[[Bench, str, int], float | None]:
    """bench_diffusion_step.py's loop: the same EDM denoiser, loss, Adam step and EMA, also under fp16/bf16."""

    def bare(bench: Bench, variant: str, batch: int) -> float | None:
        if variant not in ("fp32", "fp16", "bf16"):
            return None
        warmup, timed = bench.steps
        args = argparse.Namespace(
            model=model, method="edm", img_size=img_size, batch_size=batch, n_steps=timed, warmup=warmup,
            mixed_precision=None if variant == "fp32" else variant,
        )  # fmt: skip
        return bench_diffusion_step.bare_sec_per_kimg(args, bench.mnist)

    return bare


MNIST = "--dataset mnist --data_dir {b.mnist} --no-download"
# gan_celeba.py: the model's default regularisers and sizes, as bench_gan_zoo.py runs them; decoding is timed too.
FOLDER64 = "--dataset folder --data_dir {b.rgb64} --img_size 64 --num_workers {b.workers}"
# diffusion_train.py: bench_diffusion_step.py's flags, so that its bare loop does the same work.
EDM = f"--method edm {MNIST} --model"

TRAINING = {
    "dcgan32": Case("gan_mnist.py", f"--method gan --ema {MNIST}", (64, 32), bare=bare_gan(conditional=False)),
    # The README's quick start: labels into G and D.
    "dcgan32-cond": Case(
        "gan_mnist.py", f"--method gan --ema --conditional {MNIST}", (64, 32), bare=bare_gan(conditional=True)
    ),
    "dcgan64": Case("gan_celeba.py", f"--model dcgan {FOLDER64}", (128, 32)),
    "stylegan2-64": Case("gan_celeba.py", f"--model stylegan2 {FOLDER64}", (32, 16)),
    "sagan64": Case("gan_celeba.py", f"--model sagan {FOLDER64}", (64, 16)),
    "edm-small": Case(
        "diffusion_train.py", f"{EDM} ddpmpp-small --img_size 28", (128, 32), bare=bare_diffusion("ddpmpp-small", 28)
    ),
    # The CIFAR-10 preset at 32 px on one channel: the bare loop reads MNIST-format data only (as in the README).
    "edm-cifar": Case(
        "diffusion_train.py", f"{EDM} ddpmpp-cifar --img_size 32", (128, 16), bare=bare_diffusion("ddpmpp-cifar", 32)
    ),
    "distill": Case("distill_characteristic.py", "--teacher {b.edm_snapshot} --no-download", (64, 16)),
    # The offline demo pairs (edges -> Fashion-MNIST item) of the README, at its 32 px.
    "pix2pix": Case(
        "translate.py",
        "--model pix2pix --dataset fashion_mnist_edges --data_dir {b.mnist} --no-download --img_size 32 "
        "--num_workers 0",
        (32, 8),
    ),
    "discr-flow": Case("discriminator_flow.py", MNIST, (128, 32)),
    "score-gan": Case("score_gan.py", "--data_score {b.edm_snapshot} --no-download", (256, 32)),
    # No long energy-only phase first (GEBM's 100 steps): the timed window shows the steady 5:1 schedule.
    "ebm": Case("ebm_train.py", f"{MNIST} --n_iter_d_init 0", (128, 32)),
}


def measure_training(bench: Bench, name: str, variant: str) -> dict:
    """Run one training case in one variant; steady-state img/s, sec/kimg, peak memory and the bare-loop ratio."""
    case = TRAINING[name]
    warmup, timed = bench.steps
    total, batch = warmup + timed, bench.batch(*case.batch)
    log_name = f"{name}-{variant}"
    flags = [token.format(b=bench) for token in shlex.split(case.flags)]  # split first: paths may hold spaces
    cmd = [sys.executable, case.script, *flags, "--batch_size", str(batch), "--n_steps", str(total)]
    cmd += ["--log_interval", str(warmup), "--sample_interval", "0", "--checkpoint_interval", str(10 * total)]
    cmd += ["--loggers", "none", "--log_dir", str(bench.work / "runs"), "--log_name", log_name]
    cmd += PRECISION_FLAGS[variant]
    run(bench, cmd)

    # Images per step from the script's own kimg count: batch x accumulation, noise batches and the like differ.
    stats = bench.work / "runs" / log_name / "stats.jsonl"
    last = json.loads(stats.read_text().splitlines()[-1])
    per_step = last["kimg"] * 1000 / last["step"]
    seconds = timed_seconds(stats, warmup, total, per_step)
    peak = max(json.loads(line)["mem_gb"] for line in stats.read_text().splitlines() if line)
    shutil.rmtree(stats.parent)  # the final training state of a big preset is GBs; the numbers are read
    sec_per_kimg = seconds / (timed * per_step / 1000)
    row = {"img_per_s": timed * per_step / seconds, "sec_per_kimg": sec_per_kimg, "peak_mem_gb": peak}
    if case.bare is not None:
        bare = case.bare(bench, variant, batch)  # after the script has exited: never concurrent
        if bare is not None:
            row |= {"ratio_vs_bare": sec_per_kimg / bare, "bare_sec_per_kimg": bare}
    return row | {"command": cmd}


# -------------------------------------------------------------------------------------- sampling and scoring cases
def measure_sample(bench: Bench, variant: str) -> dict:
    """sample.py on the EDM snapshot with its default solver (Heun, 18 steps); img/s from its own timer."""
    n_images = bench.batch(1024, 128)
    out_dir = bench.work / "samples"
    cmd = [sys.executable, "sample.py", "--checkpoint", bench.edm_snapshot, "--start_seed", "0", "--end_seed"]
    cmd += [str(n_images - 1), "--batch_size", str(min(n_images, 256)), "--no-grid", "--out_dir", str(out_dir)]
    run(bench, cmd)
    info = json.loads((out_dir / "sample_info.json").read_text())
    shutil.rmtree(out_dir)
    return {"img_per_s": 1000 / info["seconds_per_1k_images"], "command": cmd, "note": f"{info['nfe']} NFE"}


def printed_images_per_s(output: str, who: str) -> float:
    """The images/s of bench_fid.py's line `<who> in-process, best of 3:   12.3 s,   40.6 images/s  [...]`."""
    match = re.search(rf"{re.escape(who)} in-process, best of \d+:\s+[\d.]+ s,\s+([\d.]+) images/s", output)
    if match is None:
        raise RuntimeError(f"bench_fid.py printed no throughput line for {who}")
    return float(match.group(1))


def measure_fid(bench: Bench, variant: str) -> dict:
    """bench_fid.py: fid.py's Inception feature extraction against pytorch-fid's, random weights of the same net."""
    n_images = bench.batch(500, 100)
    cmd = [sys.executable, "benchmarks/bench_fid.py", "--n_images", str(n_images), "--batch_size"]
    cmd += [str(min(n_images, 50)), "--repeats", "1" if bench.args.quick else "3", "--threads", str(bench.args.threads)]
    out = run(bench, cmd).stdout
    ours, theirs = printed_images_per_s(out, "genzoo fid.py"), printed_images_per_s(out, "pytorch-fid")
    return {"img_per_s": ours, "ratio_vs_bare": theirs / ours, "command": cmd, "note": "ratio: vs pytorch-fid"}


# ------------------------------------------------------------------------------------------------------ the suite
CASES = {name: (lambda b, v, name=name: measure_training(b, name, v), ALL_VARIANTS) for name in TRAINING}
CASES |= {"sample": (measure_sample, ["fp32"]), "fid": (measure_fid, ["fp32"])}


def not_run_reason(bench: Bench, variant: str) -> str | None:
    if variant != "fp32" and not bench.cuda:
        return "not run: no GPU"
    if variant == "channels_last":
        return "not run: no script has a channels_last option"
    if variant not in QUICK_VARIANTS and bench.args.quick:
        return f"not run: --quick times {' and '.join(QUICK_VARIANTS)} only"
    return None


def run_case(bench: Bench, name: str, variant: str) -> dict:
    """One row: the measurement, or why it was not run, or the error; a failure never stops the suite."""
    row = {"case": name, "variant": variant, "device": bench.device}
    if reason := not_run_reason(bench, variant):
        return row | {"status": "skipped", "note": reason}
    measure, _ = CASES[name]
    bench.last_cmd = None
    try:
        result = measure(bench, variant)
    except (Exception, SystemExit) as error:  # the reused bench helpers sys.exit() on a bad run
        note = str(error) if isinstance(error, CaseError) else f"{type(error).__name__}: {error}"
        return row | {"status": "error", "note": note, "command": shlex.join(bench.last_cmd or [])}
    finally:
        if bench.cuda:
            torch.cuda.empty_cache()  # the bare loops run in this process: free their memory for the next script
    return row | {"status": "ok", **result, "command": shlex.join(result["command"])}


def markdown(rows: list[dict], meta: dict) -> str:
    def num(value, fmt: str = "") -> str:
        """Three significant digits without exponents (GPU img/s run to tens of thousands, CPU sec/kimg too)."""
        if value is None:
            return "–"
        return format(value, fmt or (",.0f" if abs(value) >= 100 else ".3g"))

    lines = [
        f"Device {meta['device']}, torch {meta['torch']}, {meta['mode']} mode ({meta['warmup']} warm-up + "
        f"{meta['n_steps']} timed steps), {meta['date']}. img/s and sec/kimg: steady state after the warm-up; peak "
        "memory: GPU allocated, or the process's peak RSS on a CPU; ratio: script time / bare PyTorch loop time "
        "(fid: fid.py / pytorch-fid), 1.00 = no overhead.",
        "",
        "| case | variant | device | img/s | sec/kimg | peak mem (GiB) | ratio vs bare | note | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("note", "")
        if r["status"] == "error":  # the table shows the last line (the exception); results.json keeps the tail
            note = "error: " + note.strip().splitlines()[-1]
        note = note.replace("|", "\\|")
        command = f"`{r['command']}`".replace("|", "\\|") if r.get("command") else ""
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['device']} | {num(r.get('img_per_s'))} | "
            f"{num(r.get('sec_per_kimg'))} | {num(r.get('peak_mem_gb'), '.2f')} | "
            f"{num(r.get('ratio_vs_bare'), '.3f')} | {note} | {command} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and the work files")
    parser.add_argument("--quick", action="store_true", help="few steps, small batches")
    parser.add_argument("--only", default="", help=f"comma-separated cases of: {', '.join(CASES)}")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma-separated, of the same list")
    parser.add_argument("--batch_size", type=int, default=0, help="every case's batch (images for sample/fid)")
    parser.add_argument("--n_steps", type=int, default=0, help="timed training steps (default: per mode)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed training steps first (default: per mode)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, every run")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per command before it counts as failed")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    variants = [v for v in args.variants.split(",") if v]
    for bad in [n for n in names if n not in CASES] + [v for v in variants if v not in ALL_VARIANTS]:
        parser.error(f"unknown case or variant {bad!r}; cases: {', '.join(CASES)}; variants: {', '.join(ALL_VARIANTS)}")
    if min(args.batch_size, args.n_steps, args.warmup) < 0 or args.threads < 1:
        parser.error("--batch_size, --n_steps and --warmup must be >= 0 (0: the mode's), --threads >= 1")
    torch.set_num_threads(args.threads)  # the bare loops run in this process, with the scripts' thread count

    out = Path(args.out).resolve()  # the scripts run from the repository root
    work = out / "work"  # data, the EDM snapshot and the samples stay here, so every recorded command reruns
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bench = Bench(args, work)
    warmup, timed = bench.steps
    meta = {
        "device": bench.device, "torch": torch.__version__, "mode": "quick" if args.quick else "full",
        "warmup": warmup, "n_steps": timed, "date": datetime.date.today().isoformat(), "cwd": str(ROOT),
    }  # fmt: skip
    rows = []
    for name in names:
        for variant in (v for v in variants if v in CASES[name][1]):
            row = run_case(bench, name, variant)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "command"}
            print(json.dumps(shown), flush=True)
            # Written after every row, so that an interrupted suite keeps what it measured.
            (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
            (out / "results.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
