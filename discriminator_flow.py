"""Train a Discriminator Flow (GPM: Franceschi et al. 2023, arXiv 2305.16150, Sec. 4.1), a GAN with no generator:
samples are particles moved from noise along the input gradient of one time-conditioned discriminator f(x, t).

    python discriminator_flow.py --dataset gaussians             # GPM's 2-D setting: vanilla loss, K 56, eta 20, MLP
    python discriminator_flow.py --dataset mnist                 # GPM's MNIST setting: IPM, K 64, eta 2, GP 0.04 at 0
    python discriminator_flow.py --dataset mnist --flow_steps 16 # eta 0.5: each step stays GPM's eta/K = 1/32
    python discriminator_flow.py --config configs/gpm/discr_flow_celeba.yaml --data_dir data   # ResNet, K 25
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] discriminator_flow.py ...
    torchrun --nproc_per_node 2 discriminator_flow.py ...        # also on CPU (gloo)
    python discriminator_flow.py ... --resume latest             # continue bit-exactly
    python sample.py --checkpoint logs/mnist_discr_flow --n_samples 100 --trajectory webp --out_dir samples/df

Each step (GPM `DiscrFlow.forward`): fresh particles z_0 ~ N(p_mean, p_std²) take K - 1 flow steps with the current
critic (sampling/particles.py), each sample keeps the state z_k of one random k in 0..K-1, and the critic takes one
optimizer step on its GAN loss between those particles and a real batch, both scored at t = k/K, plus a gradient
penalty. A step therefore costs K - 1 critic forwards and input gradients before the update. Flags left unset take
GPM's settings for the data (`GPM_SETTINGS`; config.json records them): --dataset gaussians/rings the gaussians
config, celeba the CelebA one, every other dataset the MNIST one. An unset --eta follows --flow_steps so that each
Euler step keeps GPM's size eta/K for the data (MNIST 2/64); a given --eta (flag or config file) is kept as is. The
log holds the critic's GAN term (loss/d), its total loss (loss/critic) and, with a penalty, critic/gap_over_2gp (1 is
a penalised IPM critic's equilibrium). The snapshot holds the critic (or its EMA with --ema) and its flow; sample.py
runs the flow from per-seed noise. The run folder, resume, evaluation (--eval_interval: FD of flowed samples, best
checkpoint, --only_test) and --delete are gan_mnist.py's (utils/run.py).
"""

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from losses import gradient_penalty
from losses.particle import PARTICLE_LOSSES, particle_loss
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import CRITICS, build_discr_flow
from sampling.particles import discr_flow_images, discriminator_flow
from utils.cli import UserError, script_cli
from utils.data import DATASETS, TOY_DATASETS, build_dataset, to_device, train_batches
from utils.dist import set_backends, unwrap
from utils.ema import EMA, EmaConfig
from utils.grid import save_grid, save_scatter
from utils.optim import set_hyperparameters, step_optimizer
from utils.run import Run, RunConfig
from utils.tracking import LoopTracker

GRID_ROWS = 10  # grids of 10 x 10 flowed images
SCATTER_POINTS = 2000  # 2-D data: flowed points per scatter plot
# GPM's config/discr_flow/{gaussians,mnist,celeba}/config.yaml: the values of every flag left unset. All three use
# Adam 2e-4 (0.5, 0.999), p ~ N(0, 1), no entropy noise and a zero-centred penalty (the code's default centre is 1).
GPM_SETTINGS = {
    "gaussians": dict(img_size=32, critic="mlp", loss="vanilla", flow_steps=56, eta=20.0, grad_penalty=0.0,
                      batch_size=128, n_steps=4000),
    "mnist": dict(img_size=32, critic="dcgan", loss="ipm", flow_steps=64, eta=2.0, grad_penalty=0.04,
                  batch_size=128, n_steps=200_000),
    "celeba": dict(img_size=64, critic="resnet", loss="ipm", flow_steps=25, eta=2.0, grad_penalty=0.05,
                   batch_size=64, n_steps=200_000),
}  # fmt: skip
# A resumed run must match these (the snapshot's flow is defined by them); lr, n_steps, intervals may change.
RESUME_KEYS = ("dataset", "img_size", "critic", "critic_kwargs", "loss", "flow_steps", "eta", "p_mean", "p_std")
RESUME_KEYS += ("entropy_reg",)


