"""The life of one training run on disk, written once for every training script: the run folder, refusing or
resuming it, config and code version, logs, checkpoints, evaluation and the best checkpoint.

A script builds its `Accelerator`, calls `prepare`/`backward`/`step`, owns the step counter and calls log, evaluate
and save itself (`run.due` says when: every interval and at the last step); `Run` does the filesystem side:

    run = Run(cfg, default_name, RESUME_KEYS)   # the folder: logs/<log_name>, or --workdir
    accelerator = Accelerator(..., project_config=ProjectConfiguration(project_dir=str(run.dir), ...))
    run.open(accelerator)                       # refuse / --delete / lock / load the state to resume (run.start_step);
                                                # a finished run launched again ends here with exit 0 (NothingToDo)
    ... data, models, optimizers, accelerator.prepare(...)
    extras = run.restore(gen=gen, optim_g=optim_g, ema=ema, scaler=accelerator.scaler)   # {} on a fresh start
    evaluator = loop_evaluator(run, accelerator, dataset)   # metrics/evaluate.py; None without an FD metric
    run.begin(accelerator, dataset, evaluator, summary)   # folders, config.json, code version, trackers
    loop = LoopTracker(run, accelerator, images_per_step, extras.get("skipped", 0))   # utils/tracking.py
    for step in loop.steps(): ...                # from run.start_step, each step seeded from (seed, rank, step)
        done = loop.end_step(step, applied, stats, values)   # run.log(...) when run.due(done, cfg.log_interval)
        if run.eval_due(done): run.evaluate(accelerator, done, sample_fn, model, n_classes)  # -> new_best
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            run.save(accelerator, done, replicas=(gen, disc), snapshot=dict(...), gen=gen, optim_g=optim_g, ...)

Run folder: config.json, stats.jsonl, tb/, grids/, snapshots/snapshot-<step>.safetensors (+ best.safetensors),
states/state-<step>/ (newest --keep_states, plus the best step's, never pruned), eval/step-<step>.json and
eval/ref-<metric>.npz, best.json, test/*.json (--only_test), code/launch-<step>.{json,diff} (the code that ran),
abandoned/ (artefacts of a timeline given up by resuming an older state), .lock (held while a process trains).
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import torch
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

from utils.ckpt import (
    list_snapshots,
    list_states,
    load_training_state,
    prune_states,
    resolve_state,
    save_snapshot,
    save_training_state,
    write_atomic,
)
from utils.cli import NothingToDo, UserError, check_bounds
from utils.dist import check_replicas_agree, unwrap
from utils.tracking import peak_memory_gb, status_line, tracker_config

REPO = Path(__file__).resolve().parents[1]
# Metrics the run computes itself from samples (metrics/evaluate.py). A family adds its own (computed by its script
# and passed to `evaluate` as `scores`) by redeclaring `eval_metric` with more choices; lower is better unless the
# name is in HIGHER_IS_BETTER.
EVAL_METRIC_CHOICES = ["auto", "fd_cls", "fd_pixels", "fid", "fd_points"]
HIGHER_IS_BETTER = frozenset({"ssim", "psnr"})
# Family metrics that are written and logged but never make a best checkpoint: KALE rises when a GEBM's energy
# corrects more and falls when its base improves (metrics/kale.py), so neither direction means "better".
NOT_RANKED = frozenset({"kale"})
# Fields that steer how a run starts, not what it trains: never a reason to refuse or report a resume.
_CONTROL_FIELDS = {"resume", "load_best", "only_test", "delete"}


@dataclass
class RunConfig:
    """The run fields every training script shares; a script's `Config` extends it (and may redeclare a field
    with another default: the metadata below still applies, see utils.cli.field_metadata)."""

    n_steps: int = field(default=10000, metadata={"min": 1, "help": "optimizer steps in total"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the trained networks"})
    deterministic: bool = field(
        default=False, metadata={"help": "GPU: deterministic kernels, no cudnn autotuning (bit-exact resume, slower)"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"choices": ["no", "fp16", "bf16"], "help": "default: from accelerate launch"}
    )
    log_dir: str = "logs"
    log_name: str = field(default="", metadata={"help": "run folder name inside --log_dir (default per script)"})
    workdir: str = field(
        default="", metadata={"help": "run folder (CharacteristicGenerator's flag); overrides log_dir/log_name"}
    )
    loggers: str = field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})
    log_interval: int = field(default=100, metadata={"min": 1})
    sample_interval: int = field(default=1000, metadata={"min": 0, "help": "steps between sample grids; 0 = none"})
    checkpoint_interval: int = field(default=5000, metadata={"min": 1})
    keep_states: int = field(default=2, metadata={"min": 2, "help": "newest training states kept (>= 2)"})
    eval_interval: int = field(default=0, metadata={"min": 0, "help": "steps between evaluations; 0 = none"})
    eval_first: int = field(
        default=0, metadata={"min": 0, "help": "one more evaluation after this many steps (a learning curve's start)"}
    )
    eval_metric: str = field(default="auto", metadata={"choices": EVAL_METRIC_CHOICES, "help": "see README"})
    eval_samples: int = field(default=1000, metadata={"min": 2, "help": "generated samples per evaluation"})
    eval_weights: str = field(default="", metadata={"help": "fid: the Inception file; fd_cls: another classifier"})
    resume: str = field(
        default="",
        metadata={"aliases": ("load",), "help": "'latest', a run folder or a state folder (--load: GPM's name)"},
    )
    load_best: bool = field(default=False, metadata={"help": "resume from (or --only_test) the best step"})
    only_test: bool = field(default=False, metadata={"help": "evaluate the run's newest (--load_best: best) snapshot"})
    delete: bool = field(default=False, metadata={"help": "delete an existing run folder and start over"})
    seed: int = 0
    max_skipped_steps: int = field(default=20, metadata={"min": 1, "help": "non-finite steps in a row that stop"})

    def check(self) -> None:
        """Refuse run fields that cannot work, before anything is read or written."""
        check_bounds(self)
        if self.delete and (self.resume or self.load_best or self.only_test):
            raise UserError(
                "--delete starts over: it cannot be combined with --resume/--load, --load_best or --only_test"
            )
        if self.eval_first and not self.eval_interval:
            raise UserError("--eval_first adds one evaluation to those of --eval_interval: set --eval_interval too")
        name = PurePath(self.log_name)
        if name.is_absolute() or ".." in name.parts:
            raise UserError(
                f"--log_name {self.log_name!r} must be a folder name inside --log_dir (no '..', not absolute)"
            )


def run_folder(cfg: RunConfig, default_name: str) -> Path:
    return Path(cfg.workdir) if cfg.workdir else Path(cfg.log_dir) / (cfg.log_name or default_name)


def capture(**stateful) -> dict:
    """A training-state tree from live objects: modules (unwrapped), optimizers, EMA, GradScaler by their
    state_dict(); tensors moved to the CPU; plain values as they are; None stays None."""
    tree = {}
    for name, obj in stateful.items():
        if isinstance(obj, torch.nn.Module):
            tree[name] = unwrap(obj).state_dict()
        elif hasattr(obj, "state_dict"):
            tree[name] = obj.state_dict()
        elif isinstance(obj, torch.Tensor):
            tree[name] = obj.detach().cpu()
        else:
            tree[name] = obj
    return tree


def code_version(root: Path = REPO) -> tuple[dict, str]:
    """What code is running: the git commit and `git diff HEAD` (plus hashes of untracked .py files) in a checkout,
    else a SHA-256 over every .py file of the project. GPM zips its sources; a commit and a diff say the same."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    def digest(files) -> str:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD")
        untracked = [root / line for line in git("ls-files", "--others", "--exclude-standard").splitlines()]
        untracked = sorted(f for f in untracked if f.suffix == ".py" and f.is_file())
        return {"git_commit": commit, "modified": bool(diff), "untracked_py": {
            str(f.relative_to(root)): digest([f]) for f in untracked}}, diff  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        files = sorted(p for p in root.rglob("*.py") if not any(part.startswith(".") for part in p.parts))
        return {"files_sha256": digest(files), "n_files": len(files)}, ""


