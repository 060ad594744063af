"""Command-line flags from a recipe's `Args` dataclass (through transformers' HfArgumentParser)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["parse_args", "field_docstrings"]

T = TypeVar("T")


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
    """Parses command-line flags into an instance of the dataclass `args_cls`.

    Every field is a flag, spelled `--field-name` or `--field_name`; its help text (`--help`) is the
    field's attribute docstring (the string literal right after it) plus its default. Booleans take
    `--flag true|false` (also yes/no/1/0), a bare `--flag` (= true), and `--no_flag` for a field whose
    default is True (HfArgumentParser's forms). Types, defaults and Literal / Enum choices are
    HfArgumentParser's.

    argv: the flags (default: sys.argv[1:]). description: text shown above the flags by --help (e.g. the
    recipe's `__doc__`).
    An unknown option or a malformed value prints the usage and the offending options, then exits with
    status 2 (argparse's convention), before the recipe does anything.
    """
    from transformers import HfArgumentParser

    if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
        raise TypeError(f"args_cls must be a dataclass type, got {args_cls!r}")
    parser = HfArgumentParser(
        args_cls, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    docs = field_docstrings(args_cls)
    for action in parser._actions:  # argparse keeps its actions here; setting .help is how it is meant
        doc = docs.get(action.dest)
        if doc is not None and not action.help:
            if action.option_strings and action.option_strings[0].startswith("--no_"):
                doc = f"Sets {action.dest} to false."
            action.help = f"{doc} (default: %(default)s)"
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed: Any
    parsed, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return parsed
