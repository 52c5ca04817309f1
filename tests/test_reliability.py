"""Reliability: every training family is SIGKILLed again and again (inside checkpoint writes, between their renames,
at training steps, and at a random moment) and resumed with `--resume latest` until it finishes; the result must be
bit-identical to an uninterrupted run: weights, optimizer and EMA states, every stats.jsonl row, every evaluation.
Then a table of bad inputs, each of which must end with one line, exit code 2, no traceback, and leave an earlier
run folder byte for byte as it was.

Fault points (tests/faults.py kills the process at the n-th call of a function):
- utils.ckpt:save_file    inside a safetensors write (the snapshot's, or a state's tensors), before any rename
- utils.ckpt:_fsync        inside a training-state write, after some files are written, before COMPLETE/rename
- utils.ckpt:save_training_state   after the snapshot (and the best copy) are in place, before the state exists
- utils.optim:step_optimizer    in the middle of a training step (between D and G updates for the GANs)
- a SIGKILL from outside right after a seeded step is logged (the exact instruction it lands on is the OS's)
"""

import hashlib
import importlib
import json
import pickle
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gan_mnist
from tests.conftest import REPO, cli_error, kill_after_line, read_stats, run, run_script, start
from tests.idx import write_idx
from utils.ckpt import list_states, load_snapshot, load_training_state, save_snapshot

# Each attempt resumes the previous one; with a checkpoint every 2 steps, 16 steps reach every fault point.
FAULTS = [
    ("utils.optim:step_optimizer", 5),  # mid-run, in a training step (between D and G updates for the GANs)
    ("utils.ckpt:save_file", 3),  # the 2nd checkpoint's snapshot, half written
    ("utils.ckpt:_fsync", 7),  # the 2nd checkpoint's state: some files written, not yet marked COMPLETE
    ("utils.ckpt:save_training_state", 2),  # the 2nd checkpoint: snapshot (and best copy) in place, state missing
]
TOY_NET = '{"width": 32, "depth": 2, "emb_channels": 16}'
# fmt: off
FAMILIES = {
    "gan_mnist": ("gan_mnist.py", [
        "--dataset", "mnist", "--batch_size", "8", "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs",
        '{"base_dim": 8}', "--z_dim", "16", "--method", "wgan-gp", "--ema", "--conditional", "--n_steps", "16",
        "--eval_interval", "4", "--eval_samples", "16",
    ]),
    "gan_celeba": ("gan_celeba.py", [
        "--dataset", "mnist", "--img_size", "16", "--model", "stylegan2", "--gen_kwargs",
        '{"channel_base": 64, "channel_max": 8, "w_dim": 8, "n_mlp": 2}', "--disc_kwargs",
        '{"channel_base": 64, "channel_max": 8}', "--z_dim", "8", "--batch_size", "4", "--num_workers", "0",
        "--r1_interval", "2", "--pl_interval", "2", "--ema", "--n_steps", "16",
    ]),
    "diffusion_train": ("diffusion_train.py", [
        "--dataset", "gaussians", "--model", "mlp", "--method", "follmer", "--net_kwargs", TOY_NET,
        "--batch_size", "32", "--n_steps", "16", "--eval_interval", "4", "--eval_samples", "64",
    ]),
    "distill_characteristic": ("distill_characteristic.py", [
        "--bsz", "16", "--global_bsz", "32", "--num_steps", "4", "--n_steps", "16", "--lr_rampup_steps", "2",
        "--eval_interval", "8", "--eval_samples", "64",
    ]),
    "translate": ("translate.py", [  # CycleGAN: its image pools (full from the first step) are part of the state
        "--model", "cyclegan", "--dataset", "fashion_mnist_sneakers_boots", "--img_size", "16", "--batch_size", "4",
        "--gen_kwargs", '{"base_dim": 4, "n_blocks": 1}', "--disc_kwargs", '{"base_dim": 4, "n_layers": 2}',
        "--pool_size", "3", "--ema", "--n_steps", "16", "--eval_interval", "4", "--eval_samples", "8",
        "--num_workers", "0",
    ]),
    "discriminator_flow": ("discriminator_flow.py", [
        "--dataset", "gaussians", "--critic_kwargs", TOY_NET, "--flow_steps", "4", "--batch_size", "16",
        "--grad_penalty", "0.1", "--ema", "--n_steps", "16", "--eval_interval", "4", "--eval_samples", "64",
    ]),
    "score_gan": ("score_gan.py", [
        "--gen_kwargs", '{"width": 16, "depth": 2}', "--z_dim", "8", "--score_steps", "2", "--batch_size", "16",
        "--ema", "--n_steps", "16", "--eval_interval", "8", "--eval_samples", "64",
    ]),
    "ebm_train": ("ebm_train.py", [
        "--dataset", "mnist", "--batch_size", "8", "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs",
        '{"base_dim": 8}', "--z_dim", "16", "--n_iter_d_init", "2", "--n_iter_d", "1", "--initialize_log_partition",
        "--ema", "--n_steps", "16", "--eval_interval", "4", "--eval_samples", "16", "--eval_kale", "--kale_interval",
        "4",
    ]),
}
# fmt: on
COMMON = ["--checkpoint_interval", "2", "--log_interval", "1", "--sample_interval", "6", "--loggers", "none"]
TIMING = {"sec_per_kimg", "mem_gb"}  # wall-clock fields of a stats row


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    """A Föllmer toy denoiser (the distillation teacher) in t/, and an EDM one (ScoreGAN's data score) in edm/."""
    log_dir = tmp_path_factory.mktemp("toy_teacher")
    for name, method in (("t", "follmer"), ("edm", "edm")):
        run_script("diffusion_train.py", "--dataset", "gaussians", "--model", "mlp", "--method", method,
                   "--net_kwargs", TOY_NET, "--batch_size", "32", "--n_steps", "4", "--log_dir", log_dir,
                   "--log_name", name, "--loggers", "none", "--sample_interval", "0")  # fmt: skip
    return log_dir / "t"


