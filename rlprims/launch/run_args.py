"""The flags every RL recipe shares, defined once: one vocabulary across grpo, ppo, dapo, rloo, reinforce_pp.

A recipe declares `class Args(RunArgs)` with its algorithm's own fields (and may re-declare a shared one
to change its default, e.g. `out_dir`); `parse_args(Args)` makes every field of both a flag, with the
docstring below as its help. Plain data: nothing here reads or acts on the values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunArgs"]


@dataclass
class RunArgs:
    """Model and data, sampling, optimizer, engine and dtypes, validation, checkpoints, tracking, seed."""

    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet of prompts; empty = the embedded arithmetic task (seed 0)."""
    val_files: str = ""
    """verl-schema parquet of held-out prompts; empty = the embedded arithmetic task (seed 1)."""
    max_operand: int = 20
    """Embedded task only: operands in [0, max_operand]; 20 gives SmolLM2-135M ~20% at temperature 1."""
    reward_fn: str = ""
    """verl-style compute_score as "module:function" or "file.py:function"; empty = rlprims' own."""
    reward_timeout_s: float = 10.0
    """Time limit of one reward call (one response), in a worker process (rlprims.rewards.reward_pool)."""
    out_dir: str = "runs/rl"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 20
    """Rollout + update steps."""
    prompts_per_rank: int = 2
    """Prompts each data-parallel rank samples per step (the ranks of one engine share theirs)."""
    max_prompt_len: int = 128
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts), with a count."""
    max_response_len: int = 48
    """Sampling stops here; such responses count as cut (response_length/clip_ratio)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 1e-5
    """AdamW learning rate of the policy (the peak of the schedule)."""
    lr_schedule: str = "constant"
    """After the warmup: "constant" or "cosine" (verl's warmup_style), rlprims.schedules."""
    warmup_ratio: float = 0.0
    """Fraction of the steps with a linear warmup from 0 (verl's lr_warmup_steps_ratio)."""
    min_lr_ratio: float = 0.0
    """cosine: the learning rate decays to min_lr_ratio · lr at the last step."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    clip_low: float = 0.2
    """PPO clip ε_low: the ratio is clipped to [1 − clip_low, 1 + clip_high] (verl's clip_ratio_low)."""
    clip_high: float = 0.2
    """PPO clip ε_high (verl's clip_ratio_high; DAPO's clip-higher raises it to 0.28)."""
    clip_dual: float = 0.0
    """Dual-clip bound c for negative advantages (verl's clip_ratio_c = 3); 0 = off."""
    entropy_coeff: float = 0.0
    """Entropy bonus: loss −= entropy_coeff · agg(entropy) (verl's entropy_coeff; 0 = off)."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch and epoch (verl: train_batch_size / ppo_mini_batch_size)."""
    epochs: int = 1
    """Passes over the rollout batch (verl's ppo_epochs)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one forward/backward (verl's dynamic batch size); 0 = fit (CPU: 8192; GPU: from
    the model and the GPU's memory, rlprims.launch.sizing)."""
    use_liger: bool | None = None
    """Liger's fused Triton kernels for the trainer's RMSNorms, rotary embedding and SwiGLU (verl's
    use_liger; CUDA only; `pip install liger-kernel`; rlprims.models.fused); unset = on where CUDA and
    liger-kernel are there and it has kernels for the model type."""
    share_prompts: bool | None = None
    """Compute each prompt once for its group's samples in the trainer's forward/backward (exact: same
    values up to fp summation order; rlprims.ops.pack_shared_prefixes); unset = on."""
    activation_checkpointing: bool | None = None
    """Recompute each decoder layer in backward instead of storing it; unset = only where the micro-batch
    would not fit without (GPU; never on CPU)."""
    fsdp_per_layer: bool | None = None
    """Each decoder layer its own FSDP2 unit (gathered and reduced on its own); false: the whole model one
    unit, with less host work per micro-batch (needs gather_once, which the fit picks for small models);
    unset = per layer."""
    cpu_offload: bool | None = None
    """FSDP2 CPU offload of the sharded weights, gradients and optimizer state (the step runs on the CPU);
    unset = fit: only where that state would take over half the GPU (rlprims.launch.sizing)."""
    dtype: str = "float32"
    """Dtype of the sharded master weights and the optimizer state."""
    compute_dtype: str = ""
    """Engine dtype and FSDP2's forward/backward dtype; empty = bfloat16 on GPUs, else float32."""
    tp: int = 1
    """Tensor-parallel size of each engine (consecutive ranks share one engine, its prompts and seeds)."""
    compile_engine: bool | None = None
    """vLLM's torch.compile + CUDA graphs (slower start, faster decoding); unset = on GPUs, not on CPU."""
    kv_cache_gb: float = 0.0
    """KV cache each engine reserves; 0 = fit (CPU: 0.5, from RAM; GPU: the rollout batch's need, capped
    by gpu_memory_utilization)."""
    gpu_memory_utilization: float = 0.4
    """Share of the GPU's memory an engine may take for its weights and KV cache (vLLM's meaning)."""
    sleep_level: int = -1
    """Engine sleep during the update (0 awake, 1 weights to CPU, 2 weights dropped and reloaded by the
    weight sync; KV cache freed in both); -1 = fit (GPU: 2, CPU: 0)."""
    rollout_logprobs: bool | None = None
    """Ask the engine for each sampled token's log-prob (the rollout_corr/* metrics, rollout corrections);
    unset = on CPU; on GPUs only where a correction needs them (they add 33-85 % to generation on an H200)."""
    sync_bucket_mb: int = 256
    """Weight sync: MiB gathered from the FSDP2 shards at a time (bounds its extra memory)."""
    val_prompts: int = 256
    """Held-out prompts to validate on (0 = none; 256 gives a standard error of ~0.03 on an accuracy)."""
    val_n: int = 1
    """Responses sampled per validation prompt: the N of mean@N (and best@N, maj@N when N > 1)."""
    val_temperature: float = 0.0
    """Validation sampling temperature; 0 = greedy (needs val_n = 1)."""
    val_every: int = 10
    """Validate every this many steps, before the first and after the last (0: only those two)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last; -1: never)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""
    tensorboard: bool = False
    """Also write TensorBoard events to out_dir/tensorboard (needs `pip install tensorboard`)."""
    seed: int = 0
    """Seeds data order, sampling, the engines and any freshly initialized weights."""
