"""The promises README makes about the repository itself."""

import inspect
from pathlib import Path

import rlprims.ops as ops

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _ci_command() -> str:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert len(commands) == 1, f".ci/run must run exactly one command, found {commands}"
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command():
    assert f"\n{_ci_command()}\n" in README, "README must show the exact command .ci/run runs"


def _public_functions():
    for name in ops.__all__:
        obj = getattr(ops, name)
        if inspect.isfunction(obj):
            yield name, obj


def _takes_tensors(fn) -> bool:
    return any("Tensor" in str(p.annotation) for p in inspect.signature(fn).parameters.values())


def test_every_public_op_has_a_full_docstring():
    missing = []
    for name, fn in _public_functions():
        doc = inspect.getdoc(fn) or ""
        if len(doc.splitlines()) < 3 or (_takes_tensors(fn) and "Shapes:" not in doc):
            missing.append(name)
    assert not missing, f"ops without a docstring giving formula and Shapes: {missing}"


def test_every_public_op_has_a_readme_row():
    missing = [name for name, _ in _public_functions() if f"| `{name}`" not in README]
    assert not missing, f"ops missing from README's table: {missing}"


def test_hyperparameters_are_keyword_only():
    offenders = []
    for name, fn in _public_functions():
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                offenders.append(f"{name}(**{p.name})")
            # Optional tensors may be positional (STYLE: tensors positional); other defaults may not.
            optional_tensor = "Tensor" in str(p.annotation)
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty and not optional_tensor:
                offenders.append(f"{name}({p.name}=...) should be keyword-only")
    assert not offenders, offenders


def test_every_test_named_in_the_fault_table_exists():
    """docs/faults.md ties each injected fault to the test that enforces it: a row cannot outlive its test."""
    import re

    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (ROOT / "docs" / "faults.md").read_text())
    assert len(named) >= 20, named
    missing = [f"{path}::{name}" for path, name in named
               if not (ROOT / path).is_file()
               or not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE)]
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"
