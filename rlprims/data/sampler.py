"""A deterministic, rank-sharded, resumable sampler: which dataset rows each rank takes next.

Each epoch is one permutation of `range(num_rows)`, seeded by (seed, epoch) alone. Global batch k of
an epoch is the slice `perm[k*G : (k+1)*G]`, G = batch_size * world_size, and rank r takes the r-th
run of `batch_size` rows in it: the ranks are disjoint, together they read the global batch, and no
row repeats within an epoch. The rows that do not fill a whole global batch at the end of an epoch are
skipped (drop_last, as verl's dataloader), and the next epoch starts with a fresh permutation.

The state is two integers (epoch, rows of that epoch consumed by all ranks together), so saving it in
a checkpoint (`state.to_dict()`) and restoring it (`SamplerState.from_dict`) continues exactly where
the run stopped; it is the same on every rank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplerState:
    """Position in the data stream: `offset` rows of epoch `epoch`'s permutation are consumed."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        """A JSON-able dict, for the checkpoint's extra state."""
        return {"epoch": self.epoch, "offset": self.offset}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SamplerState:
        """Inverse of `to_dict`; ValueError on missing keys, non-integers or negative values."""
        if not isinstance(d, dict) or set(d) != {"epoch", "offset"}:
            raise ValueError(f"sampler state must be a dict with exactly 'epoch' and 'offset', got {d!r}")
        for key in ("epoch", "offset"):
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sampler state {key} must be an int >= 0, got {value!r}")
        return SamplerState(epoch=d["epoch"], offset=d["offset"])


def sampler_init() -> SamplerState:
    """The state at the start of training: epoch 0, nothing consumed."""
    return SamplerState(epoch=0, offset=0)


def epoch_permutation(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(num_rows), a pure function of (seed, epoch).

    The (seed, epoch) pair is hashed (SHA-256) into the 64-bit seed of a CPU `torch.Generator`, whose
    `randperm` is the same on every platform; nearby seeds or epochs give unrelated orders.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    digest = hashlib.sha256(f"rlprims.sampler:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(num_rows, generator=generator).tolist()


def next_indices(
    state: SamplerState, num_rows: int, *, batch_size: int, rank: int, world_size: int, seed: int
) -> tuple[list[int], SamplerState]:
    """This rank's `batch_size` row indices of the next global batch, and the state after it.

    Global batch size G = batch_size * world_size. If fewer than G rows of the current epoch remain,
    the epoch rolls over: epoch + 1, offset 0 (the remainder is skipped). Rank r takes
    `perm[offset + r*batch_size : offset + (r+1)*batch_size]`; the new state has offset + G. Every
    rank must pass the same state, num_rows, batch_size, world_size and seed (the state returned is the
    same on every rank).
    """
    if not isinstance(state, SamplerState):
        raise ValueError(f"state must be a SamplerState, got {type(state).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size (per rank) must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    global_batch = batch_size * world_size
    if num_rows < global_batch:
        raise ValueError(f"num_rows={num_rows} is smaller than one global batch (batch_size={batch_size} "
                         f"per rank x world_size={world_size} = {global_batch}); use more rows or a "
                         "smaller batch")
    if state.offset > num_rows:
        raise ValueError(f"sampler state offset={state.offset} is past the end of a {num_rows}-row "
                         "dataset: was it saved for a different dataset?")
    epoch, offset = state.epoch, state.offset
    if offset + global_batch > num_rows:
        epoch, offset = epoch + 1, 0
    perm = epoch_permutation(num_rows, seed=seed, epoch=epoch)
    start = offset + rank * batch_size
    return perm[start : start + batch_size], SamplerState(epoch=epoch, offset=offset + global_batch)
