"""The run lifecycle (utils/run.py) through a real training script, in-process for speed: the run folder and its
refusals, --delete, the code version, evaluation in the loop and the best checkpoint, --only_test, --load_best,
resuming an older state (the abandoned timeline moved aside), one process per folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gan_mnist
from tests.conftest import REPO, TINY, cli_error, read_stats, run, run_script, start
from utils.ckpt import list_states, load_snapshot, load_training_state

QUIET = ["--loggers", "none", "--sample_interval", "0", "--log_interval", "2"]


def train(mnist_dir: Path, log_dir: Path, *args: str) -> None:
    gan_mnist.cli(
        ["--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(log_dir), *TINY, *QUIET, *map(str, args)]
    )


def snapshot_steps(run_dir: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in sorted((run_dir / "snapshots").glob("snapshot-*.safetensors"))]


def test_existing_run_is_refused_delete_starts_over_and_code_is_recorded(tmp_path, mnist_dir, capsys):
    train(mnist_dir, tmp_path, "--log_name", "r", "--n_steps", "2", "--checkpoint_interval", "2")
    run_dir = tmp_path / "r"
    before = (run_dir / "states" / "state-00000002" / "tensors.safetensors").read_bytes()
    line = cli_error(
        gan_mnist.cli, ["--data_dir", str(mnist_dir), "--log_dir", str(tmp_path), "--log_name", "r"], capsys
    )
    assert "already holds a run (training states, snapshots, stats.jsonl)" in line and "--delete" in line
    assert (run_dir / "states" / "state-00000002" / "tensors.safetensors").read_bytes() == before  # untouched
    line = cli_error(gan_mnist.cli, ["--log_name", "r", "--delete", "--resume", "latest"], capsys)
    assert "--delete starts over" in line

    train(mnist_dir, tmp_path, "--log_name", "r", "--n_steps", "1", "--checkpoint_interval", "1", "--delete")
    assert [s for s, _ in list_states(run_dir / "states")] == [1] and snapshot_steps(run_dir) == [1]
    assert [row["step"] for row in read_stats(run_dir)] == [1]

    version = json.loads((run_dir / "code" / "launch-00000000.json").read_text())
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert version["git_commit"] == commit and version["start_step"] == 0
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True, text=True).stdout
    recorded = run_dir / "code" / "launch-00000000.diff"
    assert version["modified"] == bool(diff) and (recorded.read_text() == diff if diff else not recorded.exists())


@pytest.mark.slow
def test_eval_best_checkpoint_only_test_and_load_best(tmp_path, mnist_dir, capsys):
    """The in-loop FD_cls equals sample.py + fid.py on the same seeds; the best step's snapshot and state are kept
    (never pruned); --only_test scores the last or best snapshot without training; --load_best continues from the
    best state and sets the later timeline aside."""
    run_dir = tmp_path / "ev"
    args = ["--log_name", "ev", "--conditional", "--ema", "--eval_interval", "2", "--eval_samples", "40"]
    train(mnist_dir, tmp_path, *args, "--n_steps", "8", "--checkpoint_interval", "8", "--keep_states", "2")
    evals = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "eval").glob("step-*.json")}
    assert sorted(evals) == [2, 4, 6, 8] and all(
        e["metric"] == "fd_cls" and e["n_samples"] == 40 for e in evals.values()
    )
    best = json.loads((run_dir / "best.json").read_text())
    assert best["value"] == min(e["value"] for e in evals.values()) and evals[best["step"]]["value"] == best["value"]
    # A state and a snapshot at the best step, whatever --checkpoint_interval and --keep_states say.
    states = [s for s, _ in list_states(run_dir / "states")]
    assert best["step"] in states and states[-1] == 8 and len(states) <= 3
    assert (run_dir / "snapshots" / "best.safetensors").read_bytes() == (
        run_dir / "snapshots" / f"snapshot-{best['step']:08d}.safetensors"
    ).read_bytes()

    # The same number from the standalone tools: sample.py + fid.py on seeds 0..39 of the final snapshot.
    samples, stats = tmp_path / "samples", tmp_path / "stats"
    run_script("sample.py", "--checkpoint", run_dir, "--start_seed", "0", "--end_seed", "39", "--out_dir", samples)
    run_script("fid.py", "--mode", "ref", "--data_name", "mnist", "--data_dir", mnist_dir, "--no-download",
               "--detector", "fmnist", "--dest", stats / "ref")  # fmt: skip
    run_script("fid.py", "--mode", "gen", "--img_folder", samples, "--detector", "fmnist", "--dest", stats / "gen")
    scored = run_script("fid.py", "--mode", "fid", "--ref_path", stats / "ref.npz", "--stat_path", stats / "gen.npz")
    fd_cls = float(scored.stdout.split("FD_cls (fmnist): ")[1].split()[0])
    assert fd_cls == pytest.approx(evals[8]["value"], rel=1e-6)
    accuracy = float(scored.stdout.split("class accuracy of the intended labels: ")[1].split()[0])
    assert accuracy == pytest.approx(evals[8]["accuracy"], abs=1e-9)

    # --only_test: the last snapshot (= the step-8 evaluation) and the best one; nothing is trained or changed.
    listing = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "test" not in p.parts)
    gan_mnist.cli(["--data_dir", str(mnist_dir), "--no-download", "--load", str(run_dir), "--only_test",
                   "--eval_samples", "40", *TINY, "--conditional"])  # fmt: skip
    gan_mnist.cli(["--data_dir", str(mnist_dir), "--no-download", "--load", str(run_dir), "--only_test", "--load_best",
                   "--eval_samples", "40", *TINY, "--conditional"])  # fmt: skip
    last = json.loads((run_dir / "test" / "last-step-00000008-fd_cls.json").read_text())
    tested_best = json.loads((run_dir / "test" / f"best-step-{best['step']:08d}-fd_cls.json").read_text())
    assert last["value"] == pytest.approx(evals[8]["value"], rel=1e-9)
    assert tested_best["value"] == pytest.approx(best["value"], rel=1e-9)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "test" not in p.parts) == listing

    # Four more steps at a destructive learning rate leave the best where it was; --load_best then continues from
    # the best state, and what came after it is moved aside, never deleted.
    train(mnist_dir, tmp_path, *args, "--n_steps", "12", "--checkpoint_interval", "12", "--resume", "latest",
          "--lr", "0.5")  # fmt: skip
    assert json.loads((run_dir / "best.json").read_text()) == best and best["step"] <= 8
    train(mnist_dir, tmp_path, *args, "--n_steps", "14", "--checkpoint_interval", "14", "--load_best")
    best_state = run_dir / "states" / "state-{:08d}".format(best["step"])
    assert f"resuming from {best_state}" in capsys.readouterr().out
    aside = next((run_dir / "abandoned").iterdir())
    assert (aside / "states" / "state-00000012").is_dir() and (aside / "eval" / "step-00000012.json").is_file()
    assert [s for s, _ in list_states(run_dir / "states")][-1] == 14
    assert max(int(p.stem.split("-")[1]) for p in (run_dir / "eval").glob("step-*.json")) == 14


def test_resuming_an_older_state_moves_the_newer_timeline_aside(tmp_path, mnist_dir, capsys):
    """Resume state-4 of a run that reached step 8: states, snapshots, grids and stats rows after step 4 go to
    abandoned/, `--resume latest` then follows the new timeline, which repeats the old one bit for bit."""
    run_dir = tmp_path / "t"
    args = ["--log_name", "t", "--checkpoint_interval", "4", "--keep_states", "3", "--sample_interval", "4"]
    train(mnist_dir, tmp_path, *args, "--n_steps", "8")
    old_final = load_training_state(run_dir / "states" / "state-00000008")
    old_rows = read_stats(run_dir)
    train(mnist_dir, tmp_path, *args, "--n_steps", "6", "--resume", str(run_dir / "states" / "state-00000004"))
    assert "moved 4 artefact(s) of the abandoned timeline after step 4" in capsys.readouterr().out
    aside = next((run_dir / "abandoned").iterdir())
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file() and "states" not in p.parts) == [
        "grids/raw-00000008.png", "snapshots/snapshot-00000008.safetensors", "stats.jsonl",
    ]  # fmt: skip
    assert [s for s, _ in list_states(run_dir / "states")] == [4, 6]
    assert [json.loads(r)["step"] for r in (aside / "stats.jsonl").read_text().splitlines()] == [6, 8]
    train(mnist_dir, tmp_path, *args, "--n_steps", "8", "--resume", "latest")
    new_final = load_training_state(run_dir / "states" / "state-00000008")
    for key in ("gen", "disc", "optim_g", "optim_d"):
        for (name, a), (_, b) in zip(sorted(_flat(old_final[key])), sorted(_flat(new_final[key])), strict=True):
            assert a.equal(b), name
    assert [r["loss/d"] for r in read_stats(run_dir)] == [r["loss/d"] for r in old_rows]


def _flat(tree, prefix=""):
    import torch

    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _flat(v, f"{prefix}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _flat(v, f"{prefix}.{i}")]
    return []


@pytest.mark.slow
def test_a_second_process_on_the_same_folder_is_refused(tmp_path, mnist_dir):
    """One training process per run folder: a second one (even with --resume latest) stops with one line, and the
    first one's checkpoints are untouched."""
    cmd = [sys.executable, str(REPO / "gan_mnist.py"), "--data_dir", str(mnist_dir), "--no-download",
           "--log_dir", str(tmp_path), "--log_name", "busy", *TINY, *QUIET, "--n_steps", "100000",
           "--checkpoint_interval", "5"]  # fmt: skip
    first = start(cmd)
    try:
        # Wait for the first checkpoint by reading the first run's own output (no clock). Once the test stops
        # reading, the first run blocks on a full pipe at worst: it stays alive and holds the folder.
        for line in first.stdout:
            if "saved training state" in line:
                break
        assert list_states(tmp_path / "busy" / "states"), "the first run never checkpointed"
        second = run_script("gan_mnist.py", *cmd[2:], "--resume", "latest", ok=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        line = [row for row in second.stderr.splitlines() if "error:" in row]
        assert len(line) == 1 and f"in use by another training process (pid {first.pid})" in line[0]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The OS released the lock with the killed process: the run resumes.
    run_script("gan_mnist.py", *cmd[2:-4], "--n_steps", str(list_states(tmp_path / "busy" / "states")[-1][0] + 1),
               "--checkpoint_interval", "1", "--resume", "latest")  # fmt: skip


def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_launched_again_is_done_and_untouched(tmp_path, mnist_dir, capsys):
    """A requeued cluster job runs its command again: a finished run says so in one line, exits 0 and writes
    nothing, with or without --resume latest; a state beyond --n_steps is still refused."""
    args = ["--log_name", "r", "--n_steps", "4", "--checkpoint_interval", "2", "--eval_interval", "2",
            "--eval_samples", "16"]  # fmt: skip
    train(mnist_dir, tmp_path, *args)
    run_dir = tmp_path / "r"
    before = {k: v for k, v in _digest(run_dir).items() if k != ".lock"}
    for extra in ([], ["--resume", "latest"]):
        capsys.readouterr()
        train(mnist_dir, tmp_path, *args, *extra)  # returns normally: exit code 0
        assert "the run is done (step 4 of 4), nothing to do" in capsys.readouterr().out
        assert {k: v for k, v in _digest(run_dir).items() if k != ".lock"} == before
    # Not the same command: still refused as before.
    line = cli_error(gan_mnist.cli, ["--data_dir", str(mnist_dir), "--log_dir", str(tmp_path), *TINY, *QUIET,
                                     *args[:-4], "--lr", "1e-3"], capsys)  # fmt: skip
    assert "already holds a run" in line
    line = cli_error(gan_mnist.cli, ["--data_dir", str(mnist_dir), "--log_dir", str(tmp_path), *TINY, *QUIET,
                                     "--log_name", "r", "--n_steps", "3", "--resume", "latest"], capsys)  # fmt: skip
    assert "the training state is at step 4 already; pass --n_steps > 4" in line


@pytest.mark.slow
def test_killed_after_the_final_state_the_relaunch_finishes_pruning(tmp_path, mnist_dir):
    """SIGKILL after the final state is renamed into place but before older states are pruned: the same command
    again exits 0, prunes, and changes nothing else."""
    cmd = [str(REPO / "gan_mnist.py"), "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
           "--log_name", "k", *TINY, *QUIET, "--n_steps", "6", "--checkpoint_interval", "2",
           "--resume", "latest"]  # fmt: skip
    # prune_states runs once per checkpoint, after the rename: its 3rd call is the final state's.
    killed = run([sys.executable, "-m", "tests.faults", "utils.ckpt:prune_states", "3", *cmd])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "k"
    assert [s for s, _ in list_states(run_dir / "states")] == [2, 4, 6]
    others = {k: v for k, v in _digest(run_dir).items() if not k.startswith("states/") and k != ".lock"}
    result = run_script(*cmd)
    assert "the run is done (step 6 of 6), nothing to do" in result.stdout
    assert [s for s, _ in list_states(run_dir / "states")] == [4, 6]
    assert {k: v for k, v in _digest(run_dir).items() if not k.startswith("states/") and k != ".lock"} == others


def test_a_resume_with_another_thread_count_says_it_is_not_bit_identical(tmp_path, mnist_dir, capsys):
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    try:
        torch.set_num_threads(other)
        train(mnist_dir, tmp_path, "--log_name", "t", "--n_steps", "2", "--checkpoint_interval", "2")
        assert load_training_state(list_states(tmp_path / "t" / "states")[-1][1])["run"]["threads"] == other
        torch.set_num_threads(threads)
        capsys.readouterr()
        train(mnist_dir, tmp_path, "--log_name", "t", "--n_steps", "4", "--checkpoint_interval", "2",
              "--resume", "latest")  # fmt: skip
        out = capsys.readouterr().out
        assert f"written with {other} threads, now {threads}: " in out and "not be bit-identical" in out
        capsys.readouterr()
        train(mnist_dir, tmp_path, "--log_name", "t", "--n_steps", "6", "--checkpoint_interval", "2",
              "--resume", "latest")  # fmt: skip
        assert "bit-identical" not in capsys.readouterr().out  # the same count as the state it resumes
    finally:
        torch.set_num_threads(threads)


def test_edited_snapshot_headers_give_one_line(tmp_path, mnist_dir, capsys):
    """Damaged headers (bad JSON, missing keys, other kwargs, absurd kwargs) are refused before any model memory
    is allocated: the model is first built on the meta device and compared with the weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import sample as sample_script

    train(mnist_dir, tmp_path, "--log_name", "s", "--n_steps", "1", "--checkpoint_interval", "1")
    snap = tmp_path / "s" / "snapshots" / "snapshot-00000001.safetensors"
    with safe_open(str(snap), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    kwargs = json.loads(header["model_kwargs"])
    cases = {
        "bad-json": (header | {"config": "{cut"}, "damaged genzoo snapshot header (JSONDecodeError"),
        "no-kind": ({k: v for k, v in header.items() if k != "kind"}, "damaged genzoo snapshot header (KeyError"),
        "bad-step": (header | {"step": "x"}, "damaged genzoo snapshot header (ValueError"),
        "list-kwargs": (header | {"model_kwargs": "[1, 2]"}, "model_kwargs is not a JSON object"),
        "other-width": (header | {"model_kwargs": json.dumps(kwargs | {"base_dim": 16})}, "does not match model"),
        "huge": (header | {"model_kwargs": json.dumps(kwargs | {"base_dim": 10**6})}, "does not match model"),
        "unknown-kwarg": (header | {"model_kwargs": json.dumps(kwargs | {"depth": 3})}, "unexpected keyword"),
    }
    for name, (meta, fragment) in cases.items():
        edited = tmp_path / f"{name}.safetensors"
        save_file(tensors, edited, metadata=meta)
        assert fragment in cli_error(
            sample_script.cli, ["--checkpoint", str(edited), "--out_dir", str(tmp_path / "o")], capsys
        ), name


def test_nonfinite_samples_stop_with_one_line(tmp_path, mnist_dir, capsys):
    import sample as sample_script
    from utils.ckpt import save_snapshot

    train(mnist_dir, tmp_path, "--log_name", "n", "--n_steps", "1", "--checkpoint_interval", "1")
    meta, weights = load_snapshot(tmp_path / "n")
    weights = {
        k: v.float().fill_(float("nan")) if k.endswith("weight") and v.is_floating_point() else v
        for k, v in weights.items()
    }
    nan_snap = tmp_path / "nan.safetensors"
    save_snapshot(nan_snap, meta["kind"], meta["model"], meta["model_kwargs"], weights, meta["config"], 1)
    out = tmp_path / "out"
    line = cli_error(sample_script.cli, ["--checkpoint", str(nan_snap), "--out_dir", str(out)], capsys)
    assert "non-finite values (NaN/inf): the model has diverged" in line
    assert not list(out.glob("*.png"))  # no black PNGs


def test_checkpoint_files_are_atomic_and_readable_by_others(tmp_path, monkeypatch):
    """State replacement never leaves a half state; a failed snapshot write leaves no temp file; files are 0644."""
    import torch

    from utils import ckpt

    tree = {"w": torch.arange(4.0)}
    ckpt.save_training_state(tmp_path, 10, tree)
    ckpt.save_training_state(tmp_path, 20, tree)
    real_replace = os.replace

    def crash_on_final_rename(src, dst):  # the process dies between setting the old state-20 aside and the rename
        if str(src).endswith(f"-{os.getpid()}") and ".tmp-state" in str(src):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_final_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_state(tmp_path, 20, {"w": torch.ones(4)})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert [s for s, _ in ckpt.list_states(tmp_path)] == [10]  # never a half-replaced state-20
    assert torch.equal(ckpt.load_training_state(tmp_path / "state-00000010")["w"], tree["w"])
    ckpt.save_training_state(tmp_path, 20, {"w": torch.ones(4)})  # the leftover is cleaned up by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000010", "state-00000020"]
    assert torch.equal(ckpt.load_training_state(tmp_path / "state-00000020")["w"], torch.ones(4))

    # Killed while deleting the replaced state: whatever is listed as complete must still load.
    real_rmtree = shutil.rmtree

    def crash_half_way(path, *args, **kwargs):  # on deleting the replaced state (not the temp-folder cleanup)
        if ".tmp-state" in Path(path).name:
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "tensors.safetensors").unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_state(tmp_path, 20, {"w": torch.full((4,), 2.0)})
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for _, state in ckpt.list_states(tmp_path):
        ckpt.load_training_state(state)
    assert torch.equal(ckpt.load_training_state(tmp_path / "state-00000020")["w"], torch.full((4,), 2.0))

    # A small file written atomically leaves no temp file behind when the write fails.
    monkeypatch.setattr(ckpt.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("read-only")))
    with pytest.raises(OSError, match="read-only"):
        ckpt.write_atomic(tmp_path / "best.json", "{}")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "best.json").exists()
    assert (tmp_path / "state-00000020" / "tensors.safetensors").stat().st_mode & 0o777 == 0o644

    snap = tmp_path / "snaps" / "snapshot-00000001.safetensors"
    ckpt.save_snapshot(snap, "gan", "dcgan", {}, {"w": torch.zeros(2)}, {}, 1)
    assert snap.stat().st_mode & 0o777 == 0o644
    monkeypatch.setattr(ckpt, "_fsync", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_snapshot(
            tmp_path / "snaps" / "snapshot-00000002.safetensors", "gan", "dcgan", {}, {"w": torch.zeros(2)}, {}, 2
        )
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["snapshot-00000001.safetensors"]


def test_a_family_metric_picks_the_best_in_its_own_direction(tmp_path):
    """A family's own metric (computed by its script, passed as `scores`) decides the best checkpoint: higher is
    better for SSIM-like names (HIGHER_IS_BETTER), lower for everything else; the other scores are recorded."""
    from dataclasses import dataclass, field

    from accelerate import Accelerator

    from utils.run import EVAL_METRIC_CHOICES, Run, RunConfig

    @dataclass
    class Config(RunConfig):
        eval_metric: str = field(default="ssim", metadata={"choices": [*EVAL_METRIC_CHOICES, "ssim", "l1"]})

    for metric, expected_best in (("ssim", 2), ("l1", 2)):
        cfg = Config(log_dir=str(tmp_path), log_name=metric, eval_interval=1, loggers="none", eval_metric=metric)
        run = Run(cfg, "unused", ())
        accelerator = Accelerator(**run.accelerator_kwargs())
        run.open(accelerator)
        run.begin(accelerator)
        news = []
        for step, ssim in ((1, 0.5), (2, 0.7), (3, 0.6)):
            news.append(run.evaluate(accelerator, step, scores={"ssim": ssim, "l1": 1 - ssim}))
            assert run.new_best == news[-1]  # kept for save()
            run.new_best = False  # what save() does
        assert news == [True, True, False] and run.best["step"] == expected_best and run.best["metric"] == metric
        written = json.loads((tmp_path / metric / "eval" / "step-00000003.json").read_text())
        assert written == {"step": 3, "ssim": 0.6, "l1": pytest.approx(0.4), "metric": metric, "value": written[metric]}
        run.close()


def test_deterministic_sets_the_kernel_choices_and_resumes_bit_exactly(tmp_path, mnist_dir, capsys, monkeypatch):
    """--deterministic: cudnn autotuning off, deterministic cudnn/torch algorithms, cuBLAS's fixed workspace, all set
    before the Accelerator; a run without the flag gets the fast settings back. The resume is bit-exact either way
    on CPU; the flag is what a GPU run needs for the same (it cannot be checked on a CPU-only machine)."""
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        train(mnist_dir, tmp_path, "--log_name", "straight", "--n_steps", "4", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert json.loads((tmp_path / "straight" / "config.json").read_text())["deterministic"] is True
        train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "2", "--checkpoint_interval", "2")
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.deterministic and torch.backends.cuda.matmul.allow_tf32
        capsys.readouterr()
        train(
            mnist_dir,
            tmp_path,
            "--log_name",
            "split",
            "--n_steps",
            "4",
            "--resume",
            "latest",
            "--deterministic",
            "--checkpoint_interval",
            "2",
        )
        assert "changed: ['deterministic', 'n_steps']" in capsys.readouterr().out
        straight = load_training_state(tmp_path / "straight" / "states" / "state-00000004")
        split = load_training_state(tmp_path / "split" / "states" / "state-00000004")
        for key in ("gen", "disc"):
            assert straight[key].keys() == split[key].keys()
            assert all(torch.equal(straight[key][k], split[key][k]) for k in straight[key]), key
    finally:
        from utils.dist import set_backends

        set_backends(False)  # the fast settings the other tests in this process expect


def test_the_loop_tracker_seeds_each_step_logs_when_due_and_counts_skips(tmp_path):
    """LoopTracker (utils/tracking.py), the bookkeeping of every script's loop: each step starts with the RNG seeded
    from (seed, rank, step); a row is logged every --log_interval steps and at the last step, with the means since
    the previous row (a gradient norm only from applied updates), the script's values and the skipped count;
    skipped updates in a row past --max_skipped_steps stop the run."""
    from accelerate import Accelerator

    from utils.cli import UserError
    from utils.data import step_seed
    from utils.run import Run, RunConfig
    from utils.tracking import LoopTracker

    cfg = RunConfig(log_dir=str(tmp_path), log_name="loop", n_steps=5, log_interval=2, loggers="none", seed=3)
    cfg.max_skipped_steps = 2
    run = Run(cfg, "unused", ())
    accelerator = Accelerator(**run.accelerator_kwargs())
    run.open(accelerator)
    run.begin(accelerator)
    loop = LoopTracker(run, accelerator, images_per_step=8, skipped=1)
    skipped_steps = {1, 3}  # never two in a row: the run goes on
    dones = []
    for step in loop.steps():
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(step_seed(3, 0, step))))
        applied = step not in skipped_steps
        loss, grad_norm = torch.tensor(float(step)), torch.tensor(10.0 * step if applied else float("nan"))
        dones.append(loop.end_step(step, applied, {"loss": loss}, {"lr": 0.5}, grad_norm))
    run.close()
    assert dones == [1, 2, 3, 4, 5]
    rows = read_stats(tmp_path / "loop")
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2 steps and the last
    assert [r["loss"] for r in rows] == [0.5, 2.5, 4.0]  # the means since the previous row
    assert [r["grad_norm"] for r in rows] == [0.0, 20.0, 40.0]  # steps 1 and 3 were skipped: their NaN is left out
    assert [r["kimg"] for r in rows] == [0.016, 0.032, 0.04] and {r["lr"] for r in rows} == {0.5}
    assert [r["skipped"] for r in rows] == [2, 3, 3]  # counted on from the resumed total
    assert list(rows[0])[-2:] == ["skipped", "mem_gb"]

    # Two skipped updates in a row stop the run, naming the step.
    run.start_step = 3
    loop = LoopTracker(run, accelerator, images_per_step=8)
    assert next(loop.steps()) == 3
    loop.end_step(3, False)
    with pytest.raises(UserError, match="stopping at step 5: 2 steps in a row"):
        loop.end_step(4, False)


def test_eval_first_adds_one_early_evaluation_to_the_intervals(tmp_path):
    """--eval_first N evaluates once after N steps besides every --eval_interval steps and the last step (a learning
    curve that starts early); alone it is refused, since the evaluation it would add has no interval to join."""
    from utils.cli import UserError
    from utils.run import Run, RunConfig

    cfg = RunConfig(log_dir=str(tmp_path), log_name="due", n_steps=10, eval_interval=4, eval_first=1)
    cfg.check()
    run = Run(cfg, "unused", ())
    assert [done for done in range(1, 11) if run.eval_due(done)] == [1, 4, 8, 10]
    cfg.eval_first = 0
    assert [done for done in range(1, 11) if run.eval_due(done)] == [4, 8, 10]
    cfg.eval_first, cfg.eval_interval = 3, 0
    assert not any(run.eval_due(done) for done in range(1, 11))
    with pytest.raises(UserError, match="--eval_first adds one evaluation"):
        cfg.check()
