"""Which prompts and which sampling seeds a rank uses, from its place on the data-parallel axis.

The ranks of one tensor-parallel group drive one engine together: they must pass the same prompts and
the same seed to `rlprims.rollout.generate` (it raises otherwise). So a rank's share of the data and its
seeds follow its data-parallel index (`mesh["dp"]`), never its global rank.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

__all__ = ["dp_rank_and_size", "rollout_seed"]

_SEED_SPACE = 2**62  # seeds stay below 2^62 + rows: within what torch.Generator.manual_seed takes
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads the blocks of runs with nearby seeds (2^64 / golden ratio)


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """(this rank's index on the mesh's "dp" axis, the axis' size) for `build_mesh`'s (dp, tp) mesh.

    Pass them as `rank` / `world_size` to `rlprims.data.next_indices` and as `dp_rank` / `dp_size` to
    `rollout_seed`: rank r sits at dp index r // tp, so the tp ranks that share an engine share prompts.
    """
    if not isinstance(mesh, DeviceMesh) or "dp" not in (mesh.mesh_dim_names or ()):
        raise ValueError(f"mesh must be a DeviceMesh with a 'dp' axis (see build_mesh), got {mesh!r}")
    return mesh.get_local_rank("dp"), mesh.size(mesh.mesh_dim_names.index("dp"))


def rollout_seed(
    *, seed: int, step: int, dp_rank: int, dp_size: int, rows: int, round: int = 0, rounds: int = 1
) -> int:
    """The `seed` argument of `rlprims.rollout.generate` for one call: no two rows of a run share a stream.

    generate samples row j (of `rows`, = prompts × n) with generator seed s + j. Call (step, round) of
    data-parallel rank d takes the block
        k = (step · rounds + round) · dp_size + d,      s = (seed · M + k · rows) mod 2^62
    (M a fixed odd constant), so the seeds s .. s + rows − 1 of different (step, round, d) never overlap
    within a run, and a resumed run draws exactly the seeds of an uninterrupted one. `rounds` is the most
    generation calls per step (DAPO's refill rounds; 1 otherwise), `round` this call's index in [0, rounds).
    Every call of a run must pass the same `rows` (the most rows any call generates) and `dp_size`.
    Differs from the recipes before it: `seed + step·C + rank // tp` gave row j of rank d the seed of row
    j + 1 of rank d − 1, so neighbouring ranks sampled with each other's streams.
    """
    for name, value, low in (("step", step, 0), ("dp_size", dp_size, 1), ("rows", rows, 1),
                             ("rounds", rounds, 1), ("round", round, 0), ("dp_rank", dp_rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if dp_rank >= dp_size or round >= rounds:
        raise ValueError(f"need dp_rank < dp_size, round < rounds: {dp_rank}, {dp_size}, {round}, {rounds}")
    block = (step * rounds + round) * dp_size + dp_rank
    return (seed * _SEED_MIX + block * rows) % _SEED_SPACE
