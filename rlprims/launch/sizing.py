"""Defaults fitted to the device: engine compilation, KV cache, sleep, micro-batch tokens, checkpointing.

A recipe's flags that say "0 / None = fit" are resolved here, in one call, from the model's geometry
(its config.json, counted on the meta device: no weights are read) and the GPU's memory:

    fit = fit_to_device(args, model_dir, dist, rows=rows)

On CPU every resolved value is the recipe's historical CPU default (eager engine, 0.5 GiB KV cache, no
sleep, 8,192-token micro-batches, no checkpointing), so CPU runs do not change. On CUDA:

  engine      compiled (torch.compile + CUDA graphs); KV cache = what the rollout batch needs at once
              (rows × max_model_len tokens, +25 %), capped by gpu_memory_utilization × GPU memory minus
              the engine's weights; sleeps at level 2 during the update (weights and KV cache freed;
              `update_weights` wakes it and reloads the weights); schedules up to max(256, rows) sequences
              at once (vLLM's max_num_seqs; its own default on an H100 / H200 is 1,024); asks for the
              sampled tokens' log-probs only where a rollout correction needs them (--rollout-logprobs:
              on an H200 vLLM's log-prob path adds 33 % (max_num_seqs 512) to 85 % (1,024) to generation;
              on CPU they stay on).
  trainer     Liger's fused RMSNorm / RoPE / SwiGLU kernels where liger-kernel is installed and has them
              for the model type (--use-liger; 28 % less activation memory, and faster); micro-batches
              big enough that their GPU work hides the host's per-micro-batch work (~0.15 s on an H200:
              6 · P · T ≥ 6 · 0.4B · 32,768 FLOPs, at least max(16,384, 2 · max_model_len) tokens), with
              activations ≤ a quarter of the GPU (at 0.5B: 32,768 tokens, 45.4 GiB peak on the GRPO
              issue's workload, under TRL's 49.8), or fewer tokens if they do not fit; activation checkpointing only
              when max(16,384, 2 · max_model_len) tokens do not fit without it; parameters gathered
              once per optimizer step (`rlprims.parallel.gather_once`) when that costs ≤ 5 % of the GPU;
              FSDP2 CPU offload when the sharded fp32 state does not fit beside the activations.

The memory model (per rank, bytes; P parameters, L layers, hidden H, MLP width I):
  state         P · (m + m + 2m) / world    m = master-weight bytes (fp32: 4): weights, grads, Adam
  gather_once   6 · P                       bf16 gathered weights + fp32 unsharded gradients
  activations   T · L · (24 H + 7 I) · 1.15 per micro-batch of T tokens, no checkpointing
                T · L · (18 H + 5 I) · 1.15 with Liger's kernels (they keep fewer intermediates)
                T · (4 L H + 2 (24 H + 7 I)) with checkpointing
  reserve       4 GiB + 8 · V · H           CUDA context, allocator slack, LM-head gradient buffers
The activation coefficients come from `benchmarks/micro_batch.py` on an H200 (docs/benchmarks.md: 0.5B
1,478–1,582 KiB/token without checkpointing, 148–161 with; 1.5B 3,093–3,277 and 353): the formula gives
1,497 and 3,127 KiB/token without checkpointing (within 5 %) and 192 and 362 with it (at or above);
0.5B with Liger: 1,077–1,107 measured (2026-12-03), 1,090 from the formula.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch

from rlprims.launch.spmd import Dist

__all__ = ["DeviceFit", "ModelGeometry", "fit_to_device", "fit_to_memory", "model_geometry", "kv_cache_bytes"]

GiB = 1 << 30
CPU_KV_CACHE_BYTES = GiB // 2  # the recipes' CPU default (taken from RAM per engine)
CPU_MICRO_BATCH_TOKENS = 8192  # the recipes' CPU default
MIN_MICRO_BATCH_TOKENS = 16384  # the smallest micro-batch the fit aims for (before memory caps it)
# Host work per micro-batch (Python of the decoder layers, FSDP2 hooks, kernel launches) is ~0.15 s on an
# H200 whatever its size; a 0.5B micro-batch's GPU work exceeds it from ~20k tokens (with Liger's kernels:
# 27 % MFU at 14k-token micro-batches, 39 % at 23k in benchmarks/micro_batch.py, 42 % at 29k in the GRPO
# recipe; docs/benchmarks.md). Micro-batches get at least this much work:
MICRO_BATCH_FLOPS = 6 * 402_000_000 * 32768
# ... unless their activations would take more than this share of the GPU (0.5B with Liger on an H200:
# 32,768 tokens, 45.4 GiB peak on the GRPO issue's workload with expandable segments, which `init` sets;
# without them the caching allocator's fragmentation took the same run to 64.7 GiB)
ACTIVATION_SHARE = 0.25
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelGeometry(NamedTuple):
    """What sizing needs from a causal LM's config (text config for multimodal models)."""

    params: int  # exact parameter count (tied embeddings counted once)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    head_dim: int
    model_type: str = ""  # config.model_type (which fused kernels apply)


