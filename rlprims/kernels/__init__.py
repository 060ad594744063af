"""rlprims.kernels: Triton kernels, each with the signature of its `rlprims.ops` reference.

- `logprobs_and_entropy` / `logprobs_from_hidden`: fused LM head -> per-token log-prob (and entropy),
  forward and backward without [N, V] logits. They run the Triton kernel for CUDA bf16/fp16/fp32 inputs
  when Triton is importable and `rlprims.ops.logprobs` otherwise; `triton_logprobs_and_entropy` /
  `triton_logprobs_from_hidden` force the kernel. Design and GPU numbers: docs/kernels.md.
"""

from rlprims.kernels.logprobs import (
    HAVE_TRITON,
    logprobs_and_entropy,
    logprobs_from_hidden,
    triton_logprobs_and_entropy,
    triton_logprobs_from_hidden,
    uses_triton_kernel,
)

__all__ = [
    "HAVE_TRITON",
    "logprobs_and_entropy",
    "logprobs_from_hidden",
    "triton_logprobs_and_entropy",
    "triton_logprobs_from_hidden",
    "uses_triton_kernel",
]
