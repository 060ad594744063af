"""Fused LM head -> per-token log-prob and entropy in Triton, forward and backward, no [N, V] logits.

Same signatures, values and gradients as the chunked reference `rlprims.ops.logprobs` (read its
docstrings for the math); see docs/kernels.md for the design, tolerances and GPU measurements.

Forward (one Triton kernel + O(N) torch epilogue): a grid of (row block, vocabulary split) programs; each
computes its logit tiles with `tl.dot` (fp32 accumulation) and keeps, per row, an online log-sum-exp
state over its slice of the vocabulary, in base 2 (u = z · log2 e, so exp(z − m) = exp2(u − m)):
    m = max u,   s = Σ exp2(u − m) ≥ 1,   a = Σ exp2(u − m)(u − m) ≤ 0,   u_y (the target's logit).
On a new maximum m' the state is rescaled: s ← 2^{m−m'} s, a ← 2^{m−m'} (a + s (m − m')). The splits are
merged the same way; then log π(y) = ln2 · (u_y − m) − log s and H = log s − ln2 · a/s. Every term has a
known sign (u_y ≤ m, s ≥ 1, a ≤ 0), so log π(y) ≤ 0 and H ≥ 0 hold exactly in floating point, without a
clamp. Saved for the backward: hidden, weight, targets, lse2 = m + log2 s [N], H [N].

Both kernels read hidden and weight tiles through TMA tensor descriptors (out-of-range rows, columns and
k read as zeros: no masks), and the backward kernel stores its tiles the same way. The per-logit
epilogue is kept short: the padding mask runs only in a split's last tile, and the target's logit is
gathered only in tiles that hold some row's target. docs/kernels.md measures each of these.

Backward, per vocabulary chunk [v0, v1) (the chunk is as wide as the memory budget allows, see below):
  1. a Triton kernel recomputes the logit tiles and writes
         dL/d(h Wᵀ) = (g_lp (onehot(y) − π) − g_H π (log π + H)) / τ
     in the input dtype into a [N, v1 − v0] buffer (rows padded to 16 bytes for TMA; the reference
     casts to the input dtype at the same point, before its two matmuls);
  2. grad_weight[v0:v1] = Dᵀ h — one cuBLAS matmul per chunk, each row of dW written once (no atomics,
     deterministic);
  3. grad_hidden += D W[v0:v1] — cuBLAS, summed over chunks in fp32 ([N, H]: small next to [V, H]).
Memory: the buffer holds at most 2 · chunk_size · V elements (default chunk_size = 1024, V = 152k, bf16:
0.6 GB), whatever N is; `chunk_size` has the reference's meaning of a memory knob, not a tile size.

Dispatch: `logprobs_and_entropy` / `logprobs_from_hidden` run the kernel for CUDA tensors of dtype
bf16 / fp16 / fp32 when Triton is importable, and the reference otherwise (CPU, fp64, no Triton). Force
the kernel with `triton_logprobs_and_entropy` / `triton_logprobs_from_hidden` (on CPU only under
TRITON_INTERPRET=1, Triton's interpreter), the reference with `rlprims.ops.logprobs_and_entropy` /
`rlprims.ops.logprobs_from_hidden`.

Differs from the reference: the logits are kept in fp32 straight out of the fp32 accumulator, whereas
the reference rounds h Wᵀ to the input dtype first (as an HF LM head does) and only then upcasts; for bf16
inputs this moves log-probs by about |z| · 2⁻⁹ (the kernel is the closer of the two to exact arithmetic
on the same bf16 inputs). fp32 inputs use IEEE fp32 dots (no TF32), like the reference's fp32 matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlprims.ops.logprobs import (
    DEFAULT_CHUNK_SIZE,
    LogprobsEntropy,
    _check_inputs,
)
from rlprims.ops.logprobs import logprobs_and_entropy as _reference_logprobs_and_entropy
from rlprims.ops.logprobs import logprobs_from_hidden as _reference_logprobs_from_hidden

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # the reference serves every call
    triton = None

__all__ = [
    "HAVE_TRITON",
    "logprobs_and_entropy",
    "logprobs_from_hidden",
    "triton_logprobs_and_entropy",
    "triton_logprobs_from_hidden",
    "uses_triton_kernel",
]

HAVE_TRITON = triton is not None

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The backward's dlogits buffer holds at most this many elements per unit of chunk_size, times V.
_BUFFER_ROWS_PER_CHUNK = 2


# Padding columns of a split's last tile get this base-2 logit: exp2 of it underflows to exactly 0, and
# unlike −inf it keeps e · (u − m) = 0 · (finite) = 0 (−inf would give 0 · −inf = NaN). Real logits are
# assumed above it (|z| < 1e30; fp32 logits that large overflow every implementation anyway).
_PAD = -1.0e30
_LOG2E = 1.4426950408889634  # log2(e): exp(z) = exp2(z · log2 e), the form the hardware computes
_LN2 = 0.6931471805599453

if HAVE_TRITON:
    _PAD_T = tl.constexpr(_PAD)
    _LN2_T = tl.constexpr(_LN2)

    @triton.jit
    def _logit_tile(
        h_desc, w_desc, row0, col0, H,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # acc[i, j] = Σ_k h[row0 + i, k] · W[col0 + j, k] in fp32. TMA loads: rows, columns and k past
        # the tensors' ends read as zeros, so no masks.
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            hb = h_desc.load([row0, k0])
            wb = w_desc.load([col0, k0])
            if UPCAST:  # interpreter only: its dot multiplies bf16 bit patterns as integers
                hb = hb.to(tl.float32)
                wb = wb.to(tl.float32)
            acc = tl.dot(hb, wb.T, acc, input_precision=DOT_PRECISION)
        return acc

    # Integer sizes vary from call to call (packed token counts): no value specialization, one compile.
    @triton.jit(do_not_specialize=["N", "V", "v_per_split", "num_splits"])
    def _fwd_kernel(
        h_desc, w_desc, t_ptr, part_ptr,
        N, V, H, v_per_split, num_splits,
        scale,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # Program -> (row block, vocabulary split), GROUP_N row blocks × all splits at a time, so the
        # programs that run together share both their hidden rows and their weight tiles in L2.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_N * num_splits
        first_n = (pid // per_group) * GROUP_N
        group_n = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_n
        pid_s = (pid % per_group) // group_n

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)

        # State in base 2 (u = z · log2 e, so exp(z − m) = exp2(u − m)), per row:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max of u
        s = tl.zeros([BLOCK_N], tl.float32)  # Σ exp2(u − m)
        a = tl.zeros([BLOCK_N], tl.float32)  # Σ exp2(u − m)(u − m), ≤ 0
        ut = tl.zeros([BLOCK_N], tl.float32)  # u at the target (0 if not in this split)

        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            acc = _logit_tile(
                h_desc, w_desc, pid_n * BLOCK_N, v0, H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST
            )
            u = acc * scale
            if v0 + BLOCK_V > v_end:  # only a split's last tile has padding columns
                u = tl.where((cols < v_end)[None, :], u, _PAD_T)
            m_new = tl.maximum(m, tl.max(u, axis=1))
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # ≤ 0; s = a = 0 before the first tile
            alpha = tl.exp2(shift)
            d = u - m_new[:, None]  # ≤ 0
            e = tl.exp2(d)  # 0 on padding columns, where d is finite
            a = alpha * (a + s * shift) + tl.sum(e * d, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
            # the target's logit, in the few tiles that hold some row's target (a CTA-uniform branch)
            hit = (tgt >= v0) & (tgt < v0 + BLOCK_V)
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                ut += tl.sum(tl.where(cols[None, :] == tgt[:, None], u, 0.0), axis=1)

        out = part_ptr + pid_s * N + rows
        stride_part = num_splits * N
        tl.store(out, m, mask=row_ok)
        tl.store(out + stride_part, s, mask=row_ok)
        tl.store(out + 2 * stride_part, a, mask=row_ok)
        tl.store(out + 3 * stride_part, ut, mask=row_ok)

    @triton.jit(do_not_specialize=["N", "VC", "v_offset"])
    def _bwd_dlogits_kernel(
        h_desc, w_desc, d_desc, t_ptr, lse2_ptr, ent_ptr, glp_ptr, gent_ptr,
        N, VC, H, v_offset,
        scale, inv_temp,
        HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # D[n, j] = dL/d(h Wᵀ)[n, v_offset + j] for the chunk's VC columns; grouped tile order for L2.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_v = tl.cdiv(VC, BLOCK_V)
        per_group = GROUP_N * num_v
        first_n = (pid // per_group) * GROUP_N
        group_n = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_n
        pid_v = (pid % per_group) // group_n

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col0 = v_offset + pid_v * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        acc = _logit_tile(
            h_desc, w_desc, pid_n * BLOCK_N, col0, H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST
        )

        # t = log2 π = u − lse2;  dz/τ = g_lp (onehot − π)/τ − g_H π (ln π + H)/τ, with ln π = t ln 2:
        #   π · inner,  inner = (g_lp + g_H H)/τ + (g_H ln 2/τ) · t   (one FMA per element)
        lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=0.0)
        t = acc * scale - lse2[:, None]
        p = tl.exp2(t)
        if HAS_GLP:
            g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0) * inv_temp
        if HAS_GENT:
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0) * inv_temp
            bias = g_ent * ent
            if HAS_GLP:
                bias += g_lp
            dz = -p * (bias[:, None] + (g_ent * _LN2_T)[:, None] * t)
        else:
            dz = -p * g_lp[:, None]
        if HAS_GLP:
            tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
            hit = (tgt >= col0) & (tgt < col0 + BLOCK_V)
            if tl.max(hit.to(tl.int32), axis=0) > 0:  # the few tiles that hold some row's target
                dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        # TMA store: rows past N and columns past the chunk's VC are not written
        d_desc.store([pid_n * BLOCK_N, pid_v * BLOCK_V], dz.to(d_desc.dtype))


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Tile shapes and launch settings on CUDA (tuned on an H200 with `benchmarks/kernels.py --tune`, see
# docs/kernels.md): 16-bit inputs; fp32 inputs (twice the bytes per tile: a smaller K tile to fit shared
# memory; their IEEE dots run on CUDA cores anyway); and in the interpreter (small, so that tiny test
# shapes still span many tiles).
_FWD_TILES = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3)
_BWD_TILES = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3)
_FP32_TILES = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3)
_INTERPRETER_TILES = dict(BLOCK_N=32, BLOCK_V=32, BLOCK_K=16, GROUP_N=2, num_warps=4, num_stages=1)


def _tiles(hidden: Tensor, cuda_tiles: dict) -> dict:
    if hidden.device.type != "cuda":
        return _INTERPRETER_TILES
    return _FP32_TILES if hidden.dtype == torch.float32 else cuda_tiles


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: IEEE fp32 (Triton's default would be TF32); bf16/fp16 operands ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_opts(tiles: dict, hidden: Tensor) -> dict:
    return dict(
        BLOCK_N=tiles["BLOCK_N"],
        BLOCK_V=tiles["BLOCK_V"],
        BLOCK_K=tiles["BLOCK_K"],
        GROUP_N=tiles["GROUP_N"],
        DOT_PRECISION=_dot_precision(hidden.dtype),
        # Triton's interpreter (3.9) feeds bf16 operands to numpy's matmul as their uint16 bit patterns;
        # upcasting to fp32 first is exact (a bf16 product fits in fp32), and on a GPU this is off.
        UPCAST=hidden.dtype == torch.bfloat16 and _interpreting(),
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )


def _tma_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """hidden [N, H] and weight [V, H] as TMA can read them: contiguous, 16-byte aligned, rows of a
    multiple of 16 bytes. A hidden size that is not (H · itemsize % 16 ≠ 0, e.g. an odd H in bf16: no
    real model) gets zero columns appended to both (exact: they add 0 to every dot product), at the cost
    of a copy per call. -> ([N, H'], [V, H']) with H' = H rounded up to 16 bytes."""
    pad = -hidden.shape[1] % (16 // hidden.element_size())
    out = []
    for t in (hidden, weight):
        if pad:
            t = torch.nn.functional.pad(t, (0, pad))  # a new (aligned, contiguous) tensor
        elif t.data_ptr() % 16:  # e.g. a view starting mid-row
            t = t.clone(memory_format=torch.contiguous_format)
        out.append(t.contiguous())
    return out[0], out[1]


def _descriptors(hidden: Tensor, weight: Tensor, tiles: dict):
    """-> (TMA descriptor of hidden [N, H'] in [BLOCK_N, BLOCK_K] boxes, of weight [V, H'] in
    [BLOCK_V, BLOCK_K] boxes, H'): the operands of `_logit_tile`, see `_tma_operands`."""
    hidden, weight = _tma_operands(hidden, weight)
    bk = tiles["BLOCK_K"]
    return (
        TensorDescriptor.from_tensor(hidden, [tiles["BLOCK_N"], bk]),
        TensorDescriptor.from_tensor(weight, [tiles["BLOCK_V"], bk]),
        hidden.shape[1],
    )


def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, tiles: dict | None = None):
    """-> (logprobs, entropy, lse2), each [N] fp32; lse2 = logsumexp(z) · log2 e, the base-2 lse the
    backward kernel works with. `tiles` overrides the launch settings (tuning)."""
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    tiles = tiles or _tiles(hidden, _FWD_TILES)
    bn, bv = tiles["BLOCK_N"], tiles["BLOCK_V"]
    num_n = triton.cdiv(n, bn)
    # Enough (row block, split) programs for about 8 waves; every split is a whole number of tiles (so
    # only the last split has padding columns) and at least one tile wide.
    v_tiles = triton.cdiv(v, bv)
    want = max(1, min(v_tiles, triton.cdiv(8 * _num_sms(device), num_n)))
    v_per_split = triton.cdiv(v_tiles, want) * bv
    num_splits = triton.cdiv(v, v_per_split)
    part = torch.empty(4, num_splits, n, dtype=torch.float32, device=device)
    h_desc, w_desc, h = _descriptors(hidden, weight, tiles)
    _fwd_kernel[(num_n * num_splits,)](
        h_desc, w_desc, targets, part,
        n, v, h, v_per_split, num_splits,
        _LOG2E / temperature,
        **_launch_opts(tiles, hidden),
    )  # fmt: skip
    m_s, s_s, a_s, ut_s = part.unbind(0)  # base 2: m, a and the target's u are z · log2 e
    # merge the splits: every split holds ≥ 1 column, so each m_s is finite and the largest has s ≥ 1
    m = m_s.amax(dim=0)
    shift = m_s - m  # ≤ 0
    alpha = shift.exp2()
    s = (alpha * s_s).sum(dim=0)  # ≥ 1
    a = (alpha * (a_s + s_s * shift)).sum(dim=0)  # ≤ 0
    log_s = s.log()  # ≥ 0
    logprobs = _LN2 * (ut_s.sum(dim=0) - m) - log_s  # (≤ 0) − (≥ 0): ≤ 0 exactly
    entropy = log_s - _LN2 * a / s  # (≥ 0) − (≤ 0): ≥ 0 exactly
    return logprobs, entropy, m + log_s * _LOG2E


