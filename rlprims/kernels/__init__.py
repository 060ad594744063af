"""rlprims.kernels."""
