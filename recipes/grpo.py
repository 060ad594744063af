"""GRPO: group-relative policy optimization with a vLLM engine embedded in each training process.

Shao et al. 2024, arXiv:2402.03300. Every step each rank samples `group_size` responses for its prompts
with its in-process engine, scores them, standardizes the scores within each group
(`grpo_advantages`), updates the FSDP2-sharded policy with the clipped surrogate over packed
micro-batches, and streams the new weights into its engine in place (`engine_weights` → `update_weights`).

Launch (defaults: the embedded SmolLM2-135M-Instruct and the embedded arithmetic task; no downloads):
  python recipes/grpo.py                                        # one process
  torchrun --nproc-per-node 2 recipes/grpo.py                   # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/grpo.py --model DIR --train-files train.parquet \
      --val-files test.parquet --compute-dtype bfloat16 --compile-engine true        # a GPU node
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/grpo.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from the paper / verl:
- Token-mean loss with the normalizer of the whole step (all micro-batches, all ranks), so the gradient
  does not depend on how the batch is split (verl's legacy actor did).
- No KL term by default (kl_coef = 0, as DAPO and Dr.GRPO); verl's GRPO example uses k3 with 0.001.
- With one mini-batch and one epoch (the default) the old policy is the current one: old_logprobs =
  logprobs.detach() (ratio 1, the clip never binds) and no separate old-log-prob pass is spent.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import (SamplerState, arithmetic_rows, chat_prompt_ids, next_indices, read_verl_parquet,
                          sampler_init)
from rlprims.launch import init, parse_args, seed_all, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, progress
from rlprims.models.packed import register_packed_attention, response_logprobs, response_logprobs_and_entropy
from rlprims.ops import (aggregate_token_mean, grpo_advantages, kl_k3, masked_mean, ppo_clip_loss,
                         rollout_correction_metrics)
from rlprims.parallel import (all_reduce_scalars, build_mesh, engine_weights, shard_model,
                              step_loss_normalizers, step_micro_batches)
from rlprims.rewards import compute_score, load_reward_fn, score_responses
from rlprims.rollout import (create_engine, decode_responses, default_model_path, generate, rollout_sequences,
                             update_weights)


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet of prompts; empty = the embedded arithmetic task (seed 0)."""
    val_files: str = ""
    """verl-schema parquet scored greedily; empty = the embedded arithmetic task (seed 1)."""
    max_operand: int = 20
    """Embedded task only: operands in [0, max_operand]; 20 gives SmolLM2-135M ~20% at temperature 1."""
    reward_fn: str = ""
    """verl-style compute_score as "module:function" or "file.py:function"; empty = rlprims' own."""
    out_dir: str = "runs/grpo"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 20
    """Rollout + update steps."""
    prompts_per_rank: int = 2
    """Prompts each rank samples per step; a step's batch is world_size x prompts_per_rank groups."""
    group_size: int = 8
    """Responses per prompt (GRPO's G)."""
    max_prompt_len: int = 128
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts), with a count."""
    max_response_len: int = 48
    """Sampling stops here; such responses count as cut (response_length/clip_ratio)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (verl: train_batch_size / ppo_mini_batch_size)."""
    epochs: int = 1
    """Passes over the rollout batch (verl's ppo_epochs)."""
    clip_low: float = 0.2
    """PPO clip ε_low."""
    clip_high: float = 0.28
    """PPO clip ε_high (DAPO's clip-higher)."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL to the initial policy, as a loss; 0 = no reference model."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one forward/backward (verl's dynamic batch size)."""
    dtype: str = "float32"
    """Dtype of the sharded master weights and the optimizer state."""
    compute_dtype: str = ""
    """Engine dtype and FSDP2's forward/backward dtype; empty = bfloat16 on GPUs, else float32."""
    tp: int = 1
    """Tensor-parallel size of each engine (consecutive ranks share one engine)."""
    compile_engine: bool = False
    """Let vLLM compile and capture CUDA graphs (slower start, faster decoding on GPUs)."""
    kv_cache_gb: float = 0.5
    """KV cache each engine reserves (on CPU: taken from RAM)."""
    sync_bucket_mb: int = 256
    """Weight sync: bytes gathered from the FSDP2 shards at a time (bounds its extra memory)."""
    val_prompts: int = 64
    """Held-out prompts scored greedily (0 = no validation)."""
    val_every: int = 10
    """Validate every this many steps, before the first and after the last (0: only those two)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""
    tensorboard: bool = False
    """Also write TensorBoard events to out_dir/tensorboard (needs `pip install tensorboard`)."""
    seed: int = 0
    """Seeds data order, sampling and the engines."""


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded trainer, data, resume -----------------------------------------
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), seed=args.seed,
                           tensor_parallel_size=args.tp, kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
                           enforce_eager=not args.compile_engine)
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=register_packed_attention()).to(device)
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.kl_coef > 0 else None
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    for m in (model, ref_model):
        if m is not None:
            shard_model(m, mesh, param_dtype=compute if compute != dtype else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else compute_score

    rows = (read_verl_parquet(args.train_files) if args.train_files
            else arithmetic_rows(4096, seed=0, max_operand=args.max_operand))
    val_rows = (read_verl_parquet(args.val_files) if args.val_files
                else arithmetic_rows(args.val_prompts, seed=1, max_operand=args.max_operand, split="test"))
    data = chat_prompt_ids(tokenizer, rows, max_len=args.max_prompt_len)
    val = chat_prompt_ids(tokenizer, val_rows[: args.val_prompts], max_len=args.max_prompt_len)
    out_dir = Path(args.out_dir)
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step,
                       wandb_project=args.wandb_project or None, tensorboard=args.tensorboard)
    if rank == 0:
        print(f"{len(data)} of {len(rows)} prompts fit {args.max_prompt_len} tokens; start at step {step}")

    def sync() -> float:  # streams the full weights, bucket by bucket, into this rank's engine
        t0 = time.perf_counter()
        update_weights(engine, engine_weights(model, dtype=compute, bucket_bytes=args.sync_bucket_mb << 20))
        return time.perf_counter() - t0

    def score(batch, batch_rows) -> torch.Tensor:
        return score_responses(decode_responses(tokenizer, batch), batch_rows, reward_fn=reward_fn).to(device)

    def validate() -> dict[str, float]:
        """Greedy accuracy on the held-out prompts, split across engines (every rank joins the reduce)."""
        mine = val[rank // args.tp :: world // args.tp]
        batch = generate(engine, [ids for ids, _ in mine], n=1, temperature=0.0,
                         max_tokens=args.max_response_len, pad_token_id=pad_id)
        right = score(batch, [r for _, r in mine]).sum().item()
        own = rank % args.tp == 0  # one rank of each TP group counts its engine's answers
        total = all_reduce_scalars({"right": right * own, "n": len(mine) * own}, mean=False, device=device)
        return {f"val-core/{val[0][1]['data_source']}/acc/mean@1": total["right"] / max(total["n"], 1.0)}

    sync()  # the engine starts from the model directory; a resumed trainer is ahead of it
    if step == 0 and args.val_prompts:
        log_metrics(log, 0, validate())

    while step < args.steps:
        step += 1
        t_step = time.perf_counter()
        # ---- rollout: this rank's prompts, group_size samples each, groups contiguous -----------------
        picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=rank,
                                       world_size=world, seed=args.seed)
        t0 = time.perf_counter()
        batch = generate(engine, [data[i][0] for i in picked], n=args.group_size,
                         temperature=args.temperature, max_tokens=args.max_response_len, pad_token_id=pad_id,
                         seed=(args.seed * 1_000_003 + step) * 4099 + rank // args.tp, progress=rank == 0)
        batch = type(batch)(*(t.to(device) for t in batch))
        t_gen = time.perf_counter() - t0

        # ---- reward and advantages: scores standardized within each group ---------------------------
        t0 = time.perf_counter()
        scores = score(batch, [data[i][1] for i in picked for _ in range(args.group_size)])
        mask = batch.response_mask
        advantages = grpo_advantages(scores, mask, group_size=args.group_size)
        t_reward = time.perf_counter() - t0

        # ---- packed micro-batches of ≤ max_tokens, as many on every rank (FSDP2 gathers in each pass) ----
        P, seqs = batch.prompt_ids.shape[1], rollout_sequences(batch)  # prompt + response, [B, P + R]
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        plans = step_micro_batches(lengths, max_tokens=args.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)

        def logprobs_of(m, part, entropy: bool):
            idx = torch.tensor(part, dtype=torch.long, device=device)
            fn = response_logprobs_and_entropy if entropy else response_logprobs
            out = fn(m, *(t[idx] for t in seqs), temperature=args.temperature)
            return (out.logprobs[:, P:], out.entropy[:, P:]) if entropy else out[:, P:]

        # ---- old / reference log-probs (no grad), only when the loss needs them ------------------------
        t0 = time.perf_counter()
        on_policy = args.mini_batches == 1 and args.epochs == 1
        old_logprobs = torch.zeros_like(batch.rollout_logprobs)
        ref_logprobs = torch.zeros_like(batch.rollout_logprobs)
        with torch.no_grad():
            for part in (p for plan in plans for p in plan):
                if not on_policy:
                    old_logprobs[part] = logprobs_of(model, part, entropy=False)
                if ref_model is not None:
                    ref_logprobs[part] = logprobs_of(ref_model, part, entropy=False)
        t_old = time.perf_counter() - t0

        # ---- update: clipped surrogate, step-wide token-mean per mini-batch, packed micro-batches -----
        t0 = time.perf_counter()
        stats = dict.fromkeys(("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/pg_clipfrac",
                               "actor/ppo_kl"), 0.0) | {"perf/total_num_tokens": float(sum(lengths))}
        grad_norms = []
        trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
        updates = args.epochs * len(plans)
        for plan in (p for _ in range(args.epochs) for p in plans):
            norms = step_loss_normalizers([mask[part] for part in plan])
            for part in progress(plan, desc=f"step {step} update", rank=rank):
                logprobs, entropy = logprobs_of(model, part, entropy=True)
                m = mask[part]
                old = logprobs.detach() if on_policy else old_logprobs[part]
                pg = ppo_clip_loss(logprobs, old, advantages[part], m, clip_low=args.clip_low,
                                   clip_high=args.clip_high)
                loss = pg_loss = aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
                if ref_model is not None:
                    kl = aggregate_token_mean(kl_k3(logprobs, ref_logprobs[part]), m,
                                              num_tokens=norms.num_tokens)
                    loss = loss + args.kl_coef * kl
                    stats["actor/kl_loss"] += kl.item() / updates
                loss.backward()
                share = m.sum().item() / max(norms.num_tokens.item(), 1) / updates  # of the step's tokens
                stats["actor/pg_loss"] += pg_loss.item() / updates
                ent = aggregate_token_mean(entropy.detach(), m, num_tokens=norms.num_tokens)
                stats["actor/entropy"] += ent.item() / updates
                stats["actor/pg_clipfrac"] += pg.metrics["pg_clipfrac"].item() * share
                stats["actor/ppo_kl"] += pg.metrics["ppo_kl"].item() * share
                trainer_logprobs[part] = logprobs.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # a DTensor
            grad_norms.append(grad_norm.full_tensor().item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0

        # ---- push the new weights into this rank's engine, in place ----------------------------------
        t_sync = sync()

        # ---- log, validate, checkpoint -------------------------------------------------------------
        lens = batch.response_lengths.float()
        behaviour = trainer_logprobs if on_policy else old_logprobs  # log π_old of the sampled tokens
        corr = rollout_correction_metrics(behaviour, batch.rollout_logprobs, mask)
        step_s = time.perf_counter() - t_step
        local = {
            **{f"critic/score/{f}": getattr(scores, f)().item() for f in ("mean", "max", "min")},
            **{f"response_length/{f}": getattr(lens, f)().item() for f in ("mean", "max", "min")},
            "response_length/clip_ratio": (lens >= args.max_response_len).float().mean().item(),
            "critic/advantages/mean": masked_mean(advantages, mask).item(),
            "actor/lr": args.lr, "actor/grad_norm": sum(grad_norms) / len(grad_norms),
            **{k: corr[k].item() for k in ("rollout_corr/kl", "rollout_corr/training_ppl",
                                           "rollout_corr/rollout_ppl")},
            "timing_s/gen": t_gen, "timing_s/reward": t_reward, "timing_s/old_log_prob": t_old,
            "timing_s/update_actor": t_update, "timing_s/sync": t_sync, "timing_s/step": step_s,
        }
        metrics = {**all_reduce_scalars(local, mean=True, device=device),
                   **all_reduce_scalars(stats, mean=False, device=device)}
        metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / metrics["timing_s/step"] / world
        if args.val_prompts and (step == args.steps or (args.val_every and step % args.val_every == 0)):
            metrics.update(validate())
        log_metrics(log, step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(out_dir / "checkpoints", step, model=model, optimizer=optimizer,
                            extra_state={"step": step, "sampler": sampler.to_dict()},
                            keep_last=2)

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    close_run_log(log)
    engine = None  # vLLM's teardown needs the process group: free the engine first
    gc.collect()
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
