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


# ----------------------------------------------------------------- --config, --verbose, checks, help


@dataclass
class Recipe:
    lr: float = 1e-5
    """Learning rate; 20% of runs need less."""
    steps: int = 20
    """Steps."""
    compile_engine: bool = False
    """Compile the engine."""
    compute_dtype: str = ""
    """Dtype."""
    train_files: str = ""
    """Parquet files."""
    group_size: int = 8
    """Samples per prompt."""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"--group-size {self.group_size}: GRPO needs at least 2 samples per prompt")


def test_yaml_config_and_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 3e-6\nsteps: 4\ncompile-engine: true\ncompute_dtype: bfloat16\n")
    assert parse_args(Recipe, ["--config", str(cfg)]) == Recipe(
        lr=3e-6, steps=4, compile_engine=True, compute_dtype="bfloat16"
    )
    assert parse_args(Recipe, [f"--config={cfg}", "--steps", "9", "--compile-engine", "false"]) == Recipe(
        lr=3e-6, steps=9, compile_engine=False, compute_dtype="bfloat16"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("- lr\n", "expected a mapping"),
        ("lr: [\n", "not valid YAML"),
        ("steps: -2\n", "--steps -2: must be >= 1"),
        ("steps: two\n", "invalid int value: 'two'"),
    ],
)
def test_yaml_config_errors(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(Recipe, ["--config", str(cfg)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(Recipe, ["--config", str(tmp_path / "none.yaml")])
    assert "none.yaml" in capsys.readouterr().err


def test_values_checked_at_parse_time(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_args(Recipe, ["--lr", "-1", "--steps", "0", "--compute-dtype", "fp8",
                            "--train-files", str(tmp_path / "missing.parquet")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    for text in ("--lr -1.0: must be > 0", "--steps 0: must be >= 1", "--compute-dtype 'fp8'",
                 "no such file: " + str(tmp_path / "missing.parquet")):
        assert text in err, err
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit):
            parse_args(Recipe, ["--lr", value])


@dataclass
class Groups:
    group_size: int = 8
    """Samples per prompt."""
    steps: int = 1
    """Steps."""


def test_group_of_one_and_negative_steps_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(Groups, ["--group-size", "1", "--steps", "-3"])
    err = capsys.readouterr().err
    assert "--group-size 1: must be >= 2" in err and "--steps -3: must be >= 1" in err


@dataclass
class Saving:
    save_every: int = 10
    """Checkpoint every this many steps (-1: never)."""


def test_save_every_takes_minus_one_for_never(capsys):
    assert parse_args(Saving, ["--save-every", "-1"]).save_every == -1
    with pytest.raises(SystemExit):
        parse_args(Saving, ["--save-every", "-2"])
    assert "--save-every -2: must be >= -1 (-1: never)" in capsys.readouterr().err


def test_post_init_error_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Recipe, ["--group-size", "1"])
    assert e.value.code == 2 and "GRPO needs at least 2" in capsys.readouterr().err


def test_verbose_sets_the_environment(monkeypatch):
    monkeypatch.delenv("RLPRIMS_VERBOSE", raising=False)
    assert parse_args(Recipe, ["--steps", "3"]) == Recipe(steps=3)
    import os

    assert "RLPRIMS_VERBOSE" not in os.environ
    assert parse_args(Recipe, ["--verbose"]) == Recipe()
    assert os.environ["RLPRIMS_VERBOSE"] == "1"


def test_help_with_percent_and_extra_flags(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Recipe, ["--help"], description="Recipe with 100% docs.")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Learning rate; 20% of runs need less. (default: 1e-05)" in out
    assert "--config FILE.yaml" in out and "--verbose" in out and "{'option_strings'" not in out


def test_every_recipe_help_prints_its_docstring_and_flag_docs():
    """`python recipes/X.py --help` of every recipe: exit 0, the docstring's first line, each field's doc."""
    import dataclasses
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    for recipe in sorted((repo / "recipes").glob("*.py")):
        proc = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True,
                              cwd=repo, env={"PYTHONPATH": str(repo), "PATH": ""}, timeout=120)
        assert proc.returncode == 0, (recipe.name, proc.stderr[-2000:])
        out = " ".join(proc.stdout.split())
        source = recipe.read_text()
        first_line = source.split('"""')[1].strip().splitlines()[0]
        assert " ".join(first_line.split()) in out, recipe.name
        spec = importlib.util.spec_from_file_location(f"_recipe_{recipe.stem}", recipe)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # defines Args; main() runs only under __main__
        docs = field_docstrings(module.Args)
        assert len(docs) == len(dataclasses.fields(module.Args)), (recipe.name, "a field without a docstring")
        for name, doc in docs.items():
            assert " ".join(doc.split())[:40] in out, (recipe.name, name)
        assert "{'option_strings'" not in out and "--config FILE.yaml" in out
