"""recipes/reinforce_pp.py: two steps under torchrun with 2 processes sharing one engine (--tp 2) on the
tiny random chat model. (The whitening over every data-parallel rank, `dist_reinforce_pp_advantages`, is
tested on 4 gloo ranks against one process in tests/parallel/test_stats.py.)

The tiny model never solves arithmetic, so a reward function in a file (length parity of the reply)
gives varying returns, hence a gradient at step 1 and a nonzero KL to the reference at step 2.
"""

import math

import pytest

from tests.recipes.conftest import assert_documented, metric_lines, run_recipe

KEYS = ("critic/score/mean", "critic/rewards/mean", "critic/returns/mean", "critic/returns/max",
        "critic/advantages/mean", "actor/pg_loss", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl",
        "actor/grad_norm", "actor/reward_kl_penalty", "response_length/mean", "rollout_corr/kl",
        "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights", "perf/throughput")


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("reinforce_pp")
    reward = out / "parity_reward.py"
    reward.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    run_recipe("reinforce_pp", out, "--model", tiny_chat_model, "--tp", "2", "--steps", "2",
               "--prompts-per-rank", "2",
               "--group-size", "4", "--max-response-len", "16", "--kv-cache-gb", "0.1", "--val-prompts", "4",
               "--lr", "1e-3", "--reward-fn", f"{reward}:score")
    return out, metric_lines(out)


def test_metrics(run):
    _, lines = run
    assert_documented(lines)
    steps = [m for m in lines if "actor/pg_loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in KEYS:
            assert key in m and math.isfinite(m[key]), key
        assert abs(m["critic/advantages/mean"]) < 1e-5  # whitened over the step's tokens
    assert [m["step"] for m in lines if "val-core/rlprims/arithmetic/acc/mean@1" in m] == [0, 2]
    assert steps[0]["actor/grad_norm"] > 0
    assert steps[0]["actor/reward_kl_penalty"] == 0.0  # policy == reference before the first update
    assert steps[1]["actor/reward_kl_penalty"] != 0.0  # k1 is signed
    assert steps[1]["rollout_corr/kl"] < 1e-4  # the engines got the updated weights


def test_checkpoint_and_export(run):
    out, _ = run
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
