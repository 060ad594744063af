"""Every recipe is a complete loop a person reads in one sitting: ≤ 350 lines, one statement per line of
≤ 110 characters (ruff with the repo's config), a docstring with the paper and the launch commands, an
`Args` dataclass with a docstring per field, and imports from rlprims, torch, transformers and vLLM only
(plus the standard library)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.py"))
# The library modules the recipes share (written with them, held to the same lines).
SHARED = ["rlprims/launch/run_args.py", "rlprims/parallel/stats.py", "rlprims/parallel/ranks.py",
          "rlprims/parallel/advantages.py", "rlprims/parallel/step.py", "rlprims/models/rollout.py",
          "rlprims/validation.py", "rlprims/schedules.py", "rlprims/timing.py",
          "rlprims/ops/token_rewards.py", "rlprims/ops/correction.py"]
MAX_LINES = 350
ALLOWED = {"rlprims", "torch", "transformers", "vllm"}


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"grpo", "ppo", "dapo", "rloo", "reinforce_pp", "sft", "reward_model"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_shape(path: Path):
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines (cap {MAX_LINES})"
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    assert "arXiv" in doc or "arxiv" in doc, f"{path.name}: the docstring names no paper"
    assert "torchrun" in doc and "rlprims.launch.slurm" in doc, f"{path.name}: launch commands missing"

    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            top = name.split(".")[0]
            assert top in ALLOWED or top in sys.stdlib_module_names or top == "__future__", (
                f"{path.name} imports {name}")

    args = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    assert args, f"{path.name} has no Args dataclass"
    body = args[0].body
    fields = [(i, n) for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    assert fields, f"{path.name}: Args has no fields"
    for i, node in fields:
        doc_next = i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(
            getattr(body[i + 1], "value", None), ast.Constant) and isinstance(body[i + 1].value.value, str)
        assert doc_next, f"{path.name}: Args.{node.target.id} has no docstring"


def test_ruff_one_statement_per_line_within_110_characters():
    """`ruff check` with pyproject.toml's [tool.ruff] (E4, E7, E9, E501, F) on the recipes and the modules
    they share."""
    cmd = [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "recipes", *SHARED]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr



def test_fitted_recipes_shard_as_fitted():
    """Every recipe calls `fit_to_device` and passes all of the trainer's share to every
    `shard_model` (checkpointing, gather_once's resharding, CPU offload: the last was once computed and
    dropped)."""
    fitted = {}
    for path in RECIPES:
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Name) and n.id == "fit_to_device" for n in ast.walk(tree)):
            fitted[path.stem] = [n for n in ast.walk(tree)
                                 if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "shard_model"]
    assert set(fitted) == {p.stem for p in RECIPES}, sorted(fitted)
    for name, calls in fitted.items():
        assert calls, f"{name}: no shard_model call"
        for call in calls:
            spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
            assert spread == ["fit.shard_kwargs"], f"{name}:{call.lineno}: {ast.unparse(call)}"
