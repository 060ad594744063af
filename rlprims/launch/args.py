"""Command-line flags from a recipe's `Args` dataclass (through transformers' HfArgumentParser).

Why HfArgumentParser: it derives flags from the dataclass (types, defaults, Literal choices), accepts
both `--max-response-len` and `--max_response_len` and TRL's `--flag true|false`, and it is already a
dependency of every recipe (transformers). tyro and jsonargparse would add a dependency and change the
boolean syntax users and docs already rely on. What it lacks, added here: help from the fields'
attribute docstrings, `--config run.yaml` (TRL / verl users keep runs in YAML; flags override it),
`--verbose`, and checks of the values before the recipe loads anything.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["parse_args", "field_docstrings", "check_args", "CHECKS"]

T = TypeVar("T")

_DTYPES = ("float32", "bfloat16", "float16")


def _positive(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 else "must be >= 0"


def _at_least_one(v: Any) -> str | None:
    return None if isinstance(v, int) and v >= 1 else "must be >= 1"


def _fraction(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and 0 <= v <= 1 else "must be in [0, 1]"


def _dtype(v: Any) -> str | None:
    return None if v in _DTYPES else f"must be one of {', '.join(_DTYPES)}"


def _dtype_or_auto(v: Any) -> str | None:
    return None if v == "" or v in _DTYPES else f"must be empty (automatic) or one of {', '.join(_DTYPES)}"


def _model_dir(v: Any) -> str | None:
    if not v:
        return None
    if not Path(v).is_dir():
        return f"{v!r} is not a directory (a local HF model directory; nothing is downloaded)"
    return None if (Path(v) / "config.json").is_file() else f"{v!r} has no config.json (not an HF model dir)"


def _files(v: Any) -> str | None:
    missing = [f for f in str(v).split(",") if f.strip() and not Path(f.strip()).is_file()]
    return f"no such file: {', '.join(missing)}" if missing else None


def _reward_fn(v: Any) -> str | None:
    if not v:
        return None
    target, sep, fn = str(v).rpartition(":")
    if not sep or not target or not fn.isidentifier():
        return f"{v!r} must be 'module:function' or 'path/to/file.py:function'"
    if target.endswith(".py") and not Path(target).is_file():
        return f"no such file: {target}"
    return None


# The shared flag vocabulary of the recipes: a field of one of these names is checked by parse_args.
# A recipe adds its own checks in `Args.__post_init__` (raise ValueError naming the flag).
CHECKS: dict[str, Callable[[Any], str | None]] = {
    **dict.fromkeys(("lr", "critic_lr", "temperature", "max_grad_norm"), _positive),
    **dict.fromkeys(("steps", "prompts_per_rank", "gen_prompts_per_rank", "max_gen_rounds",
                     "max_prompt_len", "max_response_len", "max_len", "mini_batches", "epochs", "tp",
                     "sync_bucket_mb", "batch_size", "pairs_per_rank",
                     "val_n", "keep_checkpoints"), _at_least_one),
    **dict.fromkeys(("kl_coef", "entropy_coef", "entropy_coeff", "clip_low", "clip_high", "clip_ratio", "vf_clip",
                     "val_prompts", "val_every", "seed", "max_operand", "weight_decay",
                     "overlong_buffer_len", "overlong_penalty_factor", "critic_warmup", "warmup_steps",
                     "val_pairs", "val_rows", "reward_timeout_s",
                     "kv_cache_gb", "max_tokens_per_micro_batch"), _non_negative),  # 0 = fit to the device
    **dict.fromkeys(("gamma", "lam", "warmup_ratio", "min_lr_ratio", "gpu_memory_utilization"), _fraction),
    "group_size": lambda v: None if isinstance(v, int) and v >= 2 else (
        "must be >= 2: group-relative advantages of a group of one are the raw scores (verl's mean 0, std 1)"),
    "save_every": lambda v: None if isinstance(v, int) and v >= -1 else "must be >= -1 (-1: never)",
    "lr_schedule": lambda v: None if v in ("constant", "cosine") else "must be 'constant' or 'cosine'",
    "dtype": _dtype,
    "compute_dtype": _dtype_or_auto,
    "model": _model_dir,
    "train_files": _files,
    "val_files": _files,
    "reward_fn": _reward_fn,
}


def check_args(args: Any) -> list[str]:
    """Problems with the values of a parsed `Args` dataclass: one "--flag: what is wrong" per problem.

    Fields named in CHECKS are checked (counts >= 1, rates > 0, fractions in [0, 1], known dtypes, files
    and model directories that exist, the "module:function" form of a reward function); others are not.
    """
    problems = []
    for field in dataclasses.fields(args):
        check = CHECKS.get(field.name)
        value = getattr(args, field.name)
        if check is not None and isinstance(value, bool) is False and (problem := check(value)) is not None:
            problems.append(f"--{field.name.replace('_', '-')} {value!r}: {problem}")
    return problems


def field_docstrings(args_cls: type) -> dict[str, str]:
    """{field name: the string literal written right after the field} for a class and its bases.

    Read from the class source with `ast`; a class whose source is not available (defined in a REPL)
    gives {}. A subclass's docstring overrides its base's for the same field.
    """
    docs: dict[str, str] = {}
    for klass in reversed(args_cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        if node is None:
            continue
        body = node.body
        for stmt, nxt in zip(body, body[1:]):
            target = getattr(stmt, "target", None)
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def parse_args(
    args_cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None
) -> T:
    """Parses command-line flags (and an optional YAML file) into an instance of the dataclass `args_cls`.

    Every field is a flag, spelled `--field-name` or `--field_name`; its help text (`--help`) is the
    field's attribute docstring (the string literal right after it) plus its default. Booleans take
    `--flag true|false` (also yes/no/1/0), a bare `--flag` (= true), and `--no_flag` for a field whose
    default is True (HfArgumentParser's forms). Types, defaults and Literal / Enum choices are
    HfArgumentParser's.

    Two more flags on every parser:
      --config FILE.yaml  a mapping of field names (either spelling) to values; flags on the command line
                          override it. Values go through the same conversion and checks as flags.
      --verbose           show every library's logs and warnings (sets RLPRIMS_VERBOSE=1; see
                          rlprims.launch.console).

    argv: the flags (default: sys.argv[1:]). description: text shown above the flags by --help
    (default: the docstring of the `__main__` module, i.e. the recipe's).
    Errors exit with status 2 (argparse's convention) and name the flag, before the recipe does anything:
    an unknown option, a malformed value, an unreadable or unknown-key YAML file, and a value that fails
    `check_args` (e.g. `--lr -1`, `--steps 0`, a missing --train-files file) or the dataclass's own
    `__post_init__` (a ValueError).
    """
    from transformers import HfArgumentParser

    if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
        raise TypeError(f"args_cls must be a dataclass type, got {args_cls!r}")
    if description is None and argv is None:
        description = getattr(sys.modules.get("__main__"), "__doc__", None)
    parser = HfArgumentParser(
        args_cls, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    docs = field_docstrings(args_cls)
    for action in parser._actions:  # argparse keeps its actions here; setting .help is how it is meant
        doc = docs.get(action.dest)
        if doc is not None and not action.help:
            if action.option_strings and action.option_strings[0].startswith("--no_"):
                doc = f"Sets {action.dest} to false."
            action.help = doc.replace("%", "%%") + " (default: %(default)s)"  # argparse formats with %
    # Shown by --help; taken out of argv before parsing (SUPPRESS: never in the parsed namespace).
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="Read flag values from this YAML mapping; command-line flags override it.")
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="Show every library's logs and warnings (= RLPRIMS_VERBOSE=1).")
    argv = list(sys.argv[1:] if argv is None else argv)
    config, verbose, argv = _extract_config_and_verbose(parser, argv)
    if config is not None:
        argv = _yaml_to_argv(parser, config, args_cls) + argv
    if verbose:
        os.environ["RLPRIMS_VERBOSE"] = "1"
    parsed: Any
    try:
        parsed, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as e:  # the dataclass's __post_init__
        parser.error(str(e))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    if problems := check_args(parsed):
        parser.error("invalid values:\n  " + "\n  ".join(problems))
    return parsed


def _extract_config_and_verbose(parser: argparse.ArgumentParser, argv: list[str]):
    """Takes --config FILE / --config=FILE and --verbose out of argv (they are not dataclass fields)."""
    config, verbose, rest = None, False, []
    it = iter(argv)
    for token in it:
        if token == "--config":
            config = next(it, None)
            if config is None:
                parser.error("--config needs a YAML file")
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
        elif token == "--verbose":
            verbose = True
        else:
            rest.append(token)
    return config, verbose, rest


def _yaml_to_argv(parser: argparse.ArgumentParser, path: str, args_cls: type) -> list[str]:
    """The YAML mapping as flags, so its values are converted and checked exactly as flags are."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror or e}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({e})")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    argv: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            parser.error(f"--config {path}: unknown key {key!r} (flags: {', '.join(sorted(fields))})")
        if value is None:
            parser.error(f"--config {path}: {key!r} has no value")
        if isinstance(value, (dict,)):
            parser.error(f"--config {path}: {key!r} must be a scalar or a list, got a mapping")
        values = value if isinstance(value, list) else [value]
        argv += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv
