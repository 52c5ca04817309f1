"""Distil a diffusion teacher into a one-step (and few-step) generator by characteristic matching (seed 004).

    python distill_characteristic.py --teacher logs/fmnist_follmer_cond --workdir logs/fmnist_char --bsz 64
    torchrun --standalone --nproc_per_node 4 distill_characteristic.py --workdir logs/mnist-characteristic \
        --teacher logs/mnist-denoiser/snapshots/snapshot-00010000.safetensors --bsz 64 --global_bsz 256
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] distill_characteristic.py ...
    python distill_characteristic.py ... --loss lpips --lpips_weights ~/vgg16-397923af.pth
    python distill_characteristic.py ... --resume latest            # continue bit-exactly

The student is the teacher's network with a second time input s (the target time), initialised from the teacher's
weights, so at step 0 its flow map G(x, t, s) is exactly the teacher's DDIM step from t to s. Each optimizer step
(losses/characteristic.py): pick a jump of n grid steps, run n steps of the frozen teacher ODE from x_t, and match
the student's G(x_t, t, s) to sg[G(x_u, u, s)] after both are carried to the data end by the EMA (target) network,
plus the teacher's denoising loss on the student's denoiser with an adaptive weight. Teachers: any
diffusion_train.py snapshot, Föllmer (seed 004's setting) or EDM (CTM's). Gradient accumulation:
--global_bsz / (--bsz x processes) rounds. Sample the student with `sample.py --num_steps 1|2|4`; compare it with its
teacher with compare.py. The run folder is laid out as diffusion_train.py's.
"""

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

from losses import get_diffusion_loss
from losses.characteristic import (
    JUMP_WEIGHTINGS,
    adaptive_weight,
    characteristic_loss,
    l2_distance,
    pseudo_huber_distance,
    sample_jumps,
)
from modelling import build_denoiser
from sampling.diffusion import ODE_SOLVERS, StackedNoise, sample, time_grid
from utils.ckpt import (
    build_from_snapshot,
    check_replicas_agree,
    check_resume_compatible,
    load_snapshot,
    open_resume_state,
    save_snapshot,
    save_training_state,
    tensors_sha256,
    unwrap,
)
from utils.cli import UserError, parse, user_errors
from utils.data import DATASETS, build_dataset, make_loader, step_seed
from utils.ema import EMA
from utils.grid import save_grid, save_scatter
from utils.tracking import (
    KimgClock,
    RunningMeans,
    SkipCounter,
    peak_memory_gb,
    progress,
    step_optimizer,
    tracker_config,
    trim_stats,
    write_log,
)

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True

GRID_ROWS = 10
SCATTER_POINTS = 4000
# A resumed run must match these (and the teacher's weights); lr, n_steps, intervals may change, with a note.
RESUME_KEYS = (
    "dataset", "img_size", "num_steps", "rho", "t_min", "t_max", "train_data_end", "loss", "optimizer", "global_bsz"
)  # fmt: skip


