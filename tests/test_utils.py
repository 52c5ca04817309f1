import copy
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from utils.ckpt import (
    list_states,
    load_snapshot,
    load_training_state,
    resolve_state,
    save_snapshot,
    save_training_state,
    tensors_sha256,
)
from utils.cli import UserError, parse
from utils.dist import unwrap, weights_digest
from utils.ema import EMA, ema_beta
from utils.grid import save_grid, to_uint8


# EMA -----------------------------------------------------------------------------------------------------------
def test_ema_beta_half_life_math():
    assert ema_beta(32, 10.0, cur_nimg=10**9) == pytest.approx(0.997784, abs=1e-6)  # reference 6.7
    # The horizon in images is the same for any batch: beta^(images / batch) after a half-life is 0.5.
    for batch in (16, 64, 256):
        assert ema_beta(batch, 10.0, 10**9) ** (10_000 / batch) == pytest.approx(0.5)
    # Ramp-up caps the half-life at ratio x images seen.
    assert ema_beta(32, 10.0, cur_nimg=3200, rampup_ratio=0.05) == pytest.approx(0.5 ** (32 / 160))


def test_ema_update_lerps_parameters_and_copies_buffers():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, halflife_kimg=0.001, rampup_ratio=None)  # half-life 1 image
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    beta = ema.update(model, batch_size=1, cur_nimg=1)
    assert beta == pytest.approx(0.5)
    torch.testing.assert_close(ema.module.weight, torch.full((3,), 2.0))  # 0.5 * 1 + 0.5 * 3
    torch.testing.assert_close(ema.module.running_mean, torch.full((3,), 7.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


# Checkpoints ---------------------------------------------------------------------------------------------------
def _tree():
    return {
        "step": 7,
        "model": {"w": torch.randn(3, 2), "n": torch.tensor(5)},
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.999), "params": [0]}],
        },
        "scaler": None,
        "config": {"method": "gan", "kw": {"a": 1}},
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_training_state_roundtrip_keeps_types(tmp_path):
    tree = _tree()
    path = save_training_state(tmp_path, 7, tree)
    assert path.name == "state-00000007" and (path / "COMPLETE").is_file()
    loaded = load_training_state(path)
    assert _same(tree, loaded)  # int keys, tuples, None, 0-d tensors all survive
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "meta.json", "tensors.safetensors"]


def test_states_are_pruned_after_a_good_save_keeping_two(tmp_path):
    for step in (10, 20, 30, 40):
        save_training_state(tmp_path, step, _tree(), keep=2)
    assert [s for s, _ in list_states(tmp_path)] == [30, 40]
    save_training_state(tmp_path, 50, _tree(), keep=1)  # asking for fewer than 2 still keeps 2
    assert [s for s, _ in list_states(tmp_path)] == [40, 50]


