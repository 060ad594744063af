"""rlprims.rewards."""
