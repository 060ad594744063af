"""rlprims.launch.init / shutdown: one process (HashStore group of one), torchrun with 2 ranks, errors."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rlprims.launch import Dist, init, seed_all, shutdown
from tests._procs import kill_tree

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("spmd_script.py")
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for k in RENDEZVOUS:
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


def test_single_process_group_of_one(clean_env):
    d = init(seed=3, device="cpu")
    try:
        assert d == Dist(rank=0, world_size=1, local_rank=0, local_world_size=1,
                         device=torch.device("cpu"), backend="gloo")
        assert d.is_main
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        x = torch.tensor([2.0])
        dist.all_reduce(x)
        assert x.item() == 2.0
        # seeded exactly as seed_all(3) seeds
        got = (random.random(), np.random.rand(), torch.rand(2))
        seed_all(3)
        want = (random.random(), np.random.rand(), torch.rand(2))
        assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])
        with pytest.raises(RuntimeError, match="already exists"):
            init(seed=3)
    finally:
        shutdown(d)
    assert not dist.is_initialized()
    shutdown(d)  # a second shutdown is a no-op


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "0"}, "WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         "RANK=2, WORLD_SIZE=2"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='x'"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2",
          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "LOCAL_RANK=2"),
    ],
)
def test_inconsistent_environment(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        init(seed=0, device="cpu")
    assert not dist.is_initialized()


def test_bad_arguments(clean_env):
    with pytest.raises(ValueError, match="timeout_s"):
        init(seed=0, timeout_s=0)
    with pytest.raises(ValueError, match="device"):
        init(seed=0, device="tpu")
    with pytest.raises(ValueError, match="seed"):
        seed_all(-1)
    with pytest.raises(TypeError, match="Dist"):
        shutdown(None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            init(seed=0, device="cuda")
    assert not dist.is_initialized()


def _torchrun(tmp_path, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--out-dir", str(tmp_path), *args]
    # own session, so that a timeout kills torchrun's workers too
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_cuda_allocator_gets_expandable_segments_unless_configured(monkeypatch):
    from rlprims.launch.spmd import _expandable_segments

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    _expandable_segments(dict(os.environ))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's setting is kept
        monkeypatch.setenv(name, "max_split_size_mb:128")
        _expandable_segments(dict(os.environ))
        assert os.environ[name] == "max_split_size_mb:128"
        monkeypatch.delenv(name)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_torchrun_two_ranks_same_world(tmp_path):
    proc = _torchrun(tmp_path, "--mode", "world")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        seen = (info["rank"], info["world_size"], info["local_rank"], info["local_world_size"])
        assert seen == (r, 2, r, 2)
        assert info["all_reduce"] == 3.0  # 1 + 2
    assert ranks[0]["seeded"] == ranks[1]["seeded"]  # same seed on every rank


def test_torchrun_failing_rank_fails_the_job(tmp_path):
    start = time.monotonic()
    proc = _torchrun(tmp_path, "--mode", "fail")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "ValueError: boom from rank 1" in out
    assert "ChildFailedError" in out  # torchrun's summary, with the traceback from @record's error file
    assert time.monotonic() - start < 100  # rank 0 did not wait out its 120 s collective timeout


VLLM_SCRIPT = """
import gc, sys, tempfile
import torch, torch.distributed as dist
from rlprims.launch import init, shutdown
from rlprims.rollout import create_engine, generate
from tests.rollout.conftest import make_tiny_llama
d = init(seed=0, device="cpu")
llm = create_engine(make_tiny_llama(tempfile.mkdtemp()), max_model_len=96, dtype="float32", seed=0,
                    kv_cache_memory_bytes=16 << 20)
out = generate(llm, [[1, 5], [1, 17, 42]], n=2, temperature=1.0, max_tokens=4, seed=3)
x = torch.ones(1); dist.all_reduce(x)
print("GENERATED", tuple(out.response_ids.shape), dist.get_world_size(), x.item(), flush=True)
del llm; gc.collect()  # the engine first: its teardown destroys the groups it made on top of ours
shutdown(d)
print("DONE", flush=True)
"""


def test_world_one_group_then_vllm_engine(tmp_path):
    """init's group of one does not break create_engine + generate in the same process (vLLM reuses it)."""
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED (4, 4) 1 1.0" in proc.stdout and "DONE" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
