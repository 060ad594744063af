import itertools
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlprims.models.packed import (
    PACKED_ATTENTION,
    packed_attention_forward,
    packed_hidden_states,
    register_packed_attention,
    response_logprobs,
    response_logprobs_and_entropy,
    shared_prefix_hidden_states,
    varlen_attention,
)
from rlprims.ops.packing import pack_sequences, pack_shared_prefixes
from tests.tolerances import BF16_MODEL, LOGITS_FP32, REORDER

VOCAB = 48
T = 12


def _llama(**overrides):
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _qwen2(**overrides):
    # Qwen2: q/k/v projections with bias, tied embeddings (lm_head.weight is embed_tokens.weight), GQA 4:1
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).float()


def _batch(side: str, lengths=(1, T, 5, 9), prompt=3, device="cpu"):
    """Padded batch with the given valid lengths; response = tokens after the first `prompt` (≥ 1)."""
    g = torch.Generator().manual_seed(1)
    B = len(lengths)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attn = torch.zeros(B, T, dtype=torch.bool)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        start = T - n if side == "left" else 0
        attn[b, start : start + n] = True
        p = min(prompt, n)
        resp[b, start + p : start + n] = True
    return ids.to(device), attn.to(device), resp.to(device)


def _padded_reference(model, ids, attn, resp, temperature):
    """The padded forward verl runs without remove-padding: full logits, log_softmax, gather, shift."""
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros(ids.shape[0], 1, device=ids.device)
    lp, ent = torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)
    return torch.where(resp, lp, 0.0), torch.where(resp, ent, 0.0)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_equals_padded_logprobs_entropy_and_gradients(make, side):
    model = make()
    ids, attn, resp = _batch(side)
    g = torch.Generator().manual_seed(2)
    w_lp, w_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)

    model.set_attn_implementation("sdpa")
    ref_lp, ref_ent = _padded_reference(model, ids, attn, resp, temperature=0.8)
    ref_grads = _grads(model, (ref_lp * w_lp).sum() + (ref_ent * w_ent).sum())

    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    garbage = torch.where(attn, ids, 10**6)  # padding ids are never read
    out = response_logprobs_and_entropy(model, garbage, attn, resp, temperature=0.8, chunk_size=7)
    grads = _grads(model, (out.logprobs * w_lp).sum() + (out.entropy * w_ent).sum())

    assert bool((out.logprobs[~resp] == 0).all()) and bool((out.entropy[~resp] == 0).all())
    torch.testing.assert_close(out.logprobs, ref_lp, **LOGITS_FP32)
    torch.testing.assert_close(out.entropy, ref_ent, **LOGITS_FP32)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, **LOGITS_FP32)

    lp_only = response_logprobs(model, garbage, attn, resp, temperature=0.8, chunk_size=64)
    torch.testing.assert_close(lp_only, out.logprobs, **REORDER)


def test_packed_hidden_states_equal_padded_including_length_one():
    model = _llama()
    ids, attn, _ = _batch("left", lengths=(1, T, 4))
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)
    model.set_attn_implementation("sdpa")
    ref = model.model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).last_hidden_state
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    packed = pack_sequences(ids, attn)
    hidden = packed_hidden_states(model, packed)
    torch.testing.assert_close(hidden, ref[attn], **REORDER)


def test_registered_attention_still_runs_padded_batches_like_sdpa():
    model = _qwen2()
    ids, attn, _ = _batch("left", lengths=(2, T, 7))
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).logits
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    got = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).logits
    torch.testing.assert_close(got[attn], ref[attn], **REORDER)
    # unpadded batch, no mask: plain causal attention
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids).logits
    model.set_attn_implementation(PACKED_ATTENTION)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, **REORDER)


def test_packed_position_ids_without_cu_seqlens_raise():
    model = _llama()
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    packed = pack_sequences(*_batch("right")[:2])
    with pytest.raises(ValueError, match="position_ids that restart"):
        model.model(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None])


