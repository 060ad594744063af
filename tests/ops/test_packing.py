import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlprims.ops.packing import (
    PackedSequences,
    pack_shared_prefixes,
    pack_sequences,
    pack_values,
    packed_response_positions,
    unpack_values,
)
from tests.tolerances import EXACT


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_literal_left_and_right_padding():
    # row 0 left-padded (3 tokens at t=2..4), row 1 right-padded (2 tokens at t=0..1), T = 5
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 0, 0, 0]])
    p = pack_sequences(ids, _mask(["00111", "11000"]))
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 1]
    # cu_seqlens = [0, 3, 3 + 2]
    assert p.cu_seqlens.tolist() == [0, 3, 5] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 3
    # flat positions b*T + t: row 0 -> 2, 3, 4; row 1 -> 5, 6
    assert p.indices.tolist() == [2, 3, 4, 5, 6]
    assert p.seq_rows.tolist() == [0, 1]
    assert (p.batch_size, p.seq_len) == (2, 5)


def test_both_side_padding_and_empty_rows():
    # row 0: tokens at t=1..2 (padding on both sides); row 1: no token (skipped); row 2: full row
    ids = torch.arange(12).view(3, 4)
    p = pack_sequences(ids, _mask(["0110", "0000", "1111"]))
    assert p.input_ids.tolist() == [1, 2, 8, 9, 10, 11]
    assert p.position_ids.tolist() == [0, 1, 0, 1, 2, 3]
    assert p.cu_seqlens.tolist() == [0, 2, 6]
    assert p.seq_rows.tolist() == [0, 2]
    back = unpack_values(p.input_ids, p, fill=-1)
    assert back.tolist() == [[-1, 1, 2, -1], [-1, -1, -1, -1], [8, 9, 10, 11]]


def test_edges_lengths_one_and_max():
    # lengths 1 (left-padded), T (full), 1 (right-padded)
    T = 6
    mask = _mask(["000001", "111111", "100000"])
    p = pack_sequences(torch.arange(18).view(3, T), mask)
    assert p.cu_seqlens.tolist() == [0, 1, 7, 8]
    assert p.max_seqlen == T
    starts, ends = p.cu_seqlens[:-1].long(), p.cu_seqlens[1:].long()
    assert (p.position_ids[starts] == 0).all()
    assert (p.position_ids[ends - 1] == (ends - starts - 1)).all()
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]


def test_pack_unpack_identity_with_trailing_dims():
    torch.manual_seed(0)
    mask = _mask(["0011", "1110", "1111"])
    p = pack_sequences(torch.zeros(3, 4, dtype=torch.long), mask)
    x = torch.randn(3, 4, 2)
    packed = pack_values(x, p)
    assert packed.shape == (p.input_ids.numel(), 2)
    torch.testing.assert_close(
        unpack_values(packed, p), torch.where(mask[..., None], x, torch.zeros(())), **EXACT
    )
    v = torch.randn(packed.shape[0], 2)
    torch.testing.assert_close(pack_values(unpack_values(v, p), p), v, **EXACT)


def test_padding_values_never_read_and_gradients():
    mask = _mask(["0111", "1100"])
    p = pack_sequences(torch.zeros(2, 4, dtype=torch.long), mask)
    x = torch.full((2, 4), float("nan"))
    x[mask] = torch.arange(5.0)
    x.requires_grad_(True)
    packed = pack_values(x, p)
    assert packed.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    packed.sum().backward()
    assert x.grad.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    v = torch.arange(5.0, requires_grad=True)
    out = unpack_values(v, p, fill=float("nan"))
    (torch.where(mask, out, 0.0) * 2).sum().backward()
    assert v.grad.tolist() == [2.0] * 5


@st.composite
def _padded_batches(draw):
    batch = draw(st.integers(1, 5))
    seq_len = draw(st.integers(1, 9))
    rows = []
    for _ in range(batch):
        length = draw(st.integers(0, seq_len))
        start = draw(st.integers(0, seq_len - length))
        rows.append("0" * start + "1" * length + "0" * (seq_len - start - length))
    if all("1" not in r for r in rows):
        rows[0] = "1" + rows[0][1:]
    return _mask(rows)