def test_failed_save_leaves_previous_states_and_no_partial_folder(tmp_path):
    save_training_state(tmp_path, 10, _tree())
    save_training_state(tmp_path, 20, _tree())
    bad = _tree() | {"oops": object()}  # cannot be stored: the save fails half-way
    with pytest.raises(TypeError):
        save_training_state(tmp_path, 30, bad)
    assert [s for s, _ in list_states(tmp_path)] == [10, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000010", "state-00000020"]


def test_a_state_cut_mid_write_is_never_picked(tmp_path):
    save_training_state(tmp_path / "states", 10, _tree())
    cut = tmp_path / "states" / "state-00000020"  # renamed but no COMPLETE marker: an interrupted copy
    cut.mkdir()
    (cut / "meta.json").write_text("{")
    (tmp_path / "states" / ".tmp-state-00000030-1").mkdir()  # a save killed before its rename
    assert resolve_state("latest", tmp_path).name == "state-00000010"
    with pytest.raises(UserError, match="not a complete"):
        resolve_state(str(cut), tmp_path)


def test_snapshot_roundtrip_and_refusals(tmp_path):
    model = nn.Linear(3, 2)
    snap = tmp_path / "run" / "snapshots" / "snapshot-00000005.safetensors"
    save_snapshot(snap, "gan", "dcgan", {"z_dim": 3}, model.state_dict(), {"lr": 0.1}, step=5)
    meta, sd = load_snapshot(tmp_path / "run")  # a run folder resolves to its newest snapshot
    assert meta["kind"] == "gan" and meta["model_kwargs"] == {"z_dim": 3} and meta["step"] == 5
    assert _same(sd, {k: v for k, v in model.state_dict().items()})
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="not a genzoo snapshot"):
        load_snapshot(plain)
    with pytest.raises(UserError, match="no such"):
        load_snapshot(tmp_path / "missing.safetensors")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_crafted_pickle_is_refused_and_executes_nothing(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Exploit()}))
    with pytest.raises(UserError, match="not a genzoo snapshot"):
        load_snapshot(evil)
    state_dir = tmp_path / "states" / "state-00000001"
    state_dir.mkdir(parents=True)
    (state_dir / "COMPLETE").write_text("ok")
    (state_dir / "meta.json").write_text(json.dumps({"format": "genzoo-state-v1", "tree": {}}))
    (state_dir / "tensors.safetensors").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UserError, match="unreadable"):
        load_training_state(state_dir)
    assert not _Exploit.marker.exists()


def test_unwrap_strips_compile_and_ddp(tmp_path):
    """torch.compile and DDP wrappers, in either order (accelerate compiles around DDP), down to the plain module."""
    import torch.distributed as dist

    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap(ddp) is model and unwrap(torch.compile(ddp)) is model
        assert unwrap(nn.parallel.DistributedDataParallel(torch.compile(model))) is model
    finally:
        dist.destroy_process_group()


def test_weights_digest_is_bit_exact():
    """Equal for identical weights (a copy), different after a one-ulp change of one weight, a renamed parameter,
    another dtype, or a changed buffer (unless buffers are left out, as the DDP replica check does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference = weights_digest(model)
    twin = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    twin.load_state_dict(model.state_dict())
    assert weights_digest(twin) == reference and weights_digest(model, buffers=False) != reference
    assert weights_digest(copy.deepcopy(twin).double()) != reference  # the same values in float64
    weight = model[0].weight.detach()
    assert tensors_sha256([("w", weight)]) != tensors_sha256([("w", weight.view(torch.int32))])  # same bytes
    with torch.no_grad():
        twin[0].weight[1, 2] = torch.nextafter(twin[0].weight[1, 2], torch.tensor(1.0))
    assert weights_digest(twin) != reference
    renamed = nn.Sequential()
    renamed.add_module("first", model[0])
    renamed.add_module("1", model[1])
    assert weights_digest(renamed) != reference
    params_only = weights_digest(model, buffers=False)
    model[1].running_mean += 1
    assert weights_digest(model) != reference and weights_digest(model, buffers=False) == params_only


# CLI -------------------------------------------------------------------------------------------------------------
@dataclass
class _Cfg:
    method: str = field(default="gan", metadata={"choices": ["gan", "hinge"]})
    lr: float = 2e-4
    ema: bool = True
    kwargs: dict = field(default_factory=dict)
    label: int | None = None


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: hinge\nlr: 0.001\nema: false\nkwargs: {base_dim: 8}\n")
    cfg = parse(_Cfg, ["--config", str(yaml_file)])
    assert (cfg.method, cfg.lr, cfg.ema, cfg.kwargs) == ("hinge", 0.001, False, {"base_dim": 8})
    cfg = parse(_Cfg, ["--config", str(yaml_file), "--lr", "0.5", "--ema", "--label", "3"])
    assert (cfg.method, cfg.lr, cfg.ema, cfg.label) == ("hinge", 0.5, True, 3)
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"method": "hinge", "kwargs": {"a": 1}}))
    assert parse(_Cfg, ["--config", str(json_file)]).kwargs == {"a": 1}
    # A saved config (as config.json holds it, nulls included) reproduces itself.
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"method": "hinge", "lr": 0.5, "ema": False, "kwargs": {}, "label": None}))
    assert parse(_Cfg, ["--config", str(saved)]) == _Cfg(method="hinge", lr=0.5, ema=False, label=None)


def _config_file_error(tmp_path, text: str, cls=_Cfg) -> str:
    """The UserError that parse() raises for a config file holding `text`."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        parse(cls, ["--config", str(path)])
    return str(err.value)


