"""rlprims.parallel: the torch.distributed side — step-wide loss normalizers, DeviceMesh/FSDP2 set-up,
DTensor resharding and weight buckets for the engine. Functions take an explicit process group or
DeviceMesh; nothing here runs at import. This package never imports rlprims.rollout: it yields
(name, tensor) pairs that the recipe hands to rlprims.rollout.update_weights.

  build_mesh, fsdp_mesh                     (dp, tp) DeviceMesh with collective timeouts; FSDP's 1-D mesh.
  shard_model, decoder_layers               FSDP2 per decoder layer + root, mixed precision, CPU offload,
                                            activation checkpointing.
  gather_once                               a step's micro-batches with one gather and one reduce.
  offloaded_to_cpu                          FSDP2 CPU offload on GPUs (collectives go through the GPU).
  weight_buckets, engine_weights            full weights gathered bucket by bucket, cast, renamed.
  EngineTPLayout, engine_tp_layout,         vLLM's tensor-parallel slicing, and DTensor resharding of
  engine_tp_dim, engine_tp_slice,           training weights to it.
  reshard_for_engine
  step_loss_normalizers, all_reduce_scalars step-wide loss normalizers, scalar logging reductions.
  step_micro_batches                        micro-batch plans with the same pass count on every rank.
  dist_masked_mean, dist_masked_var,        rlprims.ops.reduce over every rank's rows (group explicit):
  dist_masked_whiten, dist_masked_max,      mean, variance, whitening, max, min, and verl's
  dist_masked_min, dist_mean_max_min,       <name>/{mean,max,min} for logging; every rank's rows in one
  dist_cat_rows, dist_batch_metrics         tensor (statistics that are not sums); verl's data metrics.
  dp_rank_and_size, rollout_seed            a rank's data-parallel index (prompts) and sampling seeds.
  dist_gae_advantages, dist_gpg_advantages, estimators with a batch-wide statistic (whitening, GPG's α)
  dist_reinforce_pp_advantages,             over every rank's rows.
  dist_reinforce_pp_baseline_advantages
  optimizer_step                            micro-batch backward passes, global-norm clip, step, zero.
  clip_sharded_grad_norm_                   global-norm clip of FSDP2 gradient shards wherever they live.
"""

from rlprims.parallel.advantages import (
    dist_gae_advantages,
    dist_gpg_advantages,
    dist_reinforce_pp_advantages,
    dist_reinforce_pp_baseline_advantages,
)
from rlprims.parallel.buckets import DEFAULT_BUCKET_BYTES, engine_weights, weight_buckets
from rlprims.parallel.fsdp import decoder_layers, gather_once, offloaded_to_cpu, shard_model
from rlprims.parallel.mesh import build_mesh, fsdp_mesh
from rlprims.parallel.normalizers import all_reduce_means_by_name, all_reduce_scalars, step_loss_normalizers
from rlprims.parallel.plan import step_micro_batches
from rlprims.parallel.ranks import dp_rank_and_size, rollout_seed
from rlprims.parallel.stats import (
    dist_batch_metrics,
    dist_cat_rows,
    dist_masked_max,
    dist_masked_mean,
    dist_masked_min,
    dist_masked_var,
    dist_masked_whiten,
    dist_mean_max_min,
)
from rlprims.parallel.step import clip_sharded_grad_norm_, optimizer_step
from rlprims.parallel.reshard import (
    EngineTPLayout,
    engine_tp_dim,
    engine_tp_layout,
    engine_tp_slice,
    reshard_for_engine,
)

__all__ = [
    "all_reduce_scalars",
    "all_reduce_means_by_name",
    "step_loss_normalizers",
    "step_micro_batches",
    "dist_masked_mean",
    "dist_masked_var",
    "dist_masked_whiten",
    "dist_masked_max",
    "dist_masked_min",
    "dist_mean_max_min",
    "dist_cat_rows",
    "dist_batch_metrics",
    "dp_rank_and_size",
    "dist_gae_advantages",
    "dist_gpg_advantages",
    "dist_reinforce_pp_advantages",
    "dist_reinforce_pp_baseline_advantages",
    "rollout_seed",
    "optimizer_step",
    "clip_sharded_grad_norm_",
    "build_mesh",
    "fsdp_mesh",
    "shard_model",
    "decoder_layers",
    "gather_once",
    "offloaded_to_cpu",
    "weight_buckets",
    "engine_weights",
    "DEFAULT_BUCKET_BYTES",
    "EngineTPLayout",
    "engine_tp_layout",
    "engine_tp_dim",
    "engine_tp_slice",
    "reshard_for_engine",
]