def _backward(
    hidden,
    weight,
    targets,
    lse2,
    entropy,
    grad_lp,
    grad_ent,
    temperature,
    chunk_size,
    need_h,
    need_w,
    tiles=None,
):
    """-> (grad_hidden or None, grad_weight or None). `tiles` overrides the launch settings (tuning)."""
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    tiles = tiles or _tiles(hidden, _BWD_TILES)
    bn, bv = tiles["BLOCK_N"], tiles["BLOCK_V"]
    # fewest vocabulary chunks whose [N, chunk] buffer fits the budget, then equal widths rounded up to
    # whole tiles (which may exceed the budget by < BLOCK_V columns)
    budget = _BUFFER_ROWS_PER_CHUNK * chunk_size * v
    widest = min(v, max(bv, (budget // n) // bv * bv))
    vc = min(v, triton.cdiv(triton.cdiv(v, triton.cdiv(v, widest)), bv) * bv)
    num_chunks = triton.cdiv(v, vc)
    # rows of the buffer padded to 16 bytes (a TMA store needs aligned row strides)
    per_16 = 16 // hidden.element_size()
    buf = torch.empty(n, triton.cdiv(vc, per_16) * per_16, dtype=hidden.dtype, device=device)
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_hidden = None
    acc_hidden = None
    if need_h and num_chunks > 1:
        acc_hidden = torch.zeros(n, h, dtype=torch.float32, device=device)
    dummy = lse2  # any fp32 pointer for an absent upstream gradient (never read: constexpr flag)
    h_desc, w_desc, h_padded = _descriptors(hidden, weight, tiles)
    for v0 in range(0, v, vc):
        width = min(vc, v - v0)
        d = buf[:, :width]
        _bwd_dlogits_kernel[(triton.cdiv(n, bn) * triton.cdiv(width, bv),)](
            h_desc, w_desc, TensorDescriptor(buf, [n, width], [buf.stride(0), 1], [bn, bv]),
            targets, lse2, entropy,
            dummy if grad_lp is None else grad_lp,
            dummy if grad_ent is None else grad_ent,
            n, width, h_padded, v0,
            _LOG2E / temperature, 1.0 / temperature,
            HAS_GLP=grad_lp is not None, HAS_GENT=grad_ent is not None,
            **_launch_opts(tiles, hidden),
        )  # fmt: skip
        if d.device.type == "cpu" and not d.is_contiguous():
            # interpreter only: torch 2.13's CPU bf16 matmul of a row-padded view with an odd number of
            # columns reads the padding (NaN results from garbage there); a contiguous copy avoids it
            d = d.contiguous()
        if need_w:
            torch.mm(d.t(), hidden, out=grad_weight[v0 : v0 + width])
        if need_h:
            if acc_hidden is None:
                grad_hidden = d @ weight[v0 : v0 + width]
            else:
                acc_hidden += d @ weight[v0 : v0 + width]
    if acc_hidden is not None:
        grad_hidden = acc_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


class _FusedLogprobs(torch.autograd.Function):
    """Triton forward/backward of z = (h Wᵀ)/τ -> (log π(y), H(π)); see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, targets, temperature, chunk_size, with_entropy
    ):
        n = hidden.shape[0]
        if n == 0:
            logprobs = hidden.new_zeros(0, dtype=torch.float32)
            entropy = lse2 = logprobs
        else:
            logprobs, entropy, lse2 = _forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse2, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        hidden, weight, targets, lse2, entropy = ctx.saved_tensors
        grad_lp = grads[0]
        grad_ent = grads[1] if ctx.with_entropy else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_lp is None and grad_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        if hidden.shape[0] == 0:
            gh = torch.zeros_like(hidden) if need_h else None
            gw = torch.zeros_like(weight) if need_w else None
            return gh, gw, None, None, None, None
        gh, gw = _backward(
            hidden,
            weight,
            targets,
            lse2,
            entropy,
            None if grad_lp is None else grad_lp.float().contiguous(),
            None if grad_ent is None else grad_ent.float().contiguous(),
            ctx.temperature,
            ctx.chunk_size,
            need_h,
            need_w,
        )
        return gh, gw, None, None, None, None


def uses_triton_kernel(hidden: Tensor) -> bool:
    """True when the dispatching functions would run the Triton kernel for this `hidden`."""
    return HAVE_TRITON and hidden.is_cuda and hidden.dtype in _KERNEL_DTYPES


def _check_kernel_inputs(hidden, weight, targets, temperature, chunk_size, check_targets=True) -> None:
    _check_inputs(hidden, weight, targets, temperature, chunk_size, check_targets)
    if not HAVE_TRITON:
        raise ValueError("the Triton kernel needs the `triton` package; use rlprims.ops.logprobs instead")
    if hidden.dtype not in _KERNEL_DTYPES:
        raise ValueError(
            f"the Triton kernel takes bf16/fp16/fp32 hidden and lm_head_weight, got {hidden.dtype} "
            "(fp64: use rlprims.ops.logprobs)"
        )
    if not hidden.is_cuda and not _interpreting():
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {hidden.device}"
        )


def triton_logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> LogprobsEntropy:
    """Log-prob of each target token and the entropy of each next-token distribution, fused in Triton.

    z_n = (h_n Wᵀ) / τ (fp32 accumulation); log π(y_n) = z_{n,y_n} − logsumexp(z_n);
    H_n = −Σ_v π_v log π_v. Exact gradients to hidden and lm_head_weight from both outputs:
    ∂log π_y/∂z = onehot(y) − π, ∂H/∂z = −π ⊙ (log π + H). No [N, V] logits in either pass.
    `chunk_size` bounds the backward's buffer to 2 · chunk_size · V elements of the input dtype (the
    reference's chunk_size bounds its temporaries to ≈ 4 · chunk_size · V fp32); results do not depend
    on it except for fp32 summation order of grad_hidden.
    Differs from `rlprims.ops.logprobs_and_entropy`: logits stay fp32 (not rounded to the input dtype).
    Shapes: hidden [N, H], lm_head_weight [V, H] (same dtype: bf16, fp16 or fp32; CUDA, or CPU under
            TRITON_INTERPRET=1), targets [N] int -> LogprobsEntropy(logprobs [N] fp32, entropy [N] fp32).
    """
    _check_kernel_inputs(hidden, lm_head_weight, targets, temperature, chunk_size, check_targets)
    lp, ent = _FusedLogprobs.apply(
        hidden, lm_head_weight, targets.long().contiguous(), float(temperature), chunk_size, True
    )
    return LogprobsEntropy(logprobs=lp, entropy=ent)


def triton_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> Tensor:
    """Log-prob of each target token, fused in Triton (`triton_logprobs_and_entropy` without entropy).

    log π(y_n) = z_{n,y_n} − logsumexp(z_n), z_n = (h_n Wᵀ)/τ; the backward skips the entropy terms.
    Shapes: hidden [N, H], lm_head_weight [V, H], targets [N] int -> logprobs [N] fp32.
    """
    _check_kernel_inputs(hidden, lm_head_weight, targets, temperature, chunk_size, check_targets)
    return _FusedLogprobs.apply(
        hidden, lm_head_weight, targets.long().contiguous(), float(temperature), chunk_size, False
    )


def logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> LogprobsEntropy:
    """Log-prob and entropy per token: the Triton kernel where it applies, else the chunked reference.

    Kernel when `uses_triton_kernel(hidden)` (CUDA, bf16/fp16/fp32, Triton importable):
    `triton_logprobs_and_entropy`; otherwise `rlprims.ops.logprobs_and_entropy`. Same math, see those
    (and for check_targets).
    Shapes: hidden [N, H], lm_head_weight [V, H], targets [N] -> LogprobsEntropy([N], [N]).
    """
    if uses_triton_kernel(hidden):
        return triton_logprobs_and_entropy(
            hidden, lm_head_weight, targets, temperature=temperature, chunk_size=chunk_size,
            check_targets=check_targets,
        )
    return _reference_logprobs_and_entropy(
        hidden, lm_head_weight, targets, temperature=temperature, chunk_size=chunk_size,
        check_targets=check_targets,
    )


def logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> Tensor:
    """Log-prob per token: the Triton kernel where it applies, else the chunked reference.

    Kernel when `uses_triton_kernel(hidden)`: `triton_logprobs_from_hidden`; otherwise
    `rlprims.ops.logprobs_from_hidden`.
    Shapes: hidden [N, H], lm_head_weight [V, H], targets [N] -> logprobs [N] fp32.
    """
    if uses_triton_kernel(hidden):
        return triton_logprobs_from_hidden(
            hidden, lm_head_weight, targets, temperature=temperature, chunk_size=chunk_size,
            check_targets=check_targets,
        )
    return _reference_logprobs_from_hidden(
        hidden, lm_head_weight, targets, temperature=temperature, chunk_size=chunk_size,
        check_targets=check_targets,
    )
