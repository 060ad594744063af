"""rlprims.launch: torchrun SPMD initialization and submitit/Slurm submission.

Empty so far: recipes read RANK / WORLD_SIZE / LOCAL_RANK from torchrun's environment themselves.
"""
