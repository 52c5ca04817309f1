"""Progress bookkeeping every training loop shares: loss means without a host sync per step, the status line, peak
memory and the kimg clock (stats.jsonl and TensorBoard: utils/run.py `Run.log`; optimizer steps and the
non-finite-step policy: utils/optim.py)."""

import json
import resource
import sys
import time

import torch
from tqdm import tqdm


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
