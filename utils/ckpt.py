"""Checkpoint file I/O: small snapshots for sampling, full training states for exact resume, pretrained weight
files. Nothing here unpickles; the DDP side of checkpointing (unwrap, replica check) is utils/dist.py.

Snapshot: one `.safetensors` file with the (EMA) generator weights; its header metadata holds the format tag, the
model name and kwargs, the run's resolved config and the step, as JSON strings. `sample.py`/`fid.py` read only this.
Written to a temp file, fsynced and renamed, so a reader never sees half of one.

Training state: a folder `state-<step>/` with `tensors.safetensors` (every tensor of every model, optimizer and EMA)
and `meta.json` (the rest of the tree: step, optimizer hyperparameters, scaler, config), written into a hidden temp
folder, fsynced, marked `COMPLETE` last and renamed into place; only marked folders are ever loaded, and pruning
(keep >= 2) runs only after a save has completed (torchtitan's rule: the newest may be the one being written).
Files get the permissions of any other file the user writes (0644 under umask 022), not a temp file's 0600.
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
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file; safetensors and mkstemp give 0600


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a small file so that a reader sees the old content or the new, never a mix: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_training_state(
    states_dir: str | Path, step: int, state: dict, keep: int = 2, protect: tuple[int, ...] = ()
) -> Path:
    """Atomically write `state` (a tree of dicts/lists/tensors/scalars) as `states_dir/state-<step>`, then prune
    all but the newest `keep` and the steps in `protect` (the best one)."""
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
            f.chmod(FILE_MODE)
            _fsync(f)
        (tmp / "COMPLETE").write_text("ok\n")  # written last: its presence means the folder is whole
        _fsync(tmp)
        if final.exists():
            # Replace an existing state without a moment in which neither exists: set the old one aside under a
            # name no reader picks (not state-*), rename the new one in, then delete the old.
            old = states_dir / f".old-state-{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(states_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_states(states_dir, keep, protect)
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


def prune_states(states_dir: Path, keep: int, protect: tuple[int, ...] = ()) -> None:
    keep = max(keep, 2)
    for step, path in list_states(states_dir)[:-keep]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)
    for pattern in (".tmp-state-*", ".old-state-*"):  # leftovers of a crashed save (only one process ever writes)
        for p in states_dir.glob(pattern):
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
        return _decode(meta["tree"], tensors)
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: unreadable training state ({type(e).__name__}: {str(e).splitlines()[0]})")


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
    """Write weights + metadata to one safetensors file, atomically (temp file, fsync, rename; the temp file is
    removed if anything fails)."""
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
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        tmp.chmod(FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """A run folder's step snapshots, oldest first (not best.safetensors, not temp files)."""
    return sorted((Path(run_dir) / "snapshots").glob("snapshot-*.safetensors"))


def find_snapshot(path: str | Path) -> Path:
    """A snapshot file, or a run folder -> its newest snapshot."""
    path = Path(path)
    if path.is_dir():
        snaps = list_snapshots(path)
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
    return _decode_header(metadata, path), state_dict


def _decode_header(metadata: dict, path: Path) -> dict:
    """The snapshot header with its JSON fields decoded; an edited or cut header gives one line."""
    meta = dict(metadata)
    try:
        for key in ("model_kwargs", "config", "extra"):
            meta[key] = json.loads(meta.get(key, "{}"))
            if not isinstance(meta[key], dict):
                raise TypeError(f"{key} is not a JSON object")
        meta["step"] = int(meta["step"])
        for key in ("kind", "model"):
            if not isinstance(meta[key], str):
                raise TypeError(f"{key} is not a string")
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise UserError(f"{path}: damaged genzoo snapshot header ({type(e).__name__}: {detail})")
    meta["path"] = str(path)
    return meta


def build_from_snapshot(meta: dict, state_dict: dict, build) -> torch.nn.Module:
    """`build(meta["model"], **meta["model_kwargs"])` with the snapshot's weights loaded strictly. The model is first
    built on the meta device (no memory) and compared with the weights, so edited kwargs (another width, a huge
    layer) or another version give one line instead of an allocation or a traceback."""

    def mismatch(detail: str) -> UserError:
        return UserError(f"{meta['path']}: snapshot does not match model {meta['model']!r}: {detail}")

    try:
        with torch.device("meta"):
            skeleton = build(meta["model"], **meta["model_kwargs"])
    except Exception as e:  # unknown name, bad kwargs: whatever the constructor raises, a user's file caused it
        raise mismatch(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != found:
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
        raise mismatch(detail + (f" (e.g. {wrong[0]}: {found[wrong[0]]} vs {expected[wrong[0]]})" if wrong else ""))
    model = build(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(state_dict)
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
