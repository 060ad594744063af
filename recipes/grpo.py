"""GRPO and its family: group-relative policy optimization with a vLLM engine in each training process.

Shao et al. 2024, arXiv:2402.03300. Every step each data-parallel rank samples `group_size` responses
for its prompts with its in-process engine, scores them, turns the scores into advantages, updates the
FSDP2-sharded policy over packed micro-batches, and streams the new weights into its engine in place.
verl's algorithm switches are flags, each a dict below from the flag's value to an rlprims function:
--adv-estimator (GRPO, Dr.GRPO, RLOO, OPO, GPG, pass@k, REINFORCE++-baseline), --policy-loss (PPO clip
with --clip-dual, GSPO, CISPO, SAPO, GMPO, Clip-Cov, KL-Cov), --loss-agg, --kl-estimator with --kl-coef
(a loss, or --kl-in-reward), rollout correction --rollout-is (token / sequence TIS) and --rollout-rs
(rejection on a --rollout-rs-estimator: verl's rollout_rs="seq_mean_k1" is seq_mean with k1).

Launch (defaults: the embedded SmolLM2-135M-Instruct and arithmetic task; no downloads):
  python recipes/grpo.py                                        # one process
  torchrun --nproc-per-node 2 recipes/grpo.py                   # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/grpo.py --model DIR --train-files train.parquet \\
      --val-files test.parquet --tp 2 --compile-engine true        # a GPU node: 4 engines of 2 GPUs
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/grpo.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from the paper / verl:
- Every loss is aggregated with the normalizer of the whole step (all micro-batches, all ranks), so the
  gradient does not depend on how the batch is split (verl's legacy actor did).
- No KL term by default (kl_coef = 0, as DAPO and Dr.GRPO); verl's GRPO example uses k3 with 0.001.
- With one mini-batch, one epoch and no rollout correction (the default) the old policy is the current
  one: old_logprobs = logprobs.detach() (ratio 1) and no separate old-log-prob pass is spent.
- --loss-agg applies to every loss (verl forces seq-mean-token-mean for gspo, sapo, gmpo: pass it for
  verl's numbers); seq-mean-token-sum-norm divides by max_response_len per response (verl: padded length).
"""

from __future__ import annotations

import copy
import gc
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

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
from rlprims.parallel import (all_reduce_means_by_name, all_reduce_scalars, build_mesh, dist_batch_metrics,
                              dist_cat_rows, dist_gpg_advantages, dist_reinforce_pp_baseline_advantages,
                              dp_rank_and_size, engine_weights, gather_once, optimizer_step, rollout_seed,
                              shard_model, step_loss_normalizers, step_micro_batches)
from rlprims.rewards import check_reward_sources, compute_score, load_reward_fn, reward_pool, score_responses
from rlprims.rollout import (create_engine, decode_responses, default_model_path, generate, sleep_engine,
                             update_weights)
from rlprims.schedules import constant_lr_factor, cosine_lr_factor, is_due
from rlprims.timing import timed
from rlprims.validation import validate, validation_samples


