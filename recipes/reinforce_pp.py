"""REINFORCE++: REINFORCE with a token-level KL reward and batch-whitened returns; embedded vLLM engines.

Hu 2025, arXiv:2501.03262. Each data-parallel rank samples `group_size` responses per prompt; token rewards
are the score on the last response token minus β·(log π_old − log π_ref) on every token (k1,
`kl_in_reward`); a token's advantage is its discounted return-to-go (γ = 1 as verl) whitened over the valid
tokens of the whole step, all ranks together (`dist_reinforce_pp_advantages`); the policy takes the PPO
clipped loss with dual clip. `--baseline true` is REINFORCE++-baseline (verl's
`reinforce_plus_plus_baseline`): the response's total reward minus its group's mean, on every token,
whitened the same way (`dist_reinforce_pp_baseline_advantages`).

Launch (defaults: the embedded SmolLM2-135M-Instruct and arithmetic task; no downloads):
  python recipes/reinforce_pp.py                                # one process
  torchrun --nproc-per-node 2 recipes/reinforce_pp.py           # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/reinforce_pp.py --model DIR --train-files train.parquet \\
      --val-files test.parquet --tp 2 --compile-engine true        # a GPU node: 4 engines of 2 GPUs
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/reinforce_pp.py -- --model DIR ...
Every Args field is a flag (`--help`); a run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from the paper / verl:
- KL in the reward (the paper's design); verl's REINFORCE++ examples use a k2 KL loss (0.001) instead.
- Token-mean loss, step-wide normalizer; with one mini-batch and one epoch (the default) the PPO ratio is 1
  (REINFORCE).
"""

from __future__ import annotations

import copy
import gc
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import AutoTokenizer

from rlprims import ops
from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import SamplerState, next_indices, rl_prompt_sets, sampler_init
from rlprims.launch import RunArgs, fit_to_device, init, parse_args, seed_all, shutdown
from rlprims.metrics import (close_run_log, lock_run_dir, log_generations, log_metrics, open_run_log,
                             perf_metrics, progress, unlock_run_dir)
from rlprims.models.fused import load_model
from rlprims.models.rollout import batch_logprobs, rows_logprobs_and_entropy
from rlprims.parallel import (all_reduce_scalars, build_mesh, dist_batch_metrics, dist_cat_rows,
                              dist_mean_max_min, dist_reinforce_pp_advantages,
                              dist_reinforce_pp_baseline_advantages, dp_rank_and_size, engine_weights,
                              gather_once, optimizer_step, rollout_seed, shard_model, step_loss_normalizers,
                              step_micro_batches)
from rlprims.rewards import check_reward_sources, compute_score, load_reward_fn, reward_pool, score_responses
from rlprims.rollout import (create_engine, decode_responses, default_model_path, generate, sleep_engine,
                             update_weights)
from rlprims.schedules import constant_lr_factor, cosine_lr_factor, is_due
from rlprims.timing import timed
from rlprims.validation import validate, validation_samples


@dataclass
class Args(RunArgs):
    """REINFORCE++'s flags; the shared ones (model, data, optimizer, engine, ...) are RunArgs'."""

    out_dir: str = "runs/reinforce_pp"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    group_size: int = 8
    """Responses per prompt (verl's example: 8); the baseline variant centres within these groups."""
    kl_coef: float = 0.001
    """β of the k1 KL penalty in the token rewards (verl's kl_ctrl.kl_coef); 0 = no reference model."""
    gamma: float = 1.0
    """Discount of the return-to-go (verl's algorithm.gamma)."""
    baseline: bool = False
    """REINFORCE++-baseline: group-mean-centred total reward instead of the discounted return."""
    clip_dual: float = 3.0
    """Dual-clip bound c for negative advantages (verl's clip_ratio_c); 0 = off."""