class DeviceFit(NamedTuple):
    """The resolved device defaults (see the module docstring for how each is chosen)."""

    enforce_eager: bool  # create_engine(enforce_eager=...)
    kv_cache_bytes: int  # create_engine(kv_cache_memory_bytes=...)
    sleep_level: int  # 0: the engine stays awake during the update; 1 or 2: sleep_engine(level=...)
    max_tokens_per_micro_batch: int
    checkpointing: bool  # shard_model(activation_checkpointing=...)
    gather_once: bool  # shard_model(reshard_after_forward=not ...) and gather_once(..., enabled=...)
    cpu_offload: bool  # shard_model(cpu_offload=...); the model stays on the CPU until sharded
    max_num_seqs: int | None = None  # vLLM's max_num_seqs; None: vLLM's default (CPU)
    rollout_logprobs: bool = True  # generate(logprobs=...): the engine's log-prob of each sampled token
    share_prompts: bool = True  # rows_logprobs*(share_prefixes=...): each group's prompt computed once
    use_liger: bool = False  # load_model(use_liger=...): Liger's fused RMSNorm / RoPE / SwiGLU kernels
    per_layer: bool = True  # shard_model(per_layer=...): each decoder layer its own FSDP2 unit

    @property
    def shard_kwargs(self) -> dict[str, Any]:
        """The trainer's share, as `shard_model` keyword arguments: `shard_model(model, mesh, ...,
        **fit.shard_kwargs)` (activation checkpointing, resharding for `gather_once`, CPU offload, FSDP2
        units)."""
        return dict(activation_checkpointing=self.checkpointing, reshard_after_forward=not self.gather_once,
                    cpu_offload=self.cpu_offload, per_layer=self.per_layer)

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """The engine's share, as `create_engine` keyword arguments: `create_engine(path, ...,
        **fit.engine_kwargs)` (KV cache bytes, eager or compiled, sleep mode, max_num_seqs)."""
        kw: dict[str, Any] = dict(kv_cache_memory_bytes=self.kv_cache_bytes, enforce_eager=self.enforce_eager,
                                  enable_sleep_mode=self.sleep_level > 0)
        if self.max_num_seqs is not None:
            kw["engine_args"] = {"max_num_seqs": self.max_num_seqs}
        return kw