def _attention_reference(q, k, v, bounds, causal, scale):
    """Dense attention with a block-diagonal (and causal) mask, key/value heads repeated for GQA."""
    n, hq, _ = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    seq = torch.zeros(n, dtype=torch.long, device=q.device)
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        seq[a:b] = s
    allowed = seq[:, None] == seq[None, :]
    if causal:
        pos = torch.arange(n, device=q.device)
        allowed &= pos[:, None] >= pos[None, :]
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_cpu_matches_block_diagonal_reference(causal):
    g = torch.Generator().manual_seed(3)
    bounds = [0, 1, 5, 12, 13]
    q = torch.randn(13, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(13, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(13, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max_seqlen=7, scale=0.3, causal=causal)
    ref = _attention_reference(q, k, v, bounds, causal, 0.3)
    torch.testing.assert_close(out, ref, **REORDER)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, b, **REORDER)


def _segments_reference(q, k, v, bounds_q, bounds_k, causal, scale):
    """Dense attention of each query segment over its key segment, causal bottom-right aligned."""
    outs = []
    for (a, b), (c, d) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k)):
        lq, lk = b - a, d - c
        rep = q.shape[1] // k.shape[1]
        kk, vv = k[c:d].repeat_interleave(rep, dim=1), v[c:d].repeat_interleave(rep, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[a:b], kk) * scale
        if causal:
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vv))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_cpu_key_segments_bottom_right(causal):
    g = torch.Generator().manual_seed(5)
    bounds_q, bounds_k = [0, 3, 4, 9, 11], [0, 3, 9, 14, 20]  # 3 of 3, 1 of 6, 5 of 5, 2 of 6
    q = torch.randn(11, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(20, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(20, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32) for b in (bounds_q, bounds_k))
    out = varlen_attention(q, k, v, cu_q, max_seqlen=5, scale=0.3, causal=causal, cu_seqlens_k=cu_k,
                           max_seqlen_k=6)
    ref = _segments_reference(q, k, v, bounds_q, bounds_k, causal, 0.3)
    torch.testing.assert_close(out, ref, **REORDER)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, b, **REORDER)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        bad = torch.tensor([0, 2, 8, 13, 20], dtype=torch.int32)  # segment 0: 3 causal queries, 2 keys
        varlen_attention(q, k, v, cu_q, max_seqlen=5, scale=0.3, causal=True, cu_seqlens_k=bad,
                         max_seqlen_k=7)
    with pytest.raises(ValueError, match="cu_seqlens_k must be int32"):
        varlen_attention(q, k, v, cu_q, max_seqlen=5, scale=0.3, causal=True, cu_seqlens_k=cu_k.long(),
                         max_seqlen_k=6)


