"""Runs one step of recipes/grpo.py for each group of algorithm choices, in this one process.

    python tests/recipes/_grpo_choices.py MODEL_DIR OUT_DIR

The vLLM engine and the process group are made once and reused (the recipe's create_engine, init and
shutdown are replaced for the loop), so seven runs cost one engine start. Each run's metrics.jsonl lands
in OUT_DIR/<index>/.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every value of every choice flag appears at least once (the test checks it against the dicts).
RUNS = [
    dict(adv_estimator="grpo", policy_loss="ppo", loss_agg="token-mean", clip_dual=3.0, kl_coef=0.01,
         kl_estimator="k3", val_n=2, val_temperature=1.0, lr_schedule="constant"),
    dict(adv_estimator="drgrpo", policy_loss="gspo", loss_agg="seq-mean-token-mean", kl_coef=0.01,
         kl_estimator="k1", kl_in_reward=True, rollout_is="token"),
    dict(adv_estimator="rloo", policy_loss="cispo", loss_agg="seq-mean-token-sum", kl_coef=0.01,
         kl_estimator="k2", rollout_is="sequence", mini_batches=2),
    dict(adv_estimator="opo", policy_loss="sapo", loss_agg="seq-mean-token-sum-norm", kl_coef=0.01,
         kl_estimator="abs", rollout_rs="token", rollout_rs_estimator="k3", rollout_rs_max=1e-12),
    dict(adv_estimator="gpg", policy_loss="gmpo", loss_agg="token-mean", kl_coef=0.01, kl_estimator="k1+",
         rollout_rs="seq_sum", rollout_rs_estimator="k1", rollout_rs_min=-1e-4, rollout_rs_max=1e-4),
    dict(adv_estimator="grpo_passk", policy_loss="clip_cov", loss_agg="token-mean", kl_coef=0.01,
         kl_estimator="k3+", kl_in_reward=True, rollout_rs="seq_mean", rollout_rs_estimator="k2", epochs=2),
    dict(adv_estimator="reinforce_pp_baseline", policy_loss="kl_cov", loss_agg="seq-mean-token-mean",
         kl_coef=0.01, kl_estimator="abs+", rollout_rs="seq_max", rollout_is="token", lr_schedule="cosine",
         warmup_ratio=0.5, entropy_coeff=0.01),
]
RUNS.append(dict(RUNS[0], share_prompts=False))  # each row whole: the same step as run 0, at more cost
COMMON = dict(steps=1, prompts_per_rank=2, group_size=4, max_response_len=12, kv_cache_gb=0.1, val_prompts=2,
              save_every=0, lr=1e-3, reward_fn=str(REPO / "tests" / "recipes" / "_rewards.py") + ":letter_share")


def load_recipe():
    spec = importlib.util.spec_from_file_location("grpo_recipe", REPO / "recipes" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(model_dir: str, out: str) -> None:
    grpo = load_recipe()
    ctx = grpo.init(seed=0)
    engines = {}

    def cached_engine(*args, **kwargs):
        if "engine" not in engines:
            engines["engine"] = create_engine(*args, **kwargs)
        return engines["engine"]

    create_engine = grpo.create_engine
    grpo.init, grpo.shutdown, grpo.create_engine = (lambda seed: ctx), (lambda ctx: None), cached_engine
    for i, flags in enumerate(RUNS):
        grpo.main(grpo.Args(model=model_dir, out_dir=str(Path(out) / str(i)), **COMMON, **flags))
        print(f"run {i} done: {flags}", flush=True)
    engines.clear()
    grpo.__dict__["shutdown"] = None
    import gc

    gc.collect()
    from rlprims.launch import shutdown

    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