@dataclass
class Config(EmaConfig, RunConfig):
    dataset: str = field(default="mnist", metadata={"choices": DATASETS})
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download MNIST-like data"})
    img_size: int | None = field(default=None, metadata={"help": "default GPM's: 32 (MNIST padded), CelebA 64"})
    critic: str | None = field(default=None, metadata={"choices": sorted(CRITICS), "help": "default: see GPM_SETTINGS"})
    critic_kwargs: dict = field(default_factory=dict, metadata={"help": 'JSON, e.g. {"base_dim": 32, "init": ...}'})
    loss: str | None = field(default=None, metadata={"choices": sorted(PARTICLE_LOSSES)})
    flow_steps: int | None = field(
        default=None, metadata={"min": 1, "help": "K, Euler steps of the flow (GPM nb_steps)"}
    )
    eta: float | None = field(
        default=None,
        metadata={"help": "flow time: each step moves eta/K times the velocity; default GPM's eta/K for the data x K"},
    )
    p_mean: float = field(default=0.0, metadata={"help": "initial particles N(p_mean, p_std^2)"})
    p_std: float = 1.0
    entropy_reg: float = field(default=0.0, metadata={"min": 0, "help": "noise variance along the flow (GPM 0)"})
    grad_penalty: float | None = field(default=None, metadata={"min": 0, "help": "GP weight at interpolates; 0 = off"})
    grad_penalty_center: float = field(default=0.0, metadata={"help": "(||grad|| - center)^2; GPM configs 0"})
    batch_size: int | None = field(default=None, metadata={"min": 1, "help": "per process"})
    n_steps: int | None = field(default=None, metadata={"min": 1, "help": "critic steps; default GPM's"})
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema: bool = field(default=False, metadata={"help": "keep an EMA critic; grids, evaluation, snapshots use it"})


def gpm_settings(dataset: str) -> dict:
    return GPM_SETTINGS["gaussians" if dataset in TOY_DATASETS else "celeba" if dataset == "celeba" else "mnist"]


def resolve_config(cfg: Config) -> Config:
    """Fill unset flags with GPM's settings for the data, then refuse what cannot work, before anything is written."""
    settings = gpm_settings(cfg.dataset)
    for name, value in settings.items():
        if name != "eta" and getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.eta is None:  # GPM's step eta/K, not its eta: a fixed eta with a smaller K takes longer steps
        cfg.eta = settings["eta"] * cfg.flow_steps / settings["flow_steps"]
    cfg.check()
    if (cfg.dataset in TOY_DATASETS) != (cfg.critic == "mlp"):
        raise UserError(
            f"--critic {cfg.critic} does not fit --dataset {cfg.dataset}: 2-D toy data ({', '.join(TOY_DATASETS)}) "
            "takes --critic mlp, images dcgan or resnet"
        )
    fixed = sorted({"img_size", "img_channels", "dim"} & set(cfg.critic_kwargs))
    if fixed:
        raise UserError(f"--critic_kwargs may not set {fixed}: they come from the data and --img_size")
    if min(cfg.lr, cfg.eta, cfg.p_std) <= 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError("--lr, --eta and --p_std must be > 0, --beta1 and --beta2 in [0, 1)")
    return cfg


def build_model(cfg: Config, sample_shape: tuple[int, ...]):
    """The critic inside its flow, and the kwargs that rebuild it (what the snapshot stores)."""
    shape = (
        dict(dim=sample_shape[0])
        if len(sample_shape) == 1
        else dict(img_size=cfg.img_size, img_channels=sample_shape[0])
    )
    model_kwargs = dict(
        critic_kwargs=shape | cfg.critic_kwargs, loss=cfg.loss, n_steps=cfg.flow_steps, eta=cfg.eta,
        p_mean=cfg.p_mean, p_std=cfg.p_std, entropy_reg=cfg.entropy_reg,
    )  # fmt: skip
    try:
        return build_discr_flow(cfg.critic, **model_kwargs), model_kwargs
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --critic {cfg.critic} with {cfg.critic_kwargs}: {e.args[0] if e.args else e}")


