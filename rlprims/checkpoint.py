"""Training checkpoints (torch.distributed.checkpoint) and HF exports, both written atomically.

A checkpoint is a directory `root/step-{step:08d}` (e.g. `root/step-00000100`) holding
  - the model and optimizer state, saved with torch.distributed.checkpoint (DCP) from
    `get_state_dict`: every rank writes its own shards (FSDP2 DTensors) or, for a plain module, the
    deduplicated tensors; a checkpoint loads into any world size and any sharding (DCP reshards);
  - `rng-rank-{rank:05d}.pt`: each rank's python / numpy / torch CPU / CUDA RNG states;
  - `extra_state.json`: a JSON-able dict of the caller (data-sampler state, counters, KL controller);
  - `checkpoint.json`: step, world size, time; written last, it marks the checkpoint complete.
Every rank writes into `root/.tmp-step-{step:08d}`; after a barrier rank 0 writes the marker and renames
the directory (atomic on POSIX file systems), so a process killed mid-save (even by SIGKILL) leaves the
previous checkpoint intact and `latest_checkpoint` ignores the leftover, which the next save deletes.
For more than one node, `root` must be on a file system all ranks share.

Works with a default process group (the recipes always create one, world 1 included) and without any
(a single process, e.g. tests or notebooks). Every rank must call save/load/export (collectives).

Trust: loading runs no code from the checkpoint. DCP reads `.metadata` with plain `pickle` and the
non-tensor entries of the shards (optimizer hyperparameters) with `torch.load(weights_only=False)`, so
before DCP sees a checkpoint `load_checkpoint` unpickles `.metadata` with an allowlist (DCP's metadata
dataclasses, torch.Size, dtypes, paths), checks that every entry points into the checkpoint directory,
and loads every non-tensor entry with `torch.load(weights_only=True)`; anything else is refused, naming
the file. JSON files are validated (types, step). The content is still trusted input: the weights and
the caller's state are used as they are (docs/checkpoints.md, "Trust").
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "checkpoint_step", "export_hf"]

_STEP_DIR = re.compile(r"step-(\d{8})")
_MARKER = "checkpoint.json"
_EXTRA = "extra_state.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


# ---- process group helpers ---------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _broadcast_error(message: str | None) -> None:
    """Rank 0's error (or None) raised on every rank, so that no rank waits forever for the others."""
    if _dist_on():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise RuntimeError(message)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; a single process is a supported use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- RNG ------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-rank-{rank:05d}.pt"