@dataclass
class Args(RunArgs):
    """GRPO's flags; the shared ones (model, data, optimizer, engine, validation, ...) are RunArgs'."""

    out_dir: str = "runs/grpo"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    lr: float = 2e-5
    """AdamW learning rate of the policy (the peak of the schedule)."""
    lr_schedule: str = "cosine"
    """After the warmup: "constant" or "cosine" (the main job decays 2e-5 to 0 over its 20 steps)."""
    max_response_len: int = 32
    """Sampling stops here; such responses count as cut (response_length/clip_ratio)."""
    prompts_per_rank: int = 4
    """Prompts each data-parallel rank samples per step (the ranks of one engine share theirs)."""
    group_size: int = 8
    """Responses per prompt (GRPO's G)."""
    adv_estimator: Literal["grpo", "drgrpo", "rloo", "opo", "gpg", "grpo_passk",
                           "reinforce_pp_baseline"] = "grpo"
    """Advantage estimator (verl's adv_estimator), from `advantage_estimators` below."""
    policy_loss: Literal["ppo", "gspo", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov"] = "ppo"
    """Policy loss (verl's policy_loss.loss_mode), from `policy_losses` below."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"
    """Loss aggregation (verl's loss_agg_mode), from `aggregations` below."""
    clip_high: float = 0.28
    """ε_high of the clipped losses (ppo, gspo, cispo, clip_cov; DAPO's clip-higher, verl's default 0.2)."""
    kl_coef: float = 0.0
    """β of the KL to the initial policy (a frozen reference model); 0 = no KL, no reference model."""
    kl_estimator: Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"] = "k3"
    """KL estimator (verl's kl_loss_type / kl_penalty; "+": straight-through), from `KL_ESTIMATORS`."""
    kl_in_reward: bool = False
    """KL in the reward (r − β·Σ_t kl_t, verl's use_kl_in_reward) instead of as a loss term."""
    rollout_is: Literal["", "token", "sequence"] = ""
    """Rollout correction by truncated importance weights ("" = off), from `IS_WEIGHTS` below."""
    rollout_is_threshold: float = 2.0
    """Truncation C of the importance weights (verl's rollout_is_threshold)."""
    rollout_rs: Literal["", "token", "seq_sum", "seq_mean", "seq_max"] = ""
    """Rollout correction by rejection ("" = off): what the bounds apply to, from `REJECTIONS` below."""
    rollout_rs_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Rejection: the per-token mismatch divergence that is bounded, from `MISMATCH` below."""
    rollout_rs_max: float = 0.01
    """Rejection: tokens or sequences whose statistic exceeds this leave the loss mask."""
    rollout_rs_min: float = 0.0
    """Rejection: ... or falls below this (k2, k3 are ≥ 0; set it for the signed k1, e.g. −0.01)."""


def advantage_estimators(group_size: int, group) -> dict:
    """--adv-estimator -> (scores [B], mask [B, T]) -> [B, T]; batch statistics reduce over the dp `group`."""
    return {
        "grpo": partial(ops.grpo_advantages, group_size=group_size),
        "drgrpo": partial(ops.drgrpo_advantages, group_size=group_size),
        "rloo": partial(ops.rloo_advantages, group_size=group_size),
        "opo": partial(ops.opo_advantages, group_size=group_size),
        "gpg": partial(dist_gpg_advantages, group_size=group_size, group=group),
        "grpo_passk": partial(ops.grpo_passk_advantages, group_size=group_size, norm_by_std=True),
        "reinforce_pp_baseline": partial(dist_reinforce_pp_baseline_advantages, group_size=group_size,
                                         group=group),
    }


def policy_losses(clip_low: float, clip_high: float, clip_dual: float) -> dict:
    """--policy-loss -> ops loss (logprobs, old, advantages, mask); verl's defaults, gmpo's paper's ±0.4."""
    clip = dict(clip_low=clip_low, clip_high=clip_high)
    return {
        "ppo": partial(ops.ppo_clip_loss, **clip, clip_dual=clip_dual or None),
        "gspo": partial(ops.gspo_loss, **clip),
        "cispo": partial(ops.cispo_loss, **clip),
        "sapo": partial(ops.sapo_loss, tau_pos=1.0, tau_neg=1.05),
        "gmpo": partial(ops.gmpo_loss, clip_low=0.4, clip_high=0.4),
        "clip_cov": partial(ops.clip_cov_loss, **clip, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0),
        "kl_cov": partial(ops.kl_cov_loss, kl_cov_ratio=2e-4, ppo_kl_coef=0.1),
    }


def aggregations(max_response_len: int) -> dict:
    """--loss-agg (verl's loss_agg_mode) -> (loss [B, T], mask, step-wide LossNormalizers) -> scalar."""
    return {
        "token-mean": lambda x, m, n: ops.aggregate_token_mean(x, m, num_tokens=n.num_tokens),
        "seq-mean-token-sum": lambda x, m, n: ops.aggregate_seq_mean_token_sum(x, m, num_seqs=n.num_seqs),
        "seq-mean-token-mean": lambda x, m, n: ops.aggregate_seq_mean_token_mean(x, m, num_seqs=n.num_seqs),
        "seq-mean-token-sum-norm": lambda x, m, n: ops.aggregate_seq_mean_token_sum_norm(
            x, m, norm=n.num_seqs * max_response_len),
    }


KL_ESTIMATORS = {  # --kl-estimator; "+": the estimator's value with the gradient of k2 (verl)
    "k1": ops.kl_k1, "k2": ops.kl_k2, "k3": ops.kl_k3, "abs": ops.kl_abs,
    "k1+": ops.kl_k1_st, "k3+": ops.kl_k3_st, "abs+": ops.kl_abs_st,
}
IS_WEIGHTS = {"token": ops.token_is_weights, "sequence": ops.sequence_is_weights}  # --rollout-is
IS_METRICS = {"token": ops.token_is_metrics, "sequence": ops.sequence_is_metrics}  # (before truncation)
REJECTIONS = {"token": ops.token_rejection_mask, "seq_sum": ops.seq_sum_rejection_mask,  # --rollout-rs
              "seq_mean": ops.seq_mean_rejection_mask, "seq_max": ops.seq_max_rejection_mask}
MISMATCH = {"k1": ops.mismatch_k1, "k2": ops.mismatch_k2, "k3": ops.mismatch_k3}  # --rollout-rs-estimator
LR_SCHEDULES = {"constant": constant_lr_factor, "cosine": cosine_lr_factor}  # --lr-schedule


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded trainer, data, resume -----------------------------------------
    ctx = init(seed=args.seed)
    run_lock = lock_run_dir(args.out_dir)  # a second run into the same out_dir fails here, naming this one
    rank, world, device, dtype = ctx.rank, ctx.world_size, ctx.device, getattr(torch, args.dtype)
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
    estimate = advantage_estimators(args.group_size, dp)[args.adv_estimator]
    policy_loss = policy_losses(args.clip_low, args.clip_high, args.clip_dual)[args.policy_loss]
    aggregate = aggregations(args.max_response_len)[args.loss_agg]
    lr_factor = partial(LR_SCHEDULES[args.lr_schedule], warmup_steps=int(args.warmup_ratio * args.steps),
                        total_steps=args.steps, min_lr_ratio=args.min_lr_ratio)

    prompts = rl_prompt_sets(tokenizer, train_files=args.train_files, val_files=args.val_files,
                             val_prompts=args.val_prompts, max_prompt_len=args.max_prompt_len,
                             max_operand=args.max_operand)
    data, val = prompts.train, prompts.val  # (token ids, verl row) pairs
    check_reward_sources(reward_fn, [row["data_source"] for _, row in data + val])
    scorer = reward_pool(reward_fn, timeout_s=args.reward_timeout_s)  # worker processes, calls time-limited
    out_dir, step, sampler = Path(args.out_dir), 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step,
                       wandb_project=args.wandb_project or None, tensorboard=args.tensorboard)
    if rank == 0:
        print(f"{prompts.summary(args.max_prompt_len)}; start at step {step}")

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
        with timed(timing, "reward"):  # ---- scores: in the reward workers, each call time-limited -------
            scored = score(batch, [data[i][1] for i in picked for _ in range(args.group_size)])
            scores = scored.scores.to(device)
        # ---- packed micro-batches of ≤ max_tokens, as many on every rank (FSDP2 gathers in each pass) ----
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        plans = step_micro_batches(lengths, max_tokens=fit.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)
        on_policy = args.mini_batches == args.epochs == 1 and not (args.rollout_is or args.rollout_rs)
        with timed(timing, "old_log_prob"):  # ---- old / reference log-probs, only when something needs them
            logprobs_of = partial(batch_logprobs, batch=host, parts=sum(plans, []), **forward_kw)
            need_old = not on_policy or (ref_model is not None and args.kl_in_reward)
            old_logprobs = logprobs_of(model) if need_old else None
            ref_logprobs = logprobs_of(ref_model) if ref_model is not None else None

        # ---- rollout correction: rejection shrinks the loss mask, IS weights scale the per-token loss ----
        loss_mask, is_weights = mask, torch.ones_like(batch.rollout_logprobs)
        if args.rollout_rs:
            reject = partial(REJECTIONS[args.rollout_rs], estimator=MISMATCH[args.rollout_rs_estimator],
                             max_value=args.rollout_rs_max, min_value=args.rollout_rs_min)
            loss_mask = reject(old_logprobs, batch.rollout_logprobs, mask)
        if args.rollout_is:
            is_weights = IS_WEIGHTS[args.rollout_is](old_logprobs, batch.rollout_logprobs, mask,
                                                     clip_max=args.rollout_is_threshold)

        with timed(timing, "adv"):  # ---- rewards (minus β·Σ_t kl_t with --kl-in-reward), advantages ----
            rewards, kl_metrics = scores, {}
            if ref_model is not None and args.kl_in_reward:
                kl = KL_ESTIMATORS[args.kl_estimator](old_logprobs, ref_logprobs)
                token_scores = ops.last_token_rewards(scores, mask)
                shaped = ops.kl_in_reward(token_scores, kl, mask, kl_coef=args.kl_coef)
                rewards, kl_metrics = shaped.rewards.sum(-1), shaped.metrics  # r_i − β Σ_t kl_t
            advantages = estimate(rewards, loss_mask)

        def micro_batch_loss(part):  # its share of the mini-batch's loss (norms below) and metrics
            logprobs, entropy = rows_logprobs_and_entropy(model, host, part, **forward_kw)
            trainer_logprobs[part] = logprobs.detach()
            m, old = loss_mask[part], logprobs.detach() if on_policy else old_logprobs[part]
            pg = policy_loss(logprobs, old, advantages[part], m)
            pg_loss = aggregate(pg.loss * is_weights[part], m, norms)
            ent = aggregate(entropy if args.entropy_coeff else entropy.detach(), m, norms)
            loss = pg_loss - args.entropy_coeff * ent
            share = m.sum().item() / norms.num_tokens.item()  # of the mini-batch's token means
            stats = {"actor/pg_loss": pg_loss.item(), "actor/entropy": ent.item()}
            stats |= {f"actor/{k}": v.item() * share for k, v in pg.metrics.items()}
            if ref_model is None or args.kl_in_reward:
                return loss, stats
            kl_loss = aggregate(KL_ESTIMATORS[args.kl_estimator](logprobs, ref_logprobs[part]), m, norms)
            return loss + args.kl_coef * kl_loss, stats | {"actor/kl_loss": kl_loss.item()}

        with timed(timing, "update_actor"):  # ---- epochs x mini-batches, an optimizer step each --------
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(step - 1)
            stats, grad_norms = defaultdict(float), []  # this rank's shares of the step's means
            trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
            updates = args.epochs * len(plans)
            for plan in (p for _ in range(args.epochs) for p in plans):
                norms = step_loss_normalizers([loss_mask[part] for part in plan])
                if norms.num_tokens.item() == 0:  # every token of this mini-batch rejected, on every rank
                    continue
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
        rows_all = [dist_cat_rows(t, group=dp) for t in (behaviour, batch.rollout_logprobs, mask, loss_mask)]
        corr = {} if not fit.rollout_logprobs else ops.rollout_correction_metrics(  # engine vs trainer
            *rows_all[:3], rows_all[3] if args.rollout_rs else None)
        if args.rollout_is:
            corr |= IS_METRICS[args.rollout_is](*rows_all[:3], clip_max=args.rollout_is_threshold)
        timing["timing_s/step"] = time.perf_counter() - t_step
        counts = {k: scored.metrics[k] for k in ("reward/timeouts", "reward/errors")}  # failed reward calls
        counts["perf/total_num_tokens"] = sum(lengths)
        local = timing | {k: v.item() for k, v in kl_metrics.items()}
        metrics = {
            **dist_batch_metrics(scores, rewards, advantages, loss_mask, batch.response_lengths,
                                 max_response_len=args.max_response_len, group=dp),
            **all_reduce_scalars(stats, mean=False, device=device),  # shares of world-wide normalizers
            **all_reduce_scalars(counts, mean=False, device=device, group=dp),  # over every dp rank
            **all_reduce_scalars(local, mean=True, device=device),
            **all_reduce_means_by_name({k: v for k, v in scored.metrics.items() if k.endswith("/mean")},
                                       group=dp),  # the reward's extra keys (verl's reward_extra_info)
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
