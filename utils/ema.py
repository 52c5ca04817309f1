"""Exponential moving average of a network, with the horizon given as a half-life in images.

beta = 0.5 ** (batch / halflife_nimg) per update, so the averaging horizon measured in images stays the same when
the batch size or the number of GPUs changes (EDM's `ema_halflife_kimg`, StyleGAN2-ADA's `ema_kimg`). With a
ramp-up ratio r the half-life is capped at r * images seen so far, so early weights are forgotten quickly.
Parameters are averaged; buffers (BatchNorm statistics, spectral-norm vectors) are copied, as StyleGAN2-ADA does.
CharacteristicGenerator (and consistency models) instead use a fixed decay with a warm-up,
beta = min(decay, (1 + k)/(10 + k)) at update k = 0, 1, ...: `EMA(model, decay=0.999)`.
Call `update` only after a real optimizer step (not a skipped fp16 step, not a gradient-accumulation micro-step).
"""

import copy
from dataclasses import dataclass, field

import torch

from utils.cli import UserError


@dataclass
class EmaConfig:
    """The half-life EMA flags, one meaning in every script that has them. A script's `Config` lists it before
    `RunConfig` (`class Config(EmaConfig, RunConfig)`, so the run flags come first in --help) and redeclares `ema`
    with its default and a help that names what it averages (utils.cli.field_metadata)."""

    ema: bool = field(default=False, metadata={"help": "keep an EMA of the trained network; snapshots use it"})
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = field(default=0.05, metadata={"min": 0, "help": "half-life <= ratio x images seen; 0 = off"})


def ema_beta(batch_size: int, halflife_kimg: float, cur_nimg: int, rampup_ratio: float | None = None) -> float:
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


class EMA:
    def __init__(
        self,
        model: torch.nn.Module,
        halflife_kimg: float = 10.0,
        rampup_ratio: float | None = 0.05,
        # A fixed per-update decay with CharacteristicGenerator's warm-up; overrides the half-life.
        decay: float | None = None,
    ):
        if decay is not None and not 0 <= decay < 1:
            raise UserError(f"--ema_decay must be in [0, 1), got {decay}")
        # Build from the plain module, before accelerator.prepare: a copy of a prepared module would share its
        # autocast-wrapped forward with the original.
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg, self.rampup_ratio, self.decay = halflife_kimg, rampup_ratio, decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_size: int, cur_nimg: int) -> float:
        """Average `model` (unwrapped) into the EMA; `cur_nimg` counts images seen including this step."""
        if self.decay is not None:
            k = cur_nimg // batch_size - 1  # updates before this one
            beta = min(self.decay, (1 + k) / (10 + k))
        else:
            beta = ema_beta(batch_size, self.halflife_kimg, cur_nimg, self.rampup_ratio)
        ema_params, params = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameter lists")
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        return beta

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
