"""The fused Triton log-prob/entropy kernel against an fp64 reference, forward and backward.

Where the kernel runs:
  - CUDA machine: in this process, at full shapes (H up to 1000, V up to 151936).
  - CPU (CI): `test_kernel_suite_in_triton_interpreter` reruns this file in a subprocess with
    TRITON_INTERPRET=1 (the interpreter is chosen when `@triton.jit` runs, i.e. when rlprims.kernels is
    first imported, which another test module may already have done in this process); there the kernel
    tests run at small shapes. In the parent process they are skipped and their result is that test's.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlprims.kernels import (
    HAVE_TRITON,
    logprobs_and_entropy,
    logprobs_from_hidden,
    triton_logprobs_and_entropy,
    triton_logprobs_from_hidden,
    uses_triton_kernel,
)
from rlprims.ops import logprobs as reference
from tests.tolerances import (
    EXACT,
    KERNEL_GRAD_BF16,
    KERNEL_GRAD_FP16,
    KERNEL_GRAD_FP32,
    LOGITS_FP32,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = HAVE_TRITON and torch.cuda.is_available() and not INTERPRET
KERNEL_RUNS_HERE = HAVE_TRITON and (ON_GPU or INTERPRET)
DEVICE = "cuda" if ON_GPU else "cpu"

_skip_without_kernel = pytest.mark.skipif(
    not KERNEL_RUNS_HERE,
    reason="no CUDA: run under TRITON_INTERPRET=1 by test_kernel_suite_in_triton_interpreter",
)


def kernel_test(fn):
    """Runs on a GPU (selected by `-m gpu`) and in the interpreter; skipped elsewhere."""
    return pytest.mark.gpu(_skip_without_kernel(fn))


# (H, V): V never a multiple of the tiles (CPU 32, GPU 128); H a multiple of the K tile and not, and one
# H whose rows are not a multiple of 16 bytes (the kernel pads them for its TMA loads).
SHAPES = (
    [(896, 32003), (1000, 5003), (1001, 2053), (64, 151936)] if ON_GPU else [(32, 67), (24, 130), (7, 300)]
)
TOKENS = [1, 37, 1000]
# (N, H, V): the full cross on a GPU; in the interpreter (≈ 10 ms per program) N = 1000 at one shape.
CASES = [(n, h, v) for n in TOKENS for h, v in SHAPES]
if not ON_GPU:
    CASES = [(n, h, v) for n in TOKENS[:2] for h, v in SHAPES] + [(1000, *SHAPES[0])]
GRAD_TOL = {
    torch.float32: KERNEL_GRAD_FP32,
    torch.bfloat16: KERNEL_GRAD_BF16,
    torch.float16: KERNEL_GRAD_FP16,
}


def _inputs(n, h, v, dtype, *, seed=0, logit_std=4.0):
    g = torch.Generator().manual_seed(seed)
    # z = h·W with W ~ N(0, 1): hidden ~ N(0, (logit_std² / H)) gives logits of std ≈ logit_std
    hidden = (torch.randn(n, h, generator=g) * (logit_std / math.sqrt(h))).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (hidden, weight, targets, g_lp, g_ent)]


def _run(fn, hidden, weight, targets, g_lp, g_ent, *, temperature, chunk_size=1024):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    lp, ent = fn(h, w, targets, temperature=temperature, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), (h, w))
    return lp.detach(), ent.detach(), gh, gw


def _fp64_reference(hidden, weight, targets, g_lp, g_ent, *, temperature):
    """rlprims.ops on the same inputs upcast to fp64: exact arithmetic to ~1e-15."""
    return _run(
        reference.logprobs_and_entropy, hidden.double(), weight.double(), targets, g_lp, g_ent,
        temperature=temperature, chunk_size=256,
    )  # fmt: skip


def _assert_scaled_close(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double() / scale, expected / scale, **tol)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "h", "v"), CASES)
def test_matches_fp64_reference(n, h, v, dtype):
    temperature = [1.0, 0.7, 1.3][TOKENS.index(n)]
    inputs = _inputs(n, h, v, dtype, seed=n + h)
    lp, ent, gh, gw = _run(triton_logprobs_and_entropy, *inputs, temperature=temperature)
    lp_ref, ent_ref, gh_ref, gw_ref = _fp64_reference(*inputs, temperature=temperature)
    assert lp.dtype == ent.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    # logits are accumulated in fp32 from the exact products of the (rounded) inputs, whatever their dtype
    torch.testing.assert_close(lp.double(), lp_ref, **LOGITS_FP32)
    torch.testing.assert_close(ent.double(), ent_ref, **LOGITS_FP32)
    _assert_scaled_close(gh, gh_ref, GRAD_TOL[dtype])
    _assert_scaled_close(gw, gw_ref, GRAD_TOL[dtype])
    assert bool((lp <= 0).all()) and bool((ent >= 0).all())


@kernel_test
def test_literal_two_token_vocab():
    # W = [[1], [0]], h = ln 3: z = [ln 3, 0], π = [3/4, 1/4]; log π(0) = ln 0.75;
    # H = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335. τ = 0.5: π = [9/10, 1/10], log π(1) = ln 0.1.
    hidden = torch.tensor([[math.log(3.0)], [math.log(3.0)]], device=DEVICE)
    weight = torch.tensor([[1.0], [0.0]], device=DEVICE)
    out = triton_logprobs_and_entropy(hidden, weight, torch.tensor([0, 1], device=DEVICE), temperature=1.0)
    expected_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(out.logprobs.cpu(), torch.tensor([math.log(0.75), math.log(0.25)]), **EXACT)
    torch.testing.assert_close(out.entropy.cpu(), torch.tensor([expected_h, expected_h]), **EXACT)
    out = triton_logprobs_and_entropy(hidden[:1], weight, torch.tensor([1], device=DEVICE), temperature=0.5)
    torch.testing.assert_close(out.logprobs.cpu(), torch.tensor([math.log(0.1)]), **EXACT)
    torch.testing.assert_close(
        out.entropy.cpu(), torch.tensor([-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]), **EXACT
    )


@kernel_test
@pytest.mark.parametrize("logit_std", [0.0, 1e-3, 1.0, 30.0, 300.0])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 5.0])
def test_logprobs_nonpositive_entropy_nonnegative(logit_std, temperature):
    # std 0: uniform (log π = −log V, H = log V exactly up to rounding); std 300 at τ = 0.05: one-hot,
    # where lse − Σ π z rounds below 0 if computed naively. The guard verl lacked.
    h, v = SHAPES[1]
    hidden, weight, targets, _, _ = _inputs(37, h, v, torch.float32, seed=3, logit_std=logit_std)
    out = triton_logprobs_and_entropy(hidden, weight, targets, temperature=temperature)
    assert bool((out.logprobs <= 0).all())
    assert bool((out.entropy >= 0).all())
    assert bool(torch.isfinite(out.logprobs).all()) and bool(torch.isfinite(out.entropy).all())
    assert bool((out.entropy <= math.log(v) + 1e-4).all())
    if logit_std == 0.0:
        torch.testing.assert_close(out.logprobs, torch.full_like(out.logprobs, -math.log(v)), **LOGITS_FP32)
        torch.testing.assert_close(out.entropy, torch.full_like(out.entropy, math.log(v)), **LOGITS_FP32)


@kernel_test
def test_partial_gradients_match_reference():
    """Log-prob only (the no-entropy function), entropy only; each with frozen weight / frozen hidden."""
    h, v = SHAPES[0]
    hidden, weight, targets, g_lp, g_ent = _inputs(37, h, v, torch.float32, seed=5)

    def lp_loss(lp):
        return (lp * g_lp.to(lp.dtype)).sum()

    def ent_loss(out):
        return (out.entropy * g_ent.to(out.entropy.dtype)).sum()

    def grads(fn, loss, which, h_in, w_in):
        hh = h_in.detach().requires_grad_("h" in which)
        ww = w_in.detach().requires_grad_("w" in which)
        return torch.autograd.grad(
            loss(fn(hh, ww, targets, temperature=0.9)), [t for t in (hh, ww) if t.requires_grad]
        )

    cases = [
        (triton_logprobs_from_hidden, reference.logprobs_from_hidden, lp_loss),
        (triton_logprobs_and_entropy, reference.logprobs_and_entropy, ent_loss),
    ]
    for kernel_fn, ref_fn, loss in cases:
        for which in ("hw", "h", "w"):
            got = grads(kernel_fn, loss, which, hidden, weight)
            want = grads(ref_fn, loss, which, hidden.double(), weight.double())
            assert len(got) == len(want) == len(which)
            for a, b in zip(got, want, strict=True):
                _assert_scaled_close(a, b, KERNEL_GRAD_FP32)


@kernel_test
def test_backward_chunking_and_memory_bound():
    """A tiny chunk_size splits the backward over the vocabulary; same gradients, no [N, V] tensor."""
    h, v = SHAPES[1]
    n = h + 37  # N > H: the full [N, V] logits are larger than W
    inputs = _inputs(n, h, v, torch.float32, seed=7)
    whole = _run(triton_logprobs_and_entropy, *inputs, temperature=1.0, chunk_size=10**6)
    with _LargestTensor() as mode:
        split = _run(triton_logprobs_and_entropy, *inputs, temperature=1.0, chunk_size=1)
    # chunk_size = 1: the dlogits buffer is one tile column wide ([N, ≤ 128]); the largest tensors are
    # W / dW [V, H] and hidden / dhidden [N, H]
    assert mode.largest <= max(v * h, n * h, n * 128) < n * v
    for a, b in zip(split, whole, strict=True):
        _assert_scaled_close(a, b.double(), KERNEL_GRAD_FP32)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # floating tensors only: Triton's interpreter stages kernel arguments as uint8 copies
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                self.largest = max(self.largest, t.numel())
        return out


@kernel_test
def test_empty_input():
    weight = torch.randn(50, 16, device=DEVICE)
    hidden = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    out = triton_logprobs_and_entropy(
        hidden, weight, torch.zeros(0, dtype=torch.long, device=DEVICE), temperature=1.0
    )
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert hidden.grad.shape == (0, 16)


@kernel_test
def test_strided_inputs_match_contiguous():
    # inputs that TMA cannot read as they are (a column slice of hidden, a transposed weight, a misaligned
    # start) give exactly the values of their contiguous copies, and the same gradients up to the rounding
    # of a cuBLAS matmul that may pick another algorithm for a strided or misaligned operand
    hidden, weight, targets, g_lp, g_ent = _inputs(37, 24, 130, torch.bfloat16, seed=5)
    wide = torch.cat([hidden, torch.ones_like(hidden)], dim=1)
    views = (wide[:, :24], weight.t().contiguous().t())
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    got = _run(triton_logprobs_and_entropy, *views, targets, g_lp, g_ent, temperature=0.8)
    want = _run(triton_logprobs_and_entropy, hidden, weight, targets, g_lp, g_ent, temperature=0.8)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    for a, b in zip(got[2:], want[2:], strict=True):
        _assert_scaled_close(a, b.double(), GRAD_TOL[torch.bfloat16])
    # a contiguous hidden that starts 2 bytes past a 16-byte boundary (TMA needs aligned bases)
    shifted = torch.cat([hidden.new_zeros(1), hidden.flatten()])[1:].view(37, 24)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    got = _run(triton_logprobs_and_entropy, shifted, weight, targets, g_lp, g_ent, temperature=0.8)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    for a, b in zip(got[2:], want[2:], strict=True):
        _assert_scaled_close(a, b.double(), GRAD_TOL[torch.bfloat16])


@kernel_test
def test_runs_in_the_mode_it_claims():
    from rlprims.kernels import logprobs as kernel_module

    interpreted = type(kernel_module._fwd_kernel).__name__ == "InterpretedFunction"
    assert interpreted == INTERPRET


def test_dispatch_and_forcing():
    hidden = torch.randn(5, 8)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (5,))
    # CPU (or fp64) -> the reference, bit for bit
    assert not uses_triton_kernel(hidden)
    got = logprobs_and_entropy(hidden, weight, targets, temperature=0.8)
    want = reference.logprobs_and_entropy(hidden, weight, targets, temperature=0.8)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=0)
    torch.testing.assert_close(
        logprobs_from_hidden(hidden, weight, targets, temperature=0.8),
        reference.logprobs_from_hidden(hidden, weight, targets, temperature=0.8),
        rtol=0,
        atol=0,
    )
    if HAVE_TRITON:
        with pytest.raises(ValueError, match="fp64: use rlprims.ops.logprobs"):
            triton_logprobs_and_entropy(hidden.double(), weight.double(), targets, temperature=1.0)
    if HAVE_TRITON and not INTERPRET:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            triton_logprobs_from_hidden(hidden, weight, targets, temperature=1.0)
    # the reference's input checks apply to the kernel too
    with pytest.raises(ValueError, match="hidden sizes must match"):
        triton_logprobs_and_entropy(hidden, torch.zeros(11, 7), targets, temperature=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
def test_dispatch_picks_kernel_on_cuda():
    hidden = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    assert uses_triton_kernel(hidden)
    assert not uses_triton_kernel(hidden.double())


@pytest.mark.skipif(
    not HAVE_TRITON or INTERPRET or torch.cuda.is_available(),
    reason="the interpreter subprocess is for CPU-only machines (on CUDA the kernel tests run directly)",
)
def test_kernel_suite_in_triton_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    # every kernel test ran: 7 cases × 3 dtypes + 15 invariants + 6 others (+ the dispatch test)
    assert passed is not None and int(passed.group(1)) >= 42, tail
