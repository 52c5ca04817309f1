"""Train a Generalized Energy-Based Model (Arbel et al. 2021): a base generator and an energy, with the KALE criterion.

    python ebm_train.py --config configs/gebm/cifar10.yaml --dataset cifar10     # GEBM's training.yaml
    python ebm_train.py --config configs/gebm/fashion_mnist.yaml                 # the README's CPU run
    python ebm_train.py --config configs/gebm/gaussians.yaml                     # 2-D data, MLP base and energy
    python ebm_train.py --train_mode energy --g_path logs/<a GAN or GEBM run> ...   # an energy for a fixed base
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] ebm_train.py ...
    torchrun --nproc_per_node 2 ebm_train.py ...          # also on CPU (gloo)
    python ebm_train.py ... --resume latest               # continue bit-exactly
    python sample.py --checkpoint logs/<name> --latent_sampler lmc --num_sampler_steps 100 --out_dir samples/x
    python ebm_chain.py --checkpoint logs/<name> --eval_every 10 --out_dir chain/x   # FD/KALE along the chain

Arbel, Zhou & Gretton 2021, arXiv 2003.05033; facts from MichaelArbel/GeneralizedEBM (`trainer.py`, `compute.py`,
`configs/*.yaml`). The GEBM is Q(dx) = exp(-(D(x) + A)) G(dx): base G, energy D, log-partition A (one snapshot,
modelling/gebm.py). Every iteration takes one data batch and makes *either* an energy step (D and A minimise
L_E = mean(D(x) + A) + mean exp(-(D(G(z)) + A)) - 1 + lambda * penalty) *or* a base step (G minimises
-mean D(x) - log mean exp(-D(G(z)))), in GEBM's schedule (`is_base_step`): n_iter_d_init energy steps first, then
n_iter_d per base step, and up to n_iter_d_init again after every 500th base step. `--n_steps` counts iterations
of both kinds (GEBM's 150,000 base steps are 909,162 iterations at its defaults); `base_steps` is logged and
stored. `--train_mode energy|base` trains one network only (initialise the other with --g_path/--d_path).

The command line wins over --config (GEBM's YAML silently overrode the command line). `--batch_size` is per process;
the latent batch is `noise_factor` times it. The run folder, resume, EMA, evaluation and --only_test are those of
every genzoo script (utils/run.py): --eval_interval scores the base generator's samples (FD, as GEBM's in-loop FID),
--eval_metric kale scores KALE (logged, never a best checkpoint), --eval_kale logs KALE every --kale_interval.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate import Accelerator

from losses.kale import (
    PENALTIES,
    kale_base_loss,
    kale_energy_loss,
    kale_penalty,
    monte_carlo_log_partition,
    transform_gradients,
)
from metrics.evaluate import loop_evaluator, score_snapshot
from metrics.kale import KALEEvaluator
from modelling import build_gebm
from modelling.common import latent_batches, recalibrate_batchnorm
from modelling.gebm import BASES, ENERGIES
from sampling.latent_mcmc import gebm_images
from utils.ckpt import load_snapshot
from utils.cli import UserError, script_cli
from utils.data import DATASETS, TOY_DATASETS, build_dataset, to_device, train_batches
from utils.dist import set_backends, unwrap
from utils.ema import EMA, EmaConfig
from utils.grid import save_grid, save_scatter
from utils.optim import OPTIMIZERS, make_optimizer, set_hyperparameters, step_optimizer
from utils.run import EVAL_METRIC_CHOICES, Run, RunConfig
from utils.tracking import LoopTracker

GRID_ROWS = 10  # base-sample grids are 10 x 10; toy data: scatter plots of SCATTER_POINTS points
SCATTER_POINTS = 4000
LONG_ENERGY_PHASE_EVERY = 500  # GEBM: n_iter_d_init energy steps again after every 500th base step
LOG_PARTITION_BATCHES, LOG_PARTITION_BATCH = 100, 128  # GEBM's init_log_partition: 100 batches of sample_b_size
# A resumed run must match these; anything else (lr, penalty, train_mode, intervals) may change, with a note.
RESUME_KEYS = (
    "dataset",
    "img_size",
    "g_model",
    "d_model",
    "gen_kwargs",
    "disc_kwargs",
    "z_dim",
    "no_trunc",
    "optimizer",
)


@dataclass
class Config(EmaConfig, RunConfig):
    dataset: str = field(default="cifar10", metadata={"choices": DATASETS})
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download missing data"})
    img_size: int = 32
    g_model: str | None = field(
        default=None, metadata={"choices": sorted(BASES), "help": "base generator; default mlp on 2-D data, else dcgan"}
    )
    d_model: str | None = field(
        default=None, metadata={"choices": sorted(ENERGIES), "help": "energy network; default as --g_model"}
    )
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the base generator"})
    disc_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the energy network"})
    z_dim: int | None = field(default=None, metadata={"min": 1, "help": "default 2 on 2-D data, else 100"})
    no_trunc: bool = field(default=False, metadata={"help": "no energy floor (GEBM clamps D below at -10)"})
    g_path: str = field(default="", metadata={"help": "initialise the base from a GEBM or GAN snapshot / run folder"})
    d_path: str = field(default="", metadata={"help": "initialise the energy and A from a GEBM snapshot / run folder"})
    train_mode: str = field(default="both", metadata={"choices": ["both", "energy", "base"]})
    penalty_type: str = field(default="gradient_l2", metadata={"choices": PENALTIES})
    penalty_lambda: float = field(default=0.1, metadata={"min": 0})
    initialize_log_partition: bool = field(default=False, metadata={"help": "A <- Monte-Carlo log-partition at start"})
    n_iter_d_init: int = field(default=100, metadata={"min": 0, "help": "energy steps before base steps start"})
    n_iter_d: int = field(default=5, metadata={"min": 0, "help": "energy steps per base step"})
    noise_factor: int = field(default=1, metadata={"min": 1, "help": "latent batch = noise_factor x data batch"})
    batch_size: int = field(default=128, metadata={"min": 1, "aliases": ("b_size",), "help": "per process"})
    n_steps: int = field(default=909162, metadata={"min": 1, "help": "iterations (energy + base steps)"})
    optimizer: str = field(default="Adam", metadata={"choices": OPTIMIZERS})
    lr: float = field(default=1e-5, metadata={"help": "energy and log-partition"})
    lr_generator: float = 2e-4
    beta1: float = field(default=0.5, metadata={"aliases": ("beta_1",)})
    beta2: float = field(default=0.9, metadata={"aliases": ("beta_2",)})
    grad_transform: bool = field(
        default=True, metadata={"help": "GEBM's energy-gradient transform g -> 2g/(1+g^2) (GEBM's code: grad_clip)"}
    )
    use_scheduler: bool = field(default=False, metadata={"help": "both lrs x scheduler_gamma every interval"})
    scheduler_gamma: float = 0.8
    scheduler_interval: int = field(default=5000, metadata={"min": 1, "help": "base steps (energy mode: iterations)"})
    eval_kale: bool = field(default=False, metadata={"help": "log KALE on the train and test splits"})
    kale_interval: int = field(default=2000, metadata={"min": 1, "help": "iterations between --eval_kale"})
    eval_metric: str = field(default="auto", metadata={"choices": EVAL_METRIC_CHOICES + ["kale"], "help": "see README"})
    ema: bool = field(default=False, metadata={"help": "EMA of base, energy and A; grids and snapshots use it"})


def resolve_config(cfg: Config) -> Config:
    """Fill unset flags for the data (2-D toy data: `mlp` networks and a 2-D latent; images: DCGAN and GEBM's z 100),
    then refuse flag combinations that cannot work, before anything is written."""
    toy = cfg.dataset in TOY_DATASETS
    for name, value in (("g_model", "mlp" if toy else "dcgan"), ("d_model", "mlp" if toy else "dcgan")):
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.z_dim is None:
        cfg.z_dim = 2 if toy else 100
    cfg.check()
    toy_data, toy_nets = cfg.dataset in TOY_DATASETS, (cfg.g_model == "mlp", cfg.d_model == "mlp")
    if toy_nets != (toy_data, toy_data):
        raise UserError(
            f"--g_model {cfg.g_model} / --d_model {cfg.d_model} do not fit --dataset {cfg.dataset}: 2-D toy data "
            f"({', '.join(TOY_DATASETS)}) trains mlp networks, images the others"
        )
    if cfg.lr <= 0 or cfg.lr_generator <= 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError("--lr and --lr_generator must be > 0, --beta1 and --beta2 in [0, 1)")
    if not 0 < cfg.scheduler_gamma <= 1:
        raise UserError(f"--scheduler_gamma must be in (0, 1], got {cfg.scheduler_gamma}")
    fixed = sorted({"img_size", "img_channels", "z_dim", "dim"} & (set(cfg.gen_kwargs) | set(cfg.disc_kwargs)))
    if fixed:
        raise UserError(f"--gen_kwargs/--disc_kwargs may not set {fixed}: they come from the data, --img_size, --z_dim")
    return cfg


def is_base_step(counter: int, base_steps: int, cfg: Config) -> bool:
    """GEBM's `which_step` for iteration `counter` (1-based) after `base_steps` base steps: a base step iff
    counter % (n + 1) == 0 and counter > n_iter_d_init, with n = n_iter_d_init while fewer than 2 base steps were
    taken or right after every 500th, else n_iter_d. --train_mode energy / base: never / always."""
    if cfg.train_mode != "both":
        return cfg.train_mode == "base"
    long_phase = base_steps < 2 or base_steps % LONG_ENERGY_PHASE_EVERY == 0
    n = cfg.n_iter_d_init if long_phase else cfg.n_iter_d
    return counter % (n + 1) == 0 and counter > cfg.n_iter_d_init


def lr_factor(base_steps: int, step: int, cfg: Config) -> float:
    """--use_scheduler: both learning rates x scheduler_gamma after every scheduler_interval base steps (in
    --train_mode energy: iterations, `step` of them done). GEBM decays the same way (its 5,000 fixed) only without
    FID evaluation; its training.yaml evaluates FID every 2,000 base steps, and there the KID test takes the place
    of the plain decay, so the plain decay fires at 5k, 15k, 25k, ... base steps only (README)."""
    if not cfg.use_scheduler:
        return 1.0
    return cfg.scheduler_gamma ** ((step if cfg.train_mode == "energy" else base_steps) // cfg.scheduler_interval)


def energy_step_loss(gen, energy, reals, zs, cfg: Config, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The energy step's loss, minimised over D and A: L_E + penalty_lambda * penalty (losses/kale.py), with the
    fakes G(z) made without the base's graph, so the base receives no gradient. `energy` may be DDP-wrapped (A and
    the penalty come from the eager module); `scale` is the fp16 GradScaler's (the penalty's AMP recipe)."""
    with torch.no_grad():
        fakes = gen(zs)
    d_reals, d_fakes = energy(reals), energy(fakes)
    loss_e = kale_energy_loss(d_reals, d_fakes, unwrap(energy).log_partition)
    penalty = kale_penalty(cfg.penalty_type, unwrap(energy), reals, fakes, scale)
    stats = {"loss/energy": loss_e, "penalty": penalty, "d/real": d_reals.mean(), "d/fake": d_fakes.mean()}
    return loss_e + cfg.penalty_lambda * penalty, stats


def base_step_loss(gen, energy, reals, zs) -> tuple[torch.Tensor, dict]:
    """The base step's loss, minimised over G: L_G = -mean D(x) - log mean exp(-D(G(z))) (A replaced by its batch
    optimum). The energy runs frozen (eval mode, parameters without gradient while the graph is built), so backward
    reaches the base only. Also returns base/ess = 1 / sum_i w_i^2, the effective sample size of the weights
    w = softmax(-D(G(z))) that L_G's gradient puts on the fakes (N when they are equal, 1 when one fake takes all)."""
    energy.eval().requires_grad_(False)
    try:
        d_fakes = energy(gen(zs))
        with torch.no_grad():
            d_reals = energy(reals)
    finally:
        energy.train().requires_grad_(True)  # the graph is built: its energy parameters stay without gradient
    loss_g = kale_base_loss(d_reals, d_fakes)
    weights = torch.softmax(-d_fakes.detach().float(), dim=0)
    return loss_g, {"loss/base": loss_g, "base/ess": 1 / weights.square().sum()}


def iterations_for(n_base_steps: int, cfg: Config) -> int:
    """Iterations (--n_steps) that contain `n_base_steps` base steps in --train_mode both."""
    counter = base_steps = 0
    while base_steps < n_base_steps:
        counter += 1
        base_steps += is_base_step(counter, base_steps, cfg)
    return counter


def build_model(cfg: Config, sample_shape: tuple[int, ...]):
    """The GEBM (base + energy + A) and the kwargs that rebuild it (what the snapshot stores)."""
    if len(sample_shape) == 1:  # 2-D toy data
        gen_kwargs, disc_kwargs = dict(z_dim=cfg.z_dim, dim=sample_shape[0]), dict(dim=sample_shape[0])
    else:
        disc_kwargs = dict(img_size=cfg.img_size, img_channels=sample_shape[0])
        gen_kwargs = disc_kwargs | dict(z_dim=cfg.z_dim)
    model_kwargs = dict(
        g_model=cfg.g_model, gen_kwargs=gen_kwargs | cfg.gen_kwargs, d_model=cfg.d_model,
        disc_kwargs=disc_kwargs | cfg.disc_kwargs, energy_floor=None if cfg.no_trunc else -10.0,
    )  # fmt: skip
    try:
        return build_gebm("gebm", **model_kwargs), model_kwargs
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --g_model {cfg.g_model} / --d_model {cfg.d_model}: {e.args[0] if e.args else e}")


def load_pretrained(cfg: Config, model) -> None:
    """--g_path: the base from a GEBM snapshot (its base) or a GAN snapshot (its generator); --d_path: the energy
    and A from a GEBM snapshot. Loaded strictly: another architecture or size gives one line."""
    for flag, path, part, arch in (
        ("--g_path", cfg.g_path, "base", "--g_model"),
        ("--d_path", cfg.d_path, "energy", "--d_model"),
    ):
        if not path:
            continue
        meta, weights = load_snapshot(path)
        if meta["kind"] == "gebm":
            weights = {k[len(part) + 1 :]: v for k, v in weights.items() if k.startswith(part + ".")}
        elif not (meta["kind"] == "gan" and part == "base"):
            raise UserError(f"{flag} {path}: a {meta['kind']!r} snapshot has no {part} to load (needs a GEBM run)")
        try:
            getattr(model, part).load_state_dict(weights)
        except RuntimeError as e:
            detail = str(e).splitlines()[-1].strip()
            raise UserError(f"{flag} {path}: its {part} does not fit this {arch} and its kwargs ({detail})")


def kale_evaluator(cfg: Config, accelerator, dataset) -> KALEEvaluator:
    """KALE on the training split and, where the data has one, the test split (GEBM's kale_train / kale_test)."""
    test = None
    if cfg.dataset not in ("folder", "celeba"):  # these have no test split
        test = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, train=False, download=cfg.download)
    return KALEEvaluator(accelerator, cfg.eval_samples, dataset, test)


