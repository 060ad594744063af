"""rlprims.models: running Hugging Face models the way RL training needs, without editing model code.

  rlprims.models.packed   varlen (packed) attention registered through transformers' AttentionInterface,
                          and packed forward passes returning per-token log-probs / entropy in [B, T].

Nothing is registered at import: call `rlprims.models.packed.register_packed_attention()` explicitly.
"""
