"""Submit a recipe to Slurm (or run it on this machine) through submitit: one task per GPU.

    python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 4:00:00 \\
        recipes/grpo.py -- --model /models/qwen --out-dir runs/grpo-q
    python -m rlprims.launch.slurm --local --nodes 1 --gpus-per-node 2 recipes/grpo.py -- --steps 2

Each task sets the torch.distributed rendezvous variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE) from Slurm's (through submitit's JobEnvironment, which parses node lists
such as "gpu[01-03,07]"), changes to the directory the job was submitted from, and runs the recipe with
`runpy` as `python recipe.py <recipe args>` would; the recipe then calls `rlprims.launch.init`.
Logs go to the job folder (`<folder>/<job id>_<rank>_log.out|err`, printed at submission).

Preemption and time-out: Slurm sends SIGUSR2 `signal_delay_s` before the end; submitit's handler on rank
0 calls `RecipeTask.checkpoint`, which returns the same call, and requeues the job (at most
`max_requeues` time-outs; preemptions do not count). The requeued job runs the same command, and the
recipe resumes from the latest checkpoint in its out_dir (`rlprims.checkpoint.latest_checkpoint`), so
the work lost is what was done since the recipe's last checkpoint.

A failing rank: srun runs with --kill-on-bad-exit, so the other ranks are stopped at once and the job
fails; the rank's traceback is in its log. `wait` (used by --local and --wait) reports the first rank
that failed with its traceback and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import pickle
import runpy
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

__all__ = ["RecipeTask", "rendezvous_env", "parse_time_min", "submit", "wait", "main"]

_DEFAULT_FOLDER = "runs/submitit/%j"


def rendezvous_env() -> dict[str, str]:
    """The torch.distributed variables of this submitit task, from its JobEnvironment (Slurm or local).

    MASTER_ADDR is the first host of the job's node list (127.0.0.1 for local jobs); MASTER_PORT is
    MASTER_PORT if set, else a port in [20000, 60000] derived from the job id (the same on every task and
    on every requeue of the job); RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID,
    WORLD_SIZE = SLURM_NTASKS, LOCAL_WORLD_SIZE = SLURM_NTASKS / SLURM_JOB_NUM_NODES.
    Only valid inside a submitit task (SUBMITIT_EXECUTOR set). Raises ValueError when the tasks are not
    spread evenly over the nodes (one task per GPU on every node is what this launcher submits).
    """
    job_env = submitit.JobEnvironment()
    if job_env.num_tasks % job_env.num_nodes:
        raise ValueError(
            f"{job_env.num_tasks} tasks on {job_env.num_nodes} nodes: the launcher needs the same number "
            "of tasks (one per GPU) on every node"
        )
    torch_env = TorchDistributedEnvironment()  # submitit's helper: node list, ranks, job-id port
    return {
        "MASTER_ADDR": "127.0.0.1" if job_env.cluster == "local" else torch_env.master_addr,
        "MASTER_PORT": str(torch_env.master_port),
        "RANK": str(torch_env.rank),
        "WORLD_SIZE": str(torch_env.world_size),
        "LOCAL_RANK": str(torch_env.local_rank),
        "LOCAL_WORLD_SIZE": str(torch_env.local_world_size),
    }


_PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a task Slurm stops looks like; not submitit's requeue code (144)


def _exit_on_local_requeue(signum: int, frame: Any) -> None:
    print(f"rank {os.environ.get('RANK')}: preempted; rank 0 requeues the job", file=sys.stderr, flush=True)
    sys.exit(_PREEMPTED_EXIT)


# A class because submitit's requeue needs one: it calls `checkpoint` on the submitted callable when the
# job is preempted or times out (helpers.Checkpointable). It holds only the command; no state.
class RecipeTask(Checkpointable):
    """One task of the job: set the rendezvous variables, then run `recipe` as `python recipe *args`."""

    def __init__(self, recipe: str, args: Sequence[str], workdir: str) -> None:
        self.recipe = recipe
        self.args = list(args)
        self.workdir = workdir

    def __call__(self) -> None:
        env = rendezvous_env()
        os.environ.update(env)
        if submitit.JobEnvironment().cluster == "local" and env["RANK"] != "0":
            # Slurm stops every task of a requeued job; submitit's local controller waits for all of them,
            # and only rank 0 acts on the preemption signal. Ranks > 0 leave quietly instead.
            signal.signal(submitit.JobEnvironment._usr_sig(), _exit_on_local_requeue)
        os.chdir(self.workdir)
        sys.argv = [self.recipe, *self.args]
        sys.path.insert(0, os.path.dirname(self.recipe))  # as `python recipe.py` does
        try:
            runpy.run_path(self.recipe, run_name="__main__")
        except SystemExit as e:
            # sys.exit(0) / sys.exit() from the recipe is a success; any other status (the recipe's, or
            # submitit's requeue exit from its signal handler) must end the process with that status
            if e.code not in (None, 0):
                raise

    def checkpoint(self) -> DelayedSubmission:
        """Requeue = the same command again; the recipe resumes from its own latest checkpoint."""
        return DelayedSubmission(RecipeTask(self.recipe, self.args, self.workdir))


def parse_time_min(value: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (seconds round up)."""
    text = str(value).strip()
    days, sep, rest = text.partition("-")
    if not sep:
        days, rest = "0", text
    try:
        d, parts = int(days), [int(p) for p in rest.split(":")]
    except ValueError:
        parts, d = [], -1
    if d < 0 or not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise ValueError(f"time {value!r}: use minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S (Slurm's formats)")
    if sep:  # D-H, D-H:M, D-H:M:S
        h, m, s = parts + [0] * (3 - len(parts))
    else:  # M, M:S, H:M:S
        h, m, s = parts if len(parts) == 3 else [0, *parts, 0][:3]
    minutes = d * 1440 + h * 60 + m + (1 if s else 0)
    if minutes < 1:
        raise ValueError(f"time {value!r} must be at least one minute")
    return minutes


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def submit(
    recipe: str | os.PathLike[str],
    recipe_args: Sequence[str] = (),
    *,
    nodes: int,
    gpus_per_node: int,
    folder: str | os.PathLike[str] = _DEFAULT_FOLDER,
    time_min: int = 60,
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    cpus_per_task: int | None = None,
    mem_gb: int | None = None,
    setup: Sequence[str] = (),
    max_requeues: int = 3,
    local: bool = False,
) -> submitit.Job:
    """Submits `recipe recipe_args` as a job of nodes x gpus_per_node tasks (one per GPU); returns the Job.

    Slurm (default): `sbatch` through submitit.SlurmExecutor with --nodes, --ntasks-per-node and
    --gpus-per-node = gpus_per_node, --time, the optional partition / account / qos / constraint /
    cpus-per-task / mem, `setup` shell lines before srun (module load ..., source venv), and srun
    --kill-on-bad-exit=1 (a failing rank stops the job). local=True: submitit.LocalExecutor on this
    machine with nodes * gpus_per_node tasks; CPU tasks (gloo) when torch sees no GPU.
    `folder` holds the logs and submitit's pickles; "%j" in it becomes the job id. time_min is the wall
    time; max_requeues bounds the requeues after a time-out (submitit's max_num_timeout).

    Everything is checked before anything is submitted: the recipe file exists, counts are positive,
    sbatch is on PATH (Slurm) or enough GPUs are visible (local with GPUs); ValueError otherwise.
    """
    path = Path(recipe).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"recipe {str(recipe)!r} does not exist (resolved to {path})")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("time_min", time_min)):
        _check_positive(name, value)
    for name, value in (("cpus_per_task", cpus_per_task), ("mem_gb", mem_gb)):
        if value is not None:
            _check_positive(name, value)
    if isinstance(max_requeues, bool) or not isinstance(max_requeues, int) or max_requeues < 0:
        raise ValueError(f"max_requeues must be a non-negative int, got {max_requeues!r}")
    task = RecipeTask(str(path), [str(a) for a in recipe_args], os.getcwd())
    if local:
        import torch

        tasks = nodes * gpus_per_node
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and gpus < tasks:
            raise ValueError(f"--local: {tasks} tasks need {tasks} GPUs, but {gpus} are visible")
        executor: submitit.Executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
        executor.update_parameters(
            tasks_per_node=tasks, gpus_per_node=tasks if gpus else 0, timeout_min=time_min
        )
    else:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise ValueError("sbatch / srun not found: not on a Slurm login node (use --local to run here)")
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
        params: dict[str, Any] = dict(
            job_name=job_name or path.stem,
            nodes=nodes,
            ntasks_per_node=gpus_per_node,
            gpus_per_node=gpus_per_node,
            time=time_min,
            srun_args=["--kill-on-bad-exit=1"],
        )
        optional = dict(partition=partition, account=account, qos=qos, constraint=constraint,
                        cpus_per_task=cpus_per_task, mem=None if mem_gb is None else f"{mem_gb}GB")
        params.update({k: v for k, v in optional.items() if v is not None})
        if setup:
            params["setup"] = list(setup)
        executor.update_parameters(**params)
    # a job submitted from inside another job must not inherit its SLURM_* / RANK / MASTER_* variables
    with submitit.helpers.clean_env():
        return executor.submit(task)


