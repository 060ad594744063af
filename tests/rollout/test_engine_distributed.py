"""torchrun with 2 CPU processes on gloo: one engine per rank (DP=2), and one engine over 2 ranks (TP=2).

Each run starts 2 processes (import vllm + engine start, ~30 s on 2 cores) and is killed after
_TIMEOUT_S, so a hang fails the test instead of blocking the suite. Results are compared with the
single-process session engine on the same prompts and weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from rlprims.rollout import generate, update_weights  # noqa: E402
from tests.rollout.conftest import perturbed, tiny_engine_prompts  # noqa: E402
from tests._procs import kill_tree  # noqa: E402, I001
from tests.tolerances import ENGINE_FP32  # noqa: E402

_TIMEOUT_S = 300
_REPO = Path(__file__).resolve().parents[2]
_WORKER = Path(__file__).with_name("_dist_worker.py")


def _torchrun(model_dir: str, tp: int, out_dir: Path, *extra: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(_WORKER),
        model_dir,
        str(tp),
        str(out_dir),
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(_REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        cmd,
        cwd=_REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun (tp={tp}) hung for {_TIMEOUT_S} s; last output:\n{log[-4000:]}")
    if proc.returncode != 0:
        hint = ""
        if "create shm in SHMManager failed. errno: 17" in log:
            hint = "\nstale vLLM CPU shared memory from a killed TP run: remove /dev/shm/*cpushm_* and rerun"
        pytest.fail(f"torchrun (tp={tp}) exited with {proc.returncode}; last output:\n{log[-6000:]}{hint}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _single_process(engine, prompts, original_weights):
    def greedy():
        out = generate(engine, prompts, n=1, temperature=0, max_tokens=16)
        return out.response_ids, out.rollout_logprobs

    base = greedy()
    update_weights(engine, perturbed(original_weights))
    try:
        pert = greedy()
    finally:
        update_weights(engine, original_weights)
    return base, pert


def _assert_matches(got: dict, expected) -> None:
    ids, logprobs = expected
    assert got["ids"] == ids.tolist()
    torch.testing.assert_close(torch.tensor(got["logprobs"]), logprobs, **ENGINE_FP32)


def test_data_parallel_one_engine_per_rank(tiny_model_dir, tiny_engine, original_weights, tmp_path):
    # the trainer's own gloo group exists first: vLLM reuses it and it still works afterwards
    ranks = _torchrun(tiny_model_dir, 1, tmp_path, "--trainer-group")
    for r, res in enumerate(ranks):
        assert (res["tp"], res["dp"]) == (1, 2)
        assert res["prompts"] == tiny_engine_prompts()[r::2]
        base, pert = _single_process(tiny_engine, res["prompts"], original_weights)
        _assert_matches(res["greedy"], base)
        _assert_matches(res["perturbed"], pert)
        _assert_matches(res["restored"], base)
        # a call where one rank has no prompt returns on both (vLLM's dp lock-step); then all is as before
        assert res["uneven"] == ([2, 0] if r == 0 else [0, 1])
        _assert_matches(res["after_uneven"], base)
        assert res["trainer_allreduce"] == 3.0  # 1 + 2


def test_tensor_parallel_two_ranks_one_engine(tiny_model_dir, tiny_engine, original_weights, tmp_path):
    ranks = _torchrun(tiny_model_dir, 2, tmp_path)
    base, pert = _single_process(tiny_engine, tiny_engine_prompts(), original_weights)
    for res in ranks:
        assert (res["tp"], res["dp"]) == (2, 1)
        _assert_matches(res["greedy"], base)  # the TP all-reduce reorders sums: ENGINE_FP32, same tokens
        _assert_matches(res["perturbed"], pert)
        _assert_matches(res["restored"], base)
        assert "differ across the 2 ranks of this tensor-parallel group" in res["tp_mismatch_error"]
        assert "differ across the 2 ranks of this tensor-parallel group" in res["tp_invalid_error"]
    assert ranks[0]["greedy"]["ids"] == ranks[1]["greedy"]["ids"]
