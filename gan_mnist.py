"""Train a GAN (DCGAN, optionally class-conditional) on MNIST or Fashion-MNIST at 32x32.

    python gan_mnist.py --model dcgan --method gan --log_name mnist_dcgan --batch_size 32 --n_steps 100000 \
        --lr 2e-4 --beta1 0.5 --beta2 0.999 [--conditional] [--ema]
    python gan_mnist.py --dataset fashion_mnist --method wgan-gp --lr 1e-4 --beta1 0 --beta2 0.9 --train_g_interval 5
    python gan_mnist.py --method wgan --optimizer RMSprop --lr 5e-5 --batch_size 64 --train_g_interval 5
    python gan_mnist.py --method hinge --sn_disc --lr 1e-4 --beta1 0.5 --beta2 0.999
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] [--dynamo_backend inductor] gan_mnist.py ...
    torchrun --nproc_per_node 2 gan_mnist.py ...          # also on CPU (gloo)
    python gan_mnist.py ... --resume latest               # continue bit-exactly from logs/<log_name>/states

`--batch_size` is per process. Every random draw of a step is seeded from (seed, rank, step) and the data order is
a pure function of (seed, position), so a resumed run equals an uninterrupted one. Run folder logs/<log_name>/:
config.json, stats.jsonl, tb/ (TensorBoard), grids/{raw,ema}-<step>.png, snapshots/snapshot-<step>.safetensors
(what sample.py reads), states/state-<step>/ (full training state, the newest `--keep_states` kept).
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

from losses import ganzo_targets, get_gan_loss, gradient_penalty, soft_real_targets
from modelling import GENERATORS, build_discriminator, build_generator
from modelling.common import latent_batches, recalibrate_batchnorm
from utils.ckpt import (
    check_replicas_agree,
    check_resume_compatible,
    gan_state,
    load_gan_state,
    open_resume_state,
    save_snapshot,
    save_training_state,
    unwrap,
)
from utils.cli import UserError, parse, user_errors
from utils.data import MNIST_LIKE, build_dataset, make_loader, step_seed
from utils.ema import EMA
from utils.grid import save_grid
from utils.optim import OPTIMIZERS, make_optimizer, set_hyperparameters
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

# Fast paths on GPUs, set once in plain sight. TF32 matmuls are fine for GAN training (not for FID statistics).
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True

GRID_ROWS = 10  # sample grids are 10 x 10; conditional grids have one row per class
# A resumed run must match these; anything else (lr, n_steps, intervals) may change, with a note.
RESUME_KEYS = (
    "dataset",
    "img_size",
    "model",
    "gen_kwargs",
    "disc_kwargs",
    "z_dim",
    "conditional",
    "method",
    "sn_gen",
    "sn_disc",
    "optimizer",
)


@dataclass
class Config:
    dataset: str = field(default="mnist", metadata={"choices": sorted(MNIST_LIKE)})
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download missing data"})
    img_size: int = 32
    model: str = field(default="dcgan", metadata={"choices": sorted(GENERATORS)})
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the generator"})
    disc_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the discriminator"})
    z_dim: int = 128
    conditional: bool = False
    method: str = field(default="gan", metadata={"choices": ["gan", "wgan", "wgan-gp", "hinge"]})
    gp_lambda: float = field(default=10.0, metadata={"help": "WGAN-GP penalty weight"})
    clip_value: float = field(default=0.01, metadata={"help": "WGAN critic weight clipping"})
    sn_disc: bool = field(default=False, metadata={"help": "spectral norm on every D layer, no BatchNorm (SN-GAN)"})
    sn_gen: bool = field(default=False, metadata={"help": "spectral norm on every G layer (SA-GAN)"})
    soft_labels: bool = field(default=False, metadata={"help": "Ganzo: targets U[0.9,1] / U[0,0.1] (--method gan)"})
    noisy_labels: float = field(default=0.0, metadata={"help": "Ganzo: P(swap a term's targets) per D step"})
    batch_size: int = field(default=64, metadata={"help": "per process"})
    n_steps: int = field(default=10000, metadata={"help": "discriminator steps"})
    optimizer: str = field(default="Adam", metadata={"choices": OPTIMIZERS})
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    train_g_interval: int = field(default=1, metadata={"help": "one G step every k D steps (WGAN n_critic)"})
    ema: bool = field(default=False, metadata={"help": "keep an EMA generator; samples and snapshots use it"})
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = field(default=0.05, metadata={"help": "half-life <= ratio x images seen; 0 = off"})
    compile: bool = field(default=False, metadata={"help": "torch.compile G and D (the penalty stays eager)"})
    mixed_precision: str | None = field(
        default=None, metadata={"choices": ["no", "fp16", "bf16"], "help": "default: from accelerate launch"}
    )
    log_dir: str = "logs"
    log_name: str = field(default="", metadata={"help": "default: <dataset>_<model>_<method>[_cond]"})
    loggers: str = field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})
    log_interval: int = 100
    sample_interval: int = 1000
    checkpoint_interval: int = 5000
    keep_states: int = field(default=2, metadata={"help": "training states kept (>= 2)"})
    resume: str = field(default="", metadata={"help": "'latest' or a path to a run folder or state folder"})
    seed: int = 0
    max_skipped_steps: int = field(default=20, metadata={"help": "stop after this many non-finite steps in a row"})


def check_config(cfg: Config) -> None:
    """Refuse flag combinations that cannot work, before anything is written."""
    if cfg.method != "gan" and (cfg.soft_labels or cfg.noisy_labels):
        raise UserError(f"--soft_labels/--noisy_labels apply to --method gan only, not {cfg.method}")
    if not 0 <= cfg.noisy_labels <= 1:
        raise UserError(f"--noisy_labels is a probability in [0, 1], got {cfg.noisy_labels}")
    if cfg.method == "wgan-gp" and cfg.disc_kwargs.get("norm", "none") == "batch":
        raise UserError("--method wgan-gp needs a critic without BatchNorm (the penalty is per sample)")
    for name in ("batch_size", "n_steps", "train_g_interval", "log_interval", "sample_interval", "checkpoint_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.keep_states < 2:
        raise UserError("--keep_states must be >= 2: the newest state may be the one being written")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")


def build_models(cfg: Config, n_classes: int):
    gen_kwargs = (
        dict(img_size=cfg.img_size, img_channels=1, z_dim=cfg.z_dim, n_classes=n_classes, spectral_norm=cfg.sn_gen)
        | cfg.gen_kwargs
    )
    # The WGAN-GP critic has no BatchNorm by default: a per-sample gradient penalty is invalid with batch statistics.
    # Neither has SN-GAN's (spectral norm instead). An explicit --disc_kwargs '{"norm": ...}' overrides both.
    disc_kwargs = (
        dict(
            img_size=cfg.img_size,
            img_channels=1,
            n_classes=n_classes,
            spectral_norm=cfg.sn_disc,
            norm="none" if cfg.method == "wgan-gp" or cfg.sn_disc else "batch",
        )
        | cfg.disc_kwargs
    )
    try:
        return build_generator(cfg.model, **gen_kwargs), gen_kwargs, build_discriminator(cfg.model, **disc_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model}: {e.args[0] if e.args else e}")


def main(cfg: Config) -> None:
    check_config(cfg)
    log_name = cfg.log_name or f"{cfg.dataset}_{cfg.model}_{cfg.method}{'_cond' if cfg.conditional else ''}"
    run_dir = Path(cfg.log_dir) / log_name
    state, state_path = open_resume_state(cfg.resume, run_dir)
    if state is not None:
        changed = check_resume_compatible(state["config"], dataclasses.asdict(cfg), RESUME_KEYS)

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun on a CPU-only machine run DDP over gloo
        mixed_precision=cfg.mixed_precision,
        dynamo_backend="inductor" if cfg.compile else None,
        log_with=None if cfg.loggers == "none" else cfg.loggers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
    device, is_main = accelerator.device, accelerator.is_main_process
    if accelerator.mixed_precision == "fp16" and device.type == "cpu":
        accelerator.print(
            "note: Accelerate does not apply fp16 autocast on CPU; this run computes in fp32 (bf16 works)"
        )
    if state is not None:
        accelerator.print(
            f"resuming from {state_path} (step {state['step']})" + (f"; changed: {changed}" if changed else "")
        )
    elif cfg.resume:
        accelerator.print(f"--resume {cfg.resume}: no training state in {run_dir / 'states'}; starting from scratch")
    start_step = state["step"] if state else 0
    if start_step >= cfg.n_steps:
        raise UserError(f"the training state is at step {start_step} already; pass --n_steps > {start_step} to go on")

    # Data.
    with accelerator.main_process_first():  # only one process downloads, the others then find the files
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    n_classes = dataset.n_classes if cfg.conditional else 0
    loader = iter(
        make_loader(dataset, cfg.batch_size, accelerator.process_index, accelerator.num_processes, cfg.seed, start_step)
    )

    # Models. Same init on every rank; the EMA and the evaluation copy are made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    gen, gen_kwargs, disc = build_models(cfg, n_classes)
    ema = EMA(gen, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    gen_eval = build_generator(cfg.model, **gen_kwargs).to(device)  # scratch copy for grids and snapshots
    if ema is not None:
        ema.module.to(device)
    loss_fn = get_gan_loss(cfg.method)

    # Optimizers.
    optim_g = make_optimizer(cfg.optimizer, gen.parameters(), cfg.lr, (cfg.beta1, cfg.beta2))
    optim_d = make_optimizer(cfg.optimizer, disc.parameters(), cfg.lr, (cfg.beta1, cfg.beta2))

    # Prepare.
    gen, disc, optim_g, optim_d = accelerator.prepare(gen, disc, optim_g, optim_d)

    # Resume.
    skipped = 0
    if state is not None:
        load_gan_state(state, gen, disc, optim_g, optim_d, ema, accelerator.scaler)
        for optimizer in (optim_g, optim_d):  # the saved groups carry the old lr and betas
            set_hyperparameters(optimizer, cfg.lr, (cfg.beta1, cfg.beta2))
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
        f"mixed precision {accelerator.mixed_precision}, {len(dataset)} training images"
    )

    def eval_generator(source: torch.nn.Module) -> torch.nn.Module:
        """`gen_eval` holding `source`'s weights with standing BatchNorm statistics: batch-independent outputs."""
        gen_eval.load_state_dict(unwrap(source).state_dict())
        return recalibrate_batchnorm(gen_eval, latent_batches(cfg.z_dim, n_classes, seed=cfg.seed + 1, device=device))

    @torch.no_grad()
    def save_grids(step: int) -> None:
        rng = torch.Generator().manual_seed(cfg.seed)
        zs = torch.randn(GRID_ROWS**2, cfg.z_dim, generator=rng).to(device)
        labels = torch.arange(n_classes).repeat_interleave(GRID_ROWS**2 // n_classes).to(device) if n_classes else None
        for tag, source in [("raw", gen)] + ([("ema", ema.module)] if ema else []):
            save_grid(eval_generator(source)(zs, labels), run_dir / "grids" / f"{tag}-{step:08d}.png", nrow=GRID_ROWS)

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        digest = check_replicas_agree(accelerator, unwrap(gen), unwrap(disc))
        if is_main:
            train_state = gan_state(
                step, dataclasses.asdict(cfg), skips.total, gen, disc, optim_g, optim_d, ema, accelerator.scaler
            )
            save_training_state(run_dir / "states", step, train_state, keep=cfg.keep_states)
            snapshot_gen = eval_generator(ema.module if ema else gen)
            save_snapshot(
                run_dir / "snapshots" / f"snapshot-{step:08d}.safetensors",
                kind="gan",
                model_name=cfg.model,
                model_kwargs=gen_kwargs,
                state_dict=snapshot_gen.state_dict(),
                config=dataclasses.asdict(cfg),
                step=step,
            )
            tqdm.write(
                f"step {step}: saved training state and snapshot; parameters identical on "
                f"{accelerator.num_processes} process(es) (digest {digest:016x})"
            )
        accelerator.wait_for_everyone()

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    meters, clock = RunningMeans(), KimgClock(start_step, images_per_step)
    skips = SkipCounter(cfg.max_skipped_steps, run_dir / "states", skipped)
    pbar = progress(range(start_step, cfg.n_steps), is_main, initial=start_step, total=cfg.n_steps, desc=log_name)
    for step in pbar:
        torch.manual_seed(step_seed(cfg.seed, accelerator.process_index, step))
        reals, labels = next(loader)
        reals = reals.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if n_classes else None
        n = reals.shape[0]

        # Discriminator step: fakes come from the current G without building its graph.
        with torch.no_grad():
            fakes = gen(torch.randn(n, cfg.z_dim, device=device), labels)
        d_reals, d_fakes = disc(reals, labels), disc(fakes, labels)
        if cfg.method == "gan":
            real_targets, fake_targets = ganzo_targets(n, cfg.soft_labels, cfg.noisy_labels, device)
            loss_d = loss_fn.d_loss(d_reals, d_fakes, real_targets, fake_targets).mean()
        else:
            loss_d = loss_fn.d_loss(d_reals, d_fakes).mean()
        stats = {"loss/d": loss_d, "d/real": d_reals.mean(), "d/fake": d_fakes.mean()}
        if cfg.method == "wgan-gp":
            # Second-order gradients run on the eager module (never compiled); under fp16 the penalty is taken
            # from gradients of the scaled output, then unscaled (PyTorch's AMP gradient-penalty recipe).
            scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
            gp = gradient_penalty(unwrap(disc), reals, fakes, labels, scale=scale).mean()
            loss_d = loss_d + cfg.gp_lambda * gp
            stats["penalty/gp"] = gp
        optim_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        d_applied, _ = step_optimizer(accelerator, optim_d, disc)
        if cfg.method == "wgan":
            # Clip after the update (WGAN Algorithm 1), every critic parameter.
            with torch.no_grad():
                for p in disc.parameters():
                    p.clamp_(-cfg.clip_value, cfg.clip_value)

        # Generator step, every `train_g_interval` D steps; D is frozen so only G gets gradients.
        g_applied = True
        if step % cfg.train_g_interval == 0:
            disc.requires_grad_(False)
            d_fakes = disc(gen(torch.randn(n, cfg.z_dim, device=device), labels), labels)
            if cfg.method == "gan":
                loss_g = loss_fn.g_loss(d_fakes, soft_real_targets(n, cfg.soft_labels, device)).mean()
            else:
                loss_g = loss_fn.g_loss(d_fakes).mean()
            optim_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            disc.requires_grad_(True)
            g_applied, _ = step_optimizer(accelerator, optim_g, gen)
            stats["loss/g"] = loss_g

            # Update EMA, only after an update that really happened.
            if ema is not None and g_applied:
                # One EMA update per G step, which comes every train_g_interval steps of images_per_step images.
                ema.update(unwrap(gen), cfg.train_g_interval * images_per_step, (step + 1) * images_per_step)
        meters.add(**stats)

        # Non-finite policy: skip the update and count it; stop after too many in a row (a diverged run).
        skips.update(d_applied and g_applied, step)

        # Log.
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.n_steps:
            record = {
                "step": done,
                "n_steps": cfg.n_steps,
                **clock.tick(done),
                **meters.pop(accelerator),
                "skipped": skips.total,
                "mem_gb": peak_memory_gb(device),
            }
            write_log(accelerator, run_dir, record)

        # Save sample grids and checkpoints.
        if is_main and (done % cfg.sample_interval == 0 or done == cfg.n_steps):
            save_grids(done)
        if done % cfg.checkpoint_interval == 0 or done == cfg.n_steps:
            save_checkpoint(done)

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()


if __name__ == "__main__":
    with user_errors():
        main(parse(Config, description=__doc__.split("\n")[0]))