def _group_batch(side: str, device="cpu"):
    """GRPO-like rows: prompts shared by groups (lengths differ between groups), responses of 0 to 8
    tokens, and one multi-turn row whose response mask has a hole (a tool result inside the sequence)."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 2, 5)]
    rows = [(0, 3), (0, 8), (0, 1), (1, 6), (1, 0), (2, 5), (2, 7)]  # (prompt, response length)
    width = 14
    ids = torch.randint(0, VOCAB, (len(rows), width), generator=g)
    attn = torch.zeros(len(rows), width, dtype=torch.bool)
    resp = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (j, n) in enumerate(rows):
        p = prompts[j].numel()
        start = width - p - n if side == "left" else 0
        ids[b, start : start + p] = prompts[j]
        attn[b, start : start + p + n] = True
        resp[b, start + p : start + p + n] = True
        if b == 6:  # the continuation's 3rd and 4th tokens are a tool result: in context, not scored
            resp[b, start + p + 2 : start + p + 4] = False
    return ids.to(device), attn.to(device), resp.to(device)


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_prefixes_equal_padded_logprobs_entropy_and_gradients(make, side):
    model = make()
    ids, attn, resp = _group_batch(side)
    g = torch.Generator().manual_seed(8)
    w_lp, w_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    model.set_attn_implementation("sdpa")
    ref_lp, ref_ent = _padded_reference(model, ids, attn, resp, temperature=0.7)
    ref_grads = _grads(model, (ref_lp * w_lp).sum() + (ref_ent * w_ent).sum())

    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    garbage = torch.where(attn, ids, 10**6)  # padding ids are never read
    out = response_logprobs_and_entropy(model, garbage, attn, resp, temperature=0.7, share_prefixes=True)
    grads = _grads(model, (out.logprobs * w_lp).sum() + (out.entropy * w_ent).sum())
    assert bool((out.logprobs[~resp] == 0).all()) and bool((out.entropy[~resp] == 0).all())
    torch.testing.assert_close(out.logprobs, ref_lp, **LOGITS_FP32)
    torch.testing.assert_close(out.entropy, ref_ent, **LOGITS_FP32)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, **LOGITS_FP32)
    lp_only = response_logprobs(model, garbage, attn, resp, temperature=0.7, share_prefixes=True)
    torch.testing.assert_close(lp_only, out.logprobs, **REORDER)

    pack = pack_shared_prefixes(ids, attn, resp)
    assert pack.num_groups == 3 and pack.input_ids.numel() == int(attn.sum()) - 2 * 4 - 1 * 2 - 1 * 5
    hidden = shared_prefix_hidden_states(model, pack)
    packed = pack_sequences(ids, attn)
    flat = torch.full(attn.shape, -1).flatten().index_copy(0, packed.indices, torch.arange(int(attn.sum())))
    whole = packed_hidden_states(model, packed)[flat.view(attn.shape)[attn]]
    torch.testing.assert_close(hidden[pack.stream_index[attn]], whole, **REORDER)


def test_shared_prefix_hidden_states_checks():
    model = _llama()
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    with pytest.raises(ValueError, match="must be a SharedPrefixPack"):
        shared_prefix_hidden_states(model, pack_sequences(*_batch("right")[:2]))
    with pytest.raises(ValueError, match="rlprims_kv_indices needs cu_seq_lens_k"):
        packed = pack_sequences(*_batch("right")[:2])
        model(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None],
              cu_seq_lens_q=packed.cu_seqlens, max_length_q=packed.max_seqlen,
              rlprims_kv_indices=torch.arange(packed.input_ids.numel()))


def test_register_is_explicit_and_idempotent():
    code = (
        "import rlprims.models.packed as p\n"
        "from transformers import AttentionInterface\n"
        "assert p.PACKED_ATTENTION not in AttentionInterface._global_mapping\n"
        "assert p.register_packed_attention() == p.register_packed_attention() == p.PACKED_ATTENTION\n"
        "assert AttentionInterface._global_mapping[p.PACKED_ATTENTION] is p.packed_attention_forward\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_checks():
    model = _llama()
    ids, attn, resp = _batch("right")
    with pytest.raises(ValueError, match="needs 'rlprims_packed'"):
        response_logprobs(model, ids, attn, resp, temperature=1.0)
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    with pytest.raises(ValueError, match="LM head has a bias"):
        response_logprobs(model, ids, attn, resp, temperature=1.0)
    model.lm_head.bias = None
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5 rescales the logits"):
        response_logprobs(model, ids, attn, resp, temperature=1.0)
    del model.config.logit_scale
    with pytest.raises(ValueError, match="first valid token of row"):
        response_logprobs(model, ids, attn, attn, temperature=1.0)
    with pytest.raises(ValueError, match="response_mask must have shape"):
        response_logprobs(model, ids, attn, resp[:, 1:], temperature=1.0)
    for bad in (VOCAB, -1):  # a response token outside the LM head's rows, checked on the host
        wrong = ids.clone()
        wrong[resp] = torch.where(torch.arange(int(resp.sum())) == 3, bad, wrong[resp])
        for share in (False, True):
            with pytest.raises(ValueError, match=rf"response tokens must lie in \[0, V={VOCAB}\)"):
                response_logprobs_and_entropy(model, wrong, attn, resp, temperature=1.0, share_prefixes=share)
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="empty mask but no cu_seq_lens_q"):  # the packed forward's mask
        packed_attention_forward(model.model.layers[0].self_attn, q, q[:, :2], q[:, :2],
                                 torch.empty(1, 1, 0, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention dropout"):
        packed_attention_forward(
            model.model.layers[0].self_attn,
            q,
            q[:, :2],
            q[:, :2],
            None,
            dropout=0.1,
            cu_seq_lens_q=torch.tensor([0, 3], dtype=torch.int32),
            max_length_q=3,
        )


def cuda(fn):
    """A CUDA test (selected by `-m gpu`): skipped without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs CUDA (flash / varlen_attn kernels)")
    return pytest.mark.gpu(skip(fn))


