"""Latent MCMC for Generalized EBMs: sample z from the latent posterior, then x = G(z).

Arbel, Zhou & Gretton 2021, arXiv 2003.05033, Sec. 4 (sampling GEBMs in latent space). Reference code read for
facts: MichaelArbel/GeneralizedEBM `samplers.py`, `helpers.get_latent_sampler`, `trainer.sample`.

Potential: U(z) = ||z||^2 / 2 + T * D(G(z)), i.e. -log eta(z) + T * E(G(z)) up to a constant, eta = N(0, I),
T = --temperature (GEBM's default 100 multiplies the energy: an inverse temperature; T = 1 is the GEBM's own
posterior). Gradients by autograd through G and D in eval mode. Step size gamma = --lmc_gamma, in GEBM's
parametrisation for each sampler (they differ: MALA's drift is twice ULA's for the same gamma):
- `langevin` (ULA):  z <- z - (gamma/2) grad U(z) + sqrt(gamma) xi. No correction: stationary law biased by the
  step (on N(0, 1) its variance is exactly 1 / (1 - gamma/4)).
- `mala`: z' = z - gamma grad U(z) + sqrt(2 gamma) xi, accepted with prob. min(1, exp(a)),
  a = U(z) - U(z') + ||xi||^2 / 2 - ||z - z' + gamma grad U(z')||^2 / (4 gamma).
- `lmc` (underdamped/kinetic Langevin, "ABOBA", unit mass, v_0 = 0), h = 2 sqrt(gamma), kappa = --lmc_kappa the
  friction: z_h = z + (h/2) v; g = grad U(z_h); v_h = v - (h/2) g; v~ = C v_h + S xi; v = v~ - (h/2) g;
  z = z_h + (h/2) v, with C = exp(-kappa h), S = sqrt(1 - exp(-2 kappa h)). No correction.
- `hmc`: fresh v ~ N(0, I), L = 2 leapfrog steps of size h = 2 sqrt(gamma), accepted with prob.
  min(1, exp(H(z, v) - H(z', v'))), H = U + ||v||^2 / 2.
- `zero_temperature_langevin`: ULA without noise (gradient descent on U, to a mode of the latent posterior).
- `mh`: random-walk Metropolis, z' = z + sqrt(gamma) xi, accepted with prob. min(1, exp(U(z) - U(z'))).
Step decay (GEBM's sampling run): step k = 1, 2, ... uses gamma * decay^floor((k - 1) / every); 0.1 every 200.

Where genzoo differs from GEBM's code (all follow the maths): MALA's last term is ||.||^2 / (4 gamma) (GEBM writes
`1./4*gamma`, i.e. gamma/4, which breaks detailed balance unless gamma = 1); HMC's first half-kick uses the gradient
at the chain's current state (GEBM caches the last *proposal's* gradient across iterations and batches, so after a
rejection the leapfrog starts from a stale gradient); `zero_temperature_langevin` descends the full potential
(GEBM's drops the prior term ||z||^2 / 2 and the temperature); HMC always takes L = 2 (GEBM parses 10-20 and then
overrides them with 2). Every chain draws its noise from its own generator seeded with its seed (`ChainNoise`), so
a chain does not depend on the batch it runs in.
"""

import math
from dataclasses import dataclass, field

import torch

SAMPLERS = ["langevin", "mala", "lmc", "hmc", "zero_temperature_langevin", "mh"]
METROPOLIS = {"mala", "hmc", "mh"}  # samplers with an accept/reject step: acceptance rates are reported
HMC_LEAPFROG_STEPS = 2  # GEBM's effective L
# The seed's sampling run (GEBM sampling.yaml, README): the defaults sample.py and ebm_chain.py resolve to.
SEED_DEFAULTS = dict(
    latent_sampler="langevin",
    num_sampler_steps=1000,
    lmc_gamma=1e-4,
    lmc_kappa=100.0,
    temperature=100.0,
    lmc_gamma_decay=0.1,
    lmc_gamma_decay_every=200,
)


