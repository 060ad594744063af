"""rlprims.models.fused: Liger's kernels in the trainer (CUDA) and `load_model`.

On CPU: the loader selects rlprims' packed attention and equals a plain load, and `use_liger_kernels`
refuses a CPU model, a sharded one and a missing package with errors that say what to do. On a GPU
(`-m gpu`): the Liger-patched packed forward equals the eager one in bf16 (log-probs, entropy and every
gradient), and the modules it patched are the ones named.
"""

from __future__ import annotations

import sys

import pytest
import torch

from rlprims.models.fused import _is_patched, liger_model_types, load_model, use_liger_kernels
from rlprims.models.packed import PACKED_ATTENTION, register_packed_attention, response_logprobs_and_entropy
from tests.models.test_packed import _batch, _qwen2
from tests.tolerances import BF16_MODEL

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_load_model_selects_packed_attention(tmp_path):
    _qwen2().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))
    assert model.config._attn_implementation == PACKED_ATTENTION and not model.training
    ref = _qwen2()
    ids, attn, resp = _batch("left")
    got = response_logprobs_and_entropy(model, ids, attn, resp, temperature=1.0)
    ref.set_attn_implementation(PACKED_ATTENTION)
    want = response_logprobs_and_entropy(ref, ids, attn, resp, temperature=1.0)
    assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.entropy, want.entropy)


def test_use_liger_refuses_what_it_cannot_patch(monkeypatch):
    assert {"qwen2", "llama"} <= set(liger_model_types())
    with pytest.raises(ValueError, match="CUDA only; the model is on cpu .drop --use-liger on CPU"):
        use_liger_kernels(_qwen2())
    from torch.distributed.fsdp import FSDPModule

    sharded = _qwen2()  # what fully_shard does to the class, without a process group
    sharded.__class__ = type("FSDPQwen2ForCausalLM", (FSDPModule, type(sharded)), {})
    with pytest.raises(ValueError, match="before shard_model"):
        use_liger_kernels(sharded)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        use_liger_kernels(_qwen2())


@pytest.mark.gpu
@cuda
def test_liger_equals_eager_cuda_bf16():
    ids, attn, resp = _batch("left", lengths=(1, 12, 5, 9, 2, 11), device="cuda")
    results = []
    for liger in (False, True):
        model = _qwen2(max_window_layers=0).cuda().bfloat16()
        model.set_attn_implementation(register_packed_attention())  # this test may run alone
        if liger:
            use_liger_kernels(model)
            layer = model.model.layers[0]
            assert all(_is_patched(m) for m in (layer.input_layernorm, layer.post_attention_layernorm,
                                                layer.mlp, model.model.norm))
        out = response_logprobs_and_entropy(model, ids, attn, resp, temperature=1.0)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        results.append((out.logprobs.float(), out.entropy.float(),
                        [p.grad.float() for p in model.parameters()]))
    (lp, ent, grads), (lp_l, ent_l, grads_l) = results
    torch.testing.assert_close(lp_l, lp, **BF16_MODEL)
    torch.testing.assert_close(ent_l, ent, **BF16_MODEL)
    for a, b in zip(grads_l, grads):
        scale = b.abs().max().clamp(min=1e-3)  # gradients of O(100): compare relative to their size
        torch.testing.assert_close(a / scale, b / scale, **BF16_MODEL)