def _task_jobs(job: submitit.Job) -> list[submitit.Job]:
    return [job.task(k) for k in range(job.num_tasks)] if job.num_tasks > 1 else [job]


def wait(job: submitit.Job, *, poll_s: float = 0.5) -> None:
    """Waits for the job; on the first rank that fails, stops the others and raises with its traceback.

    Ranks are watched through the result files submitit writes when a task ends (a traceback when it
    raised). The rank whose result appeared first is the cause; the others usually fail after it
    (their collectives lose a peer). Raises RuntimeError naming that rank, with its traceback and log
    paths.
    """
    tasks = _task_jobs(job)
    while True:
        done = job.done()
        failures = []
        for rank, task in enumerate(tasks):
            result = task.paths.result_pickle
            if result.exists():
                try:
                    with open(result, "rb") as f:
                        outcome, payload = pickle.load(f)
                except (EOFError, pickle.UnpicklingError):
                    continue  # being written
                if outcome == "error":
                    failures.append((result.stat().st_mtime_ns, rank, payload, task))
        if failures:
            _, rank, trace, task = min(failures)
            if not job.done():
                job.cancel(check=False)
            raise RuntimeError(
                f"job {job.job_id}: rank {rank} failed with\n{trace}\n"
                f"logs: {task.paths.stdout}\n      {task.paths.stderr}"
            )
        if done:
            break
        time.sleep(poll_s)
    job.results()  # raises submitit's error when a rank ended without a result (killed, out of memory)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlprims.launch.slurm",
        description="Submit an rlprims recipe to Slurm through submitit (one task per GPU).",
        usage="%(prog)s --nodes N --gpus-per-node G [options] RECIPE.py [-- RECIPE_ARGS ...]",
        allow_abbrev=False,
    )

    def add(name: str, **kw: Any) -> None:
        p.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kw)

    add("nodes", type=int, required=True, help="Number of nodes.")
    add("gpus-per-node", type=int, required=True, help="GPUs per node = tasks per node (one per GPU).")
    add("partition", help="Slurm partition.")
    add("time", default="1:00:00", help="Wall time in Slurm's format (default: %(default)s).")
    add("account", help="Slurm account to charge.")
    add("job-name", help="Job name (default: the recipe's file name).")
    add("qos", help="Slurm quality of service.")
    add("constraint", help="Slurm node constraint (features).")
    add("cpus-per-task", type=int, help="CPUs per task (per GPU).")
    add("mem-gb", type=int, help="Memory per node in GB.")
    add("setup", action="append", default=[], help="Shell line run before srun (repeatable).")
    add("folder", default=_DEFAULT_FOLDER, help="Job folder for logs; %%j = job id (default: %(default)s).")
    add("max-requeues", type=int, default=3, help="Requeues after time-outs (default: %(default)s).")
    add("local", action="store_true", help="Run here through submitit's local executor (nodes x gpus tasks).")
    add("wait", action="store_true", help="Slurm: wait for the job's end and report a failing rank.")
    p.add_argument("recipe", help="The recipe script, e.g. recipes/grpo.py.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 submitted / finished, 1 the job failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    own, recipe_args = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (the recipe's own arguments go after '--')"
        )
    try:
        job = submit(
            args.recipe,
            recipe_args,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            folder=args.folder,
            time_min=parse_time_min(args.time),
            partition=args.partition,
            account=args.account,
            job_name=args.job_name,
            qos=args.qos,
            constraint=args.constraint,
            cpus_per_task=args.cpus_per_task,
            mem_gb=args.mem_gb,
            setup=args.setup,
            max_requeues=args.max_requeues,
            local=args.local,
        )
    except ValueError as e:
        parser.error(str(e))
    tasks = _task_jobs(job)
    where = "locally" if args.local else "to Slurm"
    print(f"submitted job {job.job_id} {where}: {args.nodes} node(s) x {args.gpus_per_node} task(s)")
    print(f"job folder: {tasks[0].paths.folder}")
    print(f"logs (rank 0): {tasks[0].paths.stdout}\n               {tasks[0].paths.stderr}", flush=True)
    if not (args.local or args.wait):
        return 0
    try:
        wait(job)
    except (RuntimeError, submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
        print(f"job {job.job_id} failed: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
