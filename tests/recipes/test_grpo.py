"""recipes/grpo.py end to end: two ranks on the tiny model (FSDP2, one engine per rank), resumption, and
two ranks sharing one engine (--tp 2).

The score statistics are checked against the scores themselves: the reward function logs each training
response's (prompt index, score), and step 1's prompts are the sampler's for both data-parallel ranks, so
`critic/score/max` / `min` must be the max / min over both ranks' responses (not a mean of per-rank values).

Resumption is checked the hard way: the run is SIGKILLed (after the step-2 checkpoint, in the middle of
writing it, and before the first checkpoint) and restarted with the same command; the restarted run must
log exactly the same numbers as an uninterrupted one (bitwise on CPU: rollout seeds depend only on
(seed, step, rank), and the checkpoint holds weights, optimizer state, RNG states and the data
sampler's position).
"""

from __future__ import annotations

import math
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests._procs import kill_tree

from tests.recipes.conftest import assert_documented, metric_lines, REPO, run_recipe, TORCHRUN

pytest.importorskip("vllm")

STEPS = 3
FLAGS = ["--steps", str(STEPS), "--prompts-per-rank", "2", "--group-size", "4", "--max-response-len", "16",
         "--kv-cache-gb", "0.1", "--val-prompts", "4", "--val-every", "2", "--save-every", "1", "--lr", "1e-3",
         "--reward-fn", str(REPO / "tests" / "recipes" / "_rewards.py") + ":letter_share_logged"]
TIMING = ("timing_s/", "perf/throughput")


def _comparable(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in lines]


@pytest.fixture(scope="module")
def reference(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-ref")
    os.environ["RLPRIMS_TEST_SCORE_LOG"] = str(out / "scores.tsv")
    try:
        run_recipe("grpo", out, "--model", tiny_chat_model, *FLAGS)
    finally:
        del os.environ["RLPRIMS_TEST_SCORE_LOG"]
    return out, metric_lines(out)


def test_logs_verl_metrics_every_step(reference):
    out, lines = reference
    assert_documented(lines)
    train = [m for m in lines if "critic/score/mean" in m]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    for m in train:
        for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl",
                    "response_length/mean", "response_length/clip_ratio", "rollout_corr/kl",
                    "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights", "perf/throughput"):
            assert key in m and math.isfinite(m[key]), key
        assert m["actor/entropy"] > 0 and m["actor/grad_norm"] > 0  # rewards differ within groups
        # the engine samples from the weights the trainer has: pushed after every step
        assert abs(m["rollout_corr/kl"]) < 1e-4, m["rollout_corr/kl"]
    val = [m["step"] for m in lines if any(k.startswith("val-core/") for k in m)]
    assert val == [0, 2, 3]  # before the first step, every 2 steps, after the last
    for m in train:  # the reward returns verl's dict {"score", "chars"}: the extra key is logged
        assert m["reward/chars/mean"] > 0
    for m in (m for m in lines if "val-core/rlprims/arithmetic/acc/mean@1" in m):
        assert m["val-aux/rlprims/arithmetic/num_prompts"] == 4.0
        assert m["val-aux/rlprims/arithmetic/acc/mean@1/stderr"] >= 0


def test_writes_validation_generations(reference):
    import json

    out, _ = reference
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 2, 3]
    assert all(set(r) == {"step", "prompt", "response", "score"} for r in rows)
    assert all("<|im_start|>" in r["prompt"] and 0 <= r["score"] <= 1 for r in rows)


