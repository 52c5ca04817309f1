"""benchmarks/run_all.py: the shape of results.json / results.md and error rows. No timing is asserted: speeds on a
shared CPU say nothing about correctness, only that a number was measured."""

import json
import shlex
import sys
import types

import pytest
import torch

from benchmarks import run_all, timing
from tests.conftest import run_script

COLUMNS = ["case", "variant", "device", "img/s", "sec/kimg", "peak mem (GiB)", "ratio vs bare", "note", "command"]


def table(md: str) -> list[list[str]]:
    """The Markdown table's cells, header first, without the separator line."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


@pytest.mark.slow
def test_quick_gan_case_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    # channels_last is never run (no script has the option), on any device: a "not run" row without numbers.
    run_script("benchmarks/run_all.py", "--quick", "--only", "dcgan32,dcgan32-cond", "--variants", "fp32,channels_last",
               "--batch_size", "8", "--n_steps", "3", "--warmup", "1", "--threads", "1", "--out", out)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["mode"] == "quick" and (results["meta"]["warmup"], results["meta"]["n_steps"]) == (1, 3)
    fp32, channels_last, cond_fp32, _ = results["rows"]
    assert (fp32["case"], fp32["variant"], fp32["status"]) == ("dcgan32", "fp32", "ok")
    assert (cond_fp32["case"], cond_fp32["status"]) == ("dcgan32-cond", "ok")
    assert "--conditional" in cond_fp32["command"]
    for key in ("img_per_s", "sec_per_kimg", "peak_mem_gb", "ratio_vs_bare", "bare_sec_per_kimg"):
        assert fp32[key] > 0 and cond_fp32[key] > 0, key
    assert fp32["img_per_s"] == pytest.approx(1000 / fp32["sec_per_kimg"])
    assert "gan_mnist.py" in fp32["command"] and "--batch_size 8 --n_steps 4 --log_interval 1" in fp32["command"]
    assert channels_last["status"] == "skipped" and channels_last["note"].startswith("not run: ")
    assert "img_per_s" not in channels_last

    cells = table((out / "results.md").read_text())
    assert cells[0] == COLUMNS
    assert [row[:2] for row in cells[1:]] == [
        ["dcgan32", "fp32"], ["dcgan32", "channels_last"], ["dcgan32-cond", "fp32"], ["dcgan32-cond", "channels_last"]
    ]  # fmt: skip
    assert float(cells[1][3]) > 0 and cells[1][8] == f"`{fp32['command']}`"
    assert cells[2][3:7] == ["–"] * 4 and cells[2][7] == channels_last["note"]


def test_a_failing_case_becomes_an_error_row_and_the_suite_goes_on(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; sys.exit('deliberate failure')"]

    def broken(bench, variant):
        run_all.run(bench, failing)

    def fine(bench, variant):
        return {"img_per_s": 1.0, "command": [sys.executable, "-c", "pass"]}

    monkeypatch.setattr(run_all, "CASES", {"broken": (broken, ["fp32"]), "fine": (fine, ["fp32"])})
    threads = torch.get_num_threads()  # main() sets this process's thread count for its bare loops
    try:
        run_all.main(["--only", "broken,fine", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    error, ok = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert error["status"] == "error" and "exit 1" in error["note"] and "deliberate failure" in error["note"]
    assert shlex.split(error["command"]) == failing  # the exact command, reusable in a shell
    assert ok["status"] == "ok"
    assert table((tmp_path / "results.md").read_text())[1][7] == "error: exit 1: deliberate failure"


def test_unknown_cases_are_refused(tmp_path):
    with pytest.raises(SystemExit) as stop:
        run_all.main(["--only", "no_such_case", "--out", str(tmp_path)])
    assert stop.value.code == 2


def test_timed_steps_times_only_the_steps_after_the_warmup(monkeypatch):
    now, calls = [0.0], []

    def step():
        calls.append(now[0])
        now[0] += 1.0  # each step takes one second of the fake clock

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    assert timing.timed_steps(step, 3, 5, torch.device("cpu")) == 5.0 and len(calls) == 8


def test_run_script_passes_the_thread_count_and_exits_with_the_output_of_a_failure():
    timing.run_script([sys.executable, "-c", "import os, sys; sys.exit(os.environ['OMP_NUM_THREADS'] != '3')"], 3)
    with pytest.raises(SystemExit) as stop:
        timing.run_script([sys.executable, "gan_mnist.py", "--no_such_flag"], 1)
    assert str(stop.value).startswith("gan_mnist.py failed (exit 2):") and "--no_such_flag" in str(stop.value)