class Run:
    def __init__(self, cfg: RunConfig, default_name: str, resume_keys: tuple[str, ...]):
        cfg.check()
        self.cfg, self.resume_keys = cfg, resume_keys
        self.dir = run_folder(cfg, default_name)
        self.state: dict | None = None  # the training state to resume from, until restore() consumes it
        self.start_step = 0
        self.best: dict | None = None  # {"step", "metric", "value"} of the best evaluation so far
        self.new_best = False  # set by evaluate() when the step it scored is the best so far; save() clears it
        self.config: dict = {}
        self._evaluator = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------------- start
    def accelerator_kwargs(self) -> dict:
        """What every training script passes to its Accelerator: the CPU when there is no accelerator (so torchrun
        on a CPU-only machine runs DDP over gloo), --mixed_precision (else `accelerate launch`'s), --compile as the
        inductor backend, the trackers, and this folder for their files."""
        cfg = self.cfg
        return dict(
            cpu=not torch.accelerator.is_available(),
            mixed_precision=cfg.mixed_precision,
            dynamo_backend="inductor" if cfg.compile else None,
            log_with=None if cfg.loggers == "none" else cfg.loggers,
            project_config=ProjectConfiguration(project_dir=str(self.dir), logging_dir=str(self.dir)),
        )

    def open(self, accelerator) -> None:
        """Refuse what must not happen to the folder, honour --delete, lock it against a second run, set an
        abandoned timeline aside, and load the training state to resume from (into `self.state`)."""
        cfg, is_main = self.cfg, accelerator.is_main_process
        if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            accelerator.print(
                "note: Accelerate does not apply fp16 autocast on CPU; this run computes in fp32 (bf16 works)"
            )
        if cfg.only_test:
            return  # reads a finished (or running) run; writes only test/*.json
        if is_main:
            self._lock()
            self._remove_temporaries()
        content = self._content()
        state_path = None
        if not cfg.delete:
            if not cfg.resume and not cfg.load_best:
                if content and self._finished_with_this_config():
                    self._done(accelerator)
                if content:
                    raise UserError(
                        f"{self.dir} already holds a run ({', '.join(content)}); pass --resume latest to continue "
                        "it, --delete to start over, or choose another --log_name"
                    )
            else:
                state_path = self._state_to_resume()
                own = state_path is None or state_path.parent.resolve() == (self.dir / "states").resolve()
                if not own and content:
                    raise UserError(
                        f"--resume {cfg.resume} is from another run, but {self.dir} holds a run of its own "
                        f"({', '.join(content)}); choose another --log_name"
                    )
        accelerator.wait_for_everyone()  # every process has checked before the main one changes anything
        if is_main and cfg.delete and content:
            for entry in self.dir.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            accelerator.print(f"--delete: removed the earlier run in {self.dir}")
        if state_path is not None:
            self.state = load_training_state(state_path)
            self.start_step = self.state["step"]
            changed = self._check_compatible(self.state["config"])
            if self.start_step == cfg.n_steps and own:
                self._done(accelerator)
            if self.start_step >= cfg.n_steps:
                raise UserError(
                    f"the training state is at step {self.start_step} already; pass --n_steps > {self.start_step} "
                    "to go on"
                )
            self._note_other_parallelism(accelerator, self.state.get("run", {}))
        elif cfg.resume:
            accelerator.print(
                f"--resume {cfg.resume}: no training state in {self.dir / 'states'}; starting from scratch"
            )
        # Continuing from a step of this folder (step 0 after a crash before the first checkpoint) abandons what
        # was written after it.
        if is_main and (cfg.resume or cfg.load_best) and content and (state_path is None or own):
            self._set_aside_after(self.start_step, self.state.get("run", {}).get("best") if self.state else None)
        accelerator.wait_for_everyone()
        if state_path is not None:
            accelerator.print(
                f"resuming from {state_path} (step {self.start_step})" + (f"; changed: {changed}" if changed else "")
            )

    def _finished_with_this_config(self) -> bool:
        """The folder's newest state is its last step, saved by a run with exactly this configuration: the same
        command launched again (a requeued job without --resume)."""
        states = list_states(self.dir / "states")
        if not states or states[-1][0] != self.cfg.n_steps:
            return False
        state = load_training_state(states[-1][1])
        now = dataclasses.asdict(self.cfg)
        if any(state["config"].get(k) != v for k, v in now.items() if k not in _CONTROL_FIELDS):
            return False
        self.state = state  # `_done` reads its best step instead of loading it again
        return True

    def _done(self, accelerator) -> None:
        """A finished run launched again (a requeued job, or a restart after a kill that came after the final
        state): finish the pruning that the kill may have cut short, say so in one line, and end with exit 0.
        Nothing else is written."""
        if accelerator.is_main_process:
            best = self.state.get("run", {}).get("best")
            prune_states(self.dir / "states", self.cfg.keep_states, (best["step"],) if best else ())
        accelerator.wait_for_everyone()
        accelerator.print(f"{self.dir}: the run is done (step {self.cfg.n_steps} of {self.cfg.n_steps}), nothing to do")
        self.close()
        raise NothingToDo

    @staticmethod
    def _note_other_parallelism(accelerator, saved_run: dict) -> None:
        """CPU fp32 sums depend on the torch thread count, and data sharding on the process count: a resume with
        other counts is correct but not bit-identical to an uninterrupted run."""
        now = {"threads": torch.get_num_threads(), "processes": accelerator.num_processes}
        other = [f"{saved_run[k]} {k}, now {v}" for k, v in now.items() if k in saved_run and saved_run[k] != v]
        if other:
            accelerator.print(
                f"note: the training state was written with {'; '.join(other)}: the run goes on correctly, but its "
                "result will not be bit-identical to an uninterrupted run"
            )

    def _lock(self) -> None:
        """One training process per folder (a POSIX lock, released by the OS when the process ends, even by
        SIGKILL): a second run on the same folder is refused instead of interleaving checkpoints."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.dir} is in use by another training process (pid {holder}); wait for it or stop it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _remove_temporaries(self) -> None:
        """Temp files of a write that a killed process never finished (we hold the lock: nobody else writes)."""
        for pattern in (".tmp-*", "*/.tmp-*", "states/.old-state-*"):
            for path in self.dir.glob(pattern):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder (the OS does it anyway when the process ends)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _content(self) -> list[str]:
        """What in the folder belongs to an earlier run and must not be trimmed or overwritten silently."""
        found = []
        if list_states(self.dir / "states"):
            found.append("training states")
        if list_snapshots(self.dir) or (self.dir / "snapshots" / "best.safetensors").exists():
            found.append("snapshots")
        stats = self.dir / "stats.jsonl"
        if stats.is_file() and stats.stat().st_size:
            found.append("stats.jsonl")
        for sub, what in (("eval", "evaluations"), ("test", "test results"), ("grids", "sample grids")):
            if any((self.dir / sub).glob("*.json" if sub != "grids" else "*.png")):
                found.append(what)
        return found

    def _state_to_resume(self) -> Path | None:
        cfg = self.cfg
        if not cfg.load_best:
            return resolve_state(cfg.resume, self.dir)
        source = self.dir if cfg.resume in ("", "latest") else Path(cfg.resume)
        best = read_best(source)
        if best is None:
            raise UserError(f"--load_best: {source} has no best.json (it was trained without --eval_interval)")
        path = source / "states" / f"state-{best['step']:08d}"
        if not (path / "COMPLETE").is_file():
            raise UserError(f"--load_best: the state of the best step {best['step']} is missing from {path.parent}")
        return path

    def _check_compatible(self, saved_cfg: dict) -> list[str]:
        """Refuse to resume if an identity key (model, method, ...) changed; return the other changed keys."""
        cfg = dataclasses.asdict(self.cfg)
        changed = {k for k in cfg if k in saved_cfg and saved_cfg[k] != cfg[k]} - _CONTROL_FIELDS
        fatal = sorted(changed & set(self.resume_keys))
        if fatal:
            detail = ", ".join(f"{k}: saved {saved_cfg[k]!r} vs now {cfg[k]!r}" for k in fatal)
            raise UserError(f"cannot resume: the training state was made with a different setup ({detail})")
        return sorted(changed)

    def _set_aside_after(self, step: int, best: dict | None) -> None:
        """Resuming at `step` abandons whatever the folder holds from later steps (states, snapshots, grids,
        evaluations, stats rows, a later best): move it to abandoned/, so that `--resume latest` can never pick
        it up again and nothing is lost. After a crash this is what was written after the last state."""
        aside = self.dir / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step:08d}"
        moved = 0

        def move(path: Path) -> None:
            nonlocal moved
            target = aside / path.relative_to(self.dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved += 1

        for s, path in list_states(self.dir / "states"):
            if s > step:
                move(path)
        for sub, pattern in (("snapshots", "snapshot-*.safetensors"), ("grids", "*-*.png"), ("eval", "step-*.json")):
            for path in sorted((self.dir / sub).glob(pattern)):
                digits = path.stem.rsplit("-", 1)[-1]
                if digits.isdigit() and int(digits) > step:
                    move(path)
        stats = self.dir / "stats.jsonl"
        if stats.is_file():
            keep, drop = [], []
            for line in stats.read_text().splitlines():
                try:
                    (keep if json.loads(line)["step"] <= step else drop).append(line)
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a crash
                    drop.append(line)
            if drop:
                aside.mkdir(parents=True, exist_ok=True)
                (aside / "stats.jsonl").write_text("".join(row + "\n" for row in drop))
                write_atomic(stats, "".join(row + "\n" for row in keep))
                moved += 1
        current = read_best(self.dir)
        if current is not None and current != best:  # the best of the abandoned timeline: back to the state's own
            for path in (self.dir / "best.json", self.dir / "snapshots" / "best.safetensors"):
                if path.exists():
                    move(path)
            if best is not None:
                self.best = best
                self._write_best(self.dir / "snapshots" / f"snapshot-{best['step']:08d}.safetensors")
        if moved:
            tqdm.write(f"moved {moved} artefact(s) of the abandoned timeline after step {step} to {aside}")

    # ----------------------------------------------------------------------------------------------- restore
    def restore(self, **stateful) -> dict:
        """Load the resumed state into the (prepared) objects named as in `save`; return the other saved entries
        (plain values, tensors) for the script. {} on a fresh start."""
        if self.state is None:
            return {}
        state, self.state = self.state, None  # dropped here: it holds a CPU copy of every tensor
        for name, obj in stateful.items():
            if obj is None:
                continue  # e.g. a run resumed without --ema
            if state.get(name) is None:
                if name == "scaler":
                    continue  # fp32 -> fp16: the GradScaler starts afresh
                raise UserError(f"cannot resume: the training state has no {name!r} (it was made without it)")
            try:
                (unwrap(obj) if isinstance(obj, torch.nn.Module) else obj).load_state_dict(state[name])
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise UserError(f"cannot resume: the saved {name!r} does not fit ({str(e).splitlines()[0]})")
        self.best = state.get("run", {}).get("best")
        return {k: v for k, v in state.items() if k not in stateful and k not in ("step", "config", "run")}

    def begin(self, accelerator, dataset=None, evaluator=None, summary: str = "") -> None:
        """Start writing: folders, config.json, the code version and the trackers. `evaluator` scores an FD metric
        in `evaluate` (metrics/evaluate.py `loop_evaluator`: built before, so that a refused --eval_metric leaves the
        folder untouched); a script that computes its own metric passes `scores` to `evaluate` instead."""
        cfg = self.cfg
        self.config = dataclasses.asdict(cfg)
        if cfg.eval_interval and cfg.eval_metric in EVAL_METRIC_CHOICES and evaluator is None:
            raise ValueError(f"--eval_interval with --eval_metric {cfg.eval_metric}: the script passed no evaluator")
        self._evaluator = evaluator
        if accelerator.is_main_process:
            for sub in ("grids", "snapshots", "states", "code"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            write_atomic(self.dir / "config.json", json.dumps(self.config, indent=2))
            version, diff = code_version()
            version |= {"start_step": self.start_step, "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            write_atomic(self.dir / "code" / f"launch-{self.start_step:08d}.json", json.dumps(version, indent=2))
            if diff:
                write_atomic(self.dir / "code" / f"launch-{self.start_step:08d}.diff", diff)
        if cfg.loggers != "none":
            accelerator.init_trackers("tb", config=tracker_config(self.config))
        accelerator.print(f"{self.dir}: " + (summary + ", " if summary else "") + (
            f"{accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision "
            f"{accelerator.mixed_precision}" + (f", {len(dataset)} training samples" if dataset is not None else "")
        ))  # fmt: skip

    # ------------------------------------------------------------------------------------------------- loop
    def due(self, done: int, interval: int) -> bool:
        """Whether a periodic task (log, grids, evaluation, checkpoint, ...) runs after `done` steps: every
        `interval` steps and at the last step, so that a run always ends logged, evaluated and saved; never when
        `interval` is 0 (the task is off)."""
        return bool(interval) and (done % interval == 0 or done == self.cfg.n_steps)

    def eval_due(self, done: int) -> bool:
        """Whether to evaluate after `done` steps: `due` for --eval_interval, and once at --eval_first, so that a
        learning curve can start early without evaluating that often all along."""
        return self.due(done, self.cfg.eval_interval) or (bool(self.cfg.eval_interval) and done == self.cfg.eval_first)

    def log(self, accelerator, step: int, values: dict) -> None:
        """One log step: `values` (losses, kimg, ...) with the step and the peak memory, as a stats.jsonl row and the
        status line on the main process, and as TensorBoard scalars through Accelerate (every process calls it,
        Accelerate writes on the main one)."""
        record = {"step": step, "n_steps": self.cfg.n_steps, **values, "mem_gb": peak_memory_gb(accelerator.device)}
        if accelerator.is_main_process:
            with open(self.dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(status_line(record))
        accelerator.log({k: v for k, v in record.items() if k not in ("step", "n_steps")}, step=record["step"])

    def evaluate(self, accelerator, step: int, sample_fn=None, model=None, n_classes: int = 0, scores=None) -> bool:
        """Score the model, write eval/step-<step>.json, and say whether it beats every earlier evaluation of this
        timeline: the returned `new_best`, kept until `save` writes the checkpoint (the script saves at a new best).
        An FD metric is computed here from `model`'s samples (every process generates its share of the seeds); a
        family's own metrics come computed in `scores`."""
        metric = self.cfg.eval_metric
        result = {"step": step} | (self._evaluator(sample_fn, model, n_classes) if self._evaluator else {})
        result |= scores or {}
        if self._evaluator is None:
            if metric not in result:
                raise ValueError(f"--eval_metric {metric}: the script passed no such score ({sorted(result)})")
            result |= {"metric": metric, "value": float(result[metric])}
        value, sign = result["value"], -1 if result["metric"] in HIGHER_IS_BETTER else 1
        ranked = result["metric"] not in NOT_RANKED and value == value  # NaN is never best
        self.new_best = ranked and (self.best is None or sign * value < sign * self.best["value"])
        if self.new_best:
            self.best = {"step": step, "metric": result["metric"], "value": value}
        if accelerator.is_main_process:
            (self.dir / "eval").mkdir(exist_ok=True)
            write_atomic(self.dir / "eval" / f"step-{step:08d}.json", json.dumps(result, indent=2))
            extra = f" on {result['n_samples']} samples" if "n_samples" in result else ""
            extra += f", class accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
            extra += f" ({result['seconds']:.1f} s)" if "seconds" in result else ""
            note = " - new best" if self.new_best else ""
            if self.best is not None and not self.new_best:
                note = f" (best {self.best['metric']} {self.best['value']:.4f} at step {self.best['step']})"
            tqdm.write(f"step {step}: {result['metric']} {value:.4f}{extra}{note}")
        tracked = {f"eval/{k}": float(v) for k, v in (scores or {}).items()} | {f"eval/{result['metric']}": value}
        accelerator.log(tracked, step=step)
        return self.new_best

    def save(self, accelerator, step: int, *, replicas, snapshot: dict, **state) -> None:
        """Checkpoint `step`: check that every process holds the same weights, then (main process) the snapshot
        (`snapshot`: kind, model, model_kwargs, module, optional extra), the best copy if this step is the best,
        and the training state of `state` (see `capture`), each written atomically; old states are rotated, the
        best one kept."""
        accelerator.wait_for_everyone()
        digest = check_replicas_agree(accelerator, *replicas)
        if accelerator.is_main_process:
            path = self.dir / "snapshots" / f"snapshot-{step:08d}.safetensors"
            save_snapshot(
                path, snapshot["kind"], snapshot["model"], snapshot["model_kwargs"],
                unwrap(snapshot["module"]).state_dict(), self.config, step, snapshot.get("extra"),
            )  # fmt: skip
            if self.new_best:
                self._write_best(path)
            run_info = {"best": self.best, "threads": torch.get_num_threads(), "processes": accelerator.num_processes}
            tree = {"step": step, "config": self.config, "run": run_info, **capture(**state)}
            protect = (self.best["step"],) if self.best else ()
            save_training_state(self.dir / "states", step, tree, keep=self.cfg.keep_states, protect=protect)
            tqdm.write(
                f"step {step}: saved training state and snapshot; parameters identical on "
                f"{accelerator.num_processes} process(es) (digest {digest:016x})"
            )
        self.new_best = False
        accelerator.wait_for_everyone()

    def _write_best(self, snapshot_path: Path) -> None:
        """snapshots/best.safetensors = a copy of the best step's snapshot; best.json says which step it is."""
        if snapshot_path.is_file():
            write_atomic(self.dir / "snapshots" / "best.safetensors", snapshot_path.read_bytes())
        write_atomic(self.dir / "best.json", json.dumps(self.best, indent=2))


def read_best(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        return {"step": int(best["step"]), "metric": str(best["metric"]), "value": float(best["value"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged ({type(e).__name__}); restore it from the eval/ files or delete it")
