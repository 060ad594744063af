"""Weight sync into the embedded vLLM engine, and single-process checks of buckets and TP slicing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlprims.parallel import (
    engine_tp_dim,
    engine_tp_layout,
    engine_tp_slice,
    engine_weights,
    weight_buckets,
)
from tests.parallel.test_fsdp import make_model, tiny_config

_REPO = Path(__file__).resolve().parents[2]


def test_synced_engine_equals_engine_loaded_from_checkpoint(tmp_path):
    """FSDP2 step -> engine_weights -> update_weights gives exactly what a saved checkpoint gives."""
    pytest.importorskip("vllm")
    env = dict(os.environ, PYTHONPATH=str(_REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_engine_worker.py")), str(tmp_path)],
                          cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["synced"]["ids"] != r["before"]["ids"]  # the step changed the greedy text
    # same weights, same kernels: identical tokens and bit-identical log-probs
    assert r["synced"] == r["checkpoint"]


def test_buckets_of_a_plain_model_without_process_group():
    model = make_model()
    full = model.state_dict()
    buckets = list(weight_buckets(model, bucket_bytes=30_000, dtype=torch.float64))
    sizes = [sum(t.numel() * 8 for _, t in b) for b in buckets]
    assert all(s <= 30_000 or len(b) == 1 for s, b in zip(sizes, buckets))
    # 250 x 64 embedding in float64 = 128000 bytes > 30000: a bucket of its own
    assert [n for n, _ in buckets[0]] == ["model.embed_tokens.weight"]
    got = dict(kv for b in buckets for kv in b)
    assert list(got) == list(full)
    assert all(torch.equal(got[k], full[k].double()) for k in full)
    # dtype None keeps the tensors (no copy for a plain model)
    same = dict(engine_weights(model))
    assert same["model.norm.weight"].data_ptr() == model.model.norm.weight.data_ptr()


def test_tied_lm_head_is_sent_once():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    names = [n for n, _ in engine_weights(model)]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1


@pytest.mark.parametrize(
    "kw, match",
    [(dict(bucket_bytes=0), "bucket_bytes"), (dict(bucket_bytes=1.5), "bucket_bytes"),
     (dict(dtype=torch.int32), "dtype")],
)
def test_bad_bucket_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        next(weight_buckets(make_model(), **kw))


def test_build_mesh_needs_a_process_group():
    # in a fresh process: an in-process vLLM engine of an earlier test initializes torch.distributed here
    code = "from rlprims.parallel import build_mesh; build_mesh(device_type='cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(_REPO)))
    assert proc.returncode != 0 and "needs an initialized default process group" in proc.stderr, proc.stderr[-2000:]


def test_tp_slice_with_replicated_kv_heads_and_vocab_padding():
    # 4 ranks, 2 kv heads (of 16 rows): vLLM replicates each kv head on 2 ranks: ranks 0,1 -> head 0
    cfg = tiny_config(vocab_size=130)
    layout = engine_tp_layout(cfg, tp_size=4)
    k = torch.arange(32 * 64, dtype=torch.float32).view(32, 64)
    for r in range(4):
        head = r // 2
        assert torch.equal(engine_tp_slice(k, name="model.layers.1.self_attn.k_proj.weight", layout=layout,
                                           tp_rank=r), k[16 * head : 16 * head + 16])
    # vocab 130 -> padded 192, 48 rows per rank: rank 2 holds rows 96..129 + 14 zero rows, rank 3 only zeros
    emb = torch.randn(130, 64)
    s2 = engine_tp_slice(emb, name="model.embed_tokens.weight", layout=layout, tp_rank=2)
    assert s2.shape == (48, 64) and torch.equal(s2[:34], emb[96:]) and not s2[34:].any()
    s3 = engine_tp_slice(emb, name="lm_head.weight", layout=layout, tp_rank=3)
    assert s3.shape == (48, 64) and not s3.any()
    assert [engine_tp_dim(n) for n in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.bias",
                                       "model.layers.0.self_attn.q_proj.bias", "model.norm.weight")] == [1, None, 0, None]


def test_tp_layout_rejects_sizes_vllm_rejects():
    with pytest.raises(ValueError, match="tp_size"):
        engine_tp_layout(tiny_config(), tp_size=3)  # 4 heads
    with pytest.raises(ValueError, match="tp_rank"):
        engine_tp_slice(torch.zeros(4, 4), name="model.layers.0.mlp.up_proj.weight",
                        layout=engine_tp_layout(tiny_config(), tp_size=2), tp_rank=2)


@pytest.mark.parametrize("tie", [True, False])
def test_dummy_engine_expects_the_checkpoint_names_of_its_config(tmp_path, tie):
    """rollout.engine._expected_weights for load_format="dummy" (config.json only) == from safetensors."""
    from rlprims.rollout.engine import _expected_weights
    from tests.rollout.conftest import make_tiny_llama

    saved = make_tiny_llama(tmp_path / "saved", tie=tie)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(saved)
    empty = tmp_path / "config-only"
    empty.mkdir()

    def cfg(model_dir, fmt):
        return SimpleNamespace(model_config=SimpleNamespace(model=str(model_dir), hf_config=hf),
                               load_config=SimpleNamespace(load_format=fmt))

    assert _expected_weights(cfg(empty, "dummy")) == _expected_weights(cfg(saved, "auto"))
    with pytest.raises(ValueError, match="safetensors"):
        _expected_weights(cfg(empty, "auto"))
