"""Train a diffusion denoiser: EDM (Karras et al. 2022) or the Föllmer stochastic interpolant (CharacteristicGenerator's
"denoiser matching"), on images with a DDPM++ U-Net or on 2-D toy data with a small MLP.

    python diffusion_train.py --method edm --dataset fashion_mnist --model ddpmpp-small --n_steps 20000 [--conditional]
    python diffusion_train.py --method follmer --dataset mnist --img_size 28 --model ddpmpp-mnist --optimizer RAdam \
        --lr 1e-3 --workdir logs/mnist-denoiser
    python diffusion_train.py --method edm --dataset cifar10 --model ddpmpp-cifar --batch_size 128 --lr 1e-3
    python diffusion_train.py --method edm --dataset gaussians --model mlp --sigma_data 2.2 --batch_size 256
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] diffusion_train.py ...
    torchrun --nproc_per_node 2 diffusion_train.py ...       # also on CPU (gloo)
    python diffusion_train.py ... --resume latest            # continue bit-exactly

Sample a snapshot with sample.py (every ODE/SDE solver); score it with fid.py. `--batch_size` is per process;
`--model` names a preset (`ddpmpp-small|mnist|cifar`, `mlp`) and `--net_kwargs` overrides its fields. The run
folder (logs/<log_name>, or --workdir), resume, evaluation (--eval_interval: FD of the EMA denoiser's samples,
best checkpoint, --only_test) and --delete are gan_mnist.py's (utils/run.py). Each step draws its noise from a seed
of (seed, rank, step), so a resumed run equals an uninterrupted one.
"""

import json
import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from losses import get_diffusion_loss
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import DENOISERS, NETWORK_PRESETS, build_denoiser
from sampling import diffusion_images
from sampling.diffusion import StackedNoise, sample
from utils.cli import UserError, script_cli
from utils.data import DATASETS, TOY_DATASETS, build_dataset, conditioning_classes, to_device, train_batches
from utils.dist import set_backends, unwrap
from utils.ema import EMA, EmaConfig
from utils.grid import save_grid, save_scatter
from utils.optim import step_optimizer
from utils.run import Run, RunConfig
from utils.tracking import LoopTracker

GRID_ROWS = 10  # image grids are 10 x 10; conditional ones hold the classes in turn (one per row for 10 classes)
GRID_STEPS = 18  # in-loop grids use each method's default solver with 18 grid points (EDM Heun: NFE 35)
SCATTER_POINTS = 4000  # toy data: points per scatter plot
# A resumed run must match these; anything else (lr, n_steps, intervals, loss_kwargs) may change, with a note.
RESUME_KEYS = ("dataset", "img_size", "method", "model", "net_kwargs", "conditional", "sigma_data", "optimizer")


@dataclass
class Config(EmaConfig, RunConfig):
    dataset: str = field(default="fashion_mnist", metadata={"choices": DATASETS})
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download missing data"})
    img_size: int = 32
    method: str = field(default="edm", metadata={"choices": sorted(DENOISERS)})
    model: str = field(default="ddpmpp-small", metadata={"choices": sorted(NETWORK_PRESETS)})
    net_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, overrides the --model preset"})
    conditional: bool = False
    sigma_data: float | None = field(default=None, metadata={"help": "data std; default EDM 0.5, Föllmer 1"})
    loss_kwargs: dict = field(
        default_factory=dict, metadata={"help": 'JSON: EDM {"P_mean": -1.2, "P_std": 1.2}, Föllmer {"eps0": 1e-5}'}
    )
    batch_size: int = field(default=64, metadata={"min": 1, "help": "per process"})
    n_steps: int = 20000
    optimizer: str = field(default="Adam", metadata={"choices": ["Adam", "AdamW", "RAdam"]})
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    lr_rampup_kimg: float = field(default=10.0, metadata={"min": 0, "help": "linear learning-rate warm-up, in kimg"})
    grad_clip: float | None = field(
        default=None,
        metadata={"help": "max gradient norm, 0 = none; default EDM none, Föllmer 1 (CharacteristicGenerator)"},
    )
    ema: bool = field(default=True, metadata={"help": "keep an EMA denoiser; samples and snapshots use it"})
    ema_halflife_kimg: float = 500.0
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "fixed decay, min(decay, (1+k)/(10+k)) at step k (CharacteristicGenerator: 0.999); None = half-life"
        },
    )
    sample_interval: int = 2000


