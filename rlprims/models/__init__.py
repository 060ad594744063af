"""rlprims.models: running Hugging Face models the way RL training needs, without editing model code.

  rlprims.models.packed   varlen (packed) attention registered through transformers' AttentionInterface,
                          and packed forward passes returning per-token log-probs / entropy in [B, T].
  rlprims.models.fused    `load_model` (a model as the recipes train it: packed attention, on the device,
                          optionally with Liger's fused RMSNorm / RoPE / SwiGLU kernels: `use_liger_kernels`).

Nothing is registered at import: call `rlprims.models.packed.register_packed_attention()` explicitly.
"""
