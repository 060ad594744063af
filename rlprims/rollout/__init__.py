"""rlprims.rollout."""
