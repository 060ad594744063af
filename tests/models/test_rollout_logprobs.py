"""rows_logprobs / rows_logprobs_and_entropy / batch_logprobs: the response columns of a packed forward over
chosen rows of a RolloutBatch, equal to a plain padded forward of the same rows."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlprims.models.packed import register_packed_attention
from rlprims.models.rollout import batch_logprobs, rows_logprobs, rows_logprobs_and_entropy
from rlprims.rollout.batch import pack_rollout
from tests.tolerances import BF16_MODEL, LOGITS_FP32


def _model():
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.set_attn_implementation(register_packed_attention())
    return model


def _batch():
    prompts = [[1, 2, 3], [4, 5]]
    responses = [[6, 7], [8], [9, 10, 11], [12, 13, 14, 15]]  # n = 2 per prompt
    logprobs = [[0.0] * len(r) for r in responses]
    return pack_rollout(prompts, responses, logprobs, [0, 0, 0, 1], n=2, pad_token_id=0)


def _reference(model, batch, row, temperature):
    """log π of row `row`'s response tokens from one unpadded forward."""
    p = batch.prompt_ids[row][batch.prompt_mask[row]]
    r = batch.response_ids[row][batch.response_mask[row]]
    ids = torch.cat([p, r])[None]
    logits = model(input_ids=ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(-1, r[:, None])[:, 0]
    return lp


def test_rows_equal_an_unpadded_forward_and_padding_is_zero():
    model, batch = _model(), _batch()
    with torch.no_grad():
        got = rows_logprobs(model, batch, [3, 0], temperature=0.7)
        both = rows_logprobs_and_entropy(model, batch, [3, 0], temperature=0.7)
        full = batch_logprobs(model, batch, [[0, 2], [1, 3]], temperature=0.7)
    assert got.shape == (2, batch.response_ids.shape[1])
    for i, row in enumerate([3, 0]):
        n = int(batch.response_lengths[row])
        torch.testing.assert_close(got[i, :n], _reference(model, batch, row, 0.7), **LOGITS_FP32)
        assert (got[i, n:] == 0).all()
        torch.testing.assert_close(both.logprobs[i], got[i], **LOGITS_FP32)
        assert (both.entropy[i, :n] > 0).all() and (both.entropy[i, n:] == 0).all()
    torch.testing.assert_close(full[[3, 0]], got, **LOGITS_FP32)


def test_device_argument_runs_the_forward_there():
    """device= names where the forward runs; on CPU it equals the default (the batch's device)."""
    model, batch = _model(), _batch()
    with torch.no_grad():
        for share in (False, True):
            ref = rows_logprobs_and_entropy(model, batch, [1, 2, 3], temperature=0.7, share_prefixes=share)
            got = rows_logprobs_and_entropy(model, batch, [1, 2, 3], temperature=0.7, share_prefixes=share,
                                            device="cpu")
            torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=0)
            torch.testing.assert_close(got.entropy, ref.entropy, rtol=0, atol=0)
            mbs = [[0, 2], [1, 3]]
            full = batch_logprobs(model, batch, mbs, temperature=0.7, share_prefixes=share,
                                  device=torch.device("cpu"))
            same = batch_logprobs(model, batch, mbs, temperature=0.7, share_prefixes=share)
            torch.testing.assert_close(full, same, rtol=0, atol=0)
            # other micro-batches pack other rows together: equal up to fp32 summation order
            torch.testing.assert_close(full[[1, 2, 3]], ref.logprobs, **LOGITS_FP32)


def test_rollout_batch_to():
    batch = _batch()
    moved = batch.to("cpu")
    assert type(moved) is type(batch) and all(torch.equal(a, b) for a, b in zip(moved, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("share", [False, True])
def test_host_batch_with_cuda_forward_equals_cuda_batch_without_a_device_wait(share):
    """A batch kept on the CPU, forward on CUDA: same values as the batch on the GPU, and the call queues
    the forward without waiting for the device (torch's sync debug mode raises on a wait): neither the
    packing nor transformers' mask preparation (the packed forward passes a prepared empty mask)."""
    model = _model().cuda().bfloat16()  # bf16: the varlen kernels (fp32 takes an exact path that waits)
    host = _batch()
    on_gpu = host.to("cuda")
    with torch.no_grad():
        ref = rows_logprobs_and_entropy(model, on_gpu, [3, 0, 1], temperature=0.7, share_prefixes=share)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = rows_logprobs_and_entropy(model, host, [3, 0, 1], temperature=0.7, share_prefixes=share,
                                            device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert got.logprobs.device.type == "cuda"
    torch.testing.assert_close(got.logprobs, ref.logprobs, **BF16_MODEL)
    torch.testing.assert_close(got.entropy, ref.entropy, **BF16_MODEL)
