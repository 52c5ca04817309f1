"""Shared by the step benchmarks: the steady-state time of a training script, read back from its stats.jsonl."""

import json
import sys
from pathlib import Path


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