def model_geometry(model_dir: str | os.PathLike[str]) -> ModelGeometry:
    """Geometry of the causal LM in `model_dir` (config.json only; parameters counted on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.fspath(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelGeometry(
        params=params,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        model_type=getattr(config, "model_type", "") or "",
    )


def kv_cache_bytes(
    geometry: ModelGeometry,
    *,
    rows: int,
    max_model_len: int,
    dtype_bytes: int,
    tensor_parallel_size: int,
    budget_bytes: int,
) -> int:
    """KV cache that holds `rows` sequences of `max_model_len` tokens at once (+25 % for block rounding
    and the scheduler's slack, + 64 MiB), capped by `budget_bytes`; per engine rank (heads split by TP).

    bytes/token = 2 (K and V) · layers · kv_heads · head_dim · dtype_bytes / tensor_parallel_size.
    Raises ValueError if the budget does not hold one sequence.
    """
    per_token = 2 * geometry.layers * geometry.kv_heads * geometry.head_dim * dtype_bytes
    per_token = math.ceil(per_token / tensor_parallel_size)
    need = int(1.25 * rows * max_model_len * per_token) + (64 << 20)
    if budget_bytes < max_model_len * per_token:
        raise ValueError(
            f"the engine's memory budget ({budget_bytes / GiB:.2f} GiB after its weights) does not hold one "
            f"sequence of {max_model_len} tokens ({max_model_len * per_token / GiB:.2f} GiB): raise "
            "--gpu-memory-utilization or --tp, or pass --kv-cache-gb"
        )
    return min(need, budget_bytes)


def _activation_bytes_per_token(g: ModelGeometry, checkpointing: bool, liger: bool = False) -> float:
    layer = 24 * g.hidden + 7 * g.intermediate  # bf16 intermediates one decoder layer keeps for backward
    if checkpointing:
        return 4 * g.layers * g.hidden + 2 * layer
    if liger:  # RMSNorm keeps its bf16 input and 1/rms, SwiGLU its two inputs, RoPE nothing
        layer = 18 * g.hidden + 5 * g.intermediate
    return 1.15 * g.layers * layer


def _use_liger(args: Any, *, cuda: bool, available: bool) -> bool:
    """--use-liger, or fit: on CUDA where liger-kernel is installed and has kernels for the model type."""
    explicit = getattr(args, "use_liger", None)
    if explicit and not cuda:
        raise ValueError("--use-liger true: Liger's Triton kernels run on CUDA only (drop it on CPU)")
    return bool(explicit) if explicit is not None else cuda and available


def _flags(args: Any) -> tuple[bool | None, float, int, int, bool | None]:
    """(compile_engine, kv_cache_gb, sleep_level, max_tokens_per_micro_batch, activation_checkpointing)."""
    sleep = int(getattr(args, "sleep_level", -1))
    if sleep not in (-1, 0, 1, 2):
        raise ValueError(f"--sleep-level must be -1 (fit), 0, 1 or 2, got {sleep}")
    return (
        getattr(args, "compile_engine", None),
        float(getattr(args, "kv_cache_gb", 0.0) or 0.0),
        sleep,
        int(getattr(args, "max_tokens_per_micro_batch", 0) or 0),
        getattr(args, "activation_checkpointing", None),
    )


def _rollout_logprobs(args: Any, *, cuda: bool) -> bool:
    """--rollout-logprobs, or fit: needed by a rollout correction (--rollout-is / --rollout-rs), or on CPU."""
    explicit = getattr(args, "rollout_logprobs", None)
    needed = bool(getattr(args, "rollout_is", "") or getattr(args, "rollout_rs", ""))
    if explicit is False and needed:
        raise ValueError("--rollout-logprobs false: --rollout-is / --rollout-rs need the engine's log-probs")
    return bool(explicit) if explicit is not None else needed or not cuda


def _check_host_memory(g: ModelGeometry, host_state: int, host_memory: int | None, master: int,
                       total: int) -> None:
    """Raises unless host_state ≤ 0.8 · host_memory (pinned shards of every rank of the node, bytes)."""
    if host_memory is None or host_state <= 0.8 * host_memory:
        return
    hint = "--dtype bfloat16 (half the state), " if master > 2 else ""
    raise ValueError(
        f"a {g.params / 1e9:.2f}B model's trainer state (weights, gradients, Adam: "
        f"{host_state / GiB:.0f} GiB on this node) does not fit beside the activations on the "
        f"{total / GiB:.0f} GiB GPU, and offloaded to the CPU it would take more than 80 % of the host's "
        f"{host_memory / GiB:.0f} GiB: use {hint}or more GPUs (FSDP2 shards the state across them)"
    )


def _per_layer(args: Any, *, gather_once: bool, cpu_offload: bool) -> bool:
    """--fsdp-per-layer, or fit: per layer."""
    explicit = getattr(args, "fsdp_per_layer", None)
    return True if explicit is None else bool(explicit)


def _share_prompts(args: Any) -> bool:
    """--share-prompts, or fit: on (exact, and never more work; on CUDA it relies on the varlen kernels'
    bottom-right causal alignment, which tests/models/test_packed.py checks with `-m gpu`)."""
    explicit = getattr(args, "share_prompts", None)
    return bool(explicit) if explicit is not None else True


def fit_to_device(args: Any, model_dir: str | os.PathLike[str], dist: Dist, *, rows: int) -> DeviceFit:
    """Resolves a recipe's "fit" flags for `device`; explicit flag values are kept as given.

    Reads these fields of `args` (a `rlprims.launch.RunArgs`; a missing field counts as "fit"):
    compile_engine (None = compile on CUDA), kv_cache_gb (0 = fit), gpu_memory_utilization (the engine's
    share of the GPU: weights + KV cache, as vLLM's), sleep_level (-1 = fit: 2 on CUDA, 0 on CPU),
    max_tokens_per_micro_batch (0 = fit), activation_checkpointing (None = fit), rollout_logprobs (None =
    fit; rollout_is / rollout_rs need them), share_prompts (None = fit: on), max_prompt_len +
    max_response_len (the engine's max_model_len) or max_len (a recipe without an engine), tp, dtype
    (master weights), compute_dtype, cpu_offload (None = fit: when the state takes over half the GPU).
    dist: from `rlprims.launch.init` (its device, and the world size the trainer state is sharded over).
    rows: sequences each engine generates at once (0 for a recipe without an engine).
    """
    compile_engine, kv_gb, sleep, tokens, checkpointing = _flags(args)
    if dist.device.type != "cuda":
        if sleep > 0:
            raise ValueError(f"--sleep-level {sleep}: vLLM's CPU backend has no sleep mode (use 0)")
        if getattr(args, "cpu_offload", None):
            raise ValueError("--cpu-offload true: the trainer runs on the CPU already (nothing to offload)")
        return DeviceFit(
            enforce_eager=compile_engine is not True,
            kv_cache_bytes=int(kv_gb * GiB) if kv_gb > 0 else CPU_KV_CACHE_BYTES,
            sleep_level=0,
            max_tokens_per_micro_batch=tokens or CPU_MICRO_BATCH_TOKENS,
            checkpointing=bool(checkpointing),
            gather_once=False,
            cpu_offload=False,
            rollout_logprobs=_rollout_logprobs(args, cuda=False),
            share_prompts=_share_prompts(args),
            use_liger=_use_liger(args, cuda=False, available=False),
            per_layer=_per_layer(args, gather_once=False, cpu_offload=False),
        )
    from rlprims.models.fused import liger_supports

    total = torch.cuda.get_device_properties(dist.device).total_memory
    g = model_geometry(model_dir)
    return fit_to_memory(args, g, total_memory=total, world_size=dist.world_size, rows=rows,
                         host_memory=host_memory_bytes(), local_world_size=dist.local_world_size,
                         liger_available=liger_supports(g.model_type))


def host_memory_bytes() -> int | None:
    """This machine's physical memory (bytes), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fit_to_memory(
    args: Any, g: ModelGeometry, *, total_memory: int, world_size: int, rows: int,
    host_memory: int | None = None, local_world_size: int = 1, liger_available: bool = False,
) -> DeviceFit:
    """`fit_to_device` for a GPU of `total_memory` bytes and a model of geometry `g` (no device needed).

    host_memory: the machine's RAM in bytes (None = unknown): CPU offload must leave a fifth of it free
    for the `local_world_size` processes' pinned shards, or this raises instead of letting the job be
    killed by the OOM killer mid-run. liger_available: liger-kernel is installed and has kernels for the
    model type (`rlprims.models.fused.liger_supports`); --use-liger unset then means on."""
    total = total_memory
    compile_engine, kv_gb, sleep, tokens, checkpointing = _flags(args)
    tp = int(getattr(args, "tp", 1) or 1)
    max_len = int(getattr(args, "max_len", 0) or 0) or (  # SFT / reward model: their longest conversation
        int(getattr(args, "max_prompt_len", 0)) + int(getattr(args, "max_response_len", 0)))
    compute = getattr(args, "compute_dtype", "") or "bfloat16"
    master = _DTYPE_BYTES.get(getattr(args, "dtype", "float32"), 4)

    # ---- engine: weights + KV cache within gpu_memory_utilization of the GPU --------------------------
    engine_weights = g.params * _DTYPE_BYTES.get(compute, 2) // tp
    sleep = 2 if sleep == -1 and rows else max(sleep, 0)
    kv = 0
    if rows:
        budget = int(float(getattr(args, "gpu_memory_utilization", 0.4)) * total) - engine_weights - GiB
        kv = int(kv_gb * GiB) if kv_gb > 0 else kv_cache_bytes(
            g, rows=rows, max_model_len=max_len, dtype_bytes=_DTYPE_BYTES.get(compute, 2),
            tensor_parallel_size=tp, budget_bytes=budget)
    # what the engine holds during the update: asleep, its CUDA graphs and non-pooled buffers (~2 GiB)
    engine_during_update = (2 * GiB if sleep else engine_weights + kv + 2 * GiB) if rows else 0

    # ---- trainer: state, then activations of micro-batches big enough to keep the GPU busy ------------
    reserve = 4 * GiB + 8 * g.vocab * g.hidden
    usable = int(0.9 * total) - engine_during_update - reserve
    state = g.params * 4 * master // max(world_size, 1)
    # while the engine generates it is awake beside the trainer's state (activations are freed by then)
    beside_engine = state + (engine_weights + kv + 2 * GiB if rows else 0) > int(0.95 * total)
    explicit = getattr(args, "cpu_offload", None)
    cpu_offload = (state > usable // 2 or beside_engine) if explicit is None else bool(explicit)
    if not cpu_offload and beside_engine:
        raise ValueError(
            f"--cpu-offload false: the trainer's state ({state / GiB:.0f} GiB) and the awake engine "
            f"(weights {engine_weights / GiB:.0f} GiB + KV cache {kv / GiB:.0f} GiB) do not fit the "
            f"{total / GiB:.0f} GiB GPU together: offload, lower --gpu-memory-utilization / --kv-cache-gb, "
            "or use more GPUs")
    if cpu_offload:
        _check_host_memory(g, state * local_world_size, host_memory, master, total)
        state = 0
    gather_extra = 6 * g.params
    gather = gather_extra <= 0.05 * total or (cpu_offload and gather_extra <= (usable - state) // 2)
    free = usable - state - (gather_extra if gather else 0)
    liger = _use_liger(args, cuda=True, available=liger_available)
    floor = tokens or max(MIN_MICRO_BATCH_TOKENS, 2 * max_len)
    if checkpointing is None:
        checkpointing = free < floor * _activation_bytes_per_token(g, checkpointing=False, liger=liger)
    per_token = _activation_bytes_per_token(g, checkpointing=bool(checkpointing), liger=liger)
    fit_tokens = int(free // per_token)
    if not tokens:
        busy = math.ceil(MICRO_BATCH_FLOPS / (6 * g.params) / 1024) * 1024  # work that hides the host's
        want = max(floor, min(busy, int(ACTIVATION_SHARE * total // per_token)))
        tokens = max(1024, min(want, fit_tokens) // 1024 * 1024)
    if fit_tokens < max_len:
        raise ValueError(
            f"one sequence of {max_len} tokens does not fit the {free / GiB:.1f} GiB left for activations "
            f"(model {g.params / 1e9:.2f}B parameters, {total / GiB:.0f} GiB GPU): lower "
            "--gpu-memory-utilization, or use more ranks"
        )
    return DeviceFit(
        enforce_eager=compile_engine is False,
        kv_cache_bytes=kv,
        sleep_level=sleep,
        max_tokens_per_micro_batch=tokens,
        checkpointing=bool(checkpointing),
        gather_once=gather,
        cpu_offload=cpu_offload,
        max_num_seqs=max(256, -(-rows // 8) * 8) if rows else None,
        rollout_logprobs=_rollout_logprobs(args, cuda=True),
        share_prompts=_share_prompts(args),
        use_liger=liger,
        per_layer=_per_layer(args, gather_once=gather, cpu_offload=cpu_offload),
    )
