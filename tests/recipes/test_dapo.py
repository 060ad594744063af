"""recipes/dapo.py: two steps under torchrun with 2 processes sharing one engine (--tp 2) on the tiny random
chat model.

The reward (in a file) is 1 for about one reply in 7 (a hash of the text), so about half of the groups
of 4 score all 0 and are dropped: each step needs more than one generation round per rank to collect its
2 varied groups (with this seed it does; the runs are deterministic on CPU). Checks: the kept groups
all have mixed scores (score max 1, min 0), a step stops early only when every rank is full, at most
`max_gen_rounds` rounds, the overlong penalty lowers the rewards of cut replies, and the usual metrics,
checkpoint and export.
"""

import math

import pytest

from tests.recipes.conftest import assert_documented, metric_lines, run_recipe

pytest.importorskip("vllm")

KEYS = ("critic/score/mean", "critic/rewards/mean", "critic/advantages/mean", "actor/pg_loss",
        "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "response_length/mean",
        "response_length/clip_ratio", "rollout_corr/kl", "timing_s/gen", "timing_s/old_log_prob",
        "timing_s/update_actor", "timing_s/update_weights", "perf/throughput", "train/num_gen_batches",
        "train/num_kept_groups", "train/varied_group_ratio")
MAX_ROUNDS, TARGET = 3, 2  # --max-gen-rounds, prompts_per_rank x data-parallel ranks (1: --tp 2)


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dapo")
    reward = out / "rare_reward.py"
    reward.write_text("import hashlib\n\n"
                      "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(int(hashlib.md5(solution_str.encode()).hexdigest(), 16) % 7 == 0)\n")
    run_recipe("dapo", out, "--model", tiny_chat_model, "--tp", "2", "--steps", "2",
               "--prompts-per-rank", "2", "--gen-prompts-per-rank", "2", "--max-gen-rounds", str(MAX_ROUNDS),
               "--group-size", "4", "--max-response-len", "16", "--overlong-buffer-len", "4",
               "--kv-cache-gb", "0.1", "--val-prompts", "4", "--lr", "1e-4", "--reward-fn", f"{reward}:score")
    return out, metric_lines(out)


def test_metrics(run):
    _, all_lines = run
    assert_documented(all_lines)
    assert [m["step"] for m in all_lines if "val-core/rlprims/arithmetic/acc/mean@1" in m] == [0, 2]
    lines = [m for m in all_lines if "critic/score/mean" in m]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in KEYS:
            assert key in m and m[key] is not None and math.isfinite(m[key]), (key, m.get(key))
        rounds, kept = m["train/num_gen_batches"], m["train/num_kept_groups"]
        assert 1 <= rounds <= MAX_ROUNDS and 0 <= kept <= TARGET
        assert kept == TARGET or rounds == MAX_ROUNDS, "a step stops early only when every rank is full"
        if kept:
            assert m["critic/score/max"] == 1.0 and m["critic/score/min"] == 0.0  # only varied groups kept
            assert m["actor/grad_norm"] > 0
        # overlong shaping: replies cut at 16 tokens lose up to 1 (buffer 4): rewards <= scores
        assert m["critic/rewards/mean"] <= m["critic/score/mean"] - m["response_length/clip_ratio"] + 1e-6
    assert max(m["train/num_gen_batches"] for m in lines) > 1, "no refill: the reward should drop about half"


def test_checkpoint_and_export(run):
    out, _ = run
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
