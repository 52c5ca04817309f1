"""Distil a diffusion teacher into a one-step (and few-step) generator by characteristic matching
(CharacteristicGenerator).

    python distill_characteristic.py --teacher logs/fmnist_follmer_cond --workdir logs/fmnist_char --batch_size 64
    torchrun --standalone --nproc_per_node 4 distill_characteristic.py --workdir logs/mnist-characteristic \
        --teacher logs/mnist-denoiser/snapshots/snapshot-00010000.safetensors --batch_size 64 --global_batch_size 256
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] distill_characteristic.py ...
    python distill_characteristic.py ... --loss lpips --lpips_weights ~/vgg16-397923af.pth
    python distill_characteristic.py ... --resume latest            # continue bit-exactly

The student is the teacher's network with a second time input s (the target time), initialised from the teacher's
weights, so at step 0 its flow map G(x, t, s) is exactly the teacher's DDIM step from t to s. Each optimizer step
(losses/characteristic.py): pick a jump of n grid steps, run n steps of the frozen teacher ODE from x_t, and match
the student's G(x_t, t, s) to sg[G(x_u, u, s)] after both are carried to the data end by the EMA (target) network,
plus the teacher's denoising loss on the student's denoiser with an adaptive weight. Teachers: any
diffusion_train.py snapshot, Föllmer (CharacteristicGenerator's setting) or EDM (CTM's). Gradient accumulation:
--global_batch_size / (--batch_size x processes) rounds. Sample the student with `sample.py --num_steps 1|2|4`;
compare it with its teacher with compare.py. The run folder, resume, evaluation (--eval_interval: FD of the EMA
student's one-step samples, best checkpoint, --only_test) and --delete are those of every training script
(utils/run.py).
"""

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from losses import get_diffusion_loss
from losses.characteristic import (
    JUMP_WEIGHTINGS,
    adaptive_weight,
    characteristic_loss,
    l2_distance,
    pseudo_huber_distance,
    sample_jumps,
)
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import build_denoiser
from sampling import diffusion_images
from sampling.diffusion import ODE_SOLVERS, StackedNoise, sample, time_grid
from utils.ckpt import build_from_snapshot, load_snapshot, tensors_sha256
from utils.cli import UserError, script_cli
from utils.data import DATASETS, build_dataset, step_seed, to_device, train_batches
from utils.dist import set_backends, unwrap
from utils.ema import EMA
from utils.grid import save_grid, save_scatter
from utils.optim import step_optimizer
from utils.run import Run, RunConfig
from utils.tracking import LoopTracker

GRID_ROWS = 10
SCATTER_POINTS = 4000
# A resumed run must match these (and the teacher's weights); lr, n_steps, intervals may change, with a note.
RESUME_KEYS = (
    "dataset", "img_size", "num_steps", "rho", "t_min", "t_max", "train_data_end", "loss", "optimizer",
    "global_batch_size",
)  # fmt: skip


@dataclass
class Config(RunConfig):
    teacher: str = field(default="", metadata={"help": "diffusion_train.py snapshot, or its run folder (newest)"})
    dataset: str | None = field(default=None, metadata={"choices": DATASETS, "help": "default: the teacher's"})
    data_dir: str | None = field(default=None, metadata={"help": "default: the teacher's"})
    download: bool = True
    img_size: int | None = field(default=None, metadata={"help": "default: the teacher's; must match it"})
    batch_size: int = field(
        default=64, metadata={"min": 1, "aliases": ("bsz",), "help": "images per process per accumulation round"}
    )
    global_batch_size: int = field(
        default=0,
        metadata={
            "min": 0,
            "aliases": ("global_bsz",),
            "help": "images per optimizer step; 0 = --batch_size x processes",
        },
    )
    optimizer: str = field(default="RAdam", metadata={"choices": ["Adam", "AdamW", "RAdam"]})
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    lr_rampup_steps: int = field(default=200, metadata={"min": 0, "help": "linear lr warm-up, in optimizer steps"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "max gradient norm, 0 = none"})
    ema_decay: float = field(default=0.999, metadata={"help": "target/EMA decay, min(decay, (1+k)/(10+k)) at step k"})
    ema: bool = field(default=True, metadata={"help": "snapshots hold the EMA weights (else the raw student's)"})
    loss: str = field(
        default="pseudo_huber", metadata={"choices": ["pseudo_huber", "l2", "lpips"], "help": "distance at t = 0"}
    )
    lpips_weights: str = field(default="", metadata={"help": "torchvision vgg16-397923af.pth (else torch hub cache)"})
    lpips_resize: int = field(
        default=224, metadata={"help": "LPIPS input size (CharacteristicGenerator: 224), 0 = native"}
    )
    num_steps: int = field(default=20, metadata={"min": 2, "help": "teacher time-grid points N"})
    rho: float | None = field(default=None, metadata={"help": "grid exponent; default the teacher's (Föllmer 1)"})
    t_min: float | None = field(default=None, metadata={"help": "grid end; default Föllmer 1e-3, EDM 0.002"})
    t_max: float | None = field(default=None, metadata={"help": "grid start; default Föllmer 0.999, EDM 80"})
    train_data_end: bool = field(
        default=True,
        metadata={"help": "add t = 0 to the grid, so G(x, t, 0) is trained (CharacteristicGenerator: off)"},
    )
    teacher_solver: str = field(default="deis", metadata={"choices": list(ODE_SOLVERS)})
    jump_weighting: str = field(default="weighted", metadata={"choices": list(JUMP_WEIGHTINGS)})
    max_jump: int = field(default=0, metadata={"min": 0, "help": "longest teacher jump in grid steps; 0 = N - 1"})
    max_weight: float = field(default=1e4, metadata={"help": "clamp of the adaptive DSM weight"})
    loss_kwargs: dict = field(
        default_factory=dict, metadata={"help": 'JSON for the DSM term; default Föllmer {"eps0": 1e-3}'}
    )
    n_steps: int = 2000
    log_interval: int = 50
    sample_interval: int = 500
    checkpoint_interval: int = 500


