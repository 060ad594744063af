"""DAPO: GRPO with clip-higher, dynamic sampling, token-level loss and overlong reward shaping.

Yu et al. 2025, arXiv:2503.14476. Each step every rank generates rounds of `gen_prompts_per_rank`
prompts x `group_size` responses, drops the groups whose scores are all equal
(`nonzero_variance_group_mask`: their group-relative advantages are 0) and generates more until it holds
`prompts_per_rank` varied groups, for at most `max_gen_rounds` rounds; the ranks agree on the number of
rounds through an all-reduce. Rewards = score + `overlong_penalty`; advantages as GRPO; the clipped
surrogate with ε_low = 0.2, ε_high = 0.28, token-mean over each optimizer step; no KL, no reference model.

  python recipes/dapo.py                                        # one process, embedded model and task
  torchrun --nproc-per-node 2 recipes/dapo.py                   # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/dapo.py --model DIR --train-files f.parquet --compute-dtype bfloat16
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/dapo.py -- --model DIR ...
Flags: `--help`. A run resumes from the newest checkpoint in `out_dir`.

Departures from the paper / verl: each rank fills its own share of the batch (no exchange of samples
between ranks; verl fills one global batch on its driver) and drops kept groups beyond it; after
`max_gen_rounds` a rank still short trains on what it has, padding its batch with dropped groups that
are masked out of the loss (verl raises an error instead); the filter looks at the task score, the
advantages at score + overlong penalty (verl's DAPO example filters on "acc"); the token-mean normalizer
is the whole optimizer step's (all micro-batches, all ranks); old log-probs are always computed (one
extra forward when mini_batches = epochs = 1, where they equal the current ones).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import SamplerState, arithmetic_rows, chat_prompt_ids, next_indices, read_verl_parquet, sampler_init
from rlprims.launch import init, parse_args, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, progress
from rlprims.models.packed import register_packed_attention, response_logprobs, response_logprobs_and_entropy
from rlprims.ops import (aggregate_token_mean, grpo_advantages, masked_mean, micro_batch_partition,
                         nonzero_variance_group_mask, num_micro_batches, overlong_penalty, ppo_clip_loss,
                         rollout_correction_metrics)
from rlprims.parallel import all_reduce_scalars, build_mesh, engine_weights, shard_model, step_loss_normalizers
from rlprims.rewards import compute_score, load_reward_fn
from rlprims.rollout import create_engine, default_model_path, generate, update_weights


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet of prompts; empty = the embedded arithmetic task (seed 0)."""
    max_operand: int = 20
    """Embedded task only: operands in [0, max_operand]."""
    reward_fn: str = ""
    """Reward function "module:function" or "file.py:function" (verl's compute_score signature)."""
    out_dir: str = "runs/dapo"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 20
    """Rollout + update steps."""
    prompts_per_rank: int = 2
    """Groups with varied scores each rank trains on per step (verl's train_batch_size / ranks)."""
    gen_prompts_per_rank: int = 2
    """Prompts each rank samples per generation round (verl's gen_batch_size / ranks)."""
    max_gen_rounds: int = 4
    """Generation rounds per step at most (verl's max_num_gen_batches); all ranks run the same number."""
    group_size: int = 8
    """Responses per prompt."""
    max_prompt_len: int = 128
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts)."""
    max_response_len: int = 48
    """Sampling stops here; such responses count as cut (response_length/clip_ratio)."""
    overlong_buffer_len: int = 16
    """Soft overlong punishment over the last this many tokens before max_response_len (0 = off)."""
    overlong_penalty_factor: float = 1.0
    """Penalty at max_response_len (the paper's 1)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch and epoch (verl: train_batch_size / ppo_mini_batch_size)."""
    epochs: int = 1
    """Passes over the rollout batch (verl's ppo_epochs)."""
    clip_low: float = 0.2
    """PPO clip ε_low."""
    clip_high: float = 0.28
    """PPO clip ε_high (clip-higher)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one forward/backward (verl's dynamic batch size)."""
    compute_dtype: str = "float32"
    """Dtype of the engine and of forward/backward (FSDP2 mixed precision; masters and AdamW stay fp32)."""
    tp: int = 1
    """Tensor-parallel size of each engine (consecutive ranks share one engine and its prompts)."""
    compile_engine: bool = False
    """Let vLLM compile and capture CUDA graphs (slower start, faster decoding on GPUs)."""
    kv_cache_gb: float = 0.5
    """KV cache each engine reserves (on CPU: taken from RAM)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last); the newest 2 are kept."""
    seed: int = 0
    """Seeds data order, sampling and the engines."""


def cat_groups(groups):
    """Rows of several rollout batches as one: prompts left-padded, responses right-padded to the widest."""
    P, R = (max(b[i].shape[1] for b, _ in groups) for i in (0, 2))

    def field(i):
        parts = [b[i][rows] for b, rows in groups]
        if parts[0].dim() == 1:
            return torch.cat(parts)
        return torch.cat([F.pad(t, (P - t.shape[1], 0) if i < 2 else (0, R - t.shape[1])) for t in parts])
    return type(groups[0][0])(*(field(i) for i in range(len(groups[0][0]))))


def global_stats(named: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """verl's `<name>/mean`, `/max`, `/min` of each (values, mask) over the valid entries of all ranks."""
    rows = [torch.stack([x.double() for x in (torch.where(m, v, 0).sum(), m.sum(), torch.where(m, v, -torch.inf).max(),
                                              torch.where(m, -v, -torch.inf).max())]) for v, m in named.values()]
    sums, ext = (t.contiguous() for t in torch.stack(rows).split(2, dim=1))
    dist.all_reduce(sums)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX)
    return {f"{k}/{f}": x for k, (s, n), (hi, lo) in zip(named, sums.tolist(), ext.tolist())
            for f, x in (("mean", s / max(n, 1.0)), ("max", hi), ("min", -lo))}


def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded policy, data, resume --------------------------------------------
    if args.gen_prompts_per_rank * args.max_gen_rounds < args.prompts_per_rank:  # else ranks' batches could differ
        raise ValueError("gen_prompts_per_rank x max_gen_rounds must be >= prompts_per_rank")
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    compute, G = getattr(torch, args.compute_dtype), args.group_size
    model_dir = args.model or default_model_path()
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), seed=args.seed, tensor_parallel_size=args.tp,
                           kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30), enforce_eager=not args.compile_engine)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=register_packed_attention()).to(device)
    shard_model(model, build_mesh(device_type=device.type, tp=args.tp),
                param_dtype=compute if compute != torch.float32 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else compute_score

    rows = (read_verl_parquet(args.train_files) if args.train_files
            else arithmetic_rows(4096, seed=0, max_operand=args.max_operand))
    data = chat_prompt_ids(tokenizer, rows, max_len=args.max_prompt_len)
    out_dir = Path(args.out_dir)
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step)
    update_weights(engine, engine_weights(model, dtype=compute))  # a resumed trainer is ahead of the engine

    while step < args.steps:
        step += 1
        t_step = time.perf_counter()
        # ---- dynamic sampling: rounds until this rank holds prompts_per_rank varied groups ------------
        kept, dropped, rounds, varied, short = [], [], 0, 0, True  # groups: ((batch, rows), scores)
        while short and rounds < args.max_gen_rounds:
            rounds += 1
            picked, sampler = next_indices(sampler, len(data), batch_size=args.gen_prompts_per_rank,
                                           rank=rank // args.tp, world_size=world // args.tp, seed=args.seed)
            seed = ((args.seed * 1_000_003 + step) * 1024 + rank // args.tp) * 2**20 + rounds * 4096  # row r: +r
            batch = generate(engine, [data[i][0] for i in picked], n=G, temperature=args.temperature,
                             max_tokens=args.max_response_len, pad_token_id=pad_id, seed=seed)
            batch = type(batch)(*(t.to(device) for t in batch))
            texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(batch.response_ids.tolist(),
                                                                       batch.response_lengths.tolist())],
                                           skip_special_tokens=True)
            scores = torch.tensor([reward_fn(r["data_source"], t, r["reward_model"]["ground_truth"], r.get("extra_info"))
                                   for r, t in zip((data[i][1] for i in picked for _ in range(G)), texts)],
                                  dtype=torch.float32, device=device)
            keep = nonzero_variance_group_mask(scores, group_size=G)[::G].tolist()
            varied += sum(keep)
            for g, k in enumerate(keep):
                group = ((batch, slice(g * G, (g + 1) * G)), scores[g * G : (g + 1) * G])
                (kept if k and len(kept) < args.prompts_per_rank else dropped).append(group)
            short = torch.tensor([float(len(kept) < args.prompts_per_rank)], device=device)
            dist.all_reduce(short, op=dist.ReduceOp.MAX)  # every rank runs the same number of rounds
        # a rank still short pads with dropped groups that the loss ignores (same shapes, no gradient)
        groups = kept + dropped[: args.prompts_per_rank - len(kept)]
        batch, scores = cat_groups([g for g, _ in groups]), torch.cat([s for _, s in groups])
        train_rows = torch.arange(len(groups) * G, device=device) < len(kept) * G
        t_gen = time.perf_counter() - t_step

        # ---- rewards (score + overlong shaping) and group-relative advantages ----------------------
        mask, lens = batch.response_mask, batch.response_lengths
        loss_mask = mask & train_rows[:, None]
        rewards = scores + (overlong_penalty(lens, max_response_length=args.max_response_len, overlong_buffer_len=
                                             args.overlong_buffer_len, penalty_factor=args.overlong_penalty_factor)
                            if args.overlong_buffer_len else 0.0)
        advantages = grpo_advantages(rewards, mask, group_size=G)

        # ---- micro-batches (the same count on every rank: FSDP2 runs collectives in each pass) --------
        P, B = batch.prompt_ids.shape[1], mask.shape[0]
        input_ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
        attention = torch.cat([batch.prompt_mask, mask], 1)
        full_resp = torch.cat([torch.zeros_like(batch.prompt_mask), mask], 1)
        lengths = (batch.prompt_lengths + lens).tolist()
        minis = [c.tolist() for c in torch.arange(B).chunk(args.mini_batches)]
        budget = args.max_tokens_per_micro_batch
        count = torch.tensor([max(num_micro_batches([lengths[i] for i in mb], max_tokens=budget) for mb in minis)],
                             device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        plans = [[[mb[j] for j in part] for part in micro_batch_partition(
            [lengths[i] for i in mb], max_tokens=budget, min_micro_batches=int(count))]
            for mb in minis]

        def logprobs_of(part, entropy: bool):
            idx = torch.tensor(part, dtype=torch.long, device=device)
            fn = response_logprobs_and_entropy if entropy else response_logprobs
            out = fn(model, input_ids[idx], attention[idx], full_resp[idx], temperature=args.temperature)
            return (out.logprobs[:, P:], out.entropy[:, P:]) if entropy else out[:, P:]

        # ---- old log-probs (no grad), before the first optimizer step -----------------------------------
        t0 = time.perf_counter()
        old_logprobs = torch.zeros_like(batch.rollout_logprobs)
        with torch.no_grad():
            for part in (p for plan in plans for p in plan):
                old_logprobs[part] = logprobs_of(part, entropy=False)
        t_old = time.perf_counter() - t0

        # ---- update: clip-higher surrogate, token-mean over each optimizer step (all ranks) ----------
        t0 = time.perf_counter()
        stats = dict.fromkeys(("actor/pg_loss", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl"), 0.0)
        grad_norms, updates = [], args.epochs * len(plans)
        for plan in (p for _ in range(args.epochs) for p in plans):
            norms = step_loss_normalizers([loss_mask[part] for part in plan])
            if norms.num_tokens.item() == 0:  # no varied group in this mini-batch on any rank: nothing to learn
                continue
            for part in progress(plan, desc=f"step {step} update", rank=rank):
                logprobs, entropy = logprobs_of(part, entropy=True)
                m = loss_mask[part]
                pg = ppo_clip_loss(logprobs, old_logprobs[part], advantages[part], m, clip_low=args.clip_low,
                                   clip_high=args.clip_high)
                loss = aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
                loss.backward()
                share = m.sum().item() / norms.num_tokens.item() / updates  # of the step's token means
                stats["actor/pg_loss"] += loss.item() / updates
                stats["actor/entropy"] += masked_mean(entropy.detach(), m).item() * share
                stats["actor/pg_clipfrac"] += pg.metrics["pg_clipfrac"].item() * share
                stats["actor/ppo_kl"] += pg.metrics["ppo_kl"].item() * share
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # global norm
            grad_norms.append(grad_norm.full_tensor().item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0

        # ---- push the new weights into this rank's engine, in place ----------------------------------
        t0 = time.perf_counter()
        if grad_norms:
            update_weights(engine, engine_weights(model, dtype=compute))
        t_sync = time.perf_counter() - t0

        # ---- log, checkpoint -----------------------------------------------------------------------
        corr = rollout_correction_metrics(old_logprobs, batch.rollout_logprobs, loss_mask)
        local = {
            "actor/lr": args.lr, "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            **{k: corr[k].item() for k in ("rollout_corr/kl", "rollout_corr/training_ppl", "rollout_corr/rollout_ppl")},
            "timing_s/gen": t_gen, "timing_s/old_log_prob": t_old, "timing_s/update_actor": t_update,
            "timing_s/sync": t_sync, "timing_s/step": time.perf_counter() - t_step,
        }
        cut = (lens[train_rows] >= args.max_response_len).sum().item()
        counts = all_reduce_scalars({"kept": len(kept), "varied": varied, "cut": cut}, mean=False, device=device)
        metrics = {**all_reduce_scalars(local, mean=True, device=device),
                   **all_reduce_scalars(stats, mean=False, device=device),
                   "train/num_gen_batches": rounds, "train/num_kept_groups": counts["kept"],
                   "train/varied_group_ratio": counts["varied"] / (rounds * args.gen_prompts_per_rank * world),
                   "response_length/clip_ratio": counts["cut"] / max(counts["kept"] * G, 1),
                   **global_stats({"critic/score": (scores, train_rows), "critic/rewards": (rewards, train_rows),
                                   "critic/advantages": (advantages, loss_mask),
                                   "response_length": (lens.float(), train_rows)})}
        metrics["perf/total_num_tokens"] = all_reduce_scalars({"t": sum(lengths)}, mean=False, device=device)["t"]
        metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / metrics["timing_s/step"] / world
        log_metrics(log, step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(out_dir / "checkpoints", step, model=model, optimizer=optimizer, keep_last=2,
                            extra_state={"step": step, "sampler": sampler.to_dict()})

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    close_run_log(log)
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
    os._exit(0)  # the embedded engine's teardown at interpreter exit is slow and can hang; all is flushed
