"""recipes/ppo.py: two steps under torchrun with 2 processes sharing one engine (--tp 2) on the tiny random
chat model, then a resume.

The tiny model never solves arithmetic, so a reward function in a file (length parity of the reply) gives
nonzero returns for the critic to fit. The KL-in-reward path is on (--kl-coef): the penalty is exactly 0
at step 1 (policy = reference) and nonzero at step 2. A second run on the same directory with
--steps 3 --critic-warmup 3 resumes actor and critic from step 2 and, inside the warm-up, trains only the
critic at step 3.
"""

import json
import math

import pytest

from tests.recipes.conftest import assert_documented, metric_lines, run_recipe

pytest.importorskip("vllm")

FLAGS = ["--tp", "2", "--prompts-per-rank", "4", "--max-response-len", "16", "--kv-cache-gb", "0.1",
         "--kl-coef", "0.01", "--lr", "1e-4", "--critic-lr", "1e-3", "--val-prompts", "4"]
ACTOR = ("actor/pg_loss", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm",
         "timing_s/update_actor")
CRITIC = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm",
          "critic/vf_explained_var", "timing_s/update_critic")
DATA = tuple(f"{k}/{f}" for k in ("critic/score", "critic/rewards", "critic/advantages", "critic/returns",
                                  "critic/values", "response_length") for f in ("mean", "max", "min")) + (
    "actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff", "rollout_corr/kl", "timing_s/gen",
    "timing_s/old_log_prob", "timing_s/update_weights", "perf/throughput", "response_length/clip_ratio")


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    reward = out / "parity_reward.py"
    reward.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    flags = ["--model", tiny_chat_model, *FLAGS, "--reward-fn", f"{reward}:score"]
    run_recipe("ppo", out, *flags, "--steps", "2")
    first = metric_lines(out)
    run_recipe("ppo", out, *flags, "--steps", "3", "--critic-warmup", "3")  # resumes from step 2
    return out, first, metric_lines(out)


def train(lines: list[dict]) -> list[dict]:
    return [m for m in lines if "critic/score/mean" in m]


def finite(m: dict, keys) -> None:
    for key in keys:
        assert key in m and m[key] is not None and math.isfinite(m[key]), (key, m.get(key))


def test_two_steps_log_verl_metrics(run):
    _, all_lines, resumed = run
    assert_documented(all_lines + resumed)
    assert [m["step"] for m in all_lines if "val-core/rlprims/arithmetic/acc/mean@1" in m] == [0, 2]
    lines = train(all_lines)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        finite(m, ACTOR + CRITIC + DATA)
        assert m["critic/score/min"] >= 0.0 and m["critic/score/max"] <= 1.0
        assert abs(m["critic/advantages/mean"]) < 1e-5  # whitened over both ranks' tokens
        assert m["critic/values/min"] <= m["critic/values/mean"] <= m["critic/values/max"]
    assert lines[0]["actor/reward_kl_penalty"] == 0.0  # policy == reference before the first update
    assert lines[1]["actor/reward_kl_penalty"] != 0.0  # k1 is signed
    assert max(m["critic/score/max"] for m in lines) == 1.0, "parity rewards: some reply must score 1"
    assert lines[1]["rollout_corr/kl"] < 1e-4  # the engines got the updated policy


def test_resume_and_critic_warmup(run):
    _, first, all_lines = run
    assert all_lines[: len(first)] == first  # the resumed run keeps the log up to its checkpoint
    lines = train(all_lines)
    assert [m["step"] for m in lines] == [1, 2, 3]
    finite(lines[2], CRITIC + DATA)
    assert "actor/pg_loss" not in lines[2] and "timing_s/update_actor" not in lines[2]  # warm-up: critic only
    assert lines[2]["rollout_corr/kl"] < 1e-4  # the engine was re-synced with the resumed trainer


def test_checkpoints_and_exports(run):
    out, _, _ = run
    for root in ("checkpoints", "critic_checkpoints"):
        assert sorted(p.name for p in (out / root).glob("step-*")) == ["step-00000002", "step-00000003"], root
        assert (out / root / "step-00000003" / "checkpoint.json").is_file()
    assert (out / "hf" / "model.safetensors").is_file()
    config = json.loads((out / "critic_hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 1
    assert (out / "critic_hf" / "model.safetensors").is_file()
