"""Run logging: a console line and `metrics.jsonl` per step, optional wandb / TensorBoard, tqdm progress
on rank 0, and the curves PNG at the end. Metric names follow verl (docs/metrics.md lists them).

Only rank 0 writes; on other ranks every function here is a no-op (they still call them, so a recipe has
no `if rank == 0` around logging). `metrics.jsonl` holds one JSON object per `log_metrics` call:
`{"step": int, "<name>": number | null, ...}` (non-finite numbers are written as null: strict JSON).
A step may have several lines (e.g. training metrics and validation metrics of the same step).

Resuming: `open_run_log(..., resume_step=k)` keeps the lines with step <= k (the checkpoint's step) and
drops later ones, which a killed run logged after its last checkpoint and the resumed run logs again;
so log everything of step k before saving checkpoint k. `resume_step=None` starts the file afresh.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunLog",
    "open_run_log",
    "log_metrics",
    "close_run_log",
    "plot_curves",
    "progress",
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

    `resume_step`: the step of the checkpoint the run resumed from; lines of later steps are dropped
    (see the module docstring); None truncates `metrics.jsonl`. `wandb_project`: also log to Weights &
    Biases (run id kept in `out_dir/wandb_run_id` so a resumed run continues the same wandb run).
    `tensorboard`: also write TensorBoard events to `out_dir/tensorboard`. Asking for either without its
    package installed raises ImportError naming the package (on every rank, before any file is written).
    """
    if wandb_project is not None:
        _require("wandb", "wandb", f"wandb_project={wandb_project!r} asks for Weights & Biases logging")
    if tensorboard:
        _require("torch.utils.tensorboard", "tensorboard", "tensorboard=True asks for TensorBoard logging")
    if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
        raise ValueError(f"resume_step must be None or an int >= 0, got {resume_step!r}")
    out_dir = Path(out_dir)
    if rank != 0:
        return RunLog(out_dir, rank, None, console_keys)

    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    (out_dir / "config.json").write_text(config_text + "\n")
    jsonl = out_dir / "metrics.jsonl"
    kept: list[str] = []
    if resume_step is not None and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and step <= resume_step:
                kept.append(line)
    tmp = jsonl.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, jsonl)  # atomic: a kill here leaves either the old or the de-duplicated file

    wandb_run = tb_writer = None
    if wandb_project is not None:
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        run_id = run_id or wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        wandb_run = wandb.init(project=wandb_project, id=run_id, resume="allow", config=dict(config),
                               dir=str(out_dir), name=out_dir.name)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb_writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                  purge_step=None if resume_step is None else resume_step + 1)
    return RunLog(out_dir, rank, jsonl, console_keys, wandb_run, tb_writer)


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
    parts += [f"{name.split('/', 1)[1]} {v:.4g}" for name, v in values.items()
              if name.startswith("val-core/") and v is not None]
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


def close_run_log(log: RunLog) -> Path | None:
    """Writes `curves.png` next to metrics.jsonl (if matplotlib is installed; else says so) and closes
    wandb / TensorBoard. Returns the PNG path, or None (other ranks, no curve present, no matplotlib)."""
    if not log.writes:
        return None
    png = None
    try:
        png = plot_curves(log.jsonl_path, log.out_dir / "curves.png")
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
    for line in Path(jsonl_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
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
