"""Progress bookkeeping every training loop shares: loss means without a host sync per step, the status line, peak
memory, the kimg clock, and `LoopTracker`, which holds them for one loop (stats.jsonl and TensorBoard: utils/run.py
`Run.log`; optimizer steps and the non-finite-step policy: utils/optim.py)."""

import json
import resource
import sys
import time

import torch
from tqdm import tqdm

from utils.data import step_seed
from utils.optim import SkipCounter


class RunningMeans:
    """Sums detached scalars on their device between log steps; `pop` averages over steps and processes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self, accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)  # every process logs the same keys, so the stacked order matches across ranks
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        means = accelerator.reduce(means, reduction="mean")
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means.tolist(), strict=True))


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30


def status_line(record: dict) -> str:
    """`step 1000/5000 kimg 32.0 sec/kimg 1.23 loss/d 1.234 ...` from a stats record."""
    parts = [f"step {record['step']}/{record['n_steps']}", f"kimg {record['kimg']:.1f}"]
    parts += [f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "n_steps", "kimg", "time")]
    return " ".join(parts)


def progress(iterable, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm bar; in a log file (not a terminal) it refreshes every 30 s instead of filling the file."""
    return tqdm(
        iterable, disable=not enabled, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, **kwargs
    )


def tracker_config(cfg: dict) -> dict:
    """A config dict TensorBoard's hparams accept: dicts and None become JSON strings."""
    return {k: json.dumps(v) if isinstance(v, dict) or v is None else v for k, v in cfg.items()}


class KimgClock:
    """Images seen and seconds per thousand images since the previous log line."""

    def __init__(self, step: int, images_per_step: int):
        self.images_per_step, self.step, self.time = images_per_step, step, time.perf_counter()

    def tick(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        kimg_tick = (step - self.step) * self.images_per_step / 1000
        record = {"kimg": step * self.images_per_step / 1000, "sec_per_kimg": (now - self.time) / kimg_tick}
        self.step, self.time = step, now
        return record


class LoopTracker:
    """The bookkeeping around a training script's step, the same in every loop: the progress bar, the per-step
    seed, loss means, the kimg clock, the count of skipped (non-finite) updates and the log row when it is due.
    The script keeps the step itself, every Accelerate call, and the grids, evaluation and checkpoints:

        loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
        for step in loop.steps():                   # the global RNG is seeded from (seed, rank, step)
            ... the step: losses, backward, step_optimizer, EMA
            done = loop.end_step(step, applied, stats, {"lr": lr}, grad_norm)   # means, skips, log when due
            ... grids, run.evaluate, run.save(..., skipped=loop.skips.total)
    """

    def __init__(self, run, accelerator, images_per_step: int, skipped: int = 0):
        cfg = run.cfg
        self.run, self.accelerator, self.images_per_step = run, accelerator, images_per_step
        self.meters, self.clock = RunningMeans(), KimgClock(run.start_step, images_per_step)
        self.skips = SkipCounter(cfg.max_skipped_steps, run.dir / "states", skipped)

    def steps(self):
        """The steps from the run's start to --n_steps under a progress bar (main process only). Each step starts
        with the global RNG seeded from (seed, rank, step): every draw of a step is a pure function of the step,
        so a resumed run repeats the uninterrupted one."""
        run, cfg = self.run, self.run.cfg
        bar = progress(
            range(run.start_step, cfg.n_steps),
            self.accelerator.is_main_process,
            initial=run.start_step,
            total=cfg.n_steps,
            desc=run.dir.name,
        )
        for step in bar:
            torch.manual_seed(step_seed(cfg.seed, self.accelerator.process_index, step))
            yield step

    def end_step(
        self, step: int, applied: bool, stats: dict | None = None, values: dict | None = None, grad_norm=None
    ) -> int:
        """Close step `step`: add its `stats` to the means (and `grad_norm` if the update was applied: a skipped
        step's norm is inf/NaN, routine under fp16 loss scaling, and would poison the mean), count a skipped
        update (SkipCounter stops a diverged run), and log when due. Returns the number of steps done."""
        if stats:
            self.meters.add(**stats)
        if applied and grad_norm is not None:
            self.meters.add(grad_norm=grad_norm)
        self.skips.update(applied, step)
        done = step + 1
        self.log(done, values)
        return done

    def log(self, done: int, values: dict | None = None, force: bool = False) -> None:
        """Every --log_interval steps, at the last step, or when `force`d: one row of the kimg clock, the means
        since the previous row, the script's `values` and the skipped-update count."""
        if force or self.run.due(done, self.run.cfg.log_interval):
            record = self.clock.tick(done) | self.meters.pop(self.accelerator) | (values or {})
            self.run.log(self.accelerator, done, record | {"skipped": self.skips.total})