def family_args(name: str, run_dir: Path, mnist_dir: Path, toy_teacher: Path) -> list[str]:
    script, args = FAMILIES[name]
    data = ["--teacher", str(toy_teacher)] if name == "distill_characteristic" else ["--data_dir", str(mnist_dir)]
    data += ["--data_score", str(toy_teacher.parent / "edm")] if name == "score_gan" else []
    return [str(REPO / script), *data, "--no-download", *args, *COMMON, "--workdir", str(run_dir)]


def finished_run(run_dir: Path, n_steps: int) -> dict:
    """Everything of a finished run that must not depend on how often it was interrupted."""
    state = load_training_state(list_states(run_dir / "states")[-1][1])
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("workdir", "resume")}
    _, snapshot = load_snapshot(run_dir)
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in read_stats(run_dir)]
    evals = {p.name: json.loads(p.read_text())["value"] for p in sorted((run_dir / "eval").glob("step-*.json"))}
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").exists() else None
    assert state["step"] == n_steps
    return {"state": state, "snapshot": snapshot, "rows": rows, "evals": evals, "best": best}


def assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, mnist_dir, toy_teacher, family):
    n_steps = int(FAMILIES[family][1][FAMILIES[family][1].index("--n_steps") + 1])
    straight = tmp_path / "straight"
    run_script(*family_args(family, straight, mnist_dir, toy_teacher))
    reference = finished_run(straight, n_steps)

    # The same run, killed at every fault point in turn (each attempt resumes the previous one), then once at a
    # random moment, then resumed to the end.
    crashed = tmp_path / "crashed"
    cmd = family_args(family, crashed, mnist_dir, toy_teacher) + ["--resume", "latest"]
    for target, n in FAULTS:
        result = run([sys.executable, "-m", "tests.faults", target, str(n), *cmd])
        assert result.returncode == -signal.SIGKILL, f"{target} #{n} was not reached:\n{result.stderr[-3000:]}"
        for _, state in list_states(crashed / "states"):  # whatever survived a kill is complete and loadable
            load_training_state(state)
    # A kill at a moment picked by progress: right after the victim logs a seeded step between the state it
    # resumes and the end (at least two steps and the final save still to go), wherever in the next step's work
    # that lands. With one training process per folder, the step it prints is the step it has just finished.
    resumed = list_states(crashed / "states")[-1][0]
    assert resumed + 1 <= n_steps - 2, f"the fault points left too little to kill at random (state at {resumed})"
    target = random.Random(f"{family}-kill").randint(resumed + 1, n_steps - 2)
    kill_after_line(start([sys.executable, *cmd]), f"step {target}/{n_steps} ")
    result = run_script(*cmd)
    assert "resuming from" in result.stdout
    assert not list(crashed.rglob(".tmp-*")) and not list(crashed.rglob(".old-state-*"))
    assert_same(reference, finished_run(crashed, n_steps))
    if family == "gan_mnist":  # the abandoned timelines were set aside, never deleted
        assert (crashed / "abandoned").is_dir()