def check_config(cfg: Config) -> None:
    cfg.check()
    if not cfg.teacher:
        raise UserError("--teacher is required: a diffusion_train.py snapshot or run folder")
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


def get_dsm_loss(cfg: Config, method: str):
    """The teacher's denoising loss for the DSM term; Föllmer's t ~ U[eps0, 1] with CharacteristicGenerator's student
    eps0 1e-3."""
    dsm_kwargs = ({"eps0": 1e-3} if method == "follmer" else {}) | cfg.loss_kwargs
    try:
        return get_diffusion_loss(method, **dsm_kwargs)
    except TypeError as e:
        raise UserError(f"--loss_kwargs {json.dumps(cfg.loss_kwargs)} do not fit a {method} teacher: {e}")


def learning_rate(cfg: Config, step: int) -> float:
    """CharacteristicGenerator's linear warm-up over optimizer steps, lr·min((step + 1)/lr_rampup_steps, 1): the first
    step (step 0) already moves; a pure function of the step, so a resumed run sets the same rates."""
    return cfg.lr * min((step + 1) / cfg.lr_rampup_steps, 1.0) if cfg.lr_rampup_steps else cfg.lr


def distillation_loss(
    cfg: Config, student, target, teacher, dsm_loss_fn, distance, grid: torch.Tensor, reals, labels, jumps, rounds,
    autocast=nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The loss of one accumulation round, (L_char + w·L_dsm)/rounds, and its parts for the log. L_char is the batch
    mean of the characteristic loss for the jumps (n, i_t, i_s): gradients reach the student only through
    G(x_t, t, s), never the frozen teacher or the target (EMA) network. L_dsm is the teacher's denoising loss on the
    student's denoiser with s = t, and w the detached adaptive weight (gradient-norm ratio at the student's output
    layer). Dividing by the number of rounds makes the accumulated gradient that of the global batch's mean."""
    n, i_t, i_s = jumps
    with autocast():  # the teacher and the target are not prepared: the script autocasts them here
        loss_char = characteristic_loss(
            student, target, teacher, reals, labels, grid, n, i_t, i_s, distance, cfg.teacher_solver
        ).mean()
        loss_dsm = dsm_loss_fn(student, reals, labels).mean()  # s = t: the student is still a denoiser
    weight = adaptive_weight(loss_char, loss_dsm, unwrap(student).net.last_layer_weight, cfg.max_weight)
    parts = {"loss/char": loss_char, "loss/dsm": loss_dsm, "dsm_weight": weight}
    return (loss_char + weight * loss_dsm) / rounds, parts


def apply_teacher_defaults(cfg: Config, teacher, teacher_meta: dict) -> tuple[float, float, float]:
    """Fill --dataset, --data_dir and --img_size from the teacher's run, and return the grid's rho, t_min and t_max:
    the flags, or the teacher's defaults, inside the teacher's time range."""
    teacher_cfg = teacher_meta["config"]
    cfg.dataset = cfg.dataset or teacher_cfg["dataset"]
    cfg.data_dir = cfg.data_dir or teacher_cfg.get("data_dir", "data")
    cfg.img_size = cfg.img_size or teacher_cfg.get("img_size", 32)
    rho = teacher.rho if cfg.rho is None else cfg.rho
    t_min = teacher.t_min if cfg.t_min is None else cfg.t_min
    t_max = teacher.t_max if cfg.t_max is None else cfg.t_max
    if not 0 < t_min < t_max < teacher.t_limit or rho <= 0:
        raise UserError(f"need 0 < --t_min < --t_max < {teacher.t_limit} and --rho > 0: got {t_min}, {t_max}, {rho}")
    return rho, t_min, t_max


