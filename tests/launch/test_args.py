"""rlprims.launch.parse_args: flags from a dataclass, help from field docstrings, both spellings, errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rlprims.launch import field_docstrings, parse_args


@dataclass
class Base:
    model_path: str = ""
    """Local HF model directory."""
    steps: int = 3
    """Policy
    updates."""


@dataclass
class Args(Base):
    use_kl: bool = False
    """Add the KL loss."""
    packed: bool = True
    """Pack sequences."""
    lr: float = 1e-6
    undocumented: int = 0
    steps: int = 5
    """Overridden doc."""


def test_docstrings_read_from_source():
    assert field_docstrings(Args) == {
        "model_path": "Local HF model directory.",
        "steps": "Overridden doc.",
        "use_kl": "Add the KL loss.",
        "packed": "Pack sequences.",
    }
    assert field_docstrings(Base)["steps"] == "Policy\nupdates."


def test_defaults_and_both_spellings():
    assert parse_args(Args, []) == Args()
    a = parse_args(Args, ["--model-path", "m", "--steps", "7", "--lr", "2e-3", "--undocumented", "4"])
    b = parse_args(Args, ["--model_path", "m", "--steps=7", "--lr=2e-3", "--undocumented", "4"])
    assert a == b == Args(model_path="m", steps=7, lr=2e-3, undocumented=4)


@pytest.mark.parametrize(
    "argv, use_kl, packed",
    [
        (["--use-kl", "true", "--packed", "false"], True, False),
        (["--use_kl", "yes", "--packed", "0"], True, False),
        (["--use-kl"], True, True),  # bare flag = true
        (["--no_packed"], False, False),  # HfArgumentParser's complement of a default-True flag
        (["--use-kl", "False"], False, True),
    ],
)
def test_bools(argv, use_kl, packed):
    args = parse_args(Args, argv)
    assert (args.use_kl, args.packed) == (use_kl, packed)


def test_help_shows_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--help"], description="The recipe.")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "The recipe." in out
    assert "--model_path MODEL_PATH, --model-path MODEL_PATH Local HF model directory. (default: )" in out
    assert "Overridden doc. (default: 5)" in out
    assert "Add the KL loss. (default: False)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1", "--steps", "2"], "unrecognized arguments: --bogus 1"),
        (["--steps", "two"], "invalid int value: 'two'"),
        (["--use-kl", "maybe"], "--use_kl"),
    ],
)
def test_errors_name_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_not_a_dataclass():
    with pytest.raises(TypeError, match="dataclass"):
        parse_args(int, [])
