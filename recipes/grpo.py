"""GRPO: group-relative policy optimization with the vLLM engine embedded in each training process.

Shao et al. 2024, arXiv:2402.03300. Each step every rank samples `group_size` responses per prompt with
its in-process engine, scores them, standardizes scores per group (`grpo_advantages`), takes one clipped
policy-gradient step over all ranks' tokens, and pushes the new weights into its engine in place.

Launch (defaults: the embedded SmolLM2-135M-Instruct and the embedded arithmetic task, no downloads):
  python recipes/grpo.py                                   # one process
  torchrun --nproc-per-node 2 recipes/grpo.py              # data parallel, one engine per rank
  python recipes/grpo.py --model DIR --train-files train.parquet --val-files test.parquet
  python recipes/grpo.py --compute-dtype bfloat16 --compile-engine yes ...   # on GPUs
Every Args field is a flag. Measured (docs/grpo.md): ~25 s a default step on 2 CPU cores; 3.6 s a step
of 32 prompts x 8 samples on one H100.

Deliberate departures from the paper / verl:
- One policy update per batch (verl's ppo_epochs=1, one mini-batch), so the "old" policy is the current
  one: old_logprobs = logprobs.detach() and the ratio is 1 at the update (the clip never binds). The
  engine's own log-probs are still compared with the trainer's every step (`rollout_corr/*`).
- Token-mean aggregation with the normalizer of the whole step (all micro-batches and ranks), so the
  gradient does not depend on how the batch was split (verl's legacy actor did depend on it).
- No KL term by default (kl_coef=0, as DAPO and Dr.GRPO); verl's GRPO example uses k3 with 0.001.
- Data parallelism all-reduces gradients explicitly (small models); FSDP2 sharding is a separate issue.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlprims.data import arithmetic_rows, chat_prompt_ids, read_verl_parquet
from rlprims.models.packed import register_packed_attention, response_logprobs_and_entropy
from rlprims.ops import (
    aggregate_token_mean,
    grpo_advantages,
    kl_k3,
    masked_mean,
    micro_batch_partition,
    num_micro_batches,
    ppo_clip_loss,
    rollout_correction_metrics,
)
from rlprims.parallel import all_reduce_scalars, step_loss_normalizers
from rlprims.rewards import compute_score
from rlprims.rollout import create_engine, default_model_path, generate, update_weights


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet of prompts; empty = the embedded arithmetic task (generated, seed 0)."""
    val_files: str = ""
    """verl-schema parquet scored greedily before and after training; empty = arithmetic (seed 1)."""
    max_operand: int = 20
    """Embedded task only: operands in [0, max_operand]; 20 gives SmolLM2-135M ~20% at temperature 1."""
    out_dir: str = "runs/grpo"
    """Where metrics.jsonl and the final checkpoint go."""
    steps: int = 20
    """Policy updates."""
    prompts_per_rank: int = 4
    """Prompts each rank samples per step; the step's batch is world_size x prompts_per_rank groups."""
    group_size: int = 8
    """Responses per prompt (GRPO's G)."""
    max_prompt_len: int = 128
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts), with a count."""
    max_response_len: int = 64
    """Sampling stops here; such responses count as truncated (response_length/clip_ratio)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 2e-6
    """AdamW learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    clip_low: float = 0.2
    """PPO clip ε_low."""
    clip_high: float = 0.28
    """PPO clip ε_high (DAPO's clip-higher)."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL to the initial policy as a loss; 0 = no reference model."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one forward/backward (verl's dynamic batch size)."""
    dtype: str = "float32"
    """Dtype of the trainer's weights and optimizer state (the master copy)."""
    compute_dtype: str = ""
    """Engine dtype and the trainer's autocast dtype; empty = dtype. On GPUs use bfloat16 (then the
    packed attention takes torch's varlen kernel); on CPUs float32."""
    compile_engine: str = "no"
    """yes = let vLLM compile and capture CUDA graphs (slower start, faster decoding); no = eager."""
    kv_cache_gb: float = 1.0
    """KV cache each engine reserves (CPU: from RAM)."""
    val_prompts: int = 64
    """Held-out prompts scored greedily before the first and after the last step (0 = skip)."""
    seed: int = 0
    """Seeds data order, sampling and the engine."""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Args):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return Args(**vars(parser.parse_args()))