@given(_padded_batches())
def test_properties_positions_cu_seqlens_roundtrip(mask):
    B, T = mask.shape
    ids = torch.arange(B * T).view(B, T)
    p = pack_sequences(ids, mask)
    lengths = mask.sum(1)
    assert p.cu_seqlens[0] == 0 and p.cu_seqlens[-1] == mask.sum()
    assert p.cu_seqlens.diff().tolist() == lengths[lengths > 0].tolist()
    assert p.max_seqlen == int(lengths.max())
    # position ids equal the padded model's cumsum(mask) - 1 at every valid token
    expected_pos = mask.long().cumsum(1) - 1
    assert torch.equal(unpack_values(p.position_ids, p, fill=-1), torch.where(mask, expected_pos, -1))
    assert torch.equal(unpack_values(p.input_ids, p, fill=-1), torch.where(mask, ids, -1))
    assert torch.equal(pack_values(ids, p), p.input_ids)


def test_response_positions_literal():
    # row 0: prompt t=1, response t=2..3; row 1: prompt t=0..1, response t=2
    mask = _mask(["0111", "1110"])
    resp = _mask(["0011", "0010"])
    p = pack_sequences(torch.zeros(2, 4, dtype=torch.long), mask)
    # packed stream: row 0 -> 0, 1, 2; row 1 -> 3, 4, 5; responses at 1, 2 and 5
    assert packed_response_positions(resp, p).tolist() == [1, 2, 5]


def test_response_positions_bad_inputs():
    mask = _mask(["0111", "1110"])
    p = pack_sequences(torch.zeros(2, 4, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="where attention_mask is False"):
        packed_response_positions(_mask(["1011", "0000"]), p)
    with pytest.raises(ValueError, match="first valid token of row 1"):
        packed_response_positions(_mask(["0011", "1000"]), p)
    with pytest.raises(ValueError, match="response_mask must have shape"):
        packed_response_positions(_mask(["001", "001"]), p)


def test_bad_inputs():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="row 1 has 2 separate runs"):
        pack_sequences(ids, _mask(["0111", "1011"]))
    with pytest.raises(ValueError, match="empty batch"):
        pack_sequences(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty batch"):
        pack_sequences(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="no valid token"):
        pack_sequences(ids, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 4\)"):
        pack_sequences(ids, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        pack_sequences(ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must have 2 dims"):
        pack_sequences(torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool))
    p = pack_sequences(ids, torch.ones(2, 4, dtype=torch.bool))
    assert isinstance(p, PackedSequences)
    with pytest.raises(ValueError, match=r"values must have shape \(2, 4, \.\.\.\)"):
        pack_values(torch.zeros(4, 2), p)
    with pytest.raises(ValueError, match=r"values must have shape \(8, \.\.\.\)"):
        unpack_values(torch.zeros(7), p)
    with pytest.raises(ValueError, match="PackedSequences"):
        unpack_values(torch.zeros(8), (1, 2))


# ---- shared prefixes ---------------------------------------------------------------------------------


def test_shared_prefixes_literal():
    # rows 0 and 2 share the prompt [5, 6] (row 0 left-padded); row 1 has its own prompt [5]; row 3 no token
    ids = torch.tensor([[0, 5, 6, 7, 8], [5, 9, 9, 0, 0], [5, 6, 3, 0, 0], [0, 0, 0, 0, 0]])
    attn = _mask(["01111", "11100", "11100", "00000"])
    resp = _mask(["00011", "01100", "00100", "00000"])
    p = pack_shared_prefixes(ids, attn, resp)
    # group [5, 6]: prefix, row 0's [7, 8], row 2's [3]; group [5]: prefix, row 1's [9, 9]
    assert p.input_ids.tolist() == [5, 6, 7, 8, 3, 5, 9, 9]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 2, 0, 1, 2]
    assert p.cu_seqlens_q.tolist() == [0, 2, 4, 5, 6, 8] and p.cu_seqlens_q.dtype == torch.int32
    assert p.kv_indices.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 5, 6, 7]
    assert p.cu_seqlens_k.tolist() == [0, 2, 6, 9, 10, 13]
    assert (p.max_seqlen_q, p.max_seqlen_k, p.num_groups) == (2, 4, 2)
    assert p.stream_index.tolist() == [[-1, 0, 1, 2, 3], [5, 6, 7, -1, -1], [0, 1, 4, -1, -1], [-1] * 5]