def check_config(cfg: Config) -> None:
    """Refuse flag combinations that cannot work, before anything is written."""
    cfg.check()
    toy_data, toy_net = cfg.dataset in TOY_DATASETS, NETWORK_PRESETS[cfg.model][0] == "mlp"
    if toy_data != toy_net:
        raise UserError(
            f"--model {cfg.model} does not fit --dataset {cfg.dataset}: 2-D toy data ({', '.join(TOY_DATASETS)}) "
            "trains --model mlp, images train a ddpmpp-* U-Net"
        )
    if cfg.lr <= 0 or (cfg.grad_clip or 0) < 0:
        raise UserError("--lr must be > 0, --grad_clip >= 0")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1) or cfg.img_size < 1:
        raise UserError("--beta1 and --beta2 must be in [0, 1), --img_size >= 1")
    fixed = sorted({"img_size", "img_channels", "dim", "n_classes"} & set(cfg.net_kwargs))
    if fixed:
        raise UserError(f"--net_kwargs may not set {fixed}: they come from the data and --img_size/--conditional")
    if cfg.ema_decay is not None and not cfg.ema:
        raise UserError("--ema_decay sets the EMA's decay: it needs --ema (it was given with --no-ema)")
    if cfg.sigma_data is not None and cfg.sigma_data <= 0:
        raise UserError(f"--sigma_data must be > 0, got {cfg.sigma_data}")


def build_model(cfg: Config, sample_shape: tuple[int, ...], n_classes: int):
    """The denoiser and the kwargs that rebuild it (what the snapshot stores)."""
    net_name, preset = NETWORK_PRESETS[cfg.model]
    if net_name == "mlp":
        shape_kwargs = dict(dim=sample_shape[0])
    else:
        shape_kwargs = dict(img_size=cfg.img_size, img_channels=sample_shape[0])
    net_kwargs = preset | shape_kwargs | dict(n_classes=n_classes) | cfg.net_kwargs
    model_kwargs = dict(net=net_name, net_kwargs=net_kwargs)
    if cfg.sigma_data is not None:
        model_kwargs["sigma_data"] = cfg.sigma_data
    try:
        return build_denoiser(cfg.method, **model_kwargs), model_kwargs
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model} with {cfg.net_kwargs}: {e.args[0] if e.args else e}")


def learning_rate(cfg: Config, step: int, images_per_step: int) -> float:
    """EDM's linear warm-up in images seen before this step (training_loop.py): lr·min(nimg / (rampup·1000), 1), so
    the first step has lr 0; a pure function of the step, so a resumed run sets the same rates."""
    if cfg.lr_rampup_kimg <= 0:
        return cfg.lr
    return cfg.lr * min(step * images_per_step / (cfg.lr_rampup_kimg * 1000), 1.0)


def max_grad_norm(cfg: Config) -> float:
    """The clipping threshold: --grad_clip, else EDM unclipped and Föllmer 1 (CharacteristicGenerator); 0 = none (inf).
    EDM's loss is a per-image sum over pixels, so its gradient norms are ~d times Föllmer's per-pixel mean: a threshold
    tuned for one is meaningless for the other."""
    grad_clip = cfg.grad_clip if cfg.grad_clip is not None else (0.0 if cfg.method == "edm" else 1.0)
    return grad_clip or float("inf")