@dataclass
class LatentMcmcConfig:
    """The latent-MCMC flags of sample.py and ebm_chain.py (GEBM's names), read by `latent_sampler_settings`;
    None = the seed's sampling run's value (`SEED_DEFAULTS`, in brackets in the help)."""

    latent_sampler: str | None = field(default=None, metadata={"choices": SAMPLERS, "help": "latent MCMC (langevin)"})
    num_sampler_steps: int | None = field(default=None, metadata={"help": "MCMC steps (1000); 0 = the base generator"})
    lmc_gamma: float | None = field(default=None, metadata={"help": "step size gamma (1e-4)"})
    lmc_kappa: float | None = field(default=None, metadata={"help": "lmc: friction (100)"})
    temperature: float | None = field(default=None, metadata={"help": "multiplies the energy (100); 1: the GEBM"})
    lmc_gamma_decay: float | None = field(default=None, metadata={"help": "gamma x this every ... steps (0.1)"})
    lmc_gamma_decay_every: int | None = field(default=None, metadata={"help": "... this many steps (200)"})


class ChainNoise:
    """One torch.Generator per chain, seeded with the chain's seed. Its first draw is the chain's start z, the very
    latent a GAN snapshot would turn into image `seed` (sampling.seed_latents); later draws are the sampler's."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(dim, generator=g) for g in self.generators]).to(device, dtype)  # (N, dim)

    def rand(self, device=None) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(device)  # (N,)


def latent_potential(model, temperature: float):
    """U(z) = ||z||^2 / 2 + T * D(G(z)) for a GEBM (modelling/gebm.py), per chain (N,)."""

    def potential(zs: torch.Tensor) -> torch.Tensor:
        return 0.5 * zs.square().sum(dim=1) + temperature * model.energy(model.base(zs))

    return potential


def _value_and_grad(potential, zs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        zs = zs.detach().requires_grad_(True)
        u = potential(zs)
        (grad,) = torch.autograd.grad(u.sum(), zs)  # chains are independent: d(sum)/dz_i = dU(z_i)/dz_i
    return u.detach(), grad.detach()


def _accept(log_alpha: torch.Tensor, noise) -> torch.Tensor:
    """Metropolis decision per chain: u < min(1, exp(log_alpha)), u ~ U[0, 1) from the chain's own generator."""
    u = noise.rand(log_alpha.device).double()
    return u < log_alpha.clamp(max=0).exp()