@st.composite
def _grouped_batches(draw):
    """Rows of a few distinct prompts (some repeated, as GRPO's groups), continuations with holes in the
    response mask (multi-turn), random padding on either side."""
    seq_len = 12
    prompts = [
        draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)) for _ in range(draw(st.integers(1, 3)))
    ]
    batch = draw(st.integers(1, 6))
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    attn = torch.zeros(batch, seq_len, dtype=torch.bool)
    resp = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        prompt = prompts[draw(st.integers(0, len(prompts) - 1))]
        rest = draw(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=seq_len - len(prompt)))
        if rest:
            rest[0] = (rest[0][0], True)  # the continuation starts with a response token
        n = len(prompt) + len(rest)
        start = draw(st.integers(0, seq_len - n))
        ids[b, start : start + n] = torch.tensor(prompt + [t for t, _ in rest])
        attn[b, start : start + n] = True
        resp[b, start + len(prompt) : start + n] = torch.tensor([r for _, r in rest], dtype=torch.bool)
    return ids, attn, resp


@given(_grouped_batches())
def test_shared_prefixes_every_token_sees_exactly_its_row(batch):
    """The invariant that makes the shared forward exact: each valid token (b, t) lands at a stream
    position holding the same id with the same position id, and the keys it attends to (its segment's,
    bottom-right causal) are the stream positions of row b's tokens up to t, in order."""
    ids, attn, resp = batch
    p = pack_shared_prefixes(ids, attn, resp)
    n = p.input_ids.numel()
    assert p.cu_seqlens_q[-1] == n and p.cu_seqlens_k[-1] == p.kv_indices.numel()
    segment = torch.searchsorted(p.cu_seqlens_q, torch.arange(n), right=True) - 1
    lq, lk = p.cu_seqlens_q.diff(), p.cu_seqlens_k.diff()
    assert p.max_seqlen_q == int(lq.max()) and p.max_seqlen_k == int(lk.max())
    covered = torch.zeros(n, dtype=torch.bool)
    for b in range(ids.shape[0]):
        cols = torch.nonzero(attn[b]).flatten()
        assert bool((p.stream_index[b][~attn[b]] == -1).all())
        for k, t in enumerate(cols.tolist()):
            i = int(p.stream_index[b, t])
            covered[i] = True
            assert p.input_ids[i] == ids[b, t] and p.position_ids[i] == k
            s = int(segment[i])
            keys = p.kv_indices[p.cu_seqlens_k[s] : p.cu_seqlens_k[s + 1]]
            visible = keys[: i - int(p.cu_seqlens_q[s]) + 1 + int(lk[s] - lq[s])]
            assert visible.tolist() == p.stream_index[b, cols[: k + 1]].tolist()
    assert bool(covered.all())  # every stream token belongs to some row
    first = resp.to(torch.int8).argmax(1)
    prompts = {
        tuple(ids[b][attn[b] & (torch.arange(12) < first[b])].tolist())
        if resp[b].any()
        else tuple(ids[b][attn[b]].tolist())
        for b in range(ids.shape[0])
        if attn[b].any()
    }
    assert p.num_groups == len(prompts)


def test_shared_prefixes_bad_inputs():
    ids = torch.zeros(2, 4, dtype=torch.long)
    attn = _mask(["0111", "1110"])
    with pytest.raises(ValueError, match="first valid token of row 1"):
        pack_shared_prefixes(ids, attn, _mask(["0011", "1000"]))
    with pytest.raises(ValueError, match="where attention_mask is False"):
        pack_shared_prefixes(ids, attn, _mask(["1011", "0000"]))
    with pytest.raises(ValueError, match="row 1 has 2 separate runs"):
        pack_shared_prefixes(ids, _mask(["0111", "1011"]), _mask(["0000", "0000"]))
    with pytest.raises(ValueError, match="no valid token"):
        pack_shared_prefixes(ids, _mask(["0000", "0000"]), _mask(["0000", "0000"]))
    with pytest.raises(ValueError, match="empty batch"):
        pack_shared_prefixes(torch.zeros(0, 4, dtype=torch.long), *(torch.zeros(0, 4, dtype=torch.bool),) * 2)
    with pytest.raises(ValueError, match=r"response_mask must have shape \(2, 4\)"):
        pack_shared_prefixes(ids, attn, torch.zeros(2, 3, dtype=torch.bool))
