"""Every tolerance the tests use, in one place; each widening says why.

Compare with `torch.testing.assert_close(actual, expected, **EXACT)` etc.
"""

# Hand-computed literals and identities that are exact up to fp32 rounding of a few ops.
EXACT = dict(rtol=1e-6, atol=1e-6)

# Same math, different order of summation (micro-batch splits, chunking, packing): fp32 re-association
# of sums over up to ~1e4 terms moves the result by a few ulps of the total.
REORDER = dict(rtol=1e-5, atol=1e-6)

# Gradient invariance across micro-batch splits (issue 2: rel <= 1e-6 in fp32). Absolute floor for
# entries that are ~0.
GRAD_SPLIT = dict(rtol=1e-6, atol=1e-7)

# bf16 inputs, fp32 softmax: the chunked op and the materialized reference round the same bf16 matmul
# outputs, but the weight gradient is summed over chunks in fp32 vs. in one bf16 matmul, and bf16 has
# an 8-bit mantissa (relative step 2^-8 ≈ 4e-3).
BF16_MATMUL = dict(rtol=1.6e-2, atol=1e-2)

# fp32 log-softmax / entropy: lse − z cancels, so each value carries absolute rounding ≈ |z|·2^-24 per op,
# whatever the order of evaluation. Logits in the tests reach |z| ≈ 60: absolute floor 2e-5 (values near
# 0, e.g. the entropy of a sharp distribution, cannot meet a relative tolerance).
LOGITS_FP32 = dict(rtol=1e-5, atol=2e-5)

# bf16 models / attention kernels (flash, varlen_attn) against an fp32 or differently-tiled bf16
# reference: every matmul output is rounded to bf16 (relative step 2^-8 ≈ 4e-3) and the kernels sum in
# different orders; over a 2-layer model errors reach a few bf16 steps of O(1) values.
BF16_MODEL = dict(rtol=5e-2, atol=5e-2)

# fp32 log-probs of the same model from two implementations: vLLM's CPU kernels (oneDNN GEMMs, its own
# paged-attention kernel, a gloo all-reduce under TP) or a KV-cache decode, against one transformers
# forward of the whole sequence. Summation orders differ in every matmul and in attention over 2 layers;
# observed max |Δ| ≈ 1.3e-5 on log-probs down to −11 (tiny test model); 1e-4 leaves ~8× headroom and is
# still far below any real mismatch (a wrong token, temperature or mask moves log-probs by > 1e-2).
ENGINE_FP32 = dict(rtol=1e-4, atol=1e-4)

# Triton kernel (rlprims.kernels) gradients against an fp64 reference on the same (already rounded)
# inputs, compared after dividing both by max|reference| so that one tolerance fits every shape. The
# kernel, like the chunked reference, rounds dL/dlogits to the input dtype before the two gradient
# matmuls and rounds the gradients to it at the end: two roundings of the unit roundoff u (bf16 2^-9 ≈
# 2e-3, fp16 2^-11 ≈ 5e-4) plus random-sign sums over V or N of independently rounded terms. Observed
# max error ≈ 3u (bf16 6e-3, fp16 6e-4); the tolerances leave ≥ 2.5× headroom (bf16 equals BF16_MATMUL).
# fp32 inputs use IEEE fp32 dots: observed ≈ 1e-6 of the scale at V = 152k.
KERNEL_GRAD_BF16 = dict(rtol=1.6e-2, atol=1.6e-2)
KERNEL_GRAD_FP16 = dict(rtol=4e-3, atol=4e-3)
KERNEL_GRAD_FP32 = dict(rtol=1e-5, atol=1e-5)
