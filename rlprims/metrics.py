"""The run directory and its logs: a lock that gives a directory to one run, a console line and
`metrics.jsonl` per step, sample generations per validation (`generations.jsonl`), optional wandb /
TensorBoard, tqdm progress on rank 0, and the curves PNG at the end. Metric names follow verl
(docs/metrics.md lists them).

Only rank 0 writes; on other ranks every logging function here is a no-op (they still call them, so a
recipe has no `if rank == 0` around logging). `metrics.jsonl` holds one JSON object per `log_metrics`
call: `{"step": int, "<name>": number | null, ...}` (non-finite numbers are written as null: strict
JSON). A step may have several lines (e.g. training metrics and validation metrics of the same step).
`generations.jsonl` holds one `{"step", "prompt", "response", "score"}` object per logged sample.

Resuming: `open_run_log(..., resume_step=k)` with k >= 1 keeps the lines with step <= k (the
checkpoint's step) and drops later ones, which a killed run logged after its last checkpoint and the
resumed run logs again; so log everything of step k before saving checkpoint k. `resume_step` None or 0
(no checkpoint: the run starts at step 0 and logs step 0 again) starts the files afresh.

One run per directory: `lock_run_dir(out_dir)` (every rank calls it, first thing) makes a second run
into the same directory fail at once, naming the holder; the lock is an `fcntl.flock`, which the
kernel releases when the holding process ends, however it ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import numbers
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "RunDirLock",
    "lock_run_dir",
    "unlock_run_dir",
    "RunLog",
    "open_run_log",
    "log_metrics",
    "log_generations",
    "close_run_log",
    "plot_curves",
    "progress",
    "perf_metrics",
    "CONSOLE_KEYS",
    "CURVES",
]

# (metric, short label) shown on the console line when present; the full set goes to metrics.jsonl.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("critic/score/mean", "score"),
    ("response_length/mean", "len"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/kl_loss", "kl_loss"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad_norm"),
    ("critic/vf_loss", "vf_loss"),
    ("timing_s/step", "s/step"),
)

# Panels of the curves PNG: (title, alternatives); a panel shows the first alternative present in the
# file that is not identically zero (else the first present), and is left out when none is present.
CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("critic/score/mean",)),
    ("response length", ("response_length/mean",)),
    ("KL", ("actor/ppo_kl", "rollout_corr/kl", "actor/kl_loss")),
    ("entropy", ("actor/entropy",)),
)


_LOCK_FILE = ".run.lock"
_GENERATIONS = "generations.jsonl"


class RunDirLock(NamedTuple):
    """What `lock_run_dir` took: the lock file, and rank 0's open descriptor of it (None elsewhere)."""

    path: Path
    fd: int | None


def lock_run_dir(out_dir: str | os.PathLike[str], *, group: Any = None) -> RunDirLock:
    """Gives `out_dir` to this run: a second run into the same directory fails at once, naming the holder.

    Rank 0 of `group` (default: the default process group; a process without one is rank 0) creates
    `out_dir`, takes an exclusive `fcntl.flock` on `out_dir/.run.lock` without waiting, and writes its
    pid, host and start time into the file. The lock lasts until `unlock_run_dir` or the end of the
    process, however it ends: the kernel drops a flock with its last open descriptor, so a killed run
    leaves no stale lock and the next run takes it over (the file's old content is overwritten). A lock
    held by a live process raises RuntimeError naming `out_dir` and the holder's pid and host.

    Collective when torch.distributed is initialized: rank 0's outcome is broadcast over `group`, so
    every rank raises together (no rank waits in a later collective for one that failed). Call it first
    in a run, before engines or models load. Other ranks touch no file. Across nodes, the lock holds as
    far as the shared file system supports flock (NFSv4, Lustre mounted with `flock`); on one node it
    always does. A forked child keeps the lock while it lives (it shares the descriptor).
    """
    import torch.distributed as dist

    lock_path = Path(out_dir) / _LOCK_FILE
    distributed = dist.is_available() and dist.is_initialized()
    first = not distributed or dist.get_rank(group) == 0
    fd, error = _take_lock(lock_path) if first else (None, None)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        error = box[0]
    if error is not None:
        raise RuntimeError(error)
    return RunDirLock(lock_path, fd)