def training_particles(flow_model, reals: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic step's particles (GPM `DiscrFlow.forward`): z_0 ~ N(p_mean, p_std²) like `reals`, K - 1 Euler steps
    z <- z + (eta/K)·u(z, k/K) of the current critic, every state kept, and per sample the state z_k of one k ~
    U{0..K-1} with its time t = k/K (z_K is never trained on). Returns (fakes, t), without parameter gradients."""
    K, n = flow_model.n_steps, reals.shape[0]
    z0 = flow_model.p_mean + flow_model.p_std * torch.randn_like(reals)
    states = discriminator_flow(flow_model, z0, num_steps=K - 1, trajectory=True, scale=scale)  # (K, B, ...)
    k = torch.randint(K, (n,), device=reals.device)
    return states[k, torch.arange(n, device=reals.device)], k.float() / K


def critic_loss(
    model, loss_fn, reals, fakes, t, grad_penalty: float, center: float = 0.0, scale: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """The critic's loss: its GAN loss between `reals` and `fakes`, both scored at the particles' times t, plus
    grad_penalty x the mean (||grad c(x_hat, t)|| - center)² at random interpolates (on the eager module: second-order
    gradients). Logged: the GAN term (loss/d), the total (loss/critic) and, with a penalty, the gap
    c(reals) - c(fakes) over 2·lambda·GP. An IPM critic's loss -gap + lambda·GP is stationary under rescaling c by a
    factor where gap = 2·lambda·GP, so a ratio near 1 is the penalised critic's equilibrium, not a divergence."""
    d_reals, d_fakes = model(reals, t), model(fakes, t)
    loss = loss_fn.d_loss(d_reals, d_fakes).mean()
    gap = d_reals.detach().float().mean() - d_fakes.detach().float().mean()
    stats = {"loss/d": loss.detach(), "d/real": d_reals.detach().mean(), "d/fake": d_fakes.detach().mean()}
    if grad_penalty > 0:
        gp = gradient_penalty(unwrap(model), reals, fakes, t, scale=scale, center=center).mean()
        loss = loss + grad_penalty * gp
        stats |= {"penalty/gp": gp.detach(), "critic/gap_over_2gp": gap / (2 * grad_penalty * gp.detach())}
    return loss, stats | {"loss/critic": loss.detach()}


def main(cfg: Config) -> None:
    cfg = resolve_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    run = Run(cfg, f"{cfg.dataset}_discr_flow", RESUME_KEYS)

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
    loader = train_batches(dataset, cfg, accelerator, run.start_step)

    # Model: the critic and its flow, no generator. Same init (and Fourier frequencies) on every rank; the EMA copy
    # is made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    model, model_kwargs = build_model(cfg, tuple(dataset.sample_shape))
    ema = EMA(model, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    if ema is not None:
        ema.module.to(device)
    loss_fn = particle_loss(cfg.loss)

    # Optimizer.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    # Prepare.
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume: the saved groups carry the old lr and betas, so the current flags are applied again.
    resumed = run.restore(critic=model, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
    set_hyperparameters(optimizer, cfg.lr, (cfg.beta1, cfg.beta2))
    n_params = sum(p.numel() for p in unwrap(model).parameters()) / 1e6
    flow = f"{cfg.loss} flow, K {cfg.flow_steps}, eta {cfg.eta:g} (step {cfg.eta / cfg.flow_steps:.4g})"
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    run.begin(accelerator, dataset, evaluator, f"{cfg.critic} critic ({n_params:.2f}M parameters), {flow}")

    @torch.no_grad()
    def save_grids(step: int) -> None:
        """Flows of fixed seeds 0.. with the raw and the EMA critic (the sampler sample.py runs)."""
        toy = len(dataset.sample_shape) == 1
        seeds = list(range(SCATTER_POINTS if toy else GRID_ROWS**2))
        for tag, source in [("raw", unwrap(model))] + ([("ema", ema.module)] if ema else []):
            samples, _ = discr_flow_images(source, seeds, None, device)
            path = run.dir / "grids" / f"{tag}-{step:08d}.png"
            save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    for step in loop.steps():
        reals, _ = to_device(next(loader), device, labels=False)
        # Under fp16 the input gradients of the flow and of the penalty follow PyTorch's AMP recipe (scaled, then
        # unscaled in fp32); the particles themselves stay fp32.
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0

        # Simulate particles: K - 1 steps of the current critic's flow from fresh noise, one state per sample at a
        # random time. The plain module runs them (no DDP forward without a backward) without parameter gradients.
        flow_model = unwrap(model).requires_grad_(False)
        with accelerator.autocast():
            fakes, t = training_particles(flow_model, reals, scale)
        flow_model.requires_grad_(True)

        # Critic step: the GAN loss between particles and reals at the particles' times, plus the gradient penalty.
        loss_d, stats = critic_loss(
            model, loss_fn, reals, fakes, t, cfg.grad_penalty, center=cfg.grad_penalty_center, scale=scale
        )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        applied, grad_norm = step_optimizer(accelerator, optimizer, model)

        # Update EMA, only after an update that really happened.
        if ema is not None and applied:
            ema.update(unwrap(model), images_per_step, (step + 1) * images_per_step)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, applied, stats, grad_norm=grad_norm)

        # Sample grids; evaluate the flow of the EMA (or raw) critic; save checkpoints (also at a new best).
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(done)
        if run.eval_due(done):
            run.evaluate(accelerator, done, discr_flow_images, ema.module if ema else unwrap(model), 0)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            snapshot = dict(
                kind="discr_flow", model=cfg.critic, model_kwargs=model_kwargs, module=ema.module if ema else model
            )
            nets = dict(critic=model, optimizer=optimizer, ema=ema, scaler=accelerator.scaler)
            run.save(accelerator, done, replicas=(model,), snapshot=snapshot, **nets, skipped=loop.skips.total)

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main, resolve=resolve_config)


if __name__ == "__main__":
    cli()