def kale_scores(result: dict) -> dict:
    """KALEEvaluator's result as run.evaluate/score_snapshot scores: KALE on the training split (the --eval_metric
    value), the test split's, and what they were computed from."""
    keys = ("kale_test", "n_samples", "log_partition", "fake_term", "seconds")
    return {"kale": result["value"]} | {k: result[k] for k in keys if k in result}


def initialize_log_partition(cfg: Config, accelerator: Accelerator, model) -> None:
    """A <- the Monte-Carlo log-partition of the initial networks, from the same latents on every rank, so every rank
    gets the same A; fakes as the energy step makes them (batch statistics: GEBM runs the base in eval mode here, on
    the running statistics of a base that has not trained yet)."""
    rng = torch.Generator().manual_seed(cfg.seed + 2)
    batches = [torch.randn(LOG_PARTITION_BATCH, cfg.z_dim, generator=rng) for _ in range(LOG_PARTITION_BATCHES)]
    model.base.train()
    model.energy.eval()
    log_partition = monte_carlo_log_partition(model.energy, model.base, (zs.to(accelerator.device) for zs in batches))
    model.energy.train()
    with torch.no_grad():
        model.energy.log_partition.fill_(log_partition.item())
    accelerator.print(f"initial log-partition A = {log_partition.item():.6f} (Monte-Carlo, {len(batches)} batches)")