def unlock_run_dir(lock: RunDirLock) -> None:
    """Releases `lock_run_dir`'s lock: closes rank 0's descriptor (once: the number may be reused after);
    the file stays. A run need not call it: the lock ends with the process."""
    if lock.fd is not None:
        os.close(lock.fd)


def _take_lock(path: Path) -> tuple[int | None, str | None]:
    """(descriptor holding the flock, None) or (None, why not)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    except OSError as e:
        return None, f"cannot create the run lock {path}: {e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _lock_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None, (f"output directory {path.parent} is in use by another run ({holder}, lock file "
                          f"{path}); wait for that run to end or give this one another output directory")
        return None, f"cannot lock {path} ({e}); the file system may not support flock"
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd, None


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "pid and host not yet written"


@dataclass(frozen=True)
class RunLog:
    """Where a run logs. `writes` is True on rank 0 only; the other fields are None elsewhere."""

    out_dir: Path
    rank: int
    jsonl_path: Path | None
    console_keys: tuple[tuple[str, str], ...]
    wandb_run: Any = None
    tb_writer: Any = None

    @property
    def writes(self) -> bool:
        return self.rank == 0


def _require(module: str, package: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{why}, but the `{package}` package is not installed: "
                          f"pip install {package}") from e


def open_run_log(
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    config: Mapping[str, Any],
    wandb_project: str | None = None,
    tensorboard: bool = False,
    resume_step: int | None = None,
    console_keys: tuple[tuple[str, str], ...] = CONSOLE_KEYS,
) -> RunLog:
    """Opens the run's log in `out_dir` (rank 0 writes `config.json` and `metrics.jsonl`; others nothing).

    `resume_step`: the step of the checkpoint the run resumed from; with k >= 1, lines of steps after k
    are dropped from metrics.jsonl and generations.jsonl (see the module docstring); None or 0 (no
    checkpoint: the run logs from step 0 on) empties them. `wandb_project`: also log to Weights & Biases
    (a resumed run continues the wandb run whose id is in `out_dir/wandb_run_id`; a fresh one starts a
    new run and records its id there; WANDB_MODE=offline etc. apply as usual). `tensorboard`: also write
    TensorBoard events to `out_dir/tensorboard` (events of dropped steps are purged). Asking for either
    without its package installed raises ImportError naming the package (on every rank, before any file
    is written).
    """
    if wandb_project is not None:
        _require("wandb", "wandb", f"wandb_project={wandb_project!r} asks for Weights & Biases logging")
    if tensorboard:
        _require("torch.utils.tensorboard", "tensorboard", "tensorboard=True asks for TensorBoard logging")
    if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                    or resume_step < 0):
        raise ValueError(f"resume_step must be None or an int >= 0, got {resume_step!r}")
    out_dir = Path(out_dir)
    if rank != 0:
        return RunLog(out_dir, rank, None, console_keys)

    resuming = resume_step is not None and resume_step > 0
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    (out_dir / "config.json").write_text(config_text + "\n")
    jsonl = out_dir / "metrics.jsonl"
    for path in (jsonl, out_dir / _GENERATIONS):
        _keep_steps_up_to(path, resume_step if resuming else -1)

    wandb_run = tb_writer = None
    if wandb_project is not None:
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else ""
        wandb_run = wandb.init(project=wandb_project, id=run_id or None, resume="allow" if run_id else None,
                               config=dict(config), dir=str(out_dir), name=out_dir.name)
        id_file.write_text(f"{wandb_run.id}\n")
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of steps >= it written by earlier runs in this dir
        tb_writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                  purge_step=resume_step + 1 if resuming else 0)
    return RunLog(out_dir, rank, jsonl, console_keys, wandb_run, tb_writer)


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    """Rewrites a JSONL file keeping the lines whose "step" is <= last_step (none for -1); drops lines a
    kill cut short. Atomic: a kill here leaves either the old or the new file."""
    kept: list[str] = []
    if last_step >= 0 and path.exists():
        for line in path.read_text().splitlines():
            record = _json_record(line)
            step = record.get("step") if record is not None else None
            if isinstance(step, int) and not isinstance(step, bool) and step <= last_step:
                kept.append(line)
    if not kept and not path.exists():
        if path.name != _GENERATIONS:  # generations.jsonl appears with the first generations logged
            path.write_text("")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _json_record(line: str) -> dict[str, Any] | None:
    """The JSON object on a line, or None (a line cut short by a kill, or not an object)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _json_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(_json_record, path.read_text().splitlines()) if r is not None]