# ---- checkpoints ----------------------------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint directory `.../step-{step:08d}` (what `save_checkpoint` was given)."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(
            f"path={str(path)!r} is not a checkpoint directory named step-<8 digits> (e.g. step-00000100)"
        )
    return int(match.group(1))


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / _MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest step under `root`, or None.

    Temporary (`.tmp-*`) and incomplete (no `checkpoint.json`) directories are ignored.
    """
    found = _complete_checkpoints(Path(root))
    return found[-1] if found else None


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Saves model, optimizer, this rank's RNG states and `extra_state` as `root/step-{step:08d}`.

    Collective: every rank calls it with the same arguments. Atomic: ranks write into
    `root/.tmp-step-{step:08d}`; after a barrier rank 0 writes `checkpoint.json` and renames the directory;
    a second barrier makes the checkpoint visible to every rank when the call returns. Leftovers of a
    killed save are deleted first. `keep_last=k` then deletes all but the k newest complete checkpoints.
    A checkpoint already at this step is replaced. The RNG states are read on entry, so random draws
    after a resume equal the draws after this call.

    `optimizer` may be None (model only). An empty optimizer state (no step taken yet) is initialised by
    torch's `get_state_dict` with a zero-learning-rate step, as torch.distributed.checkpoint does.
    Returns the checkpoint directory.
    """
    rng = _rng_state()  # first: nothing below may draw random numbers before we record them
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**8:
        raise ValueError(f"step must be an int in [0, 1e8), got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    if not isinstance(extra_state, dict):
        raise ValueError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    if "step" in extra_state and (type(extra_state["step"]) is not int or extra_state["step"] != step):
        raise ValueError(f"extra_state['step'] must be the step being saved ({step}), got "
                         f"{extra_state['step']!r}")
    try:
        extra_json = json.dumps(extra_state, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_state must be a JSON-able dict (str keys, finite numbers): {e}") from e

    root = Path(root)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    rank, world = _rank(), _world()

    error = None
    if rank == 0:  # clean leftovers of killed saves / prunes, then make the temp directory
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.iterdir():
                if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            tmp.mkdir()
        except OSError as e:
            error = f"save_checkpoint: cannot prepare {tmp}: {e!r}"
    _broadcast_error(error)

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp)
    _write_durable(_rng_file(tmp, rank), _torch_bytes(rng))
    _barrier()

    error = None
    if rank == 0:
        try:
            _write_durable(tmp / _EXTRA, extra_json.encode())
            meta = {"step": step, "world_size": world, "time": time.time(), "format": 1}
            _write_durable(tmp / _MARKER, json.dumps(meta).encode())  # complete from here on
            if final.exists():  # re-saving a step: move the old one aside first (rename is atomic)
                final.rename(root / f"{_TRASH_PREFIX}{name}")
            tmp.rename(final)
            _fsync_dir(root)
            shutil.rmtree(root / f"{_TRASH_PREFIX}{name}", ignore_errors=True)
            if keep_last is not None:
                for old in _complete_checkpoints(root)[:-keep_last]:
                    trash = root / f"{_TRASH_PREFIX}{old.name}"
                    old.rename(trash)  # a kill during the delete leaves a .trash-* leftover, not a step-*
                    shutil.rmtree(trash, ignore_errors=True)
        except OSError as e:
            error = f"save_checkpoint: cannot finish {final}: {e!r}"
    _broadcast_error(error)
    return final


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    expect: Mapping[str, type | tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    """Restores model and optimizer (in place) and this rank's RNG states; returns the extra_state.

    Collective. The model and optimizer must be built (and sharded) as for training; the checkpoint may
    come from another world size or sharding (DCP reshards). If the checkpoint has no RNG file for this
    rank (it was saved by fewer ranks) the RNG states are left as they are, with a warning.

    Checked before anything is loaded (on every rank; a failure raises ValueError on every rank, naming
    the file): `.metadata` holds only DCP's metadata types (see the module docstring), every entry lies
    in the directory, every non-tensor entry loads with `torch.load(weights_only=True)`, the RNG files
    load likewise, `checkpoint.json` names this directory's step, `extra_state.json` is a JSON object
    whose "step" (when present, as `save_checkpoint` requires) is that step as an int. `expect`: the
    keys the caller needs and their types, e.g. `{"step": int, "sampler": dict}` (bool is not an int;
    float accepts an int); a missing key or another type raises ValueError naming it.
    """
    path = Path(path)
    if not (path / _MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_MARKER}); "
                                f"use latest_checkpoint(root) to find one")
    error, extra, saved_world = None, {}, 0
    try:
        saved_world = _check_marker(path)
        extra = _check_extra(path, expect)
        _check_dcp_files(path)
    except ValueError as e:
        error = str(e)
    _raise_if_any_rank(error)

    if optimizer is None:
        model_state = get_model_state_dict(model)
        state = {"model": model_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    rng_file = _rng_file(path, _rank())
    if rng_file.is_file():
        try:
            _set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as e:  # any failure means the file is not what save wrote
            raise ValueError(f"{rng_file} is not an RNG state file save_checkpoint wrote: {e}") from e
    else:
        warnings.warn(f"{path} was saved by {saved_world} ranks and holds no RNG state for rank {_rank()}; "
                      f"this rank's RNG is not restored", stacklevel=2)
    return extra


def _raise_if_any_rank(error: str | None) -> None:
    """Raises ValueError on every rank when any rank has an error (the first rank's), else returns."""
    if _dist_on():
        errors: list[str | None] = [None] * _world()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ValueError(error)


def _json_file(path: Path) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(path.read_text(), parse_constant=no_constants)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e


def _check_marker(path: Path) -> int:
    """checkpoint.json's world size, after checking that its step is this directory's."""
    meta = _json_file(path / _MARKER)
    step = checkpoint_step(path)
    if not isinstance(meta, dict) or type(meta.get("step")) is not int or meta["step"] != step:
        raise ValueError(f"{path / _MARKER} must be a JSON object with \"step\": {step} (the directory's "
                         f"step), got {meta!r:.200}")
    world = meta.get("world_size")
    if type(world) is not int or world < 1:
        raise ValueError(f"{path / _MARKER}: \"world_size\" must be an int >= 1, got {world!r:.50}")
    return world


def _check_extra(path: Path, expect: Mapping[str, type | tuple[type, ...]] | None) -> dict[str, Any]:
    file = path / _EXTRA
    extra = _json_file(file)
    if not isinstance(extra, dict):
        raise ValueError(f"{file} must hold a JSON object (save_checkpoint's extra_state), "
                         f"got {type(extra).__name__}")
    step = checkpoint_step(path)
    if "step" in extra and (type(extra["step"]) is not int or extra["step"] != step):
        raise ValueError(f"{file}: \"step\" must be the checkpoint's step {step} (an int), "
                         f"got {extra['step']!r:.50}")
    for key, types in (expect or {}).items():
        types = types if isinstance(types, tuple) else (types,)
        if key not in extra:
            raise ValueError(f"{file} has no {key!r} (keys: {sorted(extra)}); was it saved by this program?")
        value = extra[key]
        ok = any(type(value) is int if t is int else
                 isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
                 isinstance(value, t) for t in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{file}: {key!r} must be {names}, got {type(value).__name__} {value!r:.50}")
    return extra


# DCP's metadata types: dataclasses and enums of these modules (not their other classes, e.g. readers).
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name (TensorProperties)
    ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                               "PureWindowsPath")),  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict globals ("Restricting Globals" in the pickle docs): only the
    types DCP's `.metadata` is made of resolve; any other global (os.system, builtins.eval, ...) raises."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_METADATA_MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and obj.__module__ == module and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a checkpoint metadata type")