@dataclass
class Config:
    teacher: str = field(default="", metadata={"help": "diffusion_train.py snapshot, or its run folder (newest)"})
    dataset: str | None = field(default=None, metadata={"choices": DATASETS, "help": "default: the teacher's"})
    data_dir: str | None = field(default=None, metadata={"help": "default: the teacher's"})
    download: bool = True
    img_size: int | None = field(default=None, metadata={"help": "default: the teacher's; must match it"})
    bsz: int = field(default=64, metadata={"help": "images per process per accumulation round"})
    global_bsz: int = field(default=0, metadata={"help": "images per optimizer step; 0 = bsz x processes"})
    n_steps: int = 2000
    optimizer: str = field(default="RAdam", metadata={"choices": ["Adam", "AdamW", "RAdam"]})
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    lr_rampup_steps: int = field(default=200, metadata={"help": "linear learning-rate warm-up, in optimizer steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm, 0 = none"})
    ema_decay: float = field(default=0.999, metadata={"help": "target/EMA decay, min(decay, (1+k)/(10+k)) at step k"})
    ema: bool = field(default=True, metadata={"help": "snapshots hold the EMA weights (else the raw student's)"})
    loss: str = field(
        default="pseudo_huber", metadata={"choices": ["pseudo_huber", "l2", "lpips"], "help": "distance at t = 0"}
    )
    lpips_weights: str = field(default="", metadata={"help": "torchvision vgg16-397923af.pth (else torch hub cache)"})
    lpips_resize: int = field(default=224, metadata={"help": "LPIPS input size (seed 004: 224), 0 = native"})
    num_steps: int = field(default=20, metadata={"help": "teacher time-grid points N"})
    rho: float | None = field(default=None, metadata={"help": "grid exponent; default the teacher's (Föllmer 1)"})
    t_min: float | None = field(default=None, metadata={"help": "grid end; default Föllmer 1e-3, EDM 0.002"})
    t_max: float | None = field(default=None, metadata={"help": "grid start; default Föllmer 0.999, EDM 80"})
    train_data_end: bool = field(
        default=True, metadata={"help": "add t = 0 to the grid, so G(x, t, 0) is trained (seed 004: off)"}
    )
    teacher_solver: str = field(default="deis", metadata={"choices": list(ODE_SOLVERS)})
    jump_weighting: str = field(default="weighted", metadata={"choices": list(JUMP_WEIGHTINGS)})
    max_jump: int = field(default=0, metadata={"help": "longest teacher jump in grid steps; 0 = N - 1"})
    max_weight: float = field(default=1e4, metadata={"help": "clamp of the adaptive DSM weight"})
    loss_kwargs: dict = field(
        default_factory=dict, metadata={"help": 'JSON for the DSM term; default Föllmer {"eps0": 1e-3}'}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the student"})
    mixed_precision: str | None = field(
        default=None, metadata={"choices": ["no", "fp16", "bf16"], "help": "default: from accelerate launch"}
    )
    log_dir: str = "logs"
    log_name: str = field(default="", metadata={"help": "default: <teacher run>_characteristic"})
    workdir: str = field(default="", metadata={"help": "run folder (seed 004's flag); overrides log_dir/log_name"})
    loggers: str = field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})
    log_interval: int = 50
    sample_interval: int = field(default=500, metadata={"help": "steps between one-step sample grids; 0 = none"})
    checkpoint_interval: int = 500
    keep_states: int = field(default=2, metadata={"help": "training states kept (>= 2)"})
    resume: str = field(default="", metadata={"help": "'latest' or a path to a run folder or state folder"})
    seed: int = 0
    max_skipped_steps: int = 20


