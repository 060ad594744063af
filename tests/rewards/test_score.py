"""score_responses: verl's result types, failures counted and scored, a worker pool with a time limit."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlprims.rewards import (
    KNOWN_SOURCES,
    LoadedRewardFn,
    check_reward_sources,
    compute_score,
    load_reward_fn,
    reward_pool,
    score_responses,
)

FNS = Path(__file__).with_name("_reward_fns.py")
TIMEOUT_S = 2.0  # the pool's per-call limit in these tests; a normal call here takes well under 10 ms


def rows_of(*sources, truth="4"):
    return [{"data_source": s, "reward_model": {"ground_truth": truth}} for s in sources]


@pytest.fixture(scope="module")
def behave():
    return load_reward_fn(f"{FNS}:behave")


@pytest.fixture(scope="module")
def pool(behave):
    with reward_pool(behave, timeout_s=TIMEOUT_S, workers=2) as p:
        yield p


def test_in_process_pairs_texts_with_rows():
    rows = rows_of("gsm8k", "gsm8k")
    result = score_responses(["#### 4", "#### 5"], rows, compute_score)
    assert result.scores.tolist() == [1.0, 0.0] and result.scores.dtype == torch.float32
    assert result.extra == {} and result.errors == ()
    assert result.metrics == {"reward/timeouts": 0.0, "reward/errors": 0.0}
    seen = []
    custom = score_responses(["a"], rows[:1], lambda *a: seen.append(a) or 0.5)
    assert custom.scores.tolist() == [0.5] and seen == [("gsm8k", "a", "4", None)]
    with pytest.raises(ValueError, match="2 responses but 1 rows"):
        score_responses(["a", "b"], rows[:1], compute_score)


def test_verl_result_types(behave):
    texts = ["4", "5", "4", "5", "4", "5"]
    result = score_responses(texts, rows_of("dict", "dict", "bool", "bool", "int", "float"), behave)
    assert result.scores.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert result.extra == {"acc": [True, False, None, None, None, None],
                            "pred": ["4", "5", None, None, None, None]}
    # numeric (and bool) extra keys are averaged over the responses that have them; strings are not
    assert result.metrics == {"reward/timeouts": 0.0, "reward/errors": 0.0, "reward/acc/mean": 0.5}


def test_bad_results_are_errors_and_score_error_score(behave):
    sources = ("nan", "no-score", "raise", "ok", "ok", "ok")
    result = score_responses(["4"] * 6, rows_of(*sources), behave, error_score=-1.0)
    assert result.scores.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert result.metrics["reward/errors"] == 3.0 and result.metrics["reward/timeouts"] == 0.0
    assert "response 0 (data_source 'nan'): reward_fn returned nan: a reward must be a" in result.errors[0]
    assert "needs a 'score' key (verl), got keys ['acc']" in result.errors[1]
    assert "response 2 (data_source 'raise'): KeyError: 'no such thing'" == result.errors[2]


def test_most_calls_failing_raises(behave, pool):
    for scorer in (behave, pool):
        with pytest.raises(RuntimeError, match=r"3 of 4 reward calls failed \(0 past the time limit, 3 "
                                               r"errors\); first: response 0 \(data_source 'raise'\): Key"):
            score_responses(["4"] * 4, rows_of("raise", "raise", "raise", "ok"), scorer)
    # half is not most
    half = score_responses(["4"] * 4, rows_of("raise", "raise", "ok", "ok"), pool)
    assert half.metrics["reward/errors"] == 2
    with pytest.raises(RuntimeError, match="1 of 4 reward calls failed"):
        score_responses(["4"] * 4, rows_of("raise", "ok", "ok", "ok"), pool, max_failed_frac=0.0)


def test_empty_batch(pool):
    result = score_responses([], [], pool)
    assert result.scores.shape == (0,) and result.scores.dtype == torch.float32
    assert result.metrics == {"reward/timeouts": 0.0, "reward/errors": 0.0} and result.errors == ()


def test_pool_scores_like_in_process(behave, pool):
    texts = ["4", "5", "4", "5", "4", "5", "4"]
    rows = rows_of("dict", "dict", "bool", "bool", "int", "ok", "nan")
    here, there = score_responses(texts, rows, behave), score_responses(texts, rows, pool)
    assert torch.equal(here.scores, there.scores)
    assert (here.extra, here.metrics, here.errors) == (there.extra, there.metrics, there.errors)


def test_calls_run_in_worker_processes(pool):
    result = score_responses(["4"] * 8, rows_of(*["pid"] * 8), pool)
    pids = set(result.extra["pid"])
    assert os.getpid() not in pids and 1 <= len(pids) <= pool.workers


def test_a_call_that_never_returns_is_cut_off(pool):
    sources = ("sleep", "ok", "sleep-ignoring-sigterm", "ok")
    start = time.monotonic()
    result = score_responses(["4"] * 4, rows_of(*sources), pool, timeout_score=-2.0)
    elapsed = time.monotonic() - start
    assert result.scores.tolist() == [-2.0, 1.0, -2.0, 1.0]
    assert result.metrics == {"reward/timeouts": 2.0, "reward/errors": 0.0}
    assert result.errors[0] == \
        f"response 0 (data_source 'sleep'): no result within {TIMEOUT_S} s (time limit)"
    # the limit, plus pebble's 3 s between SIGTERM and SIGKILL for the worker that ignores SIGTERM,
    # plus slack for a loaded machine
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3.0 + 10.0
    assert score_responses(["4"], rows_of("ok"), pool).scores.tolist() == [1.0]  # new workers took over


def test_a_call_that_kills_its_worker_is_an_error(pool):
    result = score_responses(["4"] * 3, rows_of("exit", "ok", "ok"), pool)
    assert result.scores.tolist() == [0.0, 1.0, 1.0]
    assert result.metrics == {"reward/timeouts": 0.0, "reward/errors": 1.0}
    assert result.errors == ("response 0 (data_source 'exit'): the worker process died (exit code 3)",)
    assert score_responses(["4"] * 3, rows_of("ok", "ok", "ok"), pool).scores.tolist() == [1.0] * 3


def test_math_verify_time_limit_holds_in_a_worker(pool):
    start = time.monotonic()
    result = score_responses(["4"], rows_of("math"), pool)
    assert result.scores.tolist() == [-1.0]  # math-verify's own timeout_score, not the pool's cut-off
    assert result.metrics["reward/timeouts"] == 0.0 and time.monotonic() - start < TIMEOUT_S + 5.0


def test_builtin_compute_score_in_a_pool():
    with reward_pool(compute_score, timeout_s=30.0, workers=1) as pool:
        rows = rows_of("openai/gsm8k", "rlprims/arithmetic") + rows_of("lighteval/MATH", truth="0.5")
        result = score_responses(["#### 4", "#### 5", r"\boxed{\frac{1}{2}}"], rows, pool)
    assert result.scores.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(RuntimeError, match="the reward pool cannot take calls"):
        score_responses(["#### 4"], rows_of("gsm8k"), pool)
    pool.close()  # idempotent


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="cannot be sent to worker processes.*load_reward_fn"):
        reward_pool(lambda *a: 0.0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        reward_pool(compute_score, timeout_s=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        reward_pool(compute_score, workers=0)


def test_loaded_reward_fn_pickles_as_its_absolute_spec(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def f(data_source, solution_str, ground_truth, extra_info=None):\n"
                                      "    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    fn = load_reward_fn("./mine.py:f")
    assert fn == LoadedRewardFn(f"{tmp_path / 'mine.py'}:f")
    assert pickle.loads(pickle.dumps(fn)) == fn and fn("d", "s", "g") == 0.25


def test_unknown_data_source_fails_before_training(behave):
    check_reward_sources(compute_score, ["openai/gsm8k", "rlprims/arithmetic", "gsm8k"])
    check_reward_sources(behave, ["anything", "at all"])  # a user's function dispatches as it likes
    for builtin in (compute_score, load_reward_fn("rlprims.rewards:compute_score")):
        with pytest.raises(ValueError, match=r"built-in compute_score has no scorer for data_source "
                                             r"'a/b', 'zz' \(it knows 'openai/gsm8k'.*\)\. Pass your own "
                                             r"verl-style compute_score.* with --reward-fn path/to/file.py:"):
            check_reward_sources(builtin, ["openai/gsm8k", "zz", "a/b", "zz"])
    assert "lighteval/MATH" in KNOWN_SOURCES
    with pytest.raises(ValueError, match="no reward function for data_source='zz'.*--reward-fn"):
        compute_score("zz", "1", "1")


_ORPHAN_SCRIPT = """
import sys
from rlprims.rewards import load_reward_fn, reward_pool, score_responses

if __name__ == "__main__":
    pool = reward_pool(load_reward_fn(sys.argv[1]), timeout_s=60.0, workers=2)
    rows = [{"data_source": "pid", "reward_model": {"ground_truth": "4"}}] * 4
    print(*sorted(set(score_responses(["4"] * 4, rows, pool).extra["pid"])), flush=True)
    rows = [{"data_source": "sleep", "reward_model": {"ground_truth": "4"}}] * 2
    score_responses(["4"] * 2, rows, pool)  # both workers hang; the parent is killed meanwhile
"""


def test_killed_trainer_leaves_no_workers(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(_ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    trainer = subprocess.Popen([sys.executable, str(script), f"{FNS}:behave"], stdout=subprocess.PIPE,
                               env=env, start_new_session=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert pids, "the trainer printed no worker pids"
        time.sleep(0.5)  # the hanging calls have started
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 20.0
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"workers {pids} outlived the killed trainer"
    finally:
        trainer.kill()
        trainer.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead, waiting for its reaper
    except FileNotFoundError:
        return False