def train_step(cfg: Config, accelerator: Accelerator, nets: dict, transform, reals, zs, base_step: bool):
    """One iteration: an energy step (D and A minimise L_E + lambda * penalty, then GEBM's gradient transform) or,
    when `base_step`, a base step (G minimises L_G through a frozen energy), each loss from its named step function.
    Returns (logged terms, whether the update was applied)."""
    gen, energy, optim_g, optim_e = (nets[k] for k in ("gen", "energy", "optim_g", "optim_e"))
    if not base_step:
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
        loss, stats = energy_step_loss(gen, energy, reals, zs, cfg, scale)
        optim_e.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        applied, _ = step_optimizer(accelerator, optim_e, energy, transform=transform)
    else:
        loss, stats = base_step_loss(gen, energy, reals, zs)
        optim_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        applied, _ = step_optimizer(accelerator, optim_g, gen)
    return stats, applied


@torch.no_grad()
def save_grids(run: Run, step: int, sources: list, eval_model, toy: bool, device) -> None:
    """Base samples of fixed seeds (MCMC belongs to sample.py) for each (tag, model) in `sources`, drawn from
    `eval_model(model)`: a scatter plot for 2-D toy data, else an image grid, as grids/<tag>-<step>.png."""
    seeds = list(range(SCATTER_POINTS if toy else GRID_ROWS**2))
    for tag, source in sources:
        samples, _ = gebm_images(eval_model(source), seeds, None, device)
        path = run.dir / "grids" / f"{tag}-{step:08d}.png"
        save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)