def _number(name: str, value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"metric {name!r} must be a real number, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _console_line(step: int, values: Mapping[str, float | int | None], keys) -> str:
    parts = [f"step {step:5d}"]
    for name, label in keys:
        if name in values:
            v = values[name]
            parts.append(f"{label} {'nan' if v is None else f'{v:.4g}'}")
    for name, v in values.items():  # validation, with its standard error when logged (validation_metrics)
        if name.startswith("val-core/") and v is not None:
            src, metric = name.removeprefix("val-core/").split("/acc/", 1) if "/acc/" in name else (None, None)
            se = values.get(f"val-aux/{src}/acc/{metric}/stderr") if src is not None else None
            parts.append(f"{name.split('/', 1)[1]} {v:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    return "  ".join(parts)


def log_metrics(log: RunLog, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **metrics}` to metrics.jsonl, prints a compact line (rank 0 only).

    Values: Python / numpy numbers or one-element tensors (synchronise a device tensor once, in the
    caller, for many metrics). Also logs to wandb / TensorBoard when the log was opened with them.
    """
    if not log.writes:
        return
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if "step" in metrics:
        raise ValueError("metrics must not contain the key 'step' (it is the step argument)")
    values = {str(k): _number(str(k), v) for k, v in metrics.items()}
    with open(log.jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **values}, allow_nan=False) + "\n")
    from tqdm import tqdm

    tqdm.write(_console_line(step, values, log.console_keys))
    finite = {k: v for k, v in values.items() if v is not None}
    if log.wandb_run is not None:
        log.wandb_run.log(finite, step=step)
    if log.tb_writer is not None:
        for k, v in finite.items():
            log.tb_writer.add_scalar(k, v, global_step=step)
        log.tb_writer.flush()


def log_generations(
    log: RunLog,
    step: int,
    prompts: Sequence[str],
    responses: Sequence[str],
    scores: Sequence[float] | torch.Tensor,
) -> None:
    """Records validation samples, prompt + response + score each, at `step` (rank 0 writes; verl's
    `val/generations`, TRL's `log_completions`).

    Appends one line `{"step", "prompt", "response", "score"}` per sample to `generations.jsonl`; logs to
    wandb the table `val/generations` of every sample logged so far (columns step, prompt, response,
    score; read back from the file, so it spans all validations, resumed runs included) and to
    TensorBoard the step's samples as text `val/generations`. Every sample passed is written: pass a
    few (e.g. the first 4 of rank 0's validation prompts). A non-finite score is written as null.
    The lengths are checked on every rank; other ranks write nothing.
    Shapes: prompts, responses, scores of one length S (scores a list or a [S] tensor).
    """
    if not (len(prompts) == len(responses) == len(scores)):
        raise ValueError(f"log_generations: {len(prompts)} prompts, {len(responses)} responses and "
                         f"{len(scores)} scores; one of each per sample")
    if not log.writes or len(prompts) == 0:
        return
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be a 1-D tensor, got shape {tuple(scores.shape)}")
        scores = scores.detach().float().cpu().tolist()
    rows = []
    for i, (prompt, response, score) in enumerate(zip(prompts, responses, scores)):
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"sample {i}: prompt and response must be str, got "
                             f"{type(prompt).__name__} and {type(response).__name__}")
        rows.append({"step": step, "prompt": prompt, "response": response,
                     "score": _number(f"scores[{i}]", float(score) if isinstance(score, bool) else score)})
    path = log.out_dir / _GENERATIONS
    with open(path, "a") as f:
        f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    if log.wandb_run is not None:
        import wandb

        columns = ["step", "prompt", "response", "score"]
        every = _json_records(path)
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in every])
        log.wandb_run.log({"val/generations": table}, step=step)
    if log.tb_writer is not None:
        text = "\n\n---\n\n".join(
            f"**sample {i}**, score {row['score']}\n\nprompt:\n\n{_md_code(row['prompt'])}\n\n"
            f"response:\n\n{_md_code(row['response'])}" for i, row in enumerate(rows))
        log.tb_writer.add_text("val/generations", text, global_step=step)
        log.tb_writer.flush()


def _md_code(text: str) -> str:
    """`text` as a Markdown code block (indented 4 spaces): shown verbatim, whatever it holds."""
    return "\n".join("    " + line for line in (text.splitlines() or [""]))


def close_run_log(
    log: RunLog, *, curves: Sequence[tuple[str, Sequence[str]]] = CURVES
) -> Path | None:
    """Writes `curves.png` next to metrics.jsonl (if matplotlib is installed; else says so) and closes
    wandb / TensorBoard. `curves`: the panels, as `plot_curves`' `keys`. Returns the PNG path, or None
    (other ranks, no curve present, no matplotlib)."""
    if not log.writes:
        return None
    png = None
    try:
        png = plot_curves(log.jsonl_path, log.out_dir / "curves.png", keys=curves)
    except ImportError as e:
        print(f"curves.png not written: {e}", flush=True)
    if log.tb_writer is not None:
        log.tb_writer.close()
    if log.wandb_run is not None:
        if png is not None:
            import wandb

            log.wandb_run.log({"curves": wandb.Image(str(png))})
        log.wandb_run.finish()
    return png


def _read_series(jsonl_path: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] in step order; a key repeated at one step keeps its last value."""
    by_key: dict[str, dict[int, float]] = {}
    for record in _json_records(Path(jsonl_path)):
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                by_key.setdefault(k, {})[step] = float(v)
    return {k: sorted(d.items()) for k, d in by_key.items()}


def plot_curves(
    jsonl_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    keys: Sequence[tuple[str, Sequence[str]]] = CURVES,
) -> Path | None:
    """Plots metrics.jsonl as a PNG: one panel per (title, alternative keys) of `keys` that is present.

    Default panels: reward (critic/score/mean, with validation accuracies val-core/*/acc/mean@N as
    markers), response length (response_length/mean), KL (actor/ppo_kl, else rollout_corr/kl, else
    actor/kl_loss: the first present that is not identically zero) and entropy (actor/entropy), against
    the step. Uses matplotlib's object API (no pyplot, no global backend change). Returns `png_path`, or
    None without writing when no panel's keys are present.
    """
    _require("matplotlib", "matplotlib", "plot_curves draws the run's curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = _read_series(Path(jsonl_path))
    panels = []
    for title, alternatives in keys:
        present = [k for k in alternatives if k in series]
        if not present:
            continue
        nonzero = [k for k in present if any(v != 0.0 for _, v in series[k])]
        panels.append((title, (nonzero or present)[0]))
    if not panels:
        return None
    val_keys = sorted(k for k in series if k.startswith("val-core/") and "/acc/" in k)

    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        if key == "critic/score/mean":
            for vk in val_keys:
                vs, vv = zip(*series[vk])
                ax.plot(vs, vv, marker="o", linestyle="--", label=vk)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def progress(iterable: Iterable, *, desc: str, rank: int, total: int | None = None) -> Iterable:
    """`iterable` with a tqdm bar (stderr) on rank 0; on other ranks `iterable` itself, silently."""
    if rank != 0:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def perf_metrics(metrics: Mapping[str, Any], *, world_size: int, device: torch.device) -> dict[str, float]:
    """A step's verl `perf/*` metrics from its logged `perf/total_num_tokens` and `timing_s/step`.

    perf/throughput: tokens per second per rank (total_num_tokens / timing_s/step / world_size). On CUDA
    also perf/max_memory_allocated_gb and perf/max_memory_reserved_gb: this rank's peak of PyTorch's
    allocator since the last call (GiB, as verl), after which the peak is reset, so each step reports
    its own. vLLM's sleep-mode pool (the engine's weights and KV cache) is allocated through PyTorch's
    allocator: it is counted while the engine sleeps, although the engine has then released it, so on a
    GPU shared with a sleeping engine the peak can exceed what the device held (an H200 run of the 7B
    GRPO step: 99.3 GiB allocated, 91.0 GiB on the device through NVML).
    """
    for key in ("perf/total_num_tokens", "timing_s/step"):
        if key not in metrics:
            raise KeyError(f"perf_metrics needs {key!r} in the step's metrics (have {sorted(metrics)})")
    if world_size < 1 or metrics["timing_s/step"] <= 0:
        raise ValueError(f"world_size must be >= 1 and timing_s/step > 0, got {world_size} and "
                         f"{metrics['timing_s/step']}")
    out = {"perf/throughput": metrics["perf/total_num_tokens"] / metrics["timing_s/step"] / world_size}
    if device.type == "cuda":
        out["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["perf/max_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out