@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_cuda_half_matches_reference(causal):
    g = torch.Generator().manual_seed(4)
    bounds = [0, 1, 64, 200, 201, 330]
    n = bounds[-1]
    q32 = torch.randn(n, 8, 64, generator=g)
    k32, v32 = torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
    w = torch.randn(n, 8, 64, generator=g).cuda()
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    qkv = [t.cuda().bfloat16().requires_grad_(True) for t in (q32, k32, v32)]
    out = varlen_attention(*qkv, cu, max_seqlen=136, scale=0.125, causal=causal)
    assert out.dtype == torch.bfloat16 and out.shape == (n, 8, 64)
    grads = torch.autograd.grad((out.float() * w).sum(), qkv)
    ref_in = [t.detach().float().requires_grad_(True) for t in qkv]
    ref = _attention_reference(*ref_in, bounds, causal, 0.125)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    torch.testing.assert_close(out.float(), ref, **BF16_MODEL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, **BF16_MODEL)


@cuda
def test_packed_equals_padded_cuda_bf16():
    model = _qwen2(max_window_layers=0).cuda().bfloat16()
    ids, attn, resp = _batch("left", lengths=(1, T, 5, 9, 2, 11), device="cuda")
    model.set_attn_implementation("sdpa")
    ref_lp, ref_ent = _padded_reference(model, ids, attn, resp, temperature=1.0)
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    out = response_logprobs_and_entropy(model, ids, attn, resp, temperature=1.0)
    torch.testing.assert_close(out.logprobs, ref_lp, **BF16_MODEL)
    torch.testing.assert_close(out.entropy, ref_ent, **BF16_MODEL)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@cuda
def test_packed_equals_padded_cuda_fp32_uses_exact_path():
    model = _llama().cuda()
    ids, attn, resp = _batch("right", device="cuda")
    model.set_attn_implementation("sdpa")
    ref_lp, _ = _padded_reference(model, ids, attn, resp, temperature=1.0)
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    lp = response_logprobs(model, ids, attn, resp, temperature=1.0)
    # CUDA matmuls may use TF32 when enabled; the attention itself runs per-sequence SDPA in fp32 here
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_cuda_key_segments_bottom_right(causal):
    """The CUDA kernels' convention for queries fewer than keys (shared prefixes rely on it)."""
    g = torch.Generator().manual_seed(6)
    bounds_q, bounds_k = [0, 40, 41, 141, 170], [0, 40, 81, 181, 310]
    q32 = torch.randn(170, 8, 64, generator=g)
    k32, v32 = torch.randn(310, 2, 64, generator=g), torch.randn(310, 2, 64, generator=g)
    w = torch.randn(170, 8, 64, generator=g).cuda()
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32, device="cuda") for b in (bounds_q, bounds_k))
    qkv = [t.cuda().bfloat16().requires_grad_(True) for t in (q32, k32, v32)]
    out = varlen_attention(*qkv, cu_q, max_seqlen=100, scale=0.125, causal=causal, cu_seqlens_k=cu_k,
                           max_seqlen_k=129)
    grads = torch.autograd.grad((out.float() * w).sum(), qkv)
    ref_in = [t.detach().float().requires_grad_(True) for t in qkv]
    ref = _segments_reference(*ref_in, bounds_q, bounds_k, causal, 0.125)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    torch.testing.assert_close(out.float(), ref, **BF16_MODEL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, **BF16_MODEL)


@cuda
def test_shared_prefixes_equal_padded_cuda_bf16():
    model = _qwen2(max_window_layers=0).cuda().bfloat16()
    ids, attn, resp = _group_batch("left", device="cuda")
    model.set_attn_implementation("sdpa")
    ref_lp, ref_ent = _padded_reference(model, ids, attn, resp, temperature=1.0)
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    out = response_logprobs_and_entropy(model, ids, attn, resp, temperature=1.0, share_prefixes=True)
    torch.testing.assert_close(out.logprobs, ref_lp, **BF16_MODEL)
    torch.testing.assert_close(out.entropy, ref_ent, **BF16_MODEL)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
