"""rlprims.data."""
