"""rlprims.parallel: the torch.distributed side — step-wide loss normalizers, DeviceMesh/FSDP2 set-up,
DTensor resharding and weight buckets for the engine. Functions take an explicit process group or
DeviceMesh; nothing here runs at import.
"""

from rlprims.parallel.normalizers import all_reduce_scalars, step_loss_normalizers

__all__ = ["all_reduce_scalars", "step_loss_normalizers"]
