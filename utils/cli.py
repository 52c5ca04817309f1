"""Command line and config files for a script's `@dataclass Config`.

`parse(Config)` builds an argparse parser from the dataclass fields (bool -> --flag/--no-flag, dict -> JSON,
`metadata={"choices": ...}` -> choices), lets `--config file.yaml|file.json` set defaults that explicit flags
override, and handles `--dry_run` (print the resolved config, exit 0). Bad input raises `UserError`, which
`user_errors()` turns into one line on stderr and exit code 2: no traceback for a user's mistake.

Booleans are switches (`--ema`, `--no-ema`) that also take a value (`--ema true`, CharacteristicGenerator's form).
Field metadata: "help", "choices", "aliases" (more flag names, also accepted as config-file keys), "min" (inclusive
lower bound, checked by `check_bounds`), "allow_inf" (a float that may be inf; NaN is never accepted). A subclass may
redeclare a field with another default only: the metadata is looked up along the class hierarchy (`field_metadata`).
Flags are never abbreviated (`--conf x.yaml` is an error, not a silent `--config_xyz`).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints): reported as one line, never a traceback."""


class NothingToDo(Exception):
    """The command has nothing left to do (a finished run launched again, as a requeued cluster job is): the
    process ends with exit code 0 after the one line that the raiser printed."""


@contextlib.contextmanager
def user_errors(prog: str | None = None):
    prog = prog or Path(sys.argv[0]).name
    try:
        yield
    except NothingToDo:
        pass
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker, which wraps it in the traceback
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def script_cli(script_file: str, doc: str, config_cls, main, resolve=None):
    """A script's `cli(argv=None)`: parse the command line (or `argv`) into `config_cls` (the first line of the
    script's docstring `doc` as the help's description; `resolve` as in `parse`) and call `main(cfg)`; bad input
    ends with one line on stderr and exit code 2 (`user_errors`). Tests call it with an argv list."""

    def cli(argv: list[str] | None = None) -> None:
        with user_errors(Path(script_file).name):
            main(parse(config_cls, argv, description=doc.split("\n")[0], resolve=resolve))

    return cli


class _OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse prints the whole usage block; one line is easier to read in a log
        raise UserError(f"{message} (see --help)")


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class _BoolAction(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, and also `--flag VALUE` / `--flag=VALUE` with VALUE one of true/false/yes/no/1/0 in
    any case: CharacteristicGenerator's command lines write booleans with a value (`--churn True`, argparse with
    str2bool)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            super().__call__(parser, namespace, values, option_string)
        elif option_string.startswith("--no-") or values.lower() not in _BOOL_WORDS:
            parser.error(f"argument {option_string}: expected no value or one of {sorted(_BOOL_WORDS)}, got {values!r}")
        else:
            setattr(namespace, self.dest, _BOOL_WORDS[values.lower()])


def _base_type(kind):
    """`int | None` -> int; plain types unchanged."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def field_metadata(config_cls, name: str) -> dict:
    """The metadata of field `name`: its own, else that of the nearest base class that declares it (a subclass
    that only changes a default keeps the base's help, choices and bounds)."""
    for cls in getattr(config_cls, "__mro__", [type(config_cls)]):
        fields = getattr(cls, "__dataclass_fields__", {})
        if name in fields and fields[name].metadata:
            return dict(fields[name].metadata)
    return {}


def _finite_float(allow_inf: bool):
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}")
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value

    return convert


def make_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of defaults; explicit flags override it")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind, meta = hints[f.name], field_metadata(config_cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=default, help=meta.get("help", " "))
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if kind is bool:
            kwargs["action"] = _BoolAction
        elif kind is dict:
            kwargs["type"] = _json_dict
        elif typing.get_origin(kind) is list:  # list[int]: --flag 1 2 4
            kwargs["type"], kwargs["nargs"] = typing.get_args(kind)[0], "+"
        elif _base_type(kind) is float:
            kwargs["type"] = _finite_float(meta.get("allow_inf", False))
        else:
            kwargs["type"] = _base_type(kind)
        names = [f"--{f.name}"] + [f"--{alias}" for alias in meta.get("aliases", ())]
        parser.add_argument(*names, dest=f.name, **kwargs)
    return parser


def alias_names(config_cls) -> dict[str, str]:
    """Every alias of `config_cls`'s fields -> the field's name (a published spelling -> genzoo's flag)."""
    return {
        alias: f.name
        for f in dataclasses.fields(config_cls)
        for alias in field_metadata(config_cls, f.name).get("aliases", ())
    }


def _canonical_keys(config_cls, values: dict, path: str) -> dict:
    """A config file's keys with aliases replaced by the field names (`bsz: 64` -> `batch_size: 64`); a file that
    gives one option under two of its names is refused, as the two values could differ."""
    aliases, out, spelled = alias_names(config_cls), {}, {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in out:
            raise UserError(f"--config {path}: {name} is given twice, as {spelled[name]!r} and as {key!r}")
        out[name], spelled[name] = value, key
    return out


def check_bounds(cfg) -> None:
    """Refuse values below a field's "min" metadata (None means unset and is not checked)."""
    for f in dataclasses.fields(cfg):
        low, value = field_metadata(type(cfg), f.name).get("min"), getattr(cfg, f.name)
        if low is not None and value is not None and value < low:
            raise UserError(f"--{f.name} must be >= {low}, got {value}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return data


def parse(config_cls, argv: list[str] | None = None, description: str | None = None, resolve=None):
    """Resolve defaults < config file < command line into a `config_cls` instance, then `resolve(cfg)` if given
    (a script's own defaults that depend on other flags), so that --dry_run prints what the run would use."""
    parser = make_parser(config_cls, description)
    config_path = _find_config_arg(sys.argv[1:] if argv is None else argv)
    if config_path:
        file_values = load_config_file(config_path)
        valid = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(file_values) - valid - set(alias_names(config_cls)))
        if unknown:
            raise UserError(f"--config {config_path}: unknown option(s) {unknown}; valid: {sorted(valid)}")
        file_values = _canonical_keys(config_cls, file_values, config_path)
        # Values from the file go through the same type conversion and choices as the flags.
        hints = typing.get_type_hints(config_cls)
        file_argv, none_values = [], {}
        for key, value in file_values.items():
            is_list = typing.get_origin(hints[key]) is list
            if value is None:  # e.g. mixed_precision: null in a saved config.json
                none_values[key] = None
            elif isinstance(value, list) != is_list or (is_list and not value):
                kind = "a non-empty list" if is_list else "a single value"
                raise UserError(f"--config {config_path}: {key} takes {kind}, got {value!r}")
            elif (hints[key] is bool) != isinstance(value, bool):
                kind = "true or false" if hints[key] is bool else f"a {_base_type(hints[key]).__name__} value"
                raise UserError(f"--config {config_path}: {key} takes {kind}, got {value!r}")
            elif isinstance(value, bool):
                file_argv.append(f"--{key}" if value else f"--no-{key}")
            elif is_list:
                file_argv += [f"--{key}", *map(str, value)]
            else:
                file_argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        try:
            file_args = parser.parse_args(file_argv)
        except UserError as e:
            raise UserError(f"--config {config_path}: {e}")
        parser.set_defaults(**vars(file_args) | none_values)
    args = parser.parse_args(argv)
    dry_run = args.dry_run
    values = {k: v for k, v in vars(args).items() if k not in ("config", "dry_run")}
    cfg = config_cls(**values)
    if resolve is not None:
        cfg = resolve(cfg)
    if dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        sys.exit(0)
    return cfg


def _find_config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
