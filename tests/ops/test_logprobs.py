import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from rlprims.ops.logprobs import LogprobsEntropy, logprobs_and_entropy, logprobs_from_hidden
from tests.tolerances import BF16_MATMUL, EXACT, LOGITS_FP32, REORDER


def _naive(hidden, weight, targets, temperature):
    """Materialized reference: full [N, V] logits, autograd does the rest."""
    z = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _inputs(n, h, v, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def test_literal_two_token_vocab():
    # W = [[1], [0]], h = ln 3: z = [ln 3, 0], π = [3/4, 1/4].
    # log π(0) = ln 0.75 = −0.287682; H = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    hidden = torch.tensor([[math.log(3.0)]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    out = logprobs_and_entropy(hidden, weight, torch.tensor([0]), temperature=1.0)
    assert isinstance(out, LogprobsEntropy)
    torch.testing.assert_close(out.logprobs, torch.tensor([math.log(0.75)], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(
        out.entropy,
        torch.tensor([-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], dtype=torch.float64),
        **EXACT,
    )
    # τ = 0.5: z = [2 ln 3, 0], π = [9/10, 1/10]; log π(1) = ln 0.1; H = −(0.9 ln 0.9 + 0.1 ln 0.1) = 0.325083
    out = logprobs_and_entropy(hidden, weight, torch.tensor([1]), temperature=0.5)
    torch.testing.assert_close(out.logprobs, torch.tensor([math.log(0.1)], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(
        out.entropy,
        torch.tensor([-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))], dtype=torch.float64),
        **EXACT,
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 8, 24, 100])  # N = 24: dividing and not dividing
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_naive_value_and_gradient(chunk_size, dtype):
    hidden, weight, targets = _inputs(24, 16, 37, dtype=dtype, scale=2.0)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(24, generator=g, dtype=dtype), torch.randn(24, generator=g, dtype=dtype)

    out = logprobs_and_entropy(hidden, weight, targets, temperature=0.7, chunk_size=chunk_size)
    ((out.logprobs * g_lp).sum() + (out.entropy * g_ent).sum()).backward()
    got = (out.logprobs.detach(), out.entropy.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    lp, ent = _naive(hidden, weight, targets, 0.7)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    tol = REORDER if dtype == torch.float64 else LOGITS_FP32
    for a, b in zip(got, (lp.detach(), ent.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, **tol)


def test_entropy_only_gradient_and_logprobs_only_function():
    hidden, weight, targets = _inputs(10, 8, 11, dtype=torch.float64)
    ent = logprobs_and_entropy(hidden, weight, targets, temperature=1.3, chunk_size=3).entropy
    gh, gw = torch.autograd.grad(ent.sum(), (hidden, weight))
    _, ent_ref = _naive(hidden, weight, targets, 1.3)
    gh_ref, gw_ref = torch.autograd.grad(ent_ref.sum(), (hidden, weight))
    torch.testing.assert_close(gh, gh_ref, **REORDER)
    torch.testing.assert_close(gw, gw_ref, **REORDER)

    lp = logprobs_from_hidden(hidden, weight, targets, temperature=1.3, chunk_size=4)
    gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
    lp_ref, _ = _naive(hidden, weight, targets, 1.3)
    gh_ref, gw_ref = torch.autograd.grad(lp_ref.sum(), (hidden, weight))
    torch.testing.assert_close(lp, lp_ref, **REORDER)
    torch.testing.assert_close(gh, gh_ref, **REORDER)
    torch.testing.assert_close(gw, gw_ref, **REORDER)


def test_gradcheck_float64():
    hidden, weight, targets = _inputs(5, 3, 6, dtype=torch.float64)

    def f(h, w):
        out = logprobs_and_entropy(h, w, targets, temperature=0.9, chunk_size=2)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_bf16_matches_naive_bf16():
    hidden, weight, targets = _inputs(33, 32, 50, dtype=torch.bfloat16)
    out = logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_size=8)
    assert out.logprobs.dtype == torch.float32
    (out.logprobs.sum() + out.entropy.sum()).backward()
    got = (out.logprobs.detach(), out.entropy.detach(), hidden.grad.float(), weight.grad.float())
    hidden.grad = weight.grad = None
    lp, ent = _naive(hidden, weight, targets, 1.0)
    (lp.sum() + ent.sum()).backward()
    for a, b in zip(got, (lp.detach(), ent.detach(), hidden.grad.float(), weight.grad.float())):
        torch.testing.assert_close(a, b, **BF16_MATMUL)


def test_frozen_weight_and_empty_input():
    hidden, weight, targets = _inputs(6, 4, 5)
    weight = weight.detach()
    lp = logprobs_from_hidden(hidden, weight, targets, temperature=1.0, chunk_size=4)
    (gh,) = torch.autograd.grad(lp.sum(), (hidden,))
    lp_ref, _ = _naive(hidden, weight, targets, 1.0)
    torch.testing.assert_close(gh, torch.autograd.grad(lp_ref.sum(), (hidden,))[0], **LOGITS_FP32)

    empty = torch.zeros(0, 4, requires_grad=True)
    out = logprobs_and_entropy(empty, weight, torch.zeros(0, dtype=torch.long), temperature=1.0)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert empty.grad.shape == (0, 4)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_full_logits():
    n, v, chunk = 64, 200, 16
    hidden, weight, targets = _inputs(n, 8, v)
    with _LargestTensor() as mode:
        out = logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_size=chunk)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    # the weight gradient [V, H] = 1600 and chunk logits [16, V] = 3200 are the largest; full logits: 12800
    assert mode.largest <= chunk * v < n * v


@given(
    st.integers(1, 12),
    st.floats(0.05, 5.0),
    st.floats(0.01, 300.0),
    st.integers(0, 2**16),
)
def test_logprobs_nonpositive_entropy_nonnegative(n, temperature, scale, seed):
    # large scales make near one-hot distributions, where naive lse − Σ π z rounds below 0
    hidden, weight, targets = _inputs(n, 6, 9, seed=seed, scale=scale)
    out = logprobs_and_entropy(
        hidden.detach(), weight.detach(), targets, temperature=temperature, chunk_size=5
    )
    assert bool((out.logprobs <= 0).all())
    assert bool((out.entropy >= 0).all())
    assert bool(torch.isfinite(out.logprobs).all())  # z_y − lse never exponentiates z_y: no −inf
    assert bool((out.entropy <= math.log(9) + 1e-5).all())


def test_bad_inputs():
    hidden, weight, targets = _inputs(4, 3, 5)
    with pytest.raises(ValueError, match="hidden sizes must match"):
        logprobs_and_entropy(hidden, torch.zeros(5, 4), targets, temperature=1.0)
    with pytest.raises(ValueError, match="must share dtype"):
        logprobs_and_entropy(hidden, weight.double(), targets, temperature=1.0)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\)"):
        logprobs_and_entropy(hidden, weight, targets[:3], temperature=1.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=5\)"):
        logprobs_from_hidden(hidden, weight, torch.tensor([0, 1, 5, 2]), temperature=1.0)
    with pytest.raises(ValueError, match="int64/int32"):
        logprobs_from_hidden(hidden, weight, targets.float(), temperature=1.0)
    with pytest.raises(ValueError, match=r"temperature must be .*> 0"):
        logprobs_from_hidden(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        logprobs_from_hidden(hidden, weight, targets, temperature=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="hidden must have 2 dims"):
        logprobs_from_hidden(hidden[None], weight, targets, temperature=1.0)