LR_SCHEDULES = {"constant": constant_lr_factor, "cosine": cosine_lr_factor}  # --lr-schedule


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded trainer (+ reference), data, resume ---------------------------
    ctx = init(seed=args.seed)
    run_lock = lock_run_dir(args.out_dir)  # a second run into the same out_dir fails here, naming this one
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=args.prompts_per_rank * args.group_size)  # device defaults
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), tensor_parallel_size=args.tp,
                           seed=args.seed, **fit.engine_kwargs)  # KV cache, compile, sleep, max_num_seqs
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger)  # packed attention
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.kl_coef > 0 else None
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    dp, (dp_rank, dp_size) = mesh.get_group("dp"), dp_rank_and_size(mesh)  # ranks of one engine: one dp rank
    for m in [m for m in (model, ref_model) if m is not None]:
        shard_model(m, mesh, param_dtype=compute if compute != dtype else None, **fit.shard_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    forward_kw = {"temperature": args.temperature, "share_prefixes": fit.share_prompts,  # trainer log-probs
                  "device": device}  # of a batch kept on the CPU: packed without waiting for the GPU
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else compute_score
    lr_factor = partial(LR_SCHEDULES[args.lr_schedule], warmup_steps=int(args.warmup_ratio * args.steps),
                        total_steps=args.steps, min_lr_ratio=args.min_lr_ratio)

    prompts = rl_prompt_sets(tokenizer, train_files=args.train_files, val_files=args.val_files,
                             val_prompts=args.val_prompts, max_prompt_len=args.max_prompt_len,
                             max_operand=args.max_operand)
    data, val = prompts.train, prompts.val  # (token ids, verl row) pairs
    check_reward_sources(reward_fn, [row["data_source"] for _, row in data + val])
    scorer = reward_pool(reward_fn, timeout_s=args.reward_timeout_s)  # worker processes, calls time-limited
    out_dir = Path(args.out_dir)
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step,
                       wandb_project=args.wandb_project or None, tensorboard=args.tensorboard)

    def sync() -> None:  # streams the full weights, bucket by bucket, into this rank's engine, in place
        update_weights(engine, engine_weights(model, dtype=compute, bucket_bytes=args.sync_bucket_mb << 20))

    def score(batch, batch_rows):  # -> RewardResult: scores, the reward's extra keys, reward/* metrics
        return score_responses(decode_responses(tokenizer, batch), batch_rows, scorer)

    def validation(step: int) -> dict[str, float]:  # every rank joins; the ranks of one engine share prompts
        v = validate(engine, val, score, n=args.val_n, temperature=args.val_temperature, group=dp,
                     max_tokens=args.max_response_len, pad_token_id=pad_id, seed=args.seed + step)
        log_generations(log, step, *validation_samples(v, tokenizer))  # a few: generations.jsonl, trackers
        return v.metrics

    sync()  # the engine starts from the model directory; a resumed trainer is ahead of it
    if step == 0 and args.val_prompts:
        log_metrics(log, 0, validation(0))

    while step < args.steps:
        step += 1
        timing, t_step = {}, time.perf_counter()
        with timed(timing, "gen"):  # ---- rollout: this dp rank's prompts, group_size samples each ----------
            picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=dp_rank,
                                           world_size=dp_size, seed=args.seed)
            seed = rollout_seed(seed=args.seed, step=step, dp_rank=dp_rank, dp_size=dp_size,
                                rows=args.prompts_per_rank * args.group_size)
            batch = generate(engine, [data[i][0] for i in picked], n=args.group_size, seed=seed,
                             temperature=args.temperature, max_tokens=args.max_response_len,
                             pad_token_id=pad_id, progress=rank == 0, logprobs=fit.rollout_logprobs)
            sleep_engine(engine, level=fit.sleep_level)  # frees its memory for the update; the sync wakes it
            host, batch = batch, batch.to(device)  # host: for the forwards (rlprims.models.rollout)
        mask = batch.response_mask
        with timed(timing, "reward"):
            scored = score(batch, [data[i][1] for i in picked for _ in range(args.group_size)])
            scores = scored.scores.to(device)
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        plans = step_micro_batches(lengths, max_tokens=fit.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)  # as many micro-batches on every rank
        on_policy = args.mini_batches == args.epochs == 1

        with timed(timing, "old_log_prob"):  # ---- π_old and π_ref (no grad): the KL reward needs both ----
            logprobs_of = partial(batch_logprobs, batch=host, parts=sum(plans, []), **forward_kw)
            old_logprobs = logprobs_of(model) if not on_policy or ref_model is not None else None
            ref_logprobs = logprobs_of(ref_model) if ref_model is not None else None

        with timed(timing, "adv"):  # ---- token rewards − β k1(π_old, π_ref), whitened over all dp ranks
            token_rewards, kl_metrics = ops.last_token_rewards(scores, mask), {}
            if ref_model is not None:
                kl = ops.kl_k1(old_logprobs, ref_logprobs)
                shaped = ops.kl_in_reward(token_rewards, kl, mask, kl_coef=args.kl_coef)
                token_rewards, kl_metrics = shaped.rewards, shaped.metrics
            rewards = token_rewards.sum(-1)  # r_i − β Σ_t kl_t
            if args.baseline:  # REINFORCE++-baseline: r_i − its group mean, on every response token
                returns = ops.drgrpo_advantages(rewards, mask, group_size=args.group_size)
                advantages = dist_reinforce_pp_baseline_advantages(rewards, mask, group_size=args.group_size,
                                                                   group=dp)
            else:  # REINFORCE++: G_t = r_t + γ G_{t+1}
                result = dist_reinforce_pp_advantages(token_rewards, mask, gamma=args.gamma, group=dp)
                advantages, returns = result.advantages, result.returns

        def micro_batch_loss(part):  # its share of the mini-batch's loss (norms below) and metrics
            logprobs, entropy = rows_logprobs_and_entropy(model, host, part, **forward_kw)
            trainer_logprobs[part] = logprobs.detach()
            m, old = mask[part], logprobs.detach() if on_policy else old_logprobs[part]
            pg = ops.ppo_clip_loss(logprobs, old, advantages[part], m, clip_low=args.clip_low,
                                   clip_high=args.clip_high, clip_dual=args.clip_dual or None)
            pg_loss = ops.aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
            ent = ops.aggregate_token_mean(entropy if args.entropy_coeff else entropy.detach(), m,
                                           num_tokens=norms.num_tokens)
            share = m.sum().item() / norms.num_tokens.item()  # of the mini-batch's token means
            stats = {"actor/pg_loss": pg_loss.item(), "actor/entropy": ent.item()}
            return pg_loss - args.entropy_coeff * ent, stats | {f"actor/{k}": v.item() * share
                                                                for k, v in pg.metrics.items()}

        with timed(timing, "update_actor"):  # ---- epochs x mini-batches, an optimizer step each --------
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(step - 1)
            stats, grad_norms = defaultdict(float), []  # this rank's shares of the step's means
            trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
            updates = args.epochs * len(plans)
            for plan in (p for _ in range(args.epochs) for p in plans):
                norms = step_loss_normalizers([mask[part] for part in plan])
                parts = progress(gather_once(model, plan, enabled=fit.gather_once), total=len(plan),
                                 desc=f"step {step} update", rank=rank)
                norm, sums = optimizer_step(model, optimizer, parts, micro_batch_loss,
                                            max_grad_norm=args.max_grad_norm, step=step)
                grad_norms.append(norm)
                for k, v in sums.items():
                    stats[k] += v / updates
        with timed(timing, "update_weights"):
            sync()

        # ---- log (over the whole step: every dp rank's rows), validate, checkpoint -----------------------
        behaviour = trainer_logprobs if on_policy else old_logprobs  # log π_old of the sampled tokens
        corr = {} if not fit.rollout_logprobs else ops.rollout_correction_metrics(  # engine vs trainer
            *(dist_cat_rows(t, group=dp) for t in (behaviour, batch.rollout_logprobs, mask)))
        timing["timing_s/step"] = time.perf_counter() - t_step
        counts = {k: scored.metrics[k] for k in ("reward/timeouts", "reward/errors")}  # failed reward calls
        counts["perf/total_num_tokens"] = sum(lengths)
        local = timing | {k: v.item() for k, v in kl_metrics.items()}
        metrics = {
            **dist_batch_metrics(scores, rewards, advantages, mask, batch.response_lengths,
                                 max_response_len=args.max_response_len, group=dp),
            **dist_mean_max_min({"critic/returns": (returns, mask)}, group=dp),  # before whitening
            **all_reduce_scalars(stats, mean=False, device=device),  # shares of world-wide normalizers
            **all_reduce_scalars(counts, mean=False, device=device, group=dp),  # over every dp rank
            **all_reduce_scalars(local, mean=True, device=device),
            **{k: v.item() for k, v in corr.items()},
            "actor/lr": optimizer.param_groups[0]["lr"],
            "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        }
        metrics |= perf_metrics(metrics, world_size=world, device=device)
        if args.val_prompts and is_due(step, every=args.val_every, last=args.steps):
            metrics.update(validation(step))
        log_metrics(log, step, metrics)
        if is_due(step, every=args.save_every, last=args.steps):
            save_checkpoint(out_dir / "checkpoints", step, model=model, optimizer=optimizer,
                            extra_state={"step": step, "sampler": sampler.to_dict()},
                            keep_last=args.keep_checkpoints)

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    scorer.close()
    close_run_log(log)
    unlock_run_dir(run_lock)
    engine = None  # vLLM's teardown needs the process group: free the engine first
    gc.collect()
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
