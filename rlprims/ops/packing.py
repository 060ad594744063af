"""Sequence packing: padded `[B, T]` batches <-> one flat token stream `[N]` (remove padding).

A padded RL batch mixes 20-token and 1,000-token sequences; packing drops the padding and lays the
valid tokens of all rows end to end, so the model computes on N = Σ_b L_b tokens instead of B·T.
Attention must then stay inside each sequence (varlen attention, see `rlprims.models.packed`) and
position ids restart at 0 for every sequence. This is verl's `use_remove_padding`.

Layout of a packed batch (S sequences, N tokens):

    input_ids     [N]     the valid tokens of row seq_rows[0], then of row seq_rows[1], ...
    position_ids  [N]     0, 1, ..., L_s - 1 within each sequence
    cu_seqlens    [S+1]   int32; sequence s occupies [cu_seqlens[s], cu_seqlens[s+1]); cu_seqlens[S] = N
    indices       [N]     int64; where each packed token sat in the flattened batch (b·T + t)

Rows with no valid token are dropped from the stream (they are not zero-length sequences: varlen
kernels need not handle those); `unpack_values` fills them. Only this module converts between the two
layouts: every other function takes `[B, T]` or `[N]` + `cu_seqlens`.

Shared prefixes (`pack_shared_prefixes`): the `n` samples of a GRPO group repeat one prompt. Laying the
prompt once and each row's continuation after it (a depth-1 tree) computes the prompt's tokens once for
the group instead of n times; each continuation attends to its prompt and to itself, with the position
ids it has in its own row, so every token's hidden state is the one the row alone would give. Layout
(S segments: a prefix, or one row's continuation; N tokens; Nk keys):

    input_ids      [N]     group 0's prefix, its rows' continuations, group 1's prefix, ...
    position_ids   [N]     a token's position in its own row (a continuation goes on from its prefix)
    cu_seqlens_q   [S+1]   int32; segment s is the queries [cu_seqlens_q[s], cu_seqlens_q[s+1])
    kv_indices     [Nk]    int64; stream positions of each segment's keys: for a prefix itself, for a
                           continuation its group's prefix and then itself
    cu_seqlens_k   [S+1]   int32; segment s's keys are kv_indices[cu_seqlens_k[s]:cu_seqlens_k[s+1]]
    stream_index   [B, T]  int64; stream position of each valid token of the padded batch, −1 elsewhere

Causal attention over it is bottom-right aligned (query i of a segment with Lq queries and Lk keys sees
keys j ≤ i + Lk − Lq), flash-attn's convention for Lq ≠ Lk: `rlprims.models.packed.varlen_attention`.

Position ids match the padded model exactly when the padded forward uses
position_ids = cumsum(attention_mask) − 1 (what verl and HF generation do for left padding), or the
default arange for right padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlprims.ops._validate import check_mask, check_tensor

__all__ = [
    "PackedSequences",
    "SharedPrefixPack",
    "pack_shared_prefixes",
    "pack_sequences",
    "pack_values",
    "packed_response_positions",
    "unpack_values",
]


class PackedSequences(NamedTuple):
    """One packed batch: the token stream plus everything needed to map back to `[B, T]`."""

    input_ids: Tensor  # [N] the valid tokens, sequence after sequence
    position_ids: Tensor  # [N] int64, restarts at 0 at every sequence start
    cu_seqlens: Tensor  # [S+1] int32, cumulative sequence lengths, starts at 0, ends at N
    max_seqlen: int  # max_s L_s (a Python int, as varlen kernels take it)
    indices: Tensor  # [N] int64, flat position b*T + t of each packed token in the padded batch
    seq_rows: Tensor  # [S] int64, padded-batch row of each packed sequence
    batch_size: int  # B of the padded batch
    seq_len: int  # T of the padded batch


def _check_contiguous(attention_mask: Tensor) -> None:
    """Each row's valid tokens must form one run (left, right, or both-side padding)."""
    m = attention_mask.to(torch.int8)
    # A run starts at t where m[t] = 1 and m[t-1] = 0 (or t = 0); more than one start = a hole.
    runs = m[:, 0].to(torch.int64) + (m[:, 1:] > m[:, :-1]).sum(dim=1)
    bad = torch.nonzero(runs > 1).flatten()
    if bad.numel() > 0:
        row = int(bad[0])
        raise ValueError(
            f"attention_mask row {row} has {int(runs[row])} separate runs of valid tokens; packing needs "
            f"each row's valid tokens to be contiguous (left or right padding), attention_mask shape "
            f"{tuple(attention_mask.shape)} ({bad.numel()} bad row(s))"
        )


