"""Packed (padding-free) training forward for Hugging Face causal LMs.

Three pieces, no model code edited:

1. `varlen_attention`: causal attention restricted to each sequence of a packed stream
   (`[N, heads, head_dim]` + `cu_seqlens`), dispatched to
     - flash-attn's `flash_attn_varlen_func` on CUDA in fp16/bf16 when flash-attn is installed,
     - `torch.nn.attention.varlen.varlen_attn` on CUDA in fp16/bf16 otherwise,
     - one `scaled_dot_product_attention` call per sequence elsewhere (CPU, fp32/fp64 anywhere: the
       flash kernels only take half precision). Exact, slow for many sequences; it is the reference.
   GQA (fewer key/value heads than query heads) is handled natively by all three.

2. `register_packed_attention()`: registers `PACKED_ATTENTION` ("rlprims_packed") in transformers'
   `AttentionInterface` (and a mask function in `AttentionMaskInterface`). This changes transformers'
   global registry, so it is an explicit call (idempotent), never done at import. Then select it per model:
       register_packed_attention()
       model.set_attn_implementation(PACKED_ATTENTION)      # or from_pretrained(attn_implementation=...)
   The attention function takes the varlen path when the forward is given `cu_seq_lens_q` (transformers
   forwards the keyword arguments of `model.model(...)` to every attention call, the same route its own
   flash-attention path uses); without them it behaves as "sdpa", padded masks included, so the same
   model still runs padded batches and `generate`.

3. `packed_hidden_states`, `response_logprobs`, `response_logprobs_and_entropy`: pack a padded batch,
   run the backbone (`model.get_decoder()`) on the stream, and compute log-probs / entropy of the
   response tokens with `rlprims.kernels.logprobs_*` (the fused Triton kernel for CUDA bf16/fp16/fp32
   tensors, the chunked `rlprims.ops.logprobs` reference otherwise) against the LM-head weight (tied
   embeddings work: the head's weight is the embedding matrix and receives both gradients). Results come
   back in `[B, T]`, shifted: `logprobs[b, t]` is the log-prob of `input_ids[b, t]`.

Note for FSDP2: these helpers call the backbone and read `lm_head.weight` directly, not the root
module's forward; when the root module is sharded, unshard its parameters around the call (the
parallel layer's job).
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlprims.kernels import logprobs_and_entropy, logprobs_from_hidden  # Triton on CUDA, else chunked
from rlprims.ops._validate import check_mask, check_tensor
from rlprims.ops.logprobs import DEFAULT_CHUNK_SIZE, LogprobsEntropy
from rlprims.ops.packing import (
    PackedSequences,
    SharedPrefixPack,
    pack_sequences,
    pack_shared_prefixes,
    packed_response_positions,
)

__all__ = [
    "PACKED_ATTENTION",
    "packed_attention_forward",
    "packed_hidden_states",
    "register_packed_attention",
    "response_logprobs",
    "response_logprobs_and_entropy",
    "shared_prefix_hidden_states",
    "varlen_attention",
]

PACKED_ATTENTION = "rlprims_packed"


@functools.cache
def _varlen_attn_has_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _sdpa_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bounds: list[int],
    scale: float | None,
    causal: bool,
    bounds_k: list[int] | None = None,
):
    gqa = query.shape[1] != key.shape[1]
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    lengths_k = lengths if bounds_k is None else [b - a for a, b in itertools.pairwise(bounds_k)]
    # split (not per-sequence slicing): its backward is one cat, where each slice's backward would
    # allocate and add a full-size zero gradient, O(S·N) per layer.
    qs = query.transpose(0, 1).split(lengths, dim=1)  # [H, L, D] each
    ks, vs = (t.transpose(0, 1).split(lengths_k, dim=1) for t in (key, value))
    outs = []
    for q, k, v in zip(qs, ks, vs):
        lq, lk = q.shape[1], k.shape[1]
        mask = None
        if causal and lq != lk:  # bottom-right: query i sees keys j <= i + lk - lq
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        outs.append(
            F.scaled_dot_product_attention(
                q[None],
                k[None],
                v[None],
                attn_mask=mask,
                is_causal=causal and mask is None,
                scale=scale,
                enable_gqa=gqa,
            )[0]
        )
    return torch.cat(outs, dim=1).transpose(0, 1)


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    max_seqlen: int,
    scale: float | None,
    causal: bool,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """Attention within each packed sequence:  o_i = Σ_{j ∈ seq(i), j ≤ i} softmax_j(s·q_i·k_j) v_j.

    `causal=False` drops the j ≤ i condition. s = `scale` (None: 1/√head_dim). Query head h uses key/value
    head h // (Hq / Hkv) (GQA). Backend: flash-attn varlen (CUDA, fp16/bf16, if installed), else torch's
    `varlen_attn` (CUDA, fp16/bf16), else per-sequence SDPA (see module docstring). Differentiable.
    With `cu_seqlens_k` the keys have segments of their own (sequence s: queries cu_seqlens[s]:...,
    keys cu_seqlens_k[s]:...); causal masking is then bottom-right aligned, flash-attn's convention:
    query i of a sequence with Lq queries and Lk keys sees keys j ≤ i + Lk − Lq (`pack_shared_prefixes`).
    Shapes: query [N, Hq, D], key/value [N, Hkv, D] (Hq divisible by Hkv), cu_seqlens [S+1] int32
            (0 = cu_seqlens[0] < ... < cu_seqlens[S] = N), max_seqlen = max L_s -> [N, Hq, D];
            with cu_seqlens_k [S+1] int32 (ending at Nk), key/value are [Nk, Hkv, D].
    """
    check_tensor("query", query, ndim=3, floating=True)
    check_tensor("key", key, ndim=3, floating=True)
    check_tensor("value", value, ndim=3, floating=True)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1)
    n, hq, d = query.shape
    nk = n if cu_seqlens_k is None else key.shape[0]
    if key.shape != value.shape or key.shape[0] != nk or key.shape[2] != d or hq % key.shape[1] != 0:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}: "
            "need [N, Hq, D], [N, Hkv, D], [N, Hkv, D] with Hq divisible by Hkv (Nk keys with cu_seqlens_k)"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [S+1] with S >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens_k is not None:
        check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1)
        if (
            cu_seqlens_k.dtype != torch.int32
            or cu_seqlens_k.shape != cu_seqlens.shape
            or max_seqlen_k is None
        ):
            raise ValueError(
                f"cu_seqlens_k must be int32 and shaped like cu_seqlens {tuple(cu_seqlens.shape)}, with "
                f"max_seqlen_k; got {cu_seqlens_k.dtype} {tuple(cu_seqlens_k.shape)}, "
                f"max_seqlen_k={max_seqlen_k}"
            )
    half = query.dtype in (torch.float16, torch.bfloat16)
    if query.is_cuda and half:
        cu = cu_seqlens.to(query.device)
        cu_k = cu if cu_seqlens_k is None else cu_seqlens_k.to(query.device)
        max_k = max_seqlen if cu_seqlens_k is None else int(max_seqlen_k)
        flash = _flash_attn_varlen()
        if flash is not None:
            return flash(
                query,
                key,
                value,
                cu,
                cu_k,
                max_seqlen,
                max_k,
                dropout_p=0.0,
                softmax_scale=scale,
                causal=causal,
            )
        from torch.nn.attention.varlen import varlen_attn

        gqa = {}
        if hq != key.shape[1]:
            if _varlen_attn_has_gqa():
                gqa = {"enable_gqa": True}
            else:  # older torch (2.11 has no enable_gqa): repeat each key/value head Hq/Hkv times
                key = key.repeat_interleave(hq // key.shape[1], dim=1)
                value = value.repeat_interleave(hq // value.shape[1], dim=1)
        return varlen_attn(
            query.contiguous(),
            key.contiguous(),
            value.contiguous(),
            cu,
            cu_k,
            max_seqlen,
            max_k,
            scale=scale,
            window_size=(-1, 0) if causal else (-1, -1),
            **gqa,
        )
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != n or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to N={n}, got {bounds[:8]}...")
    bounds_k = None
    if cu_seqlens_k is not None:
        bounds_k = [int(x) for x in cu_seqlens_k.tolist()]
        lq, lk = (torch.tensor(x).diff() for x in (bounds, bounds_k))
        if (
            bounds_k[0] != 0
            or bounds_k[-1] != nk
            or bool((lk <= 0).any())
            or (causal and bool((lk < lq).any()))
        ):
            raise ValueError(
                f"cu_seqlens_k must increase strictly from 0 to Nk={nk}, each causal sequence with at least "
                f"as many keys as queries; got {bounds_k[:8]}... for cu_seqlens {bounds[:8]}..."
            )
    return _sdpa_varlen(query, key, value, bounds, scale, causal, bounds_k)


def packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    rlprims_kv_indices: Tensor | None = None,
    **kwargs,  # transformers passes model-specific extras (position_ids, output_attentions, ...)
) -> tuple[Tensor, None]:
    """The attention function registered as `PACKED_ATTENTION` (transformers' AttentionInterface signature).

    With `cu_seq_lens_q`: a packed batch, query [1, Hq, N, D], key/value [1, Hkv, N, D] ->
    `varlen_attention` -> ([1, N, Hq, D], None). Without: transformers' SDPA attention (padded batches).
    With `rlprims_kv_indices` (a `pack_shared_prefixes` stream, forwarded by transformers from the model
    call's keyword arguments): the keys and values are key[kv_indices] in segments `cu_seq_lens_k`.
    Rejects what the varlen path would silently get wrong: attention dropout, logit soft-capping, a
    sliding window shorter than a sequence, packed position ids without cu_seq_lens.
    """
    if cu_seq_lens_q is None:
        if attention_mask is not None and _is_no_mask(attention_mask):
            raise ValueError(f"attention '{PACKED_ATTENTION}' got the packed forward's empty mask but no "
                             "cu_seq_lens_q: pass cu_seq_lens_q/k and max_length_q/k (see packed_hidden_states)")
        position_ids = kwargs.get("position_ids")
        if (
            attention_mask is None
            and isinstance(position_ids, Tensor)
            and position_ids.shape[-1] > 1
            and not torch.compiler.is_compiling()
            and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())
        ):
            raise ValueError(
                f"attention '{PACKED_ATTENTION}' got position_ids that restart (a packed batch) but no "
                "cu_seq_lens_q: pass cu_seq_lens_q/k and max_length_q/k (see packed_hidden_states)"
            )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if attention_mask is not None and _is_no_mask(attention_mask):
        attention_mask = None  # the packed forward's "no mask" (_no_mask): the varlen structure is the mask
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            f"packed attention expects one packed row and no attention mask, got query {tuple(query.shape)} "
            f"and attention_mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    if dropout > 0.0:
        raise ValueError(
            f"packed attention does not implement attention dropout (got {dropout}); set it to 0"
        )
    if softcap is not None:
        raise ValueError(
            f"packed attention does not implement attention logit soft-capping (softcap={softcap})"
        )
    max_q = int(max_length_q) if max_length_q is not None else query.shape[2]
    if sliding_window is not None and max_q > sliding_window:
        raise ValueError(
            f"packed attention does not implement sliding windows: sliding_window={sliding_window} < "
            f"max sequence length {max_q}"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
    gathered = {}
    if rlprims_kv_indices is not None:  # shared prefixes: each segment's keys gathered from the stream
        if cu_seq_lens_k is None or max_length_k is None:
            raise ValueError("rlprims_kv_indices needs cu_seq_lens_k and max_length_k (pack_shared_prefixes)")
        key, value = key.index_select(0, rlprims_kv_indices), value.index_select(0, rlprims_kv_indices)
        gathered = {"cu_seqlens_k": cu_seq_lens_k.to(torch.int32), "max_seqlen_k": int(max_length_k)}
    elif (
        cu_seq_lens_k is not None
        and cu_seq_lens_k is not cu_seq_lens_q
        and cu_seq_lens_k.shape != cu_seq_lens_q.shape
    ):
        raise ValueError(
            "packed attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention over one stream) unless "
            "rlprims_kv_indices gathers each sequence's keys"
        )
    out = varlen_attention(
        query[0].transpose(0, 1),
        key,
        value,
        cu_seq_lens_q.to(torch.int32),
        max_seqlen=max_q,
        scale=scaling,
        causal=bool(causal),
        **gathered,
    )
    return out.unsqueeze(0), None


def _no_mask(device: torch.device) -> Tensor:
    """An empty 4-D mask [1, 1, 0, 0] that the packed forward passes as `attention_mask`.

    transformers treats a 4-D mask as prepared and hands it to the attention as is; with None it would
    look for packed sequences in the position ids first (`find_packed_sequence_indices`), which waits for
    the device (a `.all()` on the GPU) in every forward. PACKED_ATTENTION reads this mask as "none"."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def _is_no_mask(mask: Tensor) -> bool:
    return mask.dim() == 4 and mask.numel() == 0 and mask.dtype == torch.bool


def _padded_mask(*args, attention_mask: Tensor | None = None, **kwargs):
    """Mask function for PACKED_ATTENTION: SDPA's mask for padded batches, none for packed/unpadded ones."""
    if attention_mask is None:
        return None  # unpadded (plain causal in SDPA) or packed (cu_seq_lens carry the structure)
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> str:
    """Register `PACKED_ATTENTION` with transformers (global state; idempotent) and return its name.

    Then `model.set_attn_implementation(PACKED_ATTENTION)` or
    `AutoModelForCausalLM.from_pretrained(..., attn_implementation=PACKED_ATTENTION)`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, _padded_mask)
    return PACKED_ATTENTION


def _check_model(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl != PACKED_ATTENTION:
        raise ValueError(
            f"model uses attention implementation {impl!r}; packed forward needs {PACKED_ATTENTION!r}: call "
            "register_packed_attention() and model.set_attn_implementation(PACKED_ATTENTION)"
        )
    return model


def packed_hidden_states(model: nn.Module, packed: PackedSequences) -> Tensor:
    """Final hidden states (after the last norm) of the backbone on a packed stream.

    Runs the causal LM on input_ids [1, N] with the packed position ids and cu_seqlens, without
    computing logits (works under FSDP2, whose root hook gathers the embedding and LM head); each
    sequence attends only to itself, so row i equals the padded forward's hidden state at the same token.
    The model must use `PACKED_ATTENTION`. Useful beyond log-probs (value heads, reward models).
    Shapes: packed with N tokens -> [N, hidden_size].
    """
    _check_model(model)
    if not isinstance(packed, PackedSequences):
        raise ValueError(
            f"packed must be a PackedSequences (from pack_sequences), got {type(packed).__name__}"
        )
    cu, n = packed.cu_seqlens, packed.max_seqlen
    return _stream_hidden_states(
        model, packed.input_ids, packed.position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n,
        max_length_k=n,
    )


def _stream_hidden_states(model: nn.Module, input_ids: Tensor, position_ids: Tensor, **attention) -> Tensor:
    """The backbone's last hidden states [N, H] of a token stream [N]; `attention`: the varlen keywords
    transformers forwards to PACKED_ATTENTION (cu_seq_lens_q/k, max_length_q/k, rlprims_kv_indices)."""
    # Through the causal LM's own forward, not the backbone's: FSDP2 gathers the root module's parameters
    # (embedding, final norm, LM head) in the root's forward hook. No logits are computed (an empty
    # `logits_to_keep`); the last entry of `hidden_states` is the backbone's normed output.
    out = model(
        input_ids=input_ids.unsqueeze(0),
        attention_mask=_no_mask(input_ids.device),  # not None: no wait for the device in transformers' masks
        position_ids=position_ids.unsqueeze(0),
        use_cache=False,
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
        output_hidden_states=True,
        **attention,
    )
    return out.hidden_states[-1][0]


def shared_prefix_hidden_states(model: nn.Module, pack: SharedPrefixPack) -> Tensor:
    """`packed_hidden_states` of a `pack_shared_prefixes` stream: each shared prefix computed once.

    Row i of the result is the hidden state of stream token i, equal (up to fp summation order) to the
    one the token has in its own row's forward; `pack.stream_index` maps the padded batch onto it.
    Shapes: pack with N tokens -> [N, hidden_size].
    """
    _check_model(model)
    if not isinstance(pack, SharedPrefixPack):
        raise ValueError(
            f"pack must be a SharedPrefixPack (from pack_shared_prefixes), got {type(pack).__name__}"
        )
    return _stream_hidden_states(model, pack.input_ids, pack.position_ids, cu_seq_lens_q=pack.cu_seqlens_q,
                                 cu_seq_lens_k=pack.cu_seqlens_k, max_length_q=pack.max_seqlen_q,
                                 max_length_k=pack.max_seqlen_k, rlprims_kv_indices=pack.kv_indices)


def _lm_head_weight(model: nn.Module) -> Tensor:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"model.get_output_embeddings() must be a linear LM head with a [V, H] weight, got {head!r}"
        )
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            "the LM head has a bias; rlprims.ops.logprobs computes logits = h·Wᵀ without one (fold the "
            "bias in by appending a constant-1 feature to the hidden states and the bias as a column of W)"
        )
    config = model.config
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(config, attr, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"model.config.{attr}={value} rescales the logits after the LM head; the packed log-prob "
                "helpers compute plain h·Wᵀ/temperature and would disagree with the model"
            )
    return weight


def _pack_on_host(
    input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, device: torch.device
) -> tuple[PackedSequences, Tensor]:
    """`pack_sequences` + `packed_response_positions`, computed on CPU copies of the inputs, the results
    copied to `device` without waiting (pinned memory, non-blocking).

    On the device the two functions wait for it about ten times (nonzero, the checks, max_seqlen); here
    the only wait is the copy of the masks, none when the inputs are on the CPU already, and the
    micro-batch's kernels are queued without gaps. The inputs are small ([B, T] ids and masks), the
    copies negligible. CPU inputs for a CPU forward are packed in place.
    """
    if device.type == "cpu":
        packed = pack_sequences(input_ids.cpu(), attention_mask.cpu())
        return packed, packed_response_positions(response_mask.cpu(), packed)
    masks = torch.stack((attention_mask, response_mask)).cpu()  # a wait for the device, unless on the CPU
    packed = pack_sequences(input_ids.cpu(), masks[0])
    positions = packed_response_positions(masks[1], packed)  # [M]; predicted by positions − 1

    def to_device(t: Tensor) -> Tensor:
        return t.pin_memory().to(device, non_blocking=True)

    packed = packed._replace(
        input_ids=to_device(packed.input_ids),
        position_ids=to_device(packed.position_ids),
        cu_seqlens=to_device(packed.cu_seqlens),
        indices=to_device(packed.indices),
        seq_rows=to_device(packed.seq_rows),
    )
    return packed, to_device(positions)


def _forward_device(input_ids: Tensor, device: torch.device | str | None) -> torch.device:
    """Where the forward runs: `device`, or the inputs' device when None."""
    if device is None:
        return input_ids.device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_response_tokens(input_ids: Tensor, response_mask: Tensor, vocab: int) -> None:
    """The response tokens (the log-prob targets) lie in [0, V), checked on the host: the kernels are
    then called with check_targets=False (their check waits for the device). One wait for GPU inputs."""
    tokens = input_ids.cpu()[response_mask.cpu()]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"response tokens must lie in [0, V={vocab}) (the LM head's rows), got values in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


def _response_inputs(model, input_ids, attention_mask, response_mask, share_prefixes, device=None):
    """(hidden states that predict the response tokens [M, H], those tokens [M], LM-head weight, the
    tokens' flat positions b·T + t [M]), on `device` (default: the inputs')."""
    _check_model(model)
    check_tensor("input_ids", input_ids, ndim=2)
    check_mask("attention_mask", attention_mask, input_ids.shape)
    check_mask("response_mask", response_mask, input_ids.shape)
    device = _forward_device(input_ids, device)
    _check_response_tokens(input_ids, response_mask, _lm_head_weight(model).shape[0])
    if not share_prefixes:
        packed, positions = _pack_on_host(input_ids, attention_mask, response_mask, device)
        hidden = packed_hidden_states(model, packed)
        return (
            hidden.index_select(0, positions - 1),
            packed.input_ids.index_select(0, positions),
            _lm_head_weight(model),  # after the forward: under FSDP2 the root's weights are gathered now
            packed.indices.index_select(0, positions),
        )
    pack, pred, target, flat = _pack_shared_on_host(input_ids, attention_mask, response_mask, device)
    hidden = shared_prefix_hidden_states(model, pack)
    return (
        hidden.index_select(0, pred),
        pack.input_ids.index_select(0, target),
        _lm_head_weight(model),
        flat,
    )


def _pack_shared_on_host(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                         device: torch.device):
    """`pack_shared_prefixes` on CPU copies, plus for the M response tokens the stream positions of the
    hidden states that predict them and of the tokens, and their flat positions b·T + t; everything
    copied to `device` without waiting (as `_pack_on_host`: one wait for the masks, none for CPU inputs)."""
    masks = torch.stack((attention_mask, response_mask)).cpu()
    pack = pack_shared_prefixes(input_ids.cpu(), masks[0], masks[1])
    flat = torch.nonzero(masks[1].flatten()).flatten()  # [M] b·T + t, row-major
    index = pack.stream_index.flatten()
    pred, target = index.index_select(0, flat - 1), index.index_select(0, flat)  # t ≥ 1: the packing checks

    def to_device(t: Tensor) -> Tensor:
        return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)

    pack = pack._replace(
        **{
            f: to_device(getattr(pack, f))
            for f in (
                "input_ids",
                "position_ids",
                "cu_seqlens_q",
                "kv_indices",
                "cu_seqlens_k",
                "stream_index",
            )
        }
    )
    return pack, to_device(pred), to_device(target), to_device(flat)


def _to_padded(values: Tensor, flat: Tensor, shape: torch.Size) -> Tensor:
    out = torch.zeros(shape.numel(), dtype=values.dtype, device=values.device)
    return out.index_copy(0, flat, values).view(shape)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-token log-probs of the response tokens from one packed forward of an HF causal LM.

    logprobs[b, t] = log softmax(lm_head(h_{b, t−1}) / τ)[input_ids[b, t]] where response_mask[b, t],
    0 elsewhere; h from the backbone on the packed batch (no padding computed). Equals the padded forward
    (position_ids = cumsum(mask) − 1) up to fp summation order. Gradients flow to all model parameters.
    Requires `model.set_attn_implementation(PACKED_ATTENTION)`; each row's valid tokens contiguous;
    response tokens inside the valid tokens and never at a row's first valid position.
    `share_prefixes=True` packs with `pack_shared_prefixes`: rows with the same prompt (the tokens before
    their first response token: GRPO's group of n samples) compute it once. Same result up to fp order.
    device: where the forward runs and the result lives; default the inputs' device. On a GPU, inputs
    on the CPU with device="cuda" are the fast way: the packing runs on the host without waiting for
    the device (which may still be running the previous micro-batch's backward). Inputs on the GPU
    cost one wait (the copy of the masks to the host).
    Shapes: input_ids [B, T] int, attention_mask [B, T] bool, response_mask [B, T] bool -> [B, T] fp32.
    """
    hidden, targets, weight, flat = _response_inputs(
        model, input_ids, attention_mask, response_mask, share_prefixes, device
    )
    lp = logprobs_from_hidden(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                              check_targets=False)  # checked on the host
    return _to_padded(lp, flat, input_ids.shape)


def response_logprobs_and_entropy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> LogprobsEntropy:
    """`response_logprobs` plus the entropy of each response token's next-token distribution.

    entropy[b, t] = H(softmax(lm_head(h_{b, t−1}) / τ)) where response_mask[b, t], 0 elsewhere — the
    distribution that sampled input_ids[b, t] (verl's per-token entropy). Both outputs carry gradients.
    Shapes: as `response_logprobs` -> LogprobsEntropy(logprobs [B, T], entropy [B, T]) fp32.
    """
    hidden, targets, weight, flat = _response_inputs(
        model, input_ids, attention_mask, response_mask, share_prefixes, device
    )
    lp, ent = logprobs_and_entropy(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                   check_targets=False)  # checked on the host
    return LogprobsEntropy(
        logprobs=_to_padded(lp, flat, input_ids.shape), entropy=_to_padded(ent, flat, input_ids.shape)
    )