def check_config(cfg: Config) -> None:
    if not cfg.teacher:
        raise UserError("--teacher is required: a diffusion_train.py snapshot or run folder")
    for name in ("bsz", "n_steps", "log_interval", "checkpoint_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_steps < 2:
        raise UserError(f"--num_steps must be >= 2 (grid points), got {cfg.num_steps}")
    if min(cfg.sample_interval, cfg.global_bsz, cfg.max_jump, cfg.lr_rampup_steps, cfg.grad_clip) < 0:
        raise UserError("--sample_interval, --global_bsz, --max_jump, --lr_rampup_steps, --grad_clip must be >= 0")
    if cfg.keep_states < 2:
        raise UserError("--keep_states must be >= 2: the newest state may be the one being written")
    if cfg.lr <= 0 or not 0 <= cfg.ema_decay < 1 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError("--lr must be > 0; --ema_decay, --beta1, --beta2 in [0, 1)")


def load_teacher(path: str):
    """The frozen teacher, its snapshot metadata and the SHA-256 of its weights; other families are refused."""
    meta, state_dict = load_snapshot(path)
    if meta["kind"] != "diffusion":
        raise UserError(
            f"--teacher {meta['path']}: a {meta['kind']!r} snapshot; the teacher must be a diffusion_train.py "
            "snapshot (kind 'diffusion')"
        )
    teacher = build_from_snapshot(meta, state_dict, build_denoiser)
    digest = tensors_sha256(sorted(teacher.state_dict().items()))
    return teacher.eval().requires_grad_(False), meta, digest


def build_student(teacher_meta: dict, teacher: torch.nn.Module):
    """The teacher's denoiser with a two-time network, initialised from the teacher's weights; only the s-branch
    (zero-initialised) is new."""
    model_kwargs = json.loads(json.dumps(teacher_meta["model_kwargs"]))  # a deep copy
    model_kwargs["net_kwargs"]["two_time"] = True
    student = build_denoiser(teacher_meta["model"], **model_kwargs)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("_s." not in k and not k.endswith("_s") for k in missing):
        raise UserError(f"the teacher's weights do not fit the student: missing {missing}, unexpected {unexpected}")
    return student, model_kwargs


def get_distance(cfg: Config):
    if cfg.loss == "lpips":
        from losses.lpips import load_lpips

        return load_lpips(cfg.lpips_weights or None, resize=cfg.lpips_resize)
    return {"l2": l2_distance, "pseudo_huber": pseudo_huber_distance}[cfg.loss]


def main(cfg: Config) -> None:
    check_config(cfg)
    teacher, teacher_meta, teacher_sha = load_teacher(cfg.teacher)
    teacher_cfg = teacher_meta["config"]
    cfg.dataset = cfg.dataset or teacher_cfg["dataset"]
    cfg.data_dir = cfg.data_dir or teacher_cfg.get("data_dir", "data")
    cfg.img_size = cfg.img_size or teacher_cfg.get("img_size", 32)
    rho = teacher.rho if cfg.rho is None else cfg.rho
    t_min = teacher.t_min if cfg.t_min is None else cfg.t_min
    t_max = teacher.t_max if cfg.t_max is None else cfg.t_max
    if not 0 < t_min < t_max < teacher.t_limit or rho <= 0:
        raise UserError(f"need 0 < --t_min < --t_max < {teacher.t_limit} and --rho > 0: got {t_min}, {t_max}, {rho}")
    teacher_run = Path(teacher_meta["path"]).parent.parent.name or "teacher"
    run_dir = (
        Path(cfg.workdir) if cfg.workdir else Path(cfg.log_dir) / (cfg.log_name or f"{teacher_run}_characteristic")
    )
    state, state_path = open_resume_state(cfg.resume, run_dir)
    if state is not None and state["teacher_sha256"] != teacher_sha:
        raise UserError(f"cannot resume: --teacher {teacher_meta['path']} is not the teacher this run started from")

    # Accelerator.
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        dynamo_backend="inductor" if cfg.compile else None,
        log_with=None if cfg.loggers == "none" else cfg.loggers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
    device, is_main = accelerator.device, accelerator.is_main_process
    global_bsz = cfg.global_bsz or cfg.bsz * accelerator.num_processes
    rounds, remainder = divmod(global_bsz, cfg.bsz * accelerator.num_processes)
    if remainder or rounds < 1:
        raise UserError(
            f"--global_bsz {global_bsz} is not a multiple of --bsz {cfg.bsz} x {accelerator.num_processes} process(es)"
        )
    cfg.global_bsz = global_bsz
    if state is not None:
        changed = check_resume_compatible(state["config"], dataclasses.asdict(cfg), RESUME_KEYS)
        accelerator.print(
            f"resuming from {state_path} (step {state['step']})" + (f"; changed: {changed}" if changed else "")
        )
    start_step = state["step"] if state else 0
    if start_step >= cfg.n_steps:
        raise UserError(f"the training state is at step {start_step} already; pass --n_steps > {start_step} to go on")

    # Data: the teacher's training set (x0 of the interpolant, and labels for conditional teachers).
    with accelerator.main_process_first():
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if tuple(dataset.sample_shape) != teacher.sample_shape:
        raise UserError(
            f"--dataset {cfg.dataset} at --img_size {cfg.img_size} gives samples of shape "
            f"{tuple(dataset.sample_shape)}, but the teacher generates {teacher.sample_shape}"
        )
    n_classes = teacher.n_classes
    if n_classes and dataset.n_classes != n_classes:
        raise UserError(f"the teacher is conditional on {n_classes} classes; {cfg.dataset} has {dataset.n_classes}")
    loader = iter(
        make_loader(
            dataset, cfg.bsz, accelerator.process_index, accelerator.num_processes, cfg.seed, start_step * rounds
        )
    )

    # Models: the frozen teacher, the student (two-time network from the teacher's weights), and the EMA of the
    # student, which is both the target network theta^- of the loss and the weights the snapshots hold.
    teacher.to(device)
    torch.manual_seed(cfg.seed)  # the s-branch's init: the same on every rank and in every run of this seed
    student, model_kwargs = build_student(teacher_meta, teacher)
    student.eval()  # seed 004 distils in eval mode: dropout stays off, as in the teacher
    ema = EMA(student, decay=cfg.ema_decay)
    target = ema.module.to(device)
    dsm_kwargs = ({"eps0": 1e-3} if teacher_meta["model"] == "follmer" else {}) | cfg.loss_kwargs
    try:
        dsm_loss_fn = get_diffusion_loss(teacher_meta["model"], **dsm_kwargs)
    except TypeError as e:
        raise UserError(
            f"--loss_kwargs {json.dumps(cfg.loss_kwargs)} do not fit a {teacher_meta['model']} teacher: {e}"
        )
    distance = get_distance(cfg)
    if isinstance(distance, torch.nn.Module):
        distance.to(device)
    # The teacher's grid t_0 = t_max > ... > t_{N-1} = t_min, and the data end t = 0, which the teacher reaches with
    # its samplers' final step D(x; t_min) and which the one-step sampler G(z, t_max, 0) needs.
    grid = time_grid(t_max, t_min, cfg.num_steps, rho) + ([0.0] if cfg.train_data_end else [])
    grid = torch.tensor(grid, dtype=torch.float64, device=device)
    accelerator.print(
        f"teacher {teacher_meta['path']} ({teacher_meta['model']}, step {teacher_meta['step']}); student "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters; grid of {cfg.num_steps} times "
        f"from {t_max:g} to {t_min:g} (rho {rho:g}){' and t = 0' if cfg.train_data_end else ''}; "
        f"{rounds} accumulation round(s) of {cfg.bsz} per process"
    )

    # Optimizer.
    optimizer = getattr(torch.optim, cfg.optimizer)(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    # Prepare.
    student, optimizer = accelerator.prepare(student, optimizer)

    # Resume.
    skipped = 0
    if state is not None:
        unwrap(student).load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["betas"] = (cfg.beta1, cfg.beta2)
        ema.load_state_dict(state["ema"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        skipped = state["skipped"]
        del state

    if is_main:
        for sub in ("grids", "snapshots", "states"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        trim_stats(run_dir / "stats.jsonl", start_step)
    if cfg.loggers != "none":
        accelerator.init_trackers("tb", config=tracker_config(dataclasses.asdict(cfg)))
    accelerator.print(
        f"{run_dir}: {accelerator.num_processes} process(es) on {device.type}, "
        f"mixed precision {accelerator.mixed_precision}, {len(dataset)} training samples"
    )

    @torch.no_grad()
    def save_grids(step: int) -> None:
        """One-step samples of fixed seeds 0.. from the raw student and the EMA."""
        toy = len(teacher.sample_shape) == 1
        n = SCATTER_POINTS if toy else GRID_ROWS**2
        labels = torch.arange(n_classes).repeat_interleave(-(-n // n_classes))[:n].to(device) if n_classes else None
        for tag, source in (("raw", unwrap(student)), ("ema", target)):
            samples, _ = sample(source, StackedNoise(range(n)), labels, num_steps=1, t_max=t_max, device=device)
            path = run_dir / "grids" / f"{tag}-{step:08d}.png"
            save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        digest = check_replicas_agree(accelerator, unwrap(student))
        if tensors_sha256(sorted(teacher.state_dict().items())) != teacher_sha:
            raise RuntimeError("the teacher's weights changed during distillation")  # a bug, never a user error
        if is_main:
            train_state = {
                "step": step,
                "config": dataclasses.asdict(cfg),
                "teacher_sha256": teacher_sha,
                "skipped": skips.total,
                "student": unwrap(student).state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
            }
            save_training_state(run_dir / "states", step, train_state, keep=cfg.keep_states)
            save_snapshot(
                run_dir / "snapshots" / f"snapshot-{step:08d}.safetensors",
                kind="characteristic",
                model_name=teacher_meta["model"],
                model_kwargs=model_kwargs,
                state_dict=(target if cfg.ema else unwrap(student)).state_dict(),
                config=dataclasses.asdict(cfg),
                step=step,
                # The resolved grid (flags or the teacher's defaults): sample.py and compare.py sample on it.
                extra={
                    "teacher": teacher_meta["path"],
                    "teacher_sha256": teacher_sha,
                    "grid": {"t_min": t_min, "t_max": t_max, "rho": rho},
                },
            )
            tqdm.write(
                f"step {step}: saved training state and snapshot; parameters identical on "
                f"{accelerator.num_processes} process(es) (digest {digest:016x})"
            )
        accelerator.wait_for_everyone()

    # Loop.
    meters, clock = RunningMeans(), KimgClock(start_step, global_bsz)
    skips = SkipCounter(cfg.max_skipped_steps, run_dir / "states", skipped)
    pbar = progress(range(start_step, cfg.n_steps), is_main, initial=start_step, total=cfg.n_steps, desc=run_dir.name)
    for step in pbar:
        torch.manual_seed(step_seed(cfg.seed, accelerator.process_index, step))
        lr = cfg.lr * min((step + 1) / cfg.lr_rampup_steps, 1.0) if cfg.lr_rampup_steps else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr

        optimizer.zero_grad(set_to_none=True)
        for r in range(rounds):
            reals, labels = next(loader)
            reals = reals.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if n_classes else None
            # One jump length n per round, the same on every process (its RNG ignores the rank): all ranks then run
            # the same number of teacher steps. Start and end times are per sample.
            jump_rng = torch.Generator().manual_seed(step_seed(cfg.seed, -1, step * rounds + r))
            n, i_t, i_s = sample_jumps(
                len(grid), reals.shape[0], cfg.jump_weighting, jump_rng, device, cfg.max_jump or None
            )
            # DDP: gradients are all-reduced only on the last round.
            with accelerator.no_sync(student) if r < rounds - 1 else nullcontext():
                with accelerator.autocast():  # the teacher and target are not prepared: autocast them here
                    loss_char = characteristic_loss(
                        student, target, teacher, reals, labels, grid, n, i_t, i_s, distance, cfg.teacher_solver
                    ).mean()
                    loss_dsm = dsm_loss_fn(student, reals, labels).mean()  # s = t: the student is still a denoiser
                weight = adaptive_weight(loss_char, loss_dsm, unwrap(student).net.last_layer_weight, cfg.max_weight)
                accelerator.backward((loss_char + weight * loss_dsm) / rounds)
            meters.add(**{"loss/char": loss_char, "loss/dsm": loss_dsm, "dsm_weight": weight})
        applied, grad_norm = step_optimizer(accelerator, optimizer, student, cfg.grad_clip or float("inf"))

        # Update the EMA (the target network), only after an update that really happened; count skipped steps and
        # stop after too many in a row (a diverged run).
        if applied:
            ema.update(unwrap(student), global_bsz, (step + 1) * global_bsz)
            meters.add(grad_norm=grad_norm)
        skips.update(applied, step)

        # Log.
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.n_steps:
            record = {
                "step": done,
                "n_steps": cfg.n_steps,
                **clock.tick(done),
                **meters.pop(accelerator),
                "lr": lr,
                "skipped": skips.total,
                "mem_gb": peak_memory_gb(device),
            }
            write_log(accelerator, run_dir, record)

        # Save sample grids and checkpoints.
        if is_main and cfg.sample_interval and (done % cfg.sample_interval == 0 or done == cfg.n_steps):
            save_grids(done)
        if done % cfg.checkpoint_interval == 0 or done == cfg.n_steps:
            save_checkpoint(done)

    accelerator.end_training()


if __name__ == "__main__":
    with user_errors():
        main(parse(Config, description=__doc__.split("\n")[0]))