def _check_dcp_files(path: Path) -> None:
    """Raises ValueError unless every pickle DCP will read from `path` holds only allowed types."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    refused = ("refused to load: a pickle can run code when loaded, and this one holds more than "
               "checkpoint data (tampered with, or not written by torch.distributed.checkpoint)")
    meta_file = path / ".metadata"
    # DCP reads `.metadata`, and `__<rank>.metadata` when that fails (save_checkpoint writes none): all
    for file in (meta_file, *sorted(path.glob("__*.metadata"))):
        try:
            with open(file, "rb") as f:
                loaded = _MetadataUnpickler(f).load()
        except OSError as e:
            raise ValueError(f"{file} cannot be read: {e}") from e
        except Exception as e:  # any unpickling failure is a refusal
            raise ValueError(f"{file}: {e}; {refused}") from e
        if not isinstance(loaded, Metadata) or not isinstance(loaded.storage_data, dict):
            raise ValueError(f"{file} holds a {type(loaded).__name__}, not DCP metadata; {refused}")
        if file == meta_file:
            meta = loaded
    shards: dict[str, bytes] = {}
    for index, info in meta.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not (isinstance(rel, str) and rel and "/" not in rel and "\\" not in rel and rel not in (".", "..")
                and (path / rel).is_file()):
            raise ValueError(f"{meta_file}: entry {getattr(index, 'fqn', index)!r} points to {rel!r}, not a "
                             f"file of {path}; {refused}")
        if not isinstance(meta.state_dict_metadata.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue  # tensors: DCP loads them with torch.load(weights_only=True) itself
        if info.transform_descriptors:
            raise ValueError(f"{meta_file}: entry {index.fqn!r} is stored with transforms "
                             f"{info.transform_descriptors!r}, which save_checkpoint never writes; {refused}")
        if rel not in shards:
            shards[rel] = (path / rel).read_bytes()
        blob = shards[rel][info.offset : info.offset + info.length]
        try:
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as e:  # whatever fails, the entry is refused
            raise ValueError(
                f"{path / rel}: entry {index.fqn!r} does not load with torch.load(weights_only=True) ({e}); "
                f"{refused}. If you wrote it yourself with a custom type in the optimizer's param_groups, "
                f"allow that type with torch.serialization.add_safe_globals") from e
    for rng in sorted(path.glob("rng-rank-*.pt")):
        try:
            torch.load(rng, weights_only=True)
        except Exception as e:  # whatever fails, the entry is refused
            raise ValueError(f"{rng} does not load with torch.load(weights_only=True) ({e}); {refused}") from e


# ---- HF export ------------------------------------------------------------------------------------------
def export_hf(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes the model as an HF directory (config, safetensors, optional tokenizer) on rank 0.

    Collective: every rank calls it. The full weights are gathered from FSDP2 shards to rank 0's CPU
    (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), cast to `dtype` if given, and
    written by transformers' `save_pretrained` (which drops the aliases of tied weights, e.g. lm_head
    tied to embed_tokens, and undoes transformers' load-time weight conversions), so that
    `AutoModelForCausalLM.from_pretrained(out_dir)` and vLLM load it. Atomic: written to a temporary
    sibling directory, then renamed to `out_dir` (an existing `out_dir` is replaced). `model` must be a
    transformers `PreTrainedModel` (possibly `fully_shard`-ed). Returns `out_dir`.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    out_dir = Path(out_dir)
    from rlprims.parallel.fsdp import offloaded_to_cpu

    full = _full_state_dict(model, through_buckets=offloaded_to_cpu(model))
    error = None
    if _rank() == 0:
        try:
            _write_hf(model, full, out_dir, tokenizer=tokenizer, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"export_hf: writing {out_dir} failed: {e!r}"
    del full
    _broadcast_error(error)
    return out_dir


def _full_state_dict(model: torch.nn.Module, *, through_buckets: bool) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU ({} elsewhere). through_buckets: gathered bucket by bucket on the
    mesh's device (`weight_buckets`; FSDP2 CPU offload on GPUs, whose CPU shards an NCCL-only group
    cannot all-gather), else torch's `get_model_state_dict`. The former leaves a tied alias (lm_head
    tied to embed_tokens) out, which save_pretrained drops anyway."""
    if not through_buckets:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    from rlprims.parallel.buckets import weight_buckets

    full: dict[str, torch.Tensor] = {}
    for bucket in weight_buckets(model):
        if _rank() == 0:
            full.update((name, t.cpu()) for name, t in bucket)
        del bucket
    return full


def _write_hf(model, full: dict[str, torch.Tensor], out_dir: Path, *, tokenizer, dtype) -> None:
    # Gathered tensors are separate copies; alias the names that share one parameter in the model again
    # (tied embeddings) so that save_pretrained recognises and drops the duplicate, as for an unsharded
    # model. Casting goes through the same memo so that aliases stay aliases.
    alias_of: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias_of[name] = first_name.setdefault(id(p), name)
    cast: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        src = alias_of.get(name, name)
        if src not in cast:
            t = full[src] if src in full else t
            cast[src] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        state[name] = cast[src]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{_TMP_PREFIX}{out_dir.name}"
    old = out_dir.parent / f"{_TRASH_PREFIX}{out_dir.name}"
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state)
    if dtype is not None:  # save_pretrained records the dtype of the in-memory model; record the file's
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