def main(cfg: Config) -> None:
    cfg = resolve_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    name = f"{cfg.dataset}_gebm_{cfg.g_model}_{cfg.d_model}"
    run = Run(cfg, name, RESUME_KEYS)

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main = accelerator.device, accelerator.is_main_process
    run.open(accelerator)

    # Data.
    with accelerator.main_process_first():  # only one process downloads, the others then find the files
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if cfg.only_test:
        kale_eval = kale_evaluator(cfg, accelerator, dataset) if cfg.eval_metric == "kale" else None
        score_snapshot(
            run, accelerator, dataset, scores_fn=lambda model, meta: kale_scores(kale_eval(gebm_images, model))
        )
        return
    toy = cfg.dataset in TOY_DATASETS
    loader = train_batches(dataset, cfg, accelerator, run.start_step)

    # Models. Same init on every rank; `model` holds the live base and energy (the EMA tracks it), `model_eval` is a
    # scratch copy for grids, evaluations and snapshots.
    torch.manual_seed(cfg.seed)
    model, model_kwargs = build_model(cfg, tuple(dataset.sample_shape))
    load_pretrained(cfg, model)
    model.to(device)
    if cfg.initialize_log_partition and run.start_step == 0:
        initialize_log_partition(cfg, accelerator, model)  # fresh start only
    ema = EMA(model, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    model_eval = build_gebm("gebm", **model_kwargs).to(device)
    if ema is not None:
        ema.module.to(device)
    gen, energy = model.base, model.energy

    # Optimizers: A is trained with the energy's optimizer and learning rate, as in GEBM.
    optim_g = make_optimizer(cfg.optimizer, gen.parameters(), cfg.lr_generator, (cfg.beta1, cfg.beta2))
    optim_e = make_optimizer(cfg.optimizer, energy.parameters(), cfg.lr, (cfg.beta1, cfg.beta2))

    # Prepare.
    gen, energy, optim_g, optim_e = accelerator.prepare(gen, energy, optim_g, optim_e)

    # Resume (learning rates and betas are set at every step, so new flags apply to the restored optimizers).
    nets = dict(gen=gen, energy=energy, optim_g=optim_g, optim_e=optim_e, ema=ema, scaler=accelerator.scaler)
    resumed = run.restore(**nets)
    base_steps = resumed.get("base_steps", 0)
    n_params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.base, model.energy)]
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    summary = f"GEBM base {cfg.g_model} {n_params[0]:.2f}M, energy {cfg.d_model} {n_params[1]:.2f}M"
    run.begin(accelerator, dataset, evaluator, summary)

    def eval_model(source) -> torch.nn.Module:
        """`model_eval` holding `source`'s base, energy and A, with the base's BatchNorm on standing statistics:
        eval mode, so every sample depends on its seed only (chains included)."""
        model_eval.load_state_dict(source.state_dict())
        recalibrate_batchnorm(model_eval.base, latent_batches(cfg.z_dim, 0, seed=cfg.seed + 1, device=device))
        return model_eval.eval()

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    kale_eval = kale_evaluator(cfg, accelerator, dataset) if cfg.eval_kale or cfg.eval_metric == "kale" else None
    transform = partial(transform_gradients, unwrap(energy)) if cfg.grad_transform else None
    for step in loop.steps():
        reals, _ = to_device(next(loader), device, labels=False)
        zs = torch.randn(cfg.noise_factor * reals.shape[0], cfg.z_dim, device=device)
        base_step = is_base_step(step + 1, base_steps, cfg)

        # Learning rates: GEBM's plain schedule (a pure function of the counters: resume needs no scheduler state).
        factor = lr_factor(base_steps, step, cfg)
        set_hyperparameters(optim_e, cfg.lr * factor, (cfg.beta1, cfg.beta2))
        set_hyperparameters(optim_g, cfg.lr_generator * factor, (cfg.beta1, cfg.beta2))

        stats, applied = train_step(cfg, accelerator, nets, transform, reals, zs, base_step)
        if base_step:
            base_steps += 1
        loop.meters.add(**stats)

        # Update EMA (base, energy and A together), only after an update that really happened.
        if ema is not None and applied:
            ema.update(model, images_per_step, (step + 1) * images_per_step)

        # Non-finite policy: skip the update and count it; stop after too many in a row (a diverged run).
        loop.skips.update(applied, step)

        # KALE on the train and test splits (GEBM's --eval_kale), logged with the step's row.
        done = step + 1
        extra = {}
        if kale_eval is not None and run.due(done, cfg.kale_interval):
            kale = kale_eval(gebm_images, eval_model(ema.module if ema else model))
            extra = {"kale/train": kale["value"]} | ({"kale/test": kale["kale_test"]} if "kale_test" in kale else {})

        # Log (reading the log partition is a host sync: only for a row).
        if run.due(done, cfg.log_interval) or extra:
            counters = {"base_steps": base_steps, "lr_factor": factor}
            loop.log(done, extra | {"log_partition": unwrap(energy).log_partition.item()} | counters, force=True)

        # Sample grids; evaluate (FD of the base samples, or KALE); save checkpoints (also at a new best).
        if is_main and run.due(done, cfg.sample_interval):
            sources = [("raw", model)] + ([("ema", ema.module)] if ema else [])
            save_grids(run, done, sources, eval_model, toy, device)
        if run.eval_due(done):
            scored = eval_model(ema.module if ema else model)
            if cfg.eval_metric == "kale":  # a family metric: computed here, passed as scores
                run.evaluate(accelerator, done, scores=kale_scores(kale_eval(gebm_images, scored)))
            else:
                run.evaluate(accelerator, done, gebm_images, scored, 0)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            module = eval_model(ema.module if ema else model)
            snapshot = dict(kind="gebm", model="gebm", model_kwargs=model_kwargs, module=module)
            run.save(accelerator, done, replicas=(gen, energy), snapshot=snapshot, **nets, skipped=loop.skips.total,
                     base_steps=base_steps)  # fmt: skip

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main, resolve=resolve_config)


if __name__ == "__main__":
    cli()
