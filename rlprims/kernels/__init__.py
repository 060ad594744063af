"""rlprims.kernels: Triton kernels, each with the signature of its `rlprims.ops` reference.

Empty so far. The first one planned is the fused `logprobs_and_entropy` (the reference and its tests
are in rlprims/ops/logprobs.py and tests/ops/test_logprobs.py).
"""