def accumulation_rounds(cfg: Config, num_processes: int) -> tuple[int, int]:
    """The global batch (--global_batch_size, 0 = --batch_size x processes) and the number of accumulation rounds of
    --batch_size per process that make it up; a global batch that is not a whole number of rounds is refused."""
    global_batch_size = cfg.global_batch_size or cfg.batch_size * num_processes
    rounds, remainder = divmod(global_batch_size, cfg.batch_size * num_processes)
    if remainder or rounds < 1:
        raise UserError(
            f"--global_batch_size {global_batch_size} is not a multiple of --batch_size {cfg.batch_size} x "
            f"{num_processes} process(es)"
        )
    return global_batch_size, rounds


def check_dataset(cfg: Config, dataset, teacher) -> None:
    """Refuse a dataset whose sample shape or number of classes differs from the teacher's."""
    if tuple(dataset.sample_shape) != teacher.sample_shape:
        raise UserError(
            f"--dataset {cfg.dataset} at --img_size {cfg.img_size} gives samples of shape "
            f"{tuple(dataset.sample_shape)}, but the teacher generates {teacher.sample_shape}"
        )
    if teacher.n_classes and dataset.n_classes != teacher.n_classes:
        raise UserError(
            f"the teacher is conditional on {teacher.n_classes} classes; {cfg.dataset} has {dataset.n_classes}"
        )


def build_student_and_target(cfg: Config, teacher_meta: dict, teacher: torch.nn.Module, device):
    """The student (two-time network from the teacher's weights), its model kwargs, its EMA, and the EMA's module on
    `device`: the target network theta^- of the loss and the weights the snapshots hold."""
    torch.manual_seed(cfg.seed)  # the s-branch's init: the same on every rank and in every run of this seed
    student, model_kwargs = build_student(teacher_meta, teacher)
    student.eval()  # CharacteristicGenerator distils in eval mode: dropout stays off, as in the teacher
    ema = EMA(student, decay=cfg.ema_decay)
    return student, model_kwargs, ema, ema.module.to(device)


def teacher_grid(cfg: Config, rho: float, t_min: float, t_max: float, device) -> torch.Tensor:
    """The teacher's grid t_0 = t_max > ... > t_{N-1} = t_min, and (--train_data_end) the data end t = 0, which the
    teacher reaches with its samplers' final step D(x; t_min) and which the one-step sampler G(z, t_max, 0) needs."""
    grid = time_grid(t_max, t_min, cfg.num_steps, rho) + ([0.0] if cfg.train_data_end else [])
    return torch.tensor(grid, dtype=torch.float64, device=device)