def denoiser_loss(denoiser, loss_fn, reals: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The loss of one denoiser step: `loss_fn` draws each sample's noise level and noise and returns its weighted
    error (EDM: lambda(sigma)-weighted, summed over elements; Föllmer: lambda(t)-weighted, averaged over elements);
    the step averages over the batch. No loss scaling, no label dropout: the labels are always given."""
    return loss_fn(denoiser, reals, labels).mean()


@torch.no_grad()
def class_means(dataset, n_classes: int, chunk: int = 4096) -> torch.Tensor:
    """Per-class mean of the training data (row 0 = overall mean when unconditional), float64 accumulation. Chunks
    of at most 2^25 values, so that large images do not bring the whole set into memory as floats at once."""
    chunk = max(1, min(chunk, 2**25 // math.prod(dataset.sample_shape)))
    sums = torch.zeros(max(n_classes, 1), *dataset.sample_shape, dtype=torch.float64)
    counts = torch.zeros(max(n_classes, 1), dtype=torch.float64)
    for start in range(0, len(dataset), chunk):
        reals, labels = dataset[list(range(start, min(start + chunk, len(dataset))))]
        rows = labels if n_classes else torch.zeros_like(labels)
        sums.index_add_(0, rows, reals.double())
        counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    return (sums / counts.clamp(min=1).reshape(-1, *[1] * len(dataset.sample_shape))).float()


def main(cfg: Config) -> None:
    check_config(cfg)
    run = Run(cfg, f"{cfg.dataset}_{cfg.method}_{cfg.model}{'_cond' if cfg.conditional else ''}", RESUME_KEYS)

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main = accelerator.device, accelerator.is_main_process
    run.open(accelerator)

    # Data.
    with accelerator.main_process_first():  # only one process downloads, the others then find the files
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if cfg.only_test:
        score_snapshot(run, accelerator, dataset)
        return
    n_classes = conditioning_classes(cfg, dataset)
    loader = train_batches(dataset, cfg, accelerator, run.start_step)

    # Models. Same init on every rank; the EMA is made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    denoiser, model_kwargs = build_model(cfg, tuple(dataset.sample_shape), n_classes)
    if hasattr(denoiser, "data_mean"):  # Föllmer's exact first sampling step needs E[x0 | class]
        denoiser.data_mean.copy_(class_means(dataset, n_classes))
    ema = EMA(denoiser, cfg.ema_halflife_kimg, cfg.ema_rampup, cfg.ema_decay) if cfg.ema else None
    if ema is not None:
        ema.module.to(device)
    try:
        loss_fn = get_diffusion_loss(cfg.method, **cfg.loss_kwargs)
    except TypeError as e:
        raise UserError(f"--loss_kwargs {json.dumps(cfg.loss_kwargs)} do not fit --method {cfg.method}: {e}")

    # Optimizer.
    optimizer = getattr(torch.optim, cfg.optimizer)(denoiser.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    # Prepare.
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)

    # Resume: the saved groups carry the old betas (lr is set every step).
    resumed = run.restore(denoiser=denoiser, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
    for group in optimizer.param_groups:
        group["betas"] = (cfg.beta1, cfg.beta2)
    n_params = sum(p.numel() for p in unwrap(denoiser).parameters()) / 1e6
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    summary = f"{cfg.method} denoiser, {cfg.model} network ({n_params:.2f}M parameters)"
    run.begin(accelerator, dataset, evaluator, summary)

    @torch.no_grad()
    def save_grids(step: int) -> None:
        """Sample fixed seeds 0.. with the raw and the EMA denoiser (eval mode: no dropout)."""
        toy = cfg.dataset in TOY_DATASETS
        n = SCATTER_POINTS if toy else GRID_ROWS**2
        labels = None
        if n_classes:
            labels = torch.arange(n_classes).repeat_interleave(-(-n // n_classes))[:n].to(device)
        for tag, source in [("raw", unwrap(denoiser))] + ([("ema", ema.module)] if ema else []):
            was_training = source.training
            samples, _ = sample(source.eval(), StackedNoise(range(n)), labels, num_steps=GRID_STEPS, device=device)
            source.train(was_training)
            path = run.dir / "grids" / f"{tag}-{step:08d}.png"
            save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)

    # Loop.
    grad_clip = max_grad_norm(cfg)
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    for step in loop.steps():
        reals, labels = to_device(next(loader), device, labels=n_classes > 0)

        # Learning-rate warm-up, linear in images seen (EDM's lr_rampup_kimg).
        lr = learning_rate(cfg, step, images_per_step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Denoiser step: the loss draws its own noise levels and noise.
        loss = denoiser_loss(denoiser, loss_fn, reals, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        applied, grad_norm = step_optimizer(accelerator, optimizer, denoiser, grad_clip)

        # Update EMA, only after an update that really happened.
        if ema is not None and applied:
            ema.update(unwrap(denoiser), images_per_step, (step + 1) * images_per_step)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, applied, {"loss/denoise": loss}, {"lr": lr}, grad_norm)

        # Sample grids; evaluate the EMA denoiser (its default solver); save checkpoints (also at a new best).
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(done)
        if run.eval_due(done):
            run.evaluate(
                accelerator, done, diffusion_images, (ema.module if ema else unwrap(denoiser)).eval(), n_classes
            )
            unwrap(denoiser).train()
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            snapshot = dict(
                kind="diffusion", model=cfg.method, model_kwargs=model_kwargs, module=ema.module if ema else denoiser
            )
            nets = dict(denoiser=denoiser, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
            run.save(accelerator, done, replicas=(denoiser,), snapshot=snapshot, **nets, skipped=loop.skips.total)

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
