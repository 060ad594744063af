"""Shared pieces of the recipe tests: a tiny random chat model and a runner for a recipe under torchrun.

The tiny model has SmolLM2's tokenizer and chat template (so the embedded tasks and the chat templating
run exactly as with the default model) on a 2-layer, 64-wide random Llama: a 2-step run of any recipe
under 2 processes takes well under a minute on 2 cores, most of it `import vllm` and engine start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def make_tiny_chat_model(path: Path, *, seed: int = 0) -> str:
    """A random 2-layer Llama with the default model's tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlprims.rollout import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


def run_recipe(recipe: str, out: Path, *flags: str, nproc: int = 2, timeout: float = 900,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs recipes/<recipe>.py under torchrun with `nproc` processes; --out-dir is `out`."""
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), str(REPO / "recipes" / f"{recipe}.py"), *flags,
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def documented_metrics() -> list[re.Pattern]:
    """The metric names of docs/metrics.md's tables (first column), as patterns: `a/b/mean`, `/max` is
    a/b/max; `x_mean`, `_max` is x_max; <data_source>, <key> and N are placeholders."""
    names = []
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        prev = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if name.startswith(("/", "_")):
                name = prev[: prev.rfind(name[0])] + name
            else:
                prev = name
            names.append(name)
    return [re.compile(re.escape(n).replace("<data_source>", ".+").replace("<key>", ".+").replace("@N", "@[0-9]+")) for n in names]


def assert_documented(lines: list[dict]) -> None:
    """Every name a run logged is in docs/metrics.md (one name per quantity, documented)."""
    patterns = documented_metrics()
    logged = {k for m in lines for k in m if k != "step"}
    missing = sorted(k for k in logged if not any(p.fullmatch(k) for p in patterns))
    assert not missing, f"logged but not in docs/metrics.md: {missing}"