def pack_sequences(input_ids: Tensor, attention_mask: Tensor) -> PackedSequences:
    """Pack a padded batch into one token stream with per-sequence position ids and cu_seqlens.

    For row b with valid tokens at t ∈ [s_b, s_b + L_b):  packed stream = concat_b input_ids[b, s_b:s_b+L_b],
    position_ids = concat_b [0, ..., L_b − 1],  cu_seqlens = [0, L_0, L_0 + L_1, ...] (non-empty rows only).
    Remove-padding as in verl (`use_remove_padding`) / flash-attn's `unpad_input`.

    Requires each row's valid tokens to be contiguous (left, right or both-side padding); a row with holes
    raises (its position ids would be ambiguous). Rows with no valid token are skipped (S ≤ B).
    Syncs with the device once (N and max_seqlen become Python ints).
    Shapes: input_ids [B, T] (any dtype), attention_mask [B, T] bool -> PackedSequences with N = Σ mask.
    """
    check_tensor("input_ids", input_ids, ndim=2)
    check_mask("attention_mask", attention_mask, input_ids.shape)
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"cannot pack an empty batch: input_ids has shape {tuple(input_ids.shape)}")
    _check_contiguous(attention_mask)
    lengths = attention_mask.sum(dim=1)  # [B] int64
    if int(lengths.sum()) == 0:
        raise ValueError(
            f"attention_mask has no valid token (shape {tuple(attention_mask.shape)}); nothing to pack"
        )
    indices = torch.nonzero(attention_mask.flatten()).flatten()  # [N], row-major = sequence order
    nonempty = lengths > 0
    seq_rows = torch.nonzero(nonempty).flatten()
    seq_lengths = lengths[nonempty]
    cu_seqlens = torch.zeros(seq_lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = torch.cumsum(seq_lengths, dim=0).to(torch.int32)
    # Position within the sequence: global token index minus the start of its sequence.
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), seq_lengths)
    position_ids = torch.arange(indices.numel(), device=input_ids.device) - starts
    return PackedSequences(
        input_ids=input_ids.flatten()[indices],
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seq_lengths.max()),
        indices=indices,
        seq_rows=seq_rows,
        batch_size=batch,
        seq_len=seq_len,
    )


def _check_packed(packed: object) -> PackedSequences:
    if not isinstance(packed, PackedSequences):
        raise ValueError(
            f"packed must be a PackedSequences (from pack_sequences), got {type(packed).__name__}"
        )
    return packed


def pack_values(values: Tensor, packed: PackedSequences) -> Tensor:
    """Select the packed tokens of any per-token tensor:  out[i] = values.flatten(0, 1)[indices[i]].

    Use it for response masks, old/ref log-probs, advantages, ... laid out like the packed ids.
    Differentiable. Values under padding are never read.
    Shapes: values [B, T, ...] -> [N, ...].
    """
    _check_packed(packed)
    check_tensor("values", values)
    if values.dim() < 2 or tuple(values.shape[:2]) != (packed.batch_size, packed.seq_len):
        raise ValueError(
            f"values must have shape ({packed.batch_size}, {packed.seq_len}, ...) like the packed batch, "
            f"got shape {tuple(values.shape)}"
        )
    return values.flatten(0, 1).index_select(0, packed.indices.to(values.device))


def unpack_values(values: Tensor, packed: PackedSequences, *, fill: float = 0.0) -> Tensor:
    """Scatter a per-token packed tensor back to the padded layout (the inverse of `pack_values`).

    out[b, t] = values[i] where indices[i] = b·T + t, and `fill` at padding (and in skipped empty rows).
    Differentiable with respect to `values` (padding gets no gradient path).
    Shapes: values [N, ...] -> [B, T, ...].
    """
    _check_packed(packed)
    check_tensor("values", values)
    n = packed.indices.numel()
    if values.dim() < 1 or values.shape[0] != n:
        raise ValueError(
            f"values must have shape ({n}, ...) like the packed stream, got shape {tuple(values.shape)}"
        )
    rest = tuple(values.shape[1:])
    base = torch.full(
        (packed.batch_size * packed.seq_len, *rest), fill, dtype=values.dtype, device=values.device
    )
    out = base.index_copy(0, packed.indices.to(values.device), values)
    return out.view(packed.batch_size, packed.seq_len, *rest)


def packed_response_positions(response_mask: Tensor, packed: PackedSequences) -> Tensor:
    """Packed positions of the response tokens, each of which is predicted by the position before it.

    Returns p [M] int64, increasing, with input_ids[p] the response tokens; the log-prob of token p comes
    from the hidden state at p − 1 (same sequence). Rejects a response token under padding and one at a
    sequence's first position (nothing predicts it).
    Shapes: response_mask [B, T] bool -> [M], M = Σ response_mask.
    """
    _check_packed(packed)
    check_mask("response_mask", response_mask, (packed.batch_size, packed.seq_len))
    flat = response_mask.flatten()
    n_resp = int(flat.sum())
    packed_resp = flat.index_select(0, packed.indices.to(flat.device))
    if int(packed_resp.sum()) != n_resp:
        raise ValueError(
            f"response_mask has {n_resp - int(packed_resp.sum())} True position(s) where attention_mask is "
            f"False (shape {tuple(response_mask.shape)}); responses must lie inside the valid tokens"
        )
    starts = packed.cu_seqlens[:-1].to(device=flat.device, dtype=torch.int64)
    first_is_response = packed_resp.index_select(0, starts)  # [S]
    if bool(first_is_response.any()):
        s = int(torch.nonzero(first_is_response)[0])
        raise ValueError(
            f"response_mask marks the first valid token of row {int(packed.seq_rows[s])} as a response "
            "token; a sequence's first token has no preceding context to predict it"
        )
    positions = torch.nonzero(packed_resp).flatten()
    return positions


