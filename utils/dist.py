"""What DDP and torch.compile need from the training scripts: reaching the plain module inside the wrappers, the
zero-gradient term that lets a regulariser step through DDP, and the check that every process holds the same
weights (NVIDIA's check_ddp_consistency); and the GPU kernel settings (fast, or deterministic). File I/O lives in
utils/ckpt.py."""

import os

import torch

from utils.ckpt import tensors_sha256


def set_backends(deterministic: bool) -> None:
    """The GPU kernels a training run uses, set before the Accelerator touches the device. By default the fast
    ones: TF32 matmuls and convolutions (fine for training these models; fid.py turns TF32 off for statistics) and
    cudnn's autotuner, which times several algorithms per shape and may pick another one in a new process, so a
    resumed run follows the same data and noise but not the same bits. `--deterministic` keeps TF32 (it is
    deterministic) but turns the autotuner off, asks cudnn for deterministic algorithms, fixes cuBLAS's workspace
    (its documented condition for reproducible results) and makes torch use deterministic implementations; an op
    without one warns once, naming itself, and the run goes on. CPU runs are bit-exact with or without it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GPU work
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any order, to reach the plain module."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """Strip only torch.compile's wrapper (accelerate compiles last, around DDP): the eager, still DDP-synchronised
    module, for second-order gradients (R1, path length), which compiled graphs do not support."""
    return getattr(model, "_orig_mod", model)


def zero_term(module: torch.nn.Module) -> torch.Tensor:
    """0 * (sum of all parameters): added to a regulariser's loss, it gives every parameter a (zero) gradient, so
    DDP's reducer, which waits for all of them, also completes when the regulariser ignores some (R1 and the
    last bias, path length and the ToRGB biases). StyleGAN2-ADA adds 0 * output for the same reason."""
    return 0 * sum(p.sum() for p in module.parameters())


def weights_digest(*modules: torch.nn.Module, buffers: bool = True) -> int:
    """A 63-bit hash of every parameter (and buffer), bit-exact: equal digests mean identical weights."""
    named = [
        (f"{i}.{name}", t)
        for i, module in enumerate(modules)
        for name, t in list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
    ]
    return int(tensors_sha256(named)[:16], 16) >> 1


def check_replicas_agree(accelerator, *modules: torch.nn.Module) -> int:
    """All processes must hold bit-identical parameters; raise if not. Buffers are left out: BatchNorm running
    statistics are updated from each rank's own batch and DDP re-broadcasts rank 0's at the next forward, so they
    legitimately differ between forwards."""
    digest = weights_digest(*(unwrap(m) for m in modules), buffers=False)
    digests = accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=accelerator.device)).tolist()
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes hold different weights (digests {digests}): DDP replicas diverged")
    return digest
