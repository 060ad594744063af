"""The packed log-prob forward under FSDP2: same values and gradients as the unsharded model.

FSDP2 gathers the root module's parameters (embedding, final norm, LM head) in the root's forward hook,
so the packed path must run the causal LM's own forward and read the LM head weight after it, with the
root sharded with reshard_after_forward=False (as rlprims.parallel.shard_model does).
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.tolerances import REORDER

WORLD = 2


def _worker(rank: int, world: int, store_path: str, tie: bool) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlprims.models.packed import register_packed_attention, response_logprobs_and_entropy

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
        torch.manual_seed(0)
        ref = LlamaForCausalLM(cfg)
        ref.set_attn_implementation(register_packed_attention())
        model = copy.deepcopy(ref)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=False)

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 96, (4, 12), generator=g)
        attention = torch.ones(4, 12, dtype=torch.bool)
        attention[0, :3] = False  # a left-padded row
        response = attention.clone()
        response[:, :6] = False
        grads = (torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g))
        outputs = []
        for m in (ref, model):
            out = response_logprobs_and_entropy(m, ids, attention, response, temperature=0.7)
            ((out.logprobs * grads[0]).sum() + (out.entropy * grads[1]).sum()).backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[1].logprobs, outputs[0].logprobs, **REORDER)
        torch.testing.assert_close(outputs[1].entropy, outputs[0].entropy, **REORDER)
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            # every rank saw the same batch and FSDP2 averages over ranks: the gradient is the reference's
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, **REORDER, msg=name)
        # Both ranks past their last collective before the group goes: a rank that tears gloo down while
        # its peer still has FSDP2 work in flight was seen to abort ("terminate called without an active
        # exception", CI 2026-12-02)
        del model, outputs
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, WORLD])
@pytest.mark.parametrize("tie", [True, False])
def test_packed_forward_under_fsdp2_matches_unsharded(world, tie):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "store"), tie), nprocs=world, join=True)
