"""rlprims: composable, pure-PyTorch primitives for RL post-training of LLMs.

Subpackages (import the one you need; nothing heavy is imported here):
  rlprims.ops       pure tensor math: advantages, policy losses, KL, aggregation, rollout correction.
  rlprims.kernels   Triton kernels with the signatures of their ops references.
  rlprims.parallel  DeviceMesh, FSDP2, DTensor resharding, weight buckets for the engine.
  rlprims.rollout   the embedded engines: vLLM in-process and a pure-torch fallback generator.
  rlprims.launch    torchrun SPMD init, submitit/Slurm submission.
"""

__version__ = "0.1.0"
