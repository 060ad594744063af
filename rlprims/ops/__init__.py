"""rlprims.ops: pure tensor math. No torch.distributed, no I/O, no state but NamedTuples.

Conventions: token tensors are [B, T] and already shifted (logprobs[b, t] is the log-prob of
tokens[b, t]); `response_mask` is [B, T] bool; per-sequence values are [B]; groups are contiguous rows
of `group_size`; hyperparameters are keyword-only. Losses return per-token values and a dict of
detached diagnostics; aggregation is a separate call with an explicit normalizer.
"""

from rlprims.ops.reduce import (
    LossNormalizers,
    aggregate_seq_mean_token_mean,
    aggregate_seq_mean_token_sum,
    aggregate_seq_mean_token_sum_norm,
    aggregate_token_mean,
    loss_normalizers,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "LossNormalizers",
    "aggregate_seq_mean_token_mean",
    "aggregate_seq_mean_token_sum",
    "aggregate_seq_mean_token_sum_norm",
    "aggregate_token_mean",
    "loss_normalizers",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]
