"""Command-line plumbing shared by sft.py, evalmath.py and data.py: error handling, bool flags, YAML config
chains with did-you-mean, atomic JSON files, and the versions recorded in run folders and results.

`run_main(main)` runs a command's `main(argv)` and turns a user's mistake into one line on stderr
(`error: <file or flag>: <what was expected>; <the fix>`) and exit status 2, instead of a traceback.
Tracebacks stay available: pass `--debug` anywhere on the command line, or set MATHSFT_DEBUG=1.
Ctrl-C that a command did not handle itself ends with one line and exit status 130.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MATHSFT_DEBUG"


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): the message names it, what was expected and the fix."""


# Exceptions that mean "the input is wrong", not "the program is wrong". Their messages are shown as is.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError, json.JSONDecodeError, UnicodeDecodeError)


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def run_main(main: Callable[[list[str]], None], argv: list[str] | None = None,
             user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main(argv)` without `--debug`; a user error prints one line (`error: ...`) and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS + tuple(user_errors) as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- flags and YAML

def parse_bool(args: list[str]) -> bool:
    """`--flag` alone is true; `--flag true|false|1|0|yes|no|on|off` (any case)."""
    if not args:
        return True
    word = args[0].strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false (or on/off, yes/no, 1/0), got {args[0]!r}")


def _bool_annotation():
    try:
        import tyro
    except ImportError:  # modules stay importable without tyro (e.g. benchmark machines); the CLIs need it
        return bool

    spec = tyro.constructors.PrimitiveConstructorSpec(
        nargs=(0, 1), metavar="[{true,false}]", instance_from_str=parse_bool,
        is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda b: [str(b).lower()])
    return Annotated[tyro.conf.FlagConversionOff[bool], spec]


def __getattr__(name: str):
    # `from cli import Bool`: a dataclass field typed `Bool` takes `--flag`, `--flag true`, `--flag off`, ...
    # (tyro's own bool is a --flag/--no-flag pair). Built on first use, so importing cli does not import tyro.
    if name == "Bool":
        globals()["Bool"] = _bool_annotation()
        return globals()["Bool"]
    raise AttributeError(f"module 'cli' has no attribute {name!r}")


def did_you_mean(name: str, choices, flag: bool = False) -> str:
    """`; did you mean 'x'?` (`--x` with `flag`) for the closest of `choices`, else an empty string."""
    near = difflib.get_close_matches(str(name).replace("-", "_"), list(choices), n=1)
    if not near:
        return ""
    return f"; did you mean --{near[0]}?" if flag else f"; did you mean '{near[0]}'?"


def yaml_chain(path: str | os.PathLike, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, mapping)] for a YAML config file and the files its `configs:` key names (relative to it),
    bases first. Errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"error: --config {path}: no such file")
    if path.resolve() in seen:
        raise UserError(f"error: {path}: `configs:` include cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"error: {path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"error: {path}: expected a mapping of config keys, got {type(raw).__name__}")
    out = []
    for inc in raw.pop("configs", None) or []:
        out += yaml_chain(path.parent / inc, seen + (path.resolve(),))
    return out + [(path, raw)]


def apply_yaml(base, path: Path, raw: dict, rename: dict | None = None) -> None:
    """Set the fields of dataclass instance `base` from a YAML mapping (lists become tuples, `2e-4` read as a
    string becomes a float). `rename` maps a YAML key to a field name (None: the key is ignored)."""
    fields = {f.name for f in dataclasses.fields(base)}
    for key, value in raw.items():
        name = (rename or {}).get(key, key)
        if name is None:
            continue
        if name not in fields:
            raise UserError(f"error: {path}: unknown key '{key}'{did_you_mean(key, fields)}. "
                            f"Valid keys: python {Path(sys.argv[0]).name} --help")
        default = getattr(base, name)
        if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"error: {path}: {key}: expected a number, got {value!r}") from None
        setattr(base, name, tuple(value) if isinstance(value, list) else value)


def parse_config(cls, argv: list[str], rename: Callable[[dict], dict | None] | None = None,
                 prog: str | None = None) -> tuple[Any, list[str]]:
    """(dataclass `cls` instance, notes) from argv: `--config FILE` (repeatable; later files win; a `configs:` key
    loads the files it names first) gives defaults, then tyro flags (underscores) override them. `rename(raw)`
    may map a file's keys to field names (see apply_yaml)."""
    import argparse

    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[], nargs="+")
    known, rest = pre.parse_known_args(argv)
    base, notes = cls(), []
    for path, raw in (pr for group in known.config for p in group for pr in yaml_chain(p)):
        apply_yaml(base, path, raw, rename(raw) if rename else None)
        notes.append(f"config file: {path}")
    cfg = tyro.cli(cls, default=base, args=rest, use_underscores=True, prog=prog,
                   console_outputs=int(os.environ.get("RANK", "0")) == 0)
    return cfg, notes


# ----------------------------------------------------------------------------- run records

def write_json(path: str | os.PathLike, obj, fsync: bool = True) -> None:
    """Write JSON through a temporary file and os.replace, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def versions() -> dict:
    """Library versions and the git commit (with +dirty) of this checkout, for run folders and results."""
    import platform

    import numpy
    import safetensors
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "safetensors": safetensors.__version__, "numpy": numpy.__version__}
    try:
        import tyro

        out["tyro"] = tyro.__version__
    except ImportError:
        pass
    try:
        repo = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_commit"] = commit + ("+dirty" if dirty else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out