def main(args: Args) -> None:
    # ---- setup: ranks, engine, trainer, data -------------------------------------------------------
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    model_dir = args.model or default_model_path()
    max_model_len = args.max_prompt_len + args.max_response_len
    compute_dtype = args.compute_dtype or args.dtype
    engine = create_engine(model_dir, max_model_len=max_model_len, dtype=compute_dtype, seed=args.seed,
                           kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
                           enforce_eager=args.compile_engine != "yes")
    torch.manual_seed(args.seed + rank)  # after the engine, which seeds the global RNGs itself

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype,
                                                 attn_implementation=register_packed_attention())
    model.to(device).train()
    autocast = torch.autocast(device.type, dtype=getattr(torch, compute_dtype),
                              enabled=compute_dtype != args.dtype)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    rows = (read_verl_parquet(args.train_files) if args.train_files
            else arithmetic_rows(4096, seed=0, max_operand=args.max_operand))
    val_rows = (read_verl_parquet(args.val_files) if args.val_files
                else arithmetic_rows(args.val_prompts, seed=1, max_operand=args.max_operand, split="test"))
    data = chat_prompt_ids(tokenizer, rows, max_len=args.max_prompt_len)
    val = chat_prompt_ids(tokenizer, val_rows[: args.val_prompts], max_len=args.max_prompt_len)
    if len(data) < args.prompts_per_rank * world:
        raise ValueError(f"{len(data)} prompts fit max_prompt_len={args.max_prompt_len}; a step needs "
                         f"{args.prompts_per_rank * world}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    out_dir = Path(args.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"dropped {len(rows) - len(data)} of {len(rows)} prompts (> {args.max_prompt_len} tokens)")

    def score(batch, group_rows):
        texts = tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(batch.response_ids.tolist(), batch.response_lengths.tolist())],
            skip_special_tokens=True)
        values = [compute_score(r["data_source"], t, r["reward_model"]["ground_truth"], r.get("extra_info"))
                  for r, t in zip(group_rows, texts)]
        return torch.tensor(values, dtype=torch.float32, device=device)

    def validate() -> dict[str, float]:
        """Greedy accuracy on the held-out prompts, split across ranks (every rank joins the reduce)."""
        mine, correct = val[rank::world], 0.0
        if mine:
            batch = generate(engine, [ids for ids, _ in mine], n=1, temperature=0.0,
                             max_tokens=args.max_response_len, pad_token_id=pad_id)
            correct = score(batch, [r for _, r in mine]).sum().item()
        total = all_reduce_scalars({"correct": correct, "n": float(len(mine))}, mean=False, device=device)
        name = f"val-core/{val[0][1]['data_source']}/acc/mean@1" if val else "val-core/acc/mean@1"
        return {name: total["correct"] / max(total["n"], 1.0)}

    log = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    if args.val_prompts:
        initial = validate()
        if rank == 0:
            print(json.dumps({"step": 0, **initial}))
            print(json.dumps({"step": 0, **initial}), file=log, flush=True)

    for step in range(1, args.steps + 1):
        t_step = time.perf_counter()
        # ---- rollout: this rank's prompts, group_size samples each, groups contiguous -----------------
        start = ((step - 1) * world + rank) * args.prompts_per_rank
        picked = [data[order[(start + i) % len(data)]] for i in range(args.prompts_per_rank)]
        t0 = time.perf_counter()
        batch = generate(engine, [ids for ids, _ in picked], n=args.group_size, temperature=args.temperature,
                         max_tokens=args.max_response_len, seed=args.seed + 1_000_003 * step + 7919 * rank,
                         pad_token_id=pad_id)
        t_gen = time.perf_counter() - t0
        batch = type(batch)(*(t.to(device) for t in batch))

        # ---- reward: one scalar per response ----------------------------------------------------------
        t0 = time.perf_counter()
        scores = score(batch, [row for _, row in picked for _ in range(args.group_size)])
        t_reward = time.perf_counter() - t0

        # ---- advantages: standardized within each group, broadcast over the response tokens -----------
        mask = batch.response_mask
        advantages = grpo_advantages(scores, mask, group_size=args.group_size)

        # ---- update: one step over all micro-batches of all ranks, step-wide normalizer ---------------
        t0 = time.perf_counter()
        P = batch.prompt_ids.shape[1]
        input_ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
        attention = torch.cat([batch.prompt_mask, mask], 1)
        full_resp = torch.cat([torch.zeros_like(batch.prompt_mask), mask], 1)
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        budget = args.max_tokens_per_micro_batch
        k = torch.tensor(num_micro_batches(lengths, max_tokens=budget), device=device)
        if world > 1:
            dist.all_reduce(k, op=dist.ReduceOp.MAX)  # every rank runs the same number of passes
        parts = micro_batch_partition(lengths, max_tokens=budget, min_micro_batches=int(k))
        norms = step_loss_normalizers([mask[p] for p in parts])
        # this rank's share of step-wide token means: summed over ranks they are the step's values
        stats = dict.fromkeys(("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/pg_clipfrac",
                               "actor/ppo_kl"), 0.0)
        trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
        for part in parts:
            if not part:
                continue
            idx = torch.tensor(part, device=device)
            with autocast:
                out = response_logprobs_and_entropy(model, input_ids[idx], attention[idx], full_resp[idx],
                                                    temperature=args.temperature)
            logprobs, entropy = out.logprobs[:, P:], out.entropy[:, P:].detach()
            m = mask[idx]
            pg = ppo_clip_loss(logprobs, logprobs.detach(), advantages[idx], m,
                               clip_low=args.clip_low, clip_high=args.clip_high)
            loss = pg_loss = aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
            if ref_model is not None:
                with torch.no_grad(), autocast:
                    ref = response_logprobs_and_entropy(ref_model, input_ids[idx], attention[idx],
                                                        full_resp[idx], temperature=args.temperature)
                ref = ref.logprobs[:, P:]
                kl = aggregate_token_mean(kl_k3(logprobs, ref), m, num_tokens=norms.num_tokens)
                loss = loss + args.kl_coef * kl
                stats["actor/kl_loss"] += kl.item()
            loss.backward()
            share = m.sum().item() / max(norms.num_tokens.item(), 1)  # this part's share of the step's tokens
            stats["actor/pg_loss"] += pg_loss.item()
            stats["actor/entropy"] += aggregate_token_mean(entropy, m, num_tokens=norms.num_tokens).item()
            stats["actor/pg_clipfrac"] += pg.metrics["pg_clipfrac"].item() * share
            stats["actor/ppo_kl"] += pg.metrics["ppo_kl"].item() * share
            trainer_logprobs[idx] = logprobs.detach()
        if world > 1:  # sum, not mean: each rank's loss is already divided by the step-wide token count
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0

        # ---- push the new weights into this rank's engine, in place ----------------------------------
        t0 = time.perf_counter()
        update_weights(engine, {name: t.detach() for name, t in model.state_dict().items()})
        t_push = time.perf_counter() - t0

        # ---- log ----------------------------------------------------------------------------------------
        lens = batch.response_lengths.float()
        corr = rollout_correction_metrics(trainer_logprobs, batch.rollout_logprobs, mask)
        local = {
            **{f"critic/score/{f}": getattr(scores, f)().item() for f in ("mean", "max", "min")},
            **{f"response_length/{f}": getattr(lens, f)().item() for f in ("mean", "max", "min")},
            "response_length/clip_ratio": (lens >= args.max_response_len).float().mean().item(),
            "critic/advantages/mean": masked_mean(advantages, mask).item(),
            "actor/grad_norm": grad_norm.item(), "actor/lr": args.lr,
            **{k: corr[k].item() for k in ("rollout_corr/kl", "rollout_corr/training_ppl")},
            "rollout_corr/rollout_ppl": corr["rollout_corr/rollout_ppl"].item(),
            "timing_s/gen": t_gen, "timing_s/reward": t_reward, "timing_s/update_actor": t_update,
            "timing_s/update_weights": t_push, "timing_s/step": time.perf_counter() - t_step,
        }
        metrics = {**all_reduce_scalars(local, mean=True, device=device),
                   **all_reduce_scalars(stats, mean=False, device=device),
                   "perf/total_num_tokens": int(norms.num_tokens)}
        if rank == 0:
            print(json.dumps({"step": step, **metrics}), file=log, flush=True)
            print(f"step {step:4d}  score {metrics['critic/score/mean']:.3f}"
                  f"  len {metrics['response_length/mean']:.1f}"
                  f"  pg_loss {metrics['actor/pg_loss']:+.4f}  entropy {metrics['actor/entropy']:.3f}"
                  f"  grad_norm {metrics['actor/grad_norm']:.3f}"
                  f"  mismatch_kl {metrics['rollout_corr/kl']:.2e}"
                  f"  {metrics['timing_s/step']:.1f}s", flush=True)

    # ---- validate and checkpoint ------------------------------------------------------------------------
    final = validate() if args.val_prompts else {}
    if rank == 0:
        if final:
            print(json.dumps({"step": args.steps, **final}), file=log, flush=True)
        model.save_pretrained(out_dir / "final")
        tokenizer.save_pretrained(out_dir / "final")
        print(f"{json.dumps(final)}\nsaved {out_dir / 'final'}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
    os._exit(0)  # the embedded engine's teardown at exit is slow and can hang; nothing is left to flush