# ---------------------------------------------------------------------------------------------- bad inputs
def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def bad_input_ctx(tmp_path_factory, mnist_dir) -> dict:
    """A finished gan_mnist run (the folder every bad input must leave untouched) and crafted bad files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    gan_mnist.cli([
        "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(root), "--log_name", "run", "--batch_size",
        "8", "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs", '{"base_dim": 8}', "--z_dim", "16", "--n_steps",
        "4", "--checkpoint_interval", "2", "--loggers", "none", "--sample_interval", "0", "--conditional",
    ])  # fmt: skip
    run_dir = root / "run"
    files = root / "files"
    files.mkdir()
    # IDX data: corrupt, empty; an RGB image folder; an empty folder.
    shutil.copytree(mnist_dir, files / "corrupt_idx")
    (files / "corrupt_idx" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (files / "empty_idx").mkdir()
    write_idx(files / "empty_idx" / "train-images-idx3-ubyte", torch.zeros(0, 28, 28, dtype=torch.uint8))
    write_idx(files / "empty_idx" / "train-labels-idx1-ubyte", torch.zeros(0, dtype=torch.uint8))
    (files / "rgb").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(files / "rgb" / f"{i}.png")
    (files / "empty_folder").mkdir()
    # Checkpoint-like files: a crafted pickle, a truncated state, a snapshot with an edited header.
    (files / "evil.pth").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    cut = files / "cut_run" / "states" / "state-00000002"
    shutil.copytree(run_dir / "states" / "state-00000002", cut)
    (cut / "tensors.safetensors").write_bytes((cut / "tensors.safetensors").read_bytes()[:1000])
    meta, weights = load_snapshot(run_dir)
    huge = meta["model_kwargs"] | {"base_dim": 10**6}
    save_snapshot(files / "huge.safetensors", meta["kind"], meta["model"], huge, weights, meta["config"], 4)
    nan_weights = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    save_snapshot(files / "nan.safetensors", meta["kind"], meta["model"], meta["model_kwargs"], nan_weights, {}, 4)
    # Config files; statistics files; sample folders.
    (files / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (files / "list.yaml").write_text("lr: [0.1, 0.2]\n")
    np.savez(files / "ref3.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(files / "gen4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(files / "skew.npz", mu=np.zeros(3), sigma=np.eye(4))
    (files / "samples").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(files / "samples" / "000000.png")
    (files / "samples" / "sample_info.json").write_text('{"seeds": [0, ')
    (files / "broken_samples").mkdir()
    (files / "broken_samples" / "000000.png").write_bytes(b"\x89PNG cut")
    # Translation data: A/ and B/ whose names do not match.
    for domain, name in (("A", "x"), ("B", "y")):
        (files / "pairs" / domain).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(files / "pairs" / domain / f"{name}.png")
    return {"run": run_dir, "root": root, "files": files, "mnist": mnist_dir, "digest": tree_digest(run_dir)}


def _gan(ctx, *args):
    return ["--data_dir", str(ctx["mnist"]), "--no-download", "--log_dir", str(ctx["root"]), "--batch_size", "8",
            "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs", '{"base_dim": 8}', "--z_dim", "16",
            "--loggers", "none", "--conditional", *args]  # fmt: skip


def _fid_of_stats(ctx, ref, gen):
    """fid.py --mode fid on two of the crafted statistics files."""
    return ["--mode", "fid", "--ref_path", str(ctx["files"] / ref), "--stat_path", str(ctx["files"] / gen)]


def _fid_gen(ctx, folder, detector, *args):
    """fid.py --mode gen on one of the crafted sample folders, written next to the run (never into it)."""
    return ["--mode", "gen", "--img_folder", str(ctx["files"] / folder), "--detector", detector, *args,
            "--dest", str(ctx["root"] / "g")]  # fmt: skip


# (script, argv from the context, fragment of the one error line). Every case is a distinct way to get it wrong.
BAD_INPUTS = {
    "missing-data": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "x", "--data_dir", str(c["files"] / "nowhere")),
        "mnist not found",
    ),
    "corrupt-idx": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "x", "--data_dir", str(c["files"] / "corrupt_idx")),
        "train-images-idx3-ubyte.gz: cannot read",
    ),
    "empty-idx": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "x", "--data_dir", str(c["files"] / "empty_idx")),
        "holds no items",
    ),
    "empty-folder": (
        "diffusion_train",
        lambda c: ["--dataset", "folder", "--data_dir", str(c["files"] / "empty_folder"), "--log_dir", str(c["root"])],
        "no image files",
    ),
    "wrong-channels-for-metric": (
        "diffusion_train",
        lambda c: [
            "--dataset",
            "folder",
            "--data_dir",
            str(c["files"] / "rgb"),
            "--img_size",
            "8",
            "--log_dir",
            str(c["root"]),
            "--eval_interval",
            "1",
            "--eval_metric",
            "fd_cls",
            "--net_kwargs",
            '{"model_channels": 8, "channel_mult": [1]}',
        ],
        "fd_cls takes 1-channel 28 or 32 px images",
    ),
    "existing-run": ("gan_mnist", lambda c: _gan(c, "--log_name", "run"), "already holds a run"),
    "resume-other-method": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "run", "--resume", "latest", "--n_steps", "6", "--method", "hinge"),
        "method: saved 'gan' vs now 'hinge'",
    ),
    "resume-beyond-the-end": (  # a state at step 4 cannot be a run of 3 steps (at 4 itself, the run is done)
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "run", "--resume", "latest", "--n_steps", "3"),
        "pass --n_steps > 4",
    ),
    "resume-into-other-run": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "run", "--resume", str(c["files"] / "cut_run"), "--n_steps", "6"),
        "is from another run",
    ),
    "truncated-state": (
        "gan_mnist",
        lambda c: _gan(
            c,
            "--log_name",
            "cut",
            "--resume",
            str(c["files"] / "cut_run" / "states" / "state-00000002"),
            "--n_steps",
            "6",
        ),
        "unreadable training state",
    ),
    "resume-pickle": (
        "gan_mnist",
        lambda c: _gan(c, "--log_name", "y", "--resume", str(c["files"] / "evil.pth")),
        "not a complete genzoo training state",
    ),
    "teacher-from-another-family": (
        "distill_characteristic",
        lambda c: ["--teacher", str(c["run"]), "--workdir", str(c["root"] / "z")],
        "the teacher must be a diffusion_train.py snapshot",
    ),
    "sample-pickle": ("sample", lambda c: ["--checkpoint", str(c["files"] / "evil.pth")], "not a genzoo snapshot"),
    "trajectory-of-a-generator": (
        "sample",
        lambda c: ["--checkpoint", str(c["run"]), "--trajectory", "gif", "--out_dir", str(c["root"] / "t")],
        "--trajectory animates a particle flow",
    ),
    "data-score-from-a-gan": (
        "score_gan",
        lambda c: ["--data_score", str(c["run"]), "--log_dir", str(c["root"])],
        "the data score must be a diffusion_train.py --method edm snapshot",
    ),
    "batchnorm-in-a-flow-critic": (
        "discriminator_flow",
        lambda c: ["--dataset", "gaussians", "--critic_kwargs", '{"norm": "batch"}', "--log_dir", str(c["root"])],
        "cannot build --critic mlp",
    ),
    "flow-critic-for-other-data": (
        "discriminator_flow",
        lambda c: ["--dataset", "mnist", "--critic", "mlp", "--log_dir", str(c["root"])],
        "--critic mlp does not fit --dataset mnist",
    ),
    "sample-huge-kwargs": (
        "sample",
        lambda c: ["--checkpoint", str(c["files"] / "huge.safetensors")],
        "does not match model",
    ),
    "sample-nan-weights": (
        "sample",
        lambda c: ["--checkpoint", str(c["files"] / "nan.safetensors"), "--out_dir", str(c["root"] / "nan_out")],
        "non-finite values",
    ),
    "unknown-config-key": (
        "gan_mnist",
        lambda c: ["--config", str(c["files"] / "unknown.yaml")],
        "unknown option(s) ['learning_rate']",
    ),
    "list-in-config": ("gan_mnist", lambda c: ["--config", str(c["files"] / "list.yaml")], "lr takes a single value"),
    "nan-lr": ("gan_mnist", lambda c: ["--lr", "nan"], "'nan' is not a finite number"),
    "abbreviated-flag": ("gan_mnist", lambda c: ["--conf", "x.yaml"], "unrecognized arguments: --conf"),
    "log-name-escape": ("gan_mnist", lambda c: ["--log_name", "../run"], "must be a folder name inside --log_dir"),
    "log-name-absolute": ("gan_mnist", lambda c: ["--log_name", str(c["run"])], "must be a folder name inside"),
    "infinite-lr": ("gan_mnist", lambda c: ["--lr", "inf"], "'inf' is not a finite number"),
    "too-few-eval-samples": ("gan_mnist", lambda c: ["--eval_samples", "1"], "--eval_samples must be >= 2"),
    "diverging-lr": (
        "gan_mnist",
        lambda c: _gan(
            c,
            "--log_name",
            "nan",
            "--lr",
            "1e30",
            "--n_steps",
            "20",
            "--max_skipped_steps",
            "2",
            "--sample_interval",
            "0",
        ),
        "non-finite gradients",
    ),
    "fid-shapes": (
        "fid",
        lambda c: _fid_of_stats(c, "ref3.npz", "gen4.npz"),
        "has mu (3,)",
    ),
    "fid-skewed-stats": (
        "fid",
        lambda c: _fid_of_stats(c, "ref3.npz", "skew.npz"),
        "are not (d,) and (d, d) statistics",
    ),
    "truncated-sample-info": (
        "fid",
        lambda c: _fid_gen(c, "samples", "pixels"),
        "damaged sample_info.json",
    ),
    "corrupt-generated-image": (
        "fid",
        lambda c: _fid_gen(c, "broken_samples", "pixels"),
        "cannot read this image",
    ),
    "detector-weights-of-a-gan": (
        "fid",
        lambda c: _fid_gen(
            c, "samples", "fmnist", "--detector_weights", str(c["run"] / "snapshots" / "snapshot-00000004.safetensors")
        ),
        "not a classifier",
    ),
    "translate-unpaired-without-b": (
        "translate",
        lambda c: [
            "--model",
            "cyclegan",
            "--dataset",
            "unpaired",
            "--data_dir",
            str(c["files"] / "rgb"),
            "--log_dir",
            str(c["root"]),
        ],  # fmt: skip
        "an unpaired dataset needs two folders",
    ),
    "translate-pairs-without-partners": (
        "translate",
        lambda c: ["--dataset", "paired", "--data_dir", str(c["files"] / "pairs"), "--log_dir", str(c["root"])],
        "have no partner of the same name",
    ),
    "sample-input-dir-for-a-gan": (
        "sample",
        lambda c: ["--checkpoint", str(c["run"]), "--input_dir", str(c["files"] / "rgb"), "--out_dir", str(c["root"])],
        "apply to translation snapshots",
    ),
    "gebm-toy-data-with-dcgan": (
        "ebm_train",
        lambda c: ["--dataset", "gaussians", "--g_model", "dcgan", "--log_dir", str(c["root"]), "--log_name", "gebm"],
        "do not fit --dataset gaussians",
    ),
    "gebm-energy-from-a-gan": (
        "ebm_train",
        lambda c: [
            "--dataset",
            "mnist",
            "--data_dir",
            str(c["mnist"]),
            "--no-download",
            "--log_dir",
            str(c["root"]),
            "--log_name",
            "gebm",
            "--z_dim",
            "16",
            "--d_path",
            str(c["run"]),
        ],
        "has no energy to load",
    ),
    "latent-sampler-on-a-gan": (
        "sample",
        lambda c: ["--checkpoint", str(c["run"]), "--latent_sampler", "mala", "--out_dir", str(c["root"] / "mcmc")],
        "applies to GEBM snapshots",
    ),
    "chain-of-a-gan": ("ebm_chain", lambda c: ["--checkpoint", str(c["run"])], "needs a GEBM"),
    "missing-inception": (
        "gan_mnist",
        lambda c: _gan(
            c,
            "--log_name",
            "fid",
            "--eval_interval",
            "1",
            "--eval_metric",
            "fid",
            "--eval_weights",
            str(c["files"] / "nowhere.pth"),
        ),
        "no such file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_loses_nothing(bad_input_ctx, case, capsys):
    script, argv, fragment = BAD_INPUTS[case]
    line = cli_error(importlib.import_module(script).cli, argv(bad_input_ctx), capsys)
    assert fragment in line, line
    assert tree_digest(bad_input_ctx["run"]) == bad_input_ctx["digest"]  # the earlier run is byte for byte intact
