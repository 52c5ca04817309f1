"""Progress bookkeeping: loss means without a host sync per step, the status line, stats.jsonl, peak memory."""

import json
import resource
import sys
from pathlib import Path

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


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