def test_config_file_errors(tmp_path):
    assert "unknown option" in _config_file_error(tmp_path, "metod: gan\n")
    assert "invalid choice" in _config_file_error(tmp_path, "method: lsgan\n")
    with pytest.raises(UserError, match="no such file"):
        parse(_Cfg, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match="JSON"):
        parse(_Cfg, ["--kwargs", "{not json"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lr: [0.1, 0.2]\n", "lr takes a single value, got [0.1, 0.2]"),
        ("1: 2\n", "expected a mapping of option names to values"),
        ("kwargs: [1]\n", "kwargs takes a single value"),
        ("ema: maybe\n", "ema takes true or false, got 'maybe'"),
        ("lr: .nan\n", "is not a finite number"),
        ("lr: .inf\n", "is not a finite number"),
    ],
)
def test_config_file_values_of_the_wrong_kind_give_one_line(tmp_path, text, fragment):
    message = _config_file_error(tmp_path, text)
    assert fragment in message and "\n" not in message


def test_flags_are_never_abbreviated_and_nan_is_refused():
    with pytest.raises(UserError, match="unrecognized arguments: --me"):
        parse(_Cfg, ["--me", "hinge"])
    for text in ("nan", "-inf", "1e999"):
        with pytest.raises(UserError, match="not a finite number"):
            parse(_Cfg, [f"--lr={text}"])


@pytest.mark.slow
def test_dry_run_prints_resolved_config_and_exits():
    code = (
        "import sys; sys.path.insert(0, '.'); from tests.test_utils import _Cfg; from utils.cli import parse; "
        "parse(_Cfg, ['--lr', '0.25', '--no-ema', '--dry_run']); print('not reached')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__))
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"method": "gan", "lr": 0.25, "ema": False, "kwargs": {}, "label": None}


@dataclass
class _AliasCfg:
    batch_size: int = field(default=1, metadata={"aliases": ("bsz",)})
    lr: float = 2e-4


def test_aliases_work_as_flags_and_as_config_file_keys(tmp_path):
    assert parse(_AliasCfg, ["--bsz", "4"]).batch_size == 4
    old_key = tmp_path / "old.yaml"
    old_key.write_text("bsz: 8\nlr: 0.5\n")
    assert parse(_AliasCfg, ["--config", str(old_key)]) == _AliasCfg(batch_size=8, lr=0.5)
    assert parse(_AliasCfg, ["--config", str(old_key), "--batch_size", "2"]).batch_size == 2  # the flag wins
    message = _config_file_error(tmp_path, "batch_size: 8\nbsz: 16\n", _AliasCfg)
    assert "batch_size is given twice, as 'batch_size' and as 'bsz'" in message
    # A config file in CharacteristicGenerator's spelling still loads into distill_characteristic.py's Config.
    import distill_characteristic

    published = tmp_path / "cg.yaml"
    published.write_text("bsz: 32\nglobal_bsz: 128\n")
    cfg = parse(distill_characteristic.Config, ["--config", str(published)])
    assert (cfg.batch_size, cfg.global_batch_size) == (32, 128)


def _code_aliases() -> set[tuple[str, str, str]]:
    """(alias, flag, script) for every alias in the `Config` of every script at the repository's top level."""
    import importlib
    from pathlib import Path

    from utils.cli import alias_names
    from utils.run import RunConfig

    found = set()
    for path in sorted(Path(__file__).resolve().parents[1].glob("*.py")):
        if "\nclass Config" not in path.read_text():
            continue
        config = importlib.import_module(path.stem).Config
        for alias, name in alias_names(config).items():
            run_flag = issubclass(config, RunConfig) and name in RunConfig.__dataclass_fields__
            found.add((f"--{alias}", f"--{name}", "every training script" if run_flag else path.name))
    return found