def test_score_max_and_min_are_over_both_ranks(reference):
    from rlprims.data import arithmetic_rows, next_indices, sampler_init

    out, lines = reference
    rows = arithmetic_rows(4096, seed=0, max_operand=20)
    prompts = [rows[i]["extra_info"]["index"] for rank in range(2)
               for i in next_indices(sampler_init(), len(rows), batch_size=2, rank=rank, world_size=2, seed=0)[0]]
    logged = [line.split("\t") for line in (out / "scores.tsv").read_text().splitlines()]
    scores = [float(score) for index, score in logged if int(index) in prompts]
    assert len(scores) == 4 * 4  # 2 ranks x 2 prompts x group 4, all of step 1
    step1 = next(m for m in lines if m["step"] == 1 and "critic/score/max" in m)
    assert step1["critic/score/max"] == pytest.approx(max(scores), rel=1e-6)  # float32 scores
    assert step1["critic/score/min"] == pytest.approx(min(scores), rel=1e-6)
    assert step1["critic/score/mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)


def test_a_reward_call_that_never_returns_on_one_rank_is_cut_off(tiny_chat_model, tmp_path, monkeypatch):
    """Rank 1's first training reward call sleeps forever: the pool cuts it off after --reward-timeout-s,
    it scores 0 and counts in reward/timeouts (summed over ranks), and both ranks go on to the end.
    One validation prompt for two ranks: rank 1 validates on none and still joins every collective."""
    mark = tmp_path / "stalled"
    monkeypatch.setenv("RLPRIMS_TEST_STALL_MARK", str(mark))
    flags = [f for f in FLAGS if not f.endswith(":letter_share_logged")]
    flags[flags.index("--reward-fn") + 1:flags.index("--reward-fn") + 1] = [
        str(REPO / "tests" / "recipes" / "_rewards.py") + ":letter_share_stalls_once_on_rank1"]
    run_recipe("grpo", tmp_path / "run", "--model", tiny_chat_model, *flags, "--steps", "2",
               "--save-every", "0", "--reward-timeout-s", "3", "--val-prompts", "1", timeout=600)
    assert mark.exists(), "the stalling call never ran"
    lines = metric_lines(tmp_path / "run")
    timeouts = [m["reward/timeouts"] for m in lines if "reward/timeouts" in m]
    assert timeouts == [1.0, 0.0], timeouts
    assert [m["step"] for m in lines if "reward/timeouts" in m] == [1, 2]
    val = [m for m in lines if any(k.startswith("val-core/") for k in m)]
    assert [m["step"] for m in val] == [0, 2]


def test_two_ranks_sharing_one_engine(tiny_chat_model, tmp_path):
    """--tp 2: both ranks drive one engine, so they must sample the same prompts with the same seeds.
    (--save-every -1: no checkpoint at all, the final HF export all the same.)"""
    run_recipe("grpo", tmp_path, "--model", tiny_chat_model, *FLAGS, "--tp", "2", "--steps", "2",
               "--save-every", "-1")
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "hf" / "config.json").exists()
    train = [m for m in metric_lines(tmp_path) if "critic/score/mean" in m]
    assert [m["step"] for m in train] == [1, 2]
    for m in train:
        assert m["actor/grad_norm"] > 0 and math.isfinite(m["actor/pg_loss"])
        assert abs(m["rollout_corr/kl"]) < 1e-4, m["rollout_corr/kl"]  # TP-resharded weights reached the engine


def test_writes_checkpoints_export_and_curves(reference):
    out, _ = reference
    from safetensors.torch import load_file

    from rlprims.checkpoint import latest_checkpoint

    assert latest_checkpoint(out / "checkpoints").name == f"step-{STEPS:08d}"
    weights = load_file(str(out / "hf" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _start(out: Path, *extra_env: tuple[str, str]) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--nproc-per-node", "2", str(REPO / "recipes" / "grpo.py"), "--model",
           os.environ["TINY_MODEL"], *FLAGS, "--out-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **dict(extra_env)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the point to kill the run"
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()


def test_sigkill_after_a_checkpoint_resumes_bitwise(reference, tiny_chat_model, tmp_path, monkeypatch):
    _, expected = reference
    monkeypatch.setenv("TINY_MODEL", tiny_chat_model)
    proc = _start(tmp_path)
    _kill_when(proc, lambda: (tmp_path / "checkpoints" / "step-00000002" / "checkpoint.json").exists())
    run_recipe("grpo", tmp_path, "--model", tiny_chat_model, *FLAGS)
    assert _comparable(metric_lines(tmp_path)) == _comparable(expected)


def test_sigkill_before_the_first_checkpoint_restarts_clean(reference, tiny_chat_model, tmp_path, monkeypatch):
    """Killed after the step-0 validation was logged, before any checkpoint: the rerun starts over and
    its metrics.jsonl holds no line of the killed run (one line more was the bug)."""
    _, expected = reference
    monkeypatch.setenv("TINY_MODEL", tiny_chat_model)
    proc = _start(tmp_path)
    log = tmp_path / "metrics.jsonl"
    _kill_when(proc, lambda: log.exists() and log.read_text().count("\n") >= 1)
    from rlprims.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "checkpoints") is None, "killed too late: a checkpoint was written"
    run_recipe("grpo", tmp_path, "--model", tiny_chat_model, *FLAGS)
    assert _comparable(metric_lines(tmp_path)) == _comparable(expected)


def test_sigkill_during_a_checkpoint_write_resumes_bitwise(reference, tiny_chat_model, tmp_path, monkeypatch):
    """A hook (this test's sitecustomize) stalls rank 0 inside the step-2 save; the run is killed there."""
    _, expected = reference
    monkeypatch.setenv("TINY_MODEL", tiny_chat_model)
    hook = tmp_path / "hook"
    hook.mkdir()
    stalled = tmp_path / "stalled"
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, time
        import torch.distributed.checkpoint as dcp
        _save = dcp.save
        def save(*args, **kwargs):
            out = _save(*args, **kwargs)
            where = str(kwargs.get("checkpoint_id", ""))
            if "step-00000002" in where and os.environ.get("RANK") == "0":
                open({str(stalled)!r}, "w").close()
                time.sleep(600)  # killed here: the temp dir holds a complete-looking but unfinished save
            return out
        dcp.save = save
    """))
    out = tmp_path / "run"
    proc = _start(out, ("PYTHONPATH", f"{hook}{os.pathsep}{REPO}"))
    _kill_when(proc, stalled.exists)
    from rlprims.checkpoint import latest_checkpoint

    assert latest_checkpoint(out / "checkpoints").name == "step-00000001"
    run_recipe("grpo", out, "--model", tiny_chat_model, *FLAGS)
    assert _comparable(metric_lines(out)) == _comparable(expected)