class LatentChains:
    """A batch of chains advanced in chunks: `advance(k)` runs k more steps, exactly as one longer run would
    (the step counter drives the decay, the noise streams and cached values carry over)."""

    def __init__(
        self,
        potential,  # zs (N, d) -> U (N,)
        zs: torch.Tensor,  # start (N, d)
        noise,  # ChainNoise, or anything with randn(dim, device, dtype) -> (N, dim) and rand(device) -> (N,)
        sampler: str = "langevin",
        gamma: float = 1e-4,
        kappa: float = 100.0,  # lmc friction
        gamma_decay: float = 1.0,
        decay_every: int = 200,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown latent sampler {sampler!r}; valid: {SAMPLERS}")
        self.potential, self.noise, self.sampler = potential, noise, sampler
        self.gamma, self.kappa, self.gamma_decay, self.decay_every = gamma, kappa, gamma_decay, decay_every
        self.z = zs.detach().clone()
        self.v = torch.zeros_like(self.z)  # lmc velocity
        self.u = self.grad = None  # U and grad U at the current state (MALA, HMC, MH), computed once per state
        self.steps, self.nfe = 0, 0  # steps taken; potential evaluations per chain (with gradient, except mh)
        self.accepted = torch.zeros(len(self.z), dtype=torch.int64, device=self.z.device)
        self.accepted_per_step: list[int] = []  # chains accepting at each step (Metropolis samplers)

    def gamma_at(self, step: int) -> float:
        """Step size of step `step` (1-based): gamma * decay^floor((step - 1) / every)."""
        return self.gamma * self.gamma_decay ** ((step - 1) // self.decay_every)

    def advance(self, n_steps: int) -> torch.Tensor:
        update = getattr(self, f"_{self.sampler}")
        for _ in range(n_steps):
            self.steps += 1
            accepted = update(self.gamma_at(self.steps))
            if accepted is not None:
                self.accepted += accepted
                self.accepted_per_step.append(int(accepted.sum()))
        return self.z

    def _xi(self) -> torch.Tensor:
        return self.noise.randn(self.z.shape[1], self.z.device, self.z.dtype)

    def _eval(self, zs, grad: bool = True):
        self.nfe += 1
        if grad:
            return _value_and_grad(self.potential, zs)
        with torch.no_grad():
            return self.potential(zs), None

    def _ensure_cached(self, grad: bool = True) -> None:
        if self.u is None:
            self.u, self.grad = self._eval(self.z, grad)

    def _langevin(self, gamma: float):
        _, grad = self._eval(self.z)
        self.z = self.z - gamma / 2 * grad + math.sqrt(gamma) * self._xi()

    def _zero_temperature_langevin(self, gamma: float):
        _, grad = self._eval(self.z)
        self.z = self.z - gamma / 2 * grad

    def _mala(self, gamma: float) -> torch.Tensor:
        self._ensure_cached()
        xi = self._xi()
        proposal = self.z - gamma * self.grad + math.sqrt(2 * gamma) * xi
        u_new, grad_new = self._eval(proposal)
        # log q(z | z') - log q(z' | z): the forward move's noise is xi, the reverse one's is (z - z' + gamma grad')
        # / sqrt(2 gamma); both Gaussian with variance 2 gamma per coordinate.
        backward = self.z - proposal + gamma * grad_new
        log_alpha = (self.u - u_new).double() + 0.5 * xi.double().square().sum(1)
        log_alpha = log_alpha - backward.double().square().sum(1) / (4 * gamma)
        accept = _accept(log_alpha, self.noise)
        self._keep(accept, proposal, u_new, grad_new)
        return accept

    def _hmc(self, gamma: float) -> torch.Tensor:
        self._ensure_cached()
        h = 2 * math.sqrt(gamma)
        v0 = self._xi()
        z, v, grad = self.z, v0, self.grad  # the leapfrog starts from the gradient at the current state
        for _ in range(HMC_LEAPFROG_STEPS):
            v = v - h / 2 * grad
            z = z + h * v
            u_new, grad = self._eval(z)
            v = v - h / 2 * grad
        # H = U + ||v||^2 / 2; negating v' (reversibility) leaves H unchanged.
        log_alpha = (self.u - u_new).double() + 0.5 * (v0.double().square().sum(1) - v.double().square().sum(1))
        accept = _accept(log_alpha, self.noise)
        self._keep(accept, z, u_new, grad)
        return accept

    def _lmc(self, gamma: float):
        h = 2 * math.sqrt(gamma)
        c, s = math.exp(-self.kappa * h), math.sqrt(-math.expm1(-2 * self.kappa * h))
        z_half = self.z + h / 2 * self.v
        _, grad = self._eval(z_half)
        v_half = self.v - h / 2 * grad
        v_tilde = c * v_half + s * self._xi()
        self.v = v_tilde - h / 2 * grad
        self.z = z_half + h / 2 * self.v

    def _mh(self, gamma: float) -> torch.Tensor:
        self._ensure_cached(grad=False)
        proposal = self.z + math.sqrt(gamma) * self._xi()
        u_new, _ = self._eval(proposal, grad=False)
        accept = _accept((self.u - u_new).double(), self.noise)
        self._keep(accept, proposal, u_new, None)
        return accept

    def _keep(self, accept: torch.Tensor, z_new, u_new, grad_new) -> None:
        """Move accepted chains to their proposal, with its U and grad U (the cache of the new current state)."""
        self.z = torch.where(accept[:, None], z_new, self.z)
        self.u = torch.where(accept, u_new, self.u)
        if grad_new is not None:
            self.grad = torch.where(accept[:, None], grad_new, self.grad)


def latent_sampler_settings(cfg, applies: bool = True) -> dict:
    """The latent-MCMC settings of a config with sample.py's field names (None = the seed's default), checked.
    With `applies` False (not a GEBM snapshot) any latent-sampler flag given is refused, never silently ignored."""
    from utils.cli import UserError

    given = {k: getattr(cfg, k) for k in SEED_DEFAULTS if getattr(cfg, k, None) is not None}
    if not applies:
        if given:
            raise UserError(f"--{sorted(given)[0]} applies to GEBM snapshots (ebm_train.py) only")
        return {}
    settings = SEED_DEFAULTS | given
    if settings["latent_sampler"] not in SAMPLERS:
        raise UserError(f"--latent_sampler {settings['latent_sampler']!r}: valid samplers are {SAMPLERS}")
    if settings["num_sampler_steps"] < 0 or settings["lmc_gamma_decay_every"] < 1:
        raise UserError("--num_sampler_steps must be >= 0 and --lmc_gamma_decay_every >= 1")
    if not (settings["lmc_gamma"] > 0 and settings["lmc_kappa"] > 0 and 0 < settings["lmc_gamma_decay"] <= 1):
        raise UserError("need --lmc_gamma > 0, --lmc_kappa > 0 and 0 < --lmc_gamma_decay <= 1")
    if settings["temperature"] < 0:
        raise UserError(f"--temperature must be >= 0, got {settings['temperature']}")
    return settings


@torch.no_grad()
def gebm_images(model, seeds: list[int], labels, device, record: dict | None = None, **settings):
    """Samples of a GEBM snapshot: each seed's chain starts at its base latent (the first draw of its generator)
    and runs `num_sampler_steps` steps of `latent_sampler`; x = G(z). Without settings (the in-loop evaluation,
    --only_test) it runs 0 steps: the base generator's samples, as GEBM's in-loop FID scores them.
    `record` (optional dict) accumulates `accepted_per_step` (summed over chains) and `chains`; with
    `record["frames_every"] = K` it also collects `frames`: the latents of this batch's first
    `record.get("frame_chains", 64)` chains every K steps (step 0 included), for a chain animation."""
    settings = dict(settings)
    steps = settings.pop("num_sampler_steps", 0)
    noise = ChainNoise(seeds)
    zs = noise.randn(model.z_dim, device, next(model.parameters()).dtype)
    nfe = 1
    if steps:
        chains = LatentChains(
            latent_potential(model, settings["temperature"]), zs, noise, settings["latent_sampler"],
            settings["lmc_gamma"], settings["lmc_kappa"], settings["lmc_gamma_decay"],
            settings["lmc_gamma_decay_every"],
        )  # fmt: skip
        every = (record or {}).get("frames_every") or steps
        keep = (record or {}).get("frame_chains", 64)
        frames = [zs[:keep].cpu()]
        while chains.steps < steps:
            frames.append(chains.advance(min(every, steps - chains.steps))[:keep].cpu())
        zs, nfe = chains.z, chains.nfe + 1
        if record is not None:
            per_step = torch.tensor(chains.accepted_per_step, dtype=torch.int64)
            record["accepted_per_step"] = record.get("accepted_per_step", 0) + per_step
            record["chains"] = record.get("chains", 0) + len(seeds)
            if record.get("frames_every") and "frames" not in record:
                record["frames"] = frames
    return model.base(zs), nfe


def acceptance_summary(accepted_per_step: torch.Tensor, chains: int, settings: dict) -> dict:
    """Acceptance rates of a Metropolis sampler: overall and per step-size phase (the decay changes them)."""
    rates = accepted_per_step.double() / chains
    every = settings["lmc_gamma_decay_every"]
    phases = [
        {"steps": [first + 1, min(first + every, len(rates))],
         "gamma": float(f"{settings['lmc_gamma'] * settings['lmc_gamma_decay'] ** i:.6g}"),
         "acceptance": round(rates[first : first + every].mean().item(), 4)}
        for i, first in enumerate(range(0, len(rates), every))
    ]  # fmt: skip
    return {"overall": round(rates.mean().item(), 4), "by_phase": phases}


@torch.no_grad()
def save_chain_animation(model, frames: list[torch.Tensor], path, duration_ms: int = 200) -> None:
    """An animated GIF of chains: one grid of G(z) per recorded step (frames of latents, each (K, z_dim))."""
    from PIL import Image
    from torchvision.utils import make_grid

    from utils.grid import to_uint8

    device = next(model.parameters()).device
    nrow = max(1, round(len(frames[0]) ** 0.5))
    pictures = []
    for zs in frames:
        grid = make_grid(to_uint8(model.base(zs.to(device))).cpu(), nrow=nrow, padding=2)  # (3, H, W) uint8
        pictures.append(Image.fromarray(grid.permute(1, 2, 0).numpy()))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
