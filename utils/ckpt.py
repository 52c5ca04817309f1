"""Checkpoint I/O: small snapshots for sampling, full training states for exact resume. Nothing here unpickles.

Snapshot: one `.safetensors` file with the (EMA) generator weights; its header metadata holds the format tag, the
model name and kwargs, the run's resolved config and the step, as JSON strings. `sample.py`/`fid.py` read only this.

Training state: a folder `state-<step>/` with `tensors.safetensors` (every tensor of every model, optimizer and EMA)
and `meta.json` (the rest of the tree: step, optimizer hyperparameters, scaler, config), written into a hidden temp
folder, fsynced, marked `COMPLETE` last and renamed into place; only marked folders are ever loaded, and pruning
(keep >= 2) runs only after a save has completed (torchtitan's rule: the newest may be the one being written).
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from utils.cli import UserError

SNAPSHOT_FORMAT = "genzoo-snapshot-v1"
STATE_FORMAT = "genzoo-state-v1"
_STATE_RE = re.compile(r"^state-(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any order, to reach the plain module."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def gan_state(step, config, skipped, gen, disc, optim_g, optim_d, ema, scaler, **extra) -> dict:
    """The full training state of a GAN script (gan_mnist.py, gan_celeba.py) for `save_training_state`; `extra`
    holds a script's own entries (e.g. the path-length running mean)."""
    return {
        "step": step,
        "config": config,
        "skipped": skipped,
        "gen": unwrap(gen).state_dict(),
        "disc": unwrap(disc).state_dict(),
        "optim_g": optim_g.state_dict(),
        "optim_d": optim_d.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        **extra,
    }


