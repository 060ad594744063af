"""recipes/reinforce_pp.py: two steps under torchrun with 2 processes on the tiny random chat model, and its
`global_whiten` on 2 gloo ranks against `masked_whiten` of the whole batch on one rank.

The tiny model never solves arithmetic, so a reward function in a file (length parity of the reply)
gives varying returns, hence a gradient at step 1 and a nonzero KL to the reference at step 2.
"""

import importlib.util
import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.recipes.conftest import REPO, metric_lines, run_recipe
from tests.tolerances import REORDER

KEYS = ("critic/score/mean", "critic/rewards/mean", "critic/returns/mean", "actor/pg_loss", "actor/entropy",
        "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "actor/reward_kl_penalty", "response_length/mean",
        "rollout_corr/kl", "timing_s/gen", "timing_s/update_actor", "perf/throughput")


def _recipe():
    if "reinforce_pp" in sys.modules:
        return sys.modules["reinforce_pp"]
    spec = importlib.util.spec_from_file_location("reinforce_pp", REPO / "recipes" / "reinforce_pp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _batch():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=g) * 3 + 1
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])  # ranks get rows 0-1 (6 tokens) and 2-5 (14 tokens)
    mask = torch.arange(5)[None, :] < lengths[:, None]
    values = torch.where(mask, values, torch.tensor(float("nan")))  # padding must not leak
    return values, mask


def _whiten_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    values, mask = _batch()
    rows = slice(0, 2) if rank == 0 else slice(2, 6)
    torch.save(_recipe().global_whiten(values[rows], mask[rows]), f"{out}.{rank}")
    dist.destroy_process_group()


def test_global_whiten_equals_whitening_the_whole_batch(tmp_path):
    from rlprims.ops import masked_whiten

    _recipe()  # imported once here: the forked workers inherit it (spawned ones would import it again, slowly)
    mp.start_processes(_whiten_worker, args=(str(tmp_path / "init"), str(tmp_path / "w")), nprocs=2,
                       start_method="fork")
    got = torch.cat([torch.load(tmp_path / f"w.{r}") for r in range(2)])
    values, mask = _batch()
    torch.testing.assert_close(got, masked_whiten(values, mask), **REORDER)
    # whitening each rank's rows on its own gives other numbers: the all-reduce matters
    local = torch.cat([masked_whiten(values[:2], mask[:2]), masked_whiten(values[2:], mask[2:])])
    assert not torch.allclose(local, got)


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("reinforce_pp")
    reward = out / "parity_reward.py"
    reward.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    run_recipe("reinforce_pp", out, "--model", tiny_chat_model, "--steps", "2", "--prompts-per-rank", "2",
               "--group-size", "4", "--max-response-len", "16", "--kv-cache-gb", "0.1", "--val-prompts", "4",
               "--lr", "1e-3", "--reward-fn", f"{reward}:score")
    return out, metric_lines(out)


def test_metrics(run):
    _, lines = run
    steps = [m for m in lines if "actor/pg_loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in KEYS:
            assert key in m and math.isfinite(m[key]), key
    assert [m["step"] for m in lines if "val-core/rlprims/arithmetic/acc/mean@1" in m] == [0, 2]
    assert steps[0]["actor/grad_norm"] > 0
    assert steps[0]["actor/reward_kl_penalty"] == 0.0  # policy == reference before the first update
    assert steps[1]["actor/reward_kl_penalty"] != 0.0  # k1 is signed
    assert steps[1]["rollout_corr/kl"] < 1e-4  # the engines got the updated weights


def test_checkpoint_and_export(run):
    out, _ = run
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
