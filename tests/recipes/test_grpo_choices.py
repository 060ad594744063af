"""One step of every algorithm choice of recipes/grpo.py (estimator, loss, aggregation, KL estimator and
placement, rollout correction), seven runs in one process sharing one engine (tests/recipes/_grpo_choices.py),
and the flag choices equal the recipe's dicts."""

import math
import os
import subprocess
import sys
import typing

import pytest

from tests.recipes._grpo_choices import RUNS, load_recipe
from tests.recipes.conftest import assert_documented, metric_lines, REPO


def test_every_choice_is_a_dict_entry_and_every_entry_is_run():
    grpo = load_recipe()
    hints = typing.get_type_hints(grpo.Args)
    mappings = {
        "adv_estimator": grpo.advantage_estimators(4, None),
        "policy_loss": grpo.policy_losses(0.2, 0.28, 0.0),
        "loss_agg": grpo.aggregations(16),
        "kl_estimator": grpo.KL_ESTIMATORS,
        "rollout_is": {"": None, **grpo.IS_WEIGHTS},
        "rollout_rs": {"": None, **grpo.REJECTIONS},
        "rollout_rs_estimator": grpo.MISMATCH,
        "lr_schedule": grpo.LR_SCHEDULES,
    }
    assert set(grpo.IS_WEIGHTS) == set(grpo.IS_METRICS)
    for flag, mapping in mappings.items():
        if flag in hints and typing.get_origin(hints[flag]) is typing.Literal:
            assert set(typing.get_args(hints[flag])) == set(mapping), flag  # --help lists exactly these
        used = {run.get(flag, getattr(grpo.Args, flag)) for run in RUNS}
        assert set(mapping) <= used | {""}, (flag, set(mapping) - used)


@pytest.fixture(scope="module")
def runs(tiny_chat_model, tmp_path_factory):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("grpo-choices")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "recipes" / "_grpo_choices.py"), tiny_chat_model,
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [metric_lines(out / str(i)) for i in range(len(RUNS))]


def test_one_step_of_every_choice(runs):
    assert_documented([m for lines in runs for m in lines])
    for flags, lines in zip(RUNS, runs):
        step = next(m for m in lines if m["step"] == 1 and "critic/score/mean" in m)
        keys = ["critic/score/mean", "critic/advantages/max", "response_length/clip_ratio", "actor/lr",
                "rollout_corr/kl", "timing_s/update_weights", "perf/throughput"]
        if flags.get("kl_in_reward"):
            keys.append("actor/reward_kl_penalty")
        elif "actor/pg_loss" in step:
            keys.append("actor/kl_loss")
        if flags.get("rollout_is"):
            keys += ["rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_eff_sample_size"]
        if flags.get("rollout_rs"):
            keys.append("rollout_corr/rollout_rs_masked_fraction")
        for key in keys:
            assert key in step and math.isfinite(step[key]), (flags, key, step.get(key))
        val = {k for m in lines for k in m if k.startswith("val-core/")}
        n = flags.get("val_n", 1)
        assert f"val-core/rlprims/arithmetic/acc/mean@{n}" in val, (flags, val)
        if n > 1:
            assert f"val-core/rlprims/arithmetic/acc/best@{n}/mean" in val


def test_shared_prompts_change_the_cost_not_the_step(runs):
    """Run 0 computes each group's prompt once (the default on CPU); the last run is run 0
    with every row computed whole. Same rollouts, so the same step up to fp summation order."""
    assert RUNS[-1] == dict(RUNS[0], share_prompts=False) and "share_prompts" not in RUNS[0]
    shared, whole = (next(m for m in runs[i] if m["step"] == 1 and "actor/pg_loss" in m) for i in (0, -1))
    assert shared["response_length/mean"] == whole["response_length/mean"]
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/kl_loss", "rollout_corr/kl"):
        assert math.isclose(shared[key], whole[key], rel_tol=1e-4, abs_tol=1e-6), (key, shared[key], whole[key])