@torch.no_grad()
def save_grids(run: Run, step: int, student, target, teacher, t_max: float, device) -> None:
    """One-step samples of fixed seeds 0.. from the raw student and the EMA: an image grid, or a scatter plot for
    2-D toy data."""
    toy, n_classes = len(teacher.sample_shape) == 1, teacher.n_classes
    n = SCATTER_POINTS if toy else GRID_ROWS**2
    labels = torch.arange(n_classes).repeat_interleave(-(-n // n_classes))[:n].to(device) if n_classes else None
    for tag, source in (("raw", unwrap(student)), ("ema", target)):
        samples, _ = sample(source, StackedNoise(range(n)), labels, num_steps=1, t_max=t_max, device=device)
        path = run.dir / "grids" / f"{tag}-{step:08d}.png"
        save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)


def one_step_sampler(t_max: float):
    """The evaluation's sampler: the student's one step G(z, t_max, 0) from each seed's latent."""
    return lambda model, seeds, labels, device: diffusion_images(model, seeds, labels, device, t_max=t_max)


def checkpoint_snapshot(cfg: Config, teacher, teacher_meta, teacher_sha, model_kwargs, module, grid_params) -> dict:
    """The snapshot a checkpoint writes: `module` with the teacher it was distilled from and the resolved grid
    (flags or the teacher's defaults), on which sample.py and compare.py sample. The teacher never changes: its
    weights are checked against their hash here, at every checkpoint."""
    if tensors_sha256(sorted(teacher.state_dict().items())) != teacher_sha:
        raise RuntimeError("the teacher's weights changed during distillation")  # a bug, never a user error
    return dict(
        kind="characteristic", model=teacher_meta["model"], model_kwargs=model_kwargs, module=module,
        extra={"teacher": teacher_meta["path"], "teacher_sha256": teacher_sha, "grid": grid_params},
    )  # fmt: skip


def main(cfg: Config) -> None:
    check_config(cfg)
    teacher, teacher_meta, teacher_sha = load_teacher(cfg.teacher)
    rho, t_min, t_max = apply_teacher_defaults(cfg, teacher, teacher_meta)
    teacher_run = Path(teacher_meta["path"]).parent.parent.name or "teacher"
    run = Run(cfg, f"{teacher_run}_characteristic", RESUME_KEYS)

    # Accelerator.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main = accelerator.device, accelerator.is_main_process
    global_batch_size, rounds = accumulation_rounds(cfg, accelerator.num_processes)
    cfg.global_batch_size = global_batch_size
    run.open(accelerator)

    # Data: the teacher's training set (x0 of the interpolant, and labels for conditional teachers).
    with accelerator.main_process_first():
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if cfg.only_test:
        score_snapshot(run, accelerator, dataset)
        return
    check_dataset(cfg, dataset, teacher)
    n_classes = teacher.n_classes
    loader = train_batches(dataset, cfg, accelerator, run.start_step * rounds)  # `rounds` batches per step

    # Models: the frozen teacher, the student (two-time network from the teacher's weights), and the EMA of the
    # student, which is both the target network theta^- of the loss and the weights the snapshots hold.
    teacher.to(device)
    student, model_kwargs, ema, target = build_student_and_target(cfg, teacher_meta, teacher, device)
    dsm_loss_fn = get_dsm_loss(cfg, teacher_meta["model"])
    distance = get_distance(cfg)
    if isinstance(distance, torch.nn.Module):
        distance.to(device)
    grid = teacher_grid(cfg, rho, t_min, t_max, device)
    accelerator.print(
        f"teacher {teacher_meta['path']} ({teacher_meta['model']}, step {teacher_meta['step']}); student "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters; grid of {cfg.num_steps} times "
        f"from {t_max:g} to {t_min:g} (rho {rho:g}){' and t = 0' if cfg.train_data_end else ''}; "
        f"{rounds} accumulation round(s) of {cfg.batch_size} per process"
    )

    # Optimizer.
    optimizer = getattr(torch.optim, cfg.optimizer)(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    # Prepare.
    student, optimizer = accelerator.prepare(student, optimizer)

    # Resume: the saved groups carry the old betas (lr is set every step); the teacher must be the same.
    resumed = run.restore(student=student, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
    if resumed and resumed["teacher_sha256"] != teacher_sha:
        raise UserError(f"cannot resume: --teacher {teacher_meta['path']} is not the teacher this run started from")
    for group in optimizer.param_groups:
        group["betas"] = (cfg.beta1, cfg.beta2)
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    run.begin(accelerator, dataset, evaluator)

    # Loop.
    loop = LoopTracker(run, accelerator, global_batch_size, resumed.get("skipped", 0))
    for step in loop.steps():
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        optimizer.zero_grad(set_to_none=True)
        for r in range(rounds):
            reals, labels = to_device(next(loader), device, labels=n_classes > 0)
            # One jump length n per round, the same on every process (its RNG ignores the rank): all ranks then run
            # the same number of teacher steps. Start and end times are per sample.
            jump_rng = torch.Generator().manual_seed(step_seed(cfg.seed, -1, step * rounds + r))
            jumps = sample_jumps(len(grid), reals.shape[0], cfg.jump_weighting, jump_rng, device, cfg.max_jump or None)
            # DDP: gradients are all-reduced only on the last round.
            with accelerator.no_sync(student) if r < rounds - 1 else nullcontext():
                loss, parts = distillation_loss(
                    cfg, student, target, teacher, dsm_loss_fn, distance, grid, reals, labels, jumps, rounds,
                    accelerator.autocast,
                )  # fmt: skip
                accelerator.backward(loss)
            loop.meters.add(**parts)
        applied, grad_norm = step_optimizer(accelerator, optimizer, student, cfg.grad_clip or float("inf"))

        # Update the EMA (the target network), only after an update that really happened.
        if applied:
            ema.update(unwrap(student), global_batch_size, (step + 1) * global_batch_size)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, applied, values={"lr": lr}, grad_norm=grad_norm)

        # Sample grids; evaluate the one-step EMA student; save checkpoints (also at a new best evaluation).
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(run, done, student, target, teacher, t_max, device)
        if run.eval_due(done):
            run.evaluate(accelerator, done, one_step_sampler(t_max), target, n_classes)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            grid_params = {"t_min": t_min, "t_max": t_max, "rho": rho}
            module = target if cfg.ema else student
            snapshot = checkpoint_snapshot(cfg, teacher, teacher_meta, teacher_sha, model_kwargs, module, grid_params)
            nets = dict(student=student, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
            run.save(
                accelerator, done, replicas=(student,), snapshot=snapshot, **nets,
                teacher_sha256=teacher_sha, skipped=loop.skips.total,
            )  # fmt: skip

    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
