"""rlprims.launch."""
