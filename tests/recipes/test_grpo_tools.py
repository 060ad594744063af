"""recipes/grpo_tools.py end to end: two ranks on the tiny model (FSDP2, one engine and one tool pool each).

The tiny random model never writes a tool call, so this checks the wiring (verl parquet rows naming their
tool, multi-turn rollout, rewards on the last turn, packed update over the model tokens, weight sync, tool
metrics, validation with a rank that has no prompt, generations.jsonl, checkpoint, export); the tool
paths themselves are tested in tests/rollout/test_multiturn.py. One launch, two steps (~1 minute on 2 cores, most of it `import vllm`).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.recipes.conftest import REPO, metric_lines, run_recipe

pytest.importorskip("vllm")
pytest.importorskip("pebble")

STEPS = 2
FLAGS = (
    "--steps 2 --prompts-per-rank 2 --group-size 4 --max-response-len 24 --max-turn-len 12 --kv-cache-gb 0.1 "
    "--val-prompts 1 --val-every 2 --save-every 2 --lr 1e-3 --tool-workers 1"
).split() + ["--reward-fn", str(REPO / "tests" / "recipes" / "_rewards.py") + ":letter_share"]
KEYS = ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "response_length/mean",
        "response_length/model_tokens_mean", "tool/call_rate", "tool/error_rate", "num_turns/mean", "finish/stop",
        "finish/length", "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights", "reward/errors",
        "perf/throughput")


def test_two_steps_log_tool_metrics_and_stay_on_policy(tiny_chat_model, tmp_path):
    from rlprims.data import multiplication_rows, write_verl_parquet

    # verl parquet files whose rows name their tool in extra_info (what --train-files users bring)
    train = write_verl_parquet(multiplication_rows(64, seed=0), tmp_path / "data" / "train.parquet")
    test = write_verl_parquet(multiplication_rows(8, seed=1, split="test"), tmp_path / "data" / "test.parquet")
    out = tmp_path / "run"
    run_recipe("grpo_tools", out, "--model", tiny_chat_model, *FLAGS, "--train-files", str(train),
               "--val-files", str(test))
    lines = metric_lines(out)
    train_lines = [m for m in lines if "critic/score/mean" in m]
    assert [m["step"] for m in train_lines] == list(range(1, STEPS + 1))
    for m in train_lines:
        for key in KEYS:
            assert key in m and math.isfinite(m[key]), key
        assert m["actor/grad_norm"] > 0 and m["num_turns/mean"] >= 1
        assert abs(m["finish/stop"] + m["finish/length"] + m["finish/max_turns"] + m["finish/done"] - 1) < 1e-9
        assert abs(m["rollout_corr/kl"]) < 1e-4, m["rollout_corr/kl"]  # the engine has the trainer's weights
    val = [m for m in lines if "val-core/rlprims/arithmetic/acc/mean@1" in m]
    assert [m["step"] for m in val] == [0, 2] and all("val-aux/tool/call_rate" in m for m in val)
    assert all(m["val-aux/rlprims/arithmetic/num_prompts"] == 1 for m in val)  # rank 1 validated none
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [0, 2]
    assert all("What is" in g["prompt"] and g["response"] and g["score"] is not None for g in generations)
    assert (out / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    assert (out / "hf" / "model.safetensors").is_file()