def load_gan_state(state: dict, gen, disc, optim_g, optim_d, ema, scaler) -> None:
    """Restore what `gan_state` saved into freshly prepared networks, optimizers, EMA and GradScaler. The caller
    re-applies lr/betas afterwards (the saved optimizer groups carry the old ones)."""
    unwrap(gen).load_state_dict(state["gen"])
    unwrap(disc).load_state_dict(state["disc"])
    optim_g.load_state_dict(state["optim_g"])
    optim_d.load_state_dict(state["optim_d"])
    if ema is not None:
        if state["ema"] is None:
            raise UserError("cannot resume with --ema: the training state was made without an EMA")
        ema.load_state_dict(state["ema"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """Strip only torch.compile's wrapper (accelerate compiles last, around DDP): the eager, still DDP-synchronised
    module, for second-order gradients (R1, path length), which compiled graphs do not support."""
    return getattr(model, "_orig_mod", model)


def zero_term(module: torch.nn.Module) -> torch.Tensor:
    """0 * (sum of all parameters): added to a regulariser's loss, it gives every parameter a (zero) gradient, so
    DDP's reducer, which waits for all of them, also completes when the regulariser ignores some (R1 and the
    last bias, path length and the ToRGB biases). StyleGAN2-ADA adds 0 * output for the same reason."""
    return 0 * sum(p.sum() for p in module.parameters())


# Tree <-> (tensors, JSON): tensors go to safetensors under their path; everything else stays JSON with tags
# that keep int dict keys (optimizer state is keyed by parameter index) and tuples intact.
def _encode(obj, path: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a training state")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_state(states_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Atomically write `state` (a tree of dicts/lists/tensors/scalars) as `states_dir/state-<step>`, then prune."""
    states_dir = Path(states_dir)
    states_dir.mkdir(parents=True, exist_ok=True)
    final = states_dir / f"state-{step:08d}"
    tmp = states_dir / f".tmp-state-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors: dict = {}
        meta = {"format": STATE_FORMAT, "step": step, "tree": _encode(state, "s", tensors)}
        save_file(tensors, tmp / "tensors.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / "COMPLETE").write_text("ok\n")  # written last: its presence means the folder is whole
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(states_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_states(states_dir, keep)
    return final


def list_states(states_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete training states in `states_dir`, oldest first."""
    states_dir = Path(states_dir)
    if not states_dir.is_dir():
        return []
    found = []
    for p in states_dir.iterdir():
        m = _STATE_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_states(states_dir: Path, keep: int) -> None:
    keep = max(keep, 2)
    for _, path in list_states(states_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for p in states_dir.glob(".tmp-state-*"):  # leftovers of a crashed save (only one process ever writes)
        shutil.rmtree(p, ignore_errors=True)


def resolve_state(resume: str, run_dir: Path) -> Path | None:
    """`latest` -> newest complete state of `run_dir` (None if there is none); a run folder -> its newest;
    a path -> that state folder, which must be complete."""
    if resume == "latest":
        states = list_states(run_dir / "states")
        return states[-1][1] if states else None
    path = Path(resume)
    if (path / "states").is_dir():
        states = list_states(path / "states")
        if not states:
            raise UserError(f"--resume {resume}: no complete training state under {path / 'states'}")
        return states[-1][1]
    if not path.exists():
        raise UserError(f"--resume {resume}: no such file or folder")
    if not (path / "COMPLETE").is_file() or not (path / "meta.json").is_file():
        raise UserError(f"--resume {resume}: not a complete genzoo training state (expected a state-<step> folder)")
    return path


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != STATE_FORMAT:
            raise UserError(f"{path}: not a genzoo training state (format {meta.get('format')!r})")
        tensors = load_file(path / "tensors.safetensors")
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable training state ({type(e).__name__}: {e})")
    return _decode(meta["tree"], tensors)


def check_resume_compatible(saved_cfg: dict, cfg: dict, keys: tuple[str, ...]) -> list[str]:
    """Refuse to resume if an identity key (model, method, ...) changed; return the other changed keys."""
    changed = {k for k in cfg if k in saved_cfg and saved_cfg[k] != cfg[k]}
    fatal = sorted(changed & set(keys))
    if fatal:
        detail = ", ".join(f"{k}: saved {saved_cfg[k]!r} vs now {cfg[k]!r}" for k in fatal)
        raise UserError(f"cannot resume: the training state was made with a different setup ({detail})")
    return sorted(changed - {"resume"})


def open_resume_state(resume: str, run_dir: Path) -> tuple[dict | None, Path | None]:
    """The training state a run starts from, after the refusals every training script applies: a folder that holds
    states needs --resume, and a state from another run may not be resumed into a folder with states of its own
    (pruning and stats trimming would then act on those unrelated states)."""
    own_states = list_states(run_dir / "states")
    if not resume:
        if own_states:
            raise UserError(
                f"{run_dir} already holds training states; pass --resume latest or choose another --log_name"
            )
        return None, None
    state_path = resolve_state(resume, run_dir)
    if state_path is None:
        return None, None
    if own_states and state_path.parent.resolve() != (run_dir / "states").resolve():
        raise UserError(
            f"--resume {resume} is from another run, but {run_dir} holds training states of its own; "
            "choose another --log_name"
        )
    return load_training_state(state_path), state_path


def save_snapshot(
    path: str | Path,
    kind: str,
    model_name: str,
    model_kwargs: dict,
    state_dict: dict,
    config: dict,
    step: int,
    extra: dict | None = None,
) -> None:
    """Write weights + metadata to one safetensors file, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "kind": kind,
        "model": model_name,
        "model_kwargs": json.dumps(model_kwargs),
        "config": json.dumps(config),
        "step": str(step),
        "extra": json.dumps(extra or {}),  # e.g. a classifier's test accuracy
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def find_snapshot(path: str | Path) -> Path:
    """A snapshot file, or a run folder -> its newest snapshot."""
    path = Path(path)
    if path.is_dir():
        snaps = sorted((path / "snapshots").glob("snapshot-*.safetensors"))
        if not snaps:
            raise UserError(f"{path}: no snapshots/snapshot-*.safetensors in this folder (not a genzoo run folder?)")
        return snaps[-1]
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run folder")
    return path


def load_snapshot(path: str | Path) -> tuple[dict, dict]:
    """Return (metadata with JSON fields decoded, state_dict). Refuses anything that is not a genzoo snapshot."""
    path = find_snapshot(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SNAPSHOT_FORMAT:
                raise UserError(f"{path}: a safetensors file, but not a genzoo snapshot (no {SNAPSHOT_FORMAT} tag)")
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a genzoo snapshot (cannot read it as safetensors: {e})")
    meta = dict(metadata)
    for key in ("model_kwargs", "config", "extra"):
        meta[key] = json.loads(meta.get(key, "{}"))
    meta["step"] = int(meta["step"])
    meta["path"] = str(path)
    return meta, state_dict


def build_from_snapshot(meta: dict, state_dict: dict, build) -> torch.nn.Module:
    """`build(meta["model"], **meta["model_kwargs"])` with the snapshot's weights loaded strictly; a snapshot that
    does not fit its model (edited metadata, another version) gives one line."""
    try:
        model = build(meta["model"], **meta["model_kwargs"])
        model.load_state_dict(state_dict)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{meta['path']}: snapshot does not match model {meta['model']!r}: {str(e).splitlines()[0]}")
    return model


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrained_file(
    path: str | None,
    filename: str,
    sha256_prefix: str,
    url: str,
    flag: str,  # the command-line flag that names the file
    name: str,  # what the weights are, for messages: "the FID Inception"
    alternative: str = "",  # appended to the "not found" line: what works without the file
    verify: bool = True,
) -> Path:
    """A pretrained weight file that cannot be downloaded here: `path` (the user's `flag`), else the torch hub cache;
    its SHA-256 must start with `sha256_prefix` (the convention of torchvision/pytorch-fid file names) unless
    `verify` is False (tests with random weights). Missing or wrong files give one line saying what to put where."""
    if path:
        weights = Path(path)
        if not weights.is_file():
            raise UserError(f"{flag} {path}: no such file (expected {filename})")
    else:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not weights.is_file():
            raise UserError(
                f"{name} weights not found: download {filename} (SHA-256 starts with {sha256_prefix}) from {url} on "
                f"a machine with Internet, then pass {flag} PATH or put it at {weights}{alternative}"
            )
    if verify:
        digest = sha256_of(weights)
        if not digest.startswith(sha256_prefix):
            raise UserError(
                f"{weights}: SHA-256 {digest[:16]}... is not {name} ({filename}, SHA-256 {sha256_prefix}...)"
            )
    return weights


def tensors_sha256(named_tensors) -> str:
    """SHA-256 of (name, dtype, shape, bytes) of each tensor, in the order given: the identity of a set of weights.
    Unlike a file hash it does not change with the file format's header order."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(*modules: torch.nn.Module, buffers: bool = True) -> int:
    """A 63-bit hash of every parameter (and buffer), bit-exact: equal digests mean identical weights."""
    named = [
        (f"{i}.{name}", t)
        for i, module in enumerate(modules)
        for name, t in list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
    ]
    return int(tensors_sha256(named)[:16], 16) >> 1


def check_replicas_agree(accelerator, *modules: torch.nn.Module) -> int:
    """All processes must hold bit-identical parameters (NVIDIA's check_ddp_consistency); raise if not.
    Buffers are left out: BatchNorm running statistics are updated from each rank's own batch and DDP
    re-broadcasts rank 0's at the next forward, so they legitimately differ between forwards."""
    digest = weights_digest(*modules, buffers=False)
    digests = accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=accelerator.device)).tolist()
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes hold different weights (digests {digests}): DDP replicas diverged")
    return digest
