"""rlprims.launch: SPMD start-up (torchrun, Slurm or one `python` process) and Slurm submission.

- `init(seed=...)` -> `Dist`: reads torchrun's / Slurm's rendezvous variables (or none: a group of one),
  takes the GPU LOCAL_RANK (NCCL) or the CPU (gloo), initialises the default process group with a
  timeout and seeds python / numpy / torch identically on every rank; `shutdown(dist)` ends it.
- `fit_to_device(args, model_dir, dist, rows=...)` -> `DeviceFit`: the recipes' "fit" flags resolved for
  the device (engine compilation, KV cache, sleep, micro-batch tokens, checkpointing; CPU: unchanged).
- `parse_args(Args)`: a recipe's `Args` dataclass as flags (HfArgumentParser), help from the field
  docstrings, `--config run.yaml` (flags override it), values checked before anything loads.
  `RunArgs`: the flags every RL recipe shares (a recipe's `Args` extends it).
- `quiet_console()`: hides library start-up chatter (called by `init`; `--verbose` / RLPRIMS_VERBOSE=1
  keeps it).
- `python -m rlprims.launch.slurm --nodes N --gpus-per-node G recipes/grpo.py -- ...` (module
  `rlprims.launch.slurm`, needs submitit): one task per GPU on Slurm, requeue on preemption / time-out,
  `--local` for this machine. Not imported here, so `import rlprims.launch` needs no submitit.

See docs/launch.md.
"""

from rlprims.launch.args import field_docstrings, parse_args
from rlprims.launch.run_args import RunArgs
from rlprims.launch.console import quiet_console
from rlprims.launch.sizing import DeviceFit, fit_to_device
from rlprims.launch.spmd import Dist, init, seed_all, shutdown

__all__ = ["Dist", "init", "shutdown", "seed_all", "parse_args", "field_docstrings", "quiet_console",
           "DeviceFit", "fit_to_device", "RunArgs"]
