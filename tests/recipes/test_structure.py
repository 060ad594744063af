"""Every recipe is a complete loop a person reads in one sitting: ≤ 300 lines, a docstring with the paper
and the launch commands, an `Args` dataclass with a docstring per field, and imports from rlprims,
torch, transformers and vLLM only (plus the standard library)."""

import ast
import sys
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.py"))
ALLOWED = {"rlprims", "torch", "transformers", "vllm"}


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"grpo", "ppo", "dapo", "rloo", "reinforce_pp", "sft", "reward_model"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_shape(path: Path):
    source = path.read_text()
    assert len(source.splitlines()) <= 300, f"{path.name}: {len(source.splitlines())} lines (cap 300)"
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