class SharedPrefixPack(NamedTuple):
    """A packed batch whose rows share prefixes (module docstring): each distinct prefix once."""

    input_ids: Tensor  # [N]
    position_ids: Tensor  # [N] int64, each token's position in its own row
    cu_seqlens_q: Tensor  # [S+1] int32, segments (a prefix or a continuation) of the stream
    max_seqlen_q: int
    kv_indices: Tensor  # [Nk] int64, each segment's key positions in the stream
    cu_seqlens_k: Tensor  # [S+1] int32, segment s's keys: kv_indices[cu_seqlens_k[s]:cu_seqlens_k[s+1]]
    max_seqlen_k: int
    stream_index: Tensor  # [B, T] int64, stream position of each valid token, -1 under padding
    num_groups: int  # distinct prefixes


def pack_shared_prefixes(
    input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
) -> SharedPrefixPack:
    """Pack a padded batch with each distinct prefix laid once (GRPO's n samples of one prompt).

    Row b's prefix is its valid tokens before its first response token (all of them when it has none);
    its continuation is the rest of its valid tokens (response tokens, and in multi-turn rows the tool
    or user tokens between turns). Rows whose prefixes are equal token for token form one group, in
    order of first appearance: stream = prefix, then each row's continuation, group after group. A
    forward over it with bottom-right causal varlen attention gives every token the hidden state of the
    row's own forward: the logit that scores input_ids[b, t] is at stream position stream_index[b, t − 1].
    Exact: the same products and sums as `pack_sequences`; only the duplicated prefix work goes.
    Requires contiguous valid tokens per row and no response token at a row's first valid position.
    Runs on the host (one copy of the masks); the result lives on the inputs' device.
    Shapes: input_ids, attention_mask, response_mask [B, T] -> SharedPrefixPack (N ≤ Σ attention_mask).
    """
    check_tensor("input_ids", input_ids, ndim=2)
    check_mask("attention_mask", attention_mask, input_ids.shape)
    check_mask("response_mask", response_mask, input_ids.shape)
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"cannot pack an empty batch: input_ids has shape {tuple(input_ids.shape)}")
    _check_contiguous(attention_mask)
    if bool((response_mask & ~attention_mask).any()):
        raise ValueError(
            "response_mask has True positions where attention_mask is False (shape "
            f"{tuple(response_mask.shape)}); responses must lie inside the valid tokens"
        )
    ids, valid, resp = input_ids.cpu(), attention_mask.cpu(), response_mask.cpu()
    starts = valid.to(torch.int8).argmax(1).tolist()
    lengths = valid.sum(1).tolist()
    first_resp = torch.where(resp.any(1), resp.to(torch.int8).argmax(1), seq_len).tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for b in range(batch):
        if lengths[b] == 0:
            continue
        cut = min(first_resp[b], starts[b] + lengths[b])
        if cut == starts[b]:
            raise ValueError(
                f"response_mask marks the first valid token of row {b} as a response token; a sequence's "
                "first token has no preceding context to predict it"
            )
        groups.setdefault(tuple(ids[b, starts[b] : cut].tolist()), []).append(b)
    if not groups:
        raise ValueError(
            f"attention_mask has no valid token (shape {tuple(attention_mask.shape)}); nothing to pack"
        )
    stream_ids, stream_pos, cu_q, kv, cu_k = [], [], [0], [], [0]
    index = torch.full((batch, seq_len), -1, dtype=torch.int64)
    n = 0
    for prefix, rows in groups.items():
        p = len(prefix)
        prefix_pos = torch.arange(n, n + p)
        stream_ids.append(torch.tensor(prefix, dtype=ids.dtype))
        stream_pos.append(torch.arange(p))
        kv.append(prefix_pos)
        n += p
        cu_q.append(n)
        cu_k.append(cu_k[-1] + p)
        for b in rows:
            s, e = starts[b], starts[b] + lengths[b]
            index[b, s : s + p] = prefix_pos
            rest = e - (s + p)
            if rest == 0:
                continue
            own = torch.arange(n, n + rest)
            index[b, s + p : e] = own
            stream_ids.append(ids[b, s + p : e])
            stream_pos.append(torch.arange(p, p + rest))
            kv += [prefix_pos, own]
            n += rest
            cu_q.append(n)
            cu_k.append(cu_k[-1] + p + rest)
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    device = input_ids.device
    return SharedPrefixPack(
        input_ids=torch.cat(stream_ids).to(device),
        position_ids=torch.cat(stream_pos).to(device),
        cu_seqlens_q=cu_q_t.to(device),
        max_seqlen_q=int((cu_q_t[1:] - cu_q_t[:-1]).max()),
        kv_indices=torch.cat(kv).to(device),
        cu_seqlens_k=cu_k_t.to(device),
        max_seqlen_k=int((cu_k_t[1:] - cu_k_t[:-1]).max()),
        stream_index=index.to(device),
        num_groups=len(groups),
    )