def test_the_flags_page_lists_every_alias_and_no_other():
    """docs/flags.md's table of aliases has one row per alias in the scripts' Configs (read from their field
    metadata): alias, genzoo's flag, the scripts that take it (RunConfig's flags: "every training script"), and whose
    spelling it is; a row for an alias that no longer exists fails too."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text()
    section = page.split("## Aliases", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 4 and cells[3], f"docs/flags.md: a row needs 4 cells, whose spelling last: {line}"
            rows[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2]
    code = _code_aliases()
    assert ("--bsz", "--batch_size", "distill_characteristic.py") in code  # the scripts were found
    assert {(alias, flag) for alias, flag, _ in code} == set(rows)
    for alias, flag, scripts in code:
        assert scripts in rows[(alias, flag)], f"docs/flags.md: {alias} -> {flag} should name {scripts}"


def test_a_flag_name_has_one_type_in_every_script():
    """A name shared by several scripts (as a flag or as an alias) takes the same kind of value in each: a bool switch
    in one script and a number in another would be two meanings (as GEBM's gradient transform under --grad_clip
    was next to diffusion_train.py's max norm)."""
    import importlib
    import typing
    from pathlib import Path

    from utils.cli import field_metadata

    kinds = {}
    for path in sorted(Path(__file__).resolve().parents[1].glob("*.py")):
        if "\nclass Config" not in path.read_text():
            continue
        config = importlib.import_module(path.stem).Config
        hints = typing.get_type_hints(config)
        for name in config.__dataclass_fields__:
            kind = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
            for flag in (name, *field_metadata(config, name).get("aliases", ())):
                kinds.setdefault(flag, {}).setdefault(str(kind[0]), []).append(path.name)
    mixed = {flag: by_kind for flag, by_kind in kinds.items() if len(by_kind) > 1}
    assert not mixed, f"flags with different kinds of value across scripts: {mixed}"
    assert len(next(iter(kinds["batch_size"].values()))) > 1  # the scripts were found: the check compares something


# Grids -----------------------------------------------------------------------------------------------------------
def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 2, 3)
    assert to_uint8(x).flatten().tolist() == [0, 64, 128, 191, 255, 255]
    save_grid(torch.rand(20, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=10)
    from PIL import Image

    img = Image.open(tmp_path / "g.png")
    assert img.mode == "L" and img.size == (10 * 10 + 2, 2 * 10 + 2)


def test_the_half_life_ema_flags_are_declared_once():
    """Every script with --ema_rampup takes the half-life EMA flags from utils/ema.py's EmaConfig: the same default,
    bound and help everywhere; only diffusion_train.py lengthens the half-life (EDM's 500 kimg)."""
    import importlib
    from pathlib import Path

    from utils.cli import field_metadata, make_parser
    from utils.ema import EmaConfig

    found = []
    for path in sorted(Path(__file__).resolve().parents[1].glob("*.py")):
        if "\nclass Config" not in path.read_text():
            continue
        config = importlib.import_module(path.stem).Config
        if "ema_rampup" not in config.__dataclass_fields__:
            continue
        found.append(path.name)
        assert issubclass(config, EmaConfig), path.name
        flags = {action.dest: action for action in make_parser(config)._actions}
        assert flags["ema_rampup"].default == 0.05, path.name
        assert flags["ema_rampup"].help == "half-life <= ratio x images seen; 0 = off", path.name
        assert field_metadata(config, "ema_rampup")["min"] == 0, path.name
        assert flags["ema_halflife_kimg"].default == (500.0 if path.stem == "diffusion_train" else 10.0), path.name
        assert "ema" in flags and "EMA" in flags["ema"].help, path.name
    assert found == [
        "diffusion_train.py", "discriminator_flow.py", "ebm_train.py", "gan_celeba.py", "gan_mnist.py",
        "score_gan.py", "translate.py",
    ]  # fmt: skip
