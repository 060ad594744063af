"""PPO with a learned critic: clipped surrogate, GAE advantages, clipped value loss.

Schulman et al. 2017, arXiv:1707.06347; GAE: arXiv:1506.02438; the RLHF setting (score at the last
response token, KL to the reference policy in the reward): Ouyang et al. 2022, arXiv:2203.02155.
The critic is the policy's backbone with a fresh scalar head (AutoModelForTokenClassification, num_labels=1,
as verl); the value of response token t is read at the hidden state of token t-1, as log-probs are.

Launch (defaults: the embedded SmolLM2-135M-Instruct and arithmetic task; no downloads):
  python recipes/ppo.py                                         # one process
  torchrun --nproc-per-node 2 recipes/ppo.py                    # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/ppo.py --model DIR --train-files train.parquet \\
      --val-files test.parquet --tp 2 --compile-engine true        # a GPU node: 4 engines of 2 GPUs
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/ppo.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Departures from the paper / verl: both losses are token-means with the normalizer of the whole optimizer
step (all micro-batches, all ranks); advantages are whitened with all ranks' statistics (= verl's batch
whitening); KL in the reward is k1 with a fixed β, off by default (as verl); critic_warmup=K trains only
the critic for K steps (verl starts the actor one step earlier); no critic dropout; the critic is
checkpointed in critic_checkpoints/ (before the actor: every actor checkpoint has its critic).
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
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rlprims import ops
from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import SamplerState, next_indices, rl_prompt_sets, sampler_init
from rlprims.launch import RunArgs, fit_to_device, init, parse_args, seed_all, shutdown
from rlprims.metrics import (close_run_log, lock_run_dir, log_generations, log_metrics, open_run_log,
                             perf_metrics, progress, unlock_run_dir)
from rlprims.models.fused import load_model
from rlprims.models.rollout import batch_logprobs, rows_logprobs_and_entropy
from rlprims.parallel import (all_reduce_scalars, build_mesh, dist_batch_metrics, dist_cat_rows,
                              dist_gae_advantages, dist_masked_var, dist_mean_max_min, dp_rank_and_size,
                              engine_weights, gather_once, optimizer_step, rollout_seed, shard_model,
                              step_loss_normalizers, step_micro_batches)
from rlprims.rewards import check_reward_sources, compute_score, load_reward_fn, reward_pool, score_responses
from rlprims.rollout import (create_engine, decode_responses, default_model_path, generate, rollout_sequences,
                             sleep_engine, update_weights)
from rlprims.schedules import constant_lr_factor, cosine_lr_factor, is_due
from rlprims.timing import timed
from rlprims.validation import validate, validation_samples


@dataclass
class Args(RunArgs):
    """PPO's flags; the shared ones (model, data, optimizer, engine, validation, ...) are RunArgs'."""

    out_dir: str = "runs/ppo"
    """metrics.jsonl, curves.png, checkpoints/, critic_checkpoints/, the exports hf/ and critic_hf/."""
    prompts_per_rank: int = 8
    """Prompts each data-parallel rank samples per step, one response each (the critic is the baseline)."""
    critic_lr: float = 1e-5
    """Critic AdamW learning rate (verl's critic default; the same schedule as lr)."""
    vf_clip: float = 0.5
    """Value clip: V stays within ±vf_clip of the old value (verl's cliprange_value)."""
    gamma: float = 1.0
    """GAE discount γ (verl's default)."""
    lam: float = 1.0
    """GAE λ (verl's default)."""
    kl_coef: float = 0.0
    """β of the per-token KL-in-reward penalty −β·k1(π_old, π_ref); 0 = no reference model."""
    critic_warmup: int = 0
    """The first this many steps update only the critic (the policy and its engine stay put)."""
    mini_batches: int = 2
    """Optimizer steps per batch and epoch, each model (verl: train_batch_size / ppo_mini_batch_size)."""


LR_SCHEDULES = {"constant": constant_lr_factor, "cosine": cosine_lr_factor}  # --lr-schedule


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded actor + critic (+ reference), data, resume ---------------------
    ctx = init(seed=args.seed)
    run_lock = lock_run_dir(args.out_dir)  # a second run into the same out_dir fails here, naming this one
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=args.prompts_per_rank)  # device defaults
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), tensor_parallel_size=args.tp,
                           seed=args.seed, **fit.engine_kwargs)  # KV cache, compile, sleep, max_num_seqs
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts (and the value head is drawn next)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger)  # packed attention
    critic = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger, num_labels=1,
                        auto_class=AutoModelForTokenClassification)  # backbone + a fresh Linear(H, 1) head
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.kl_coef > 0 else None
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    dp, (dp_rank, dp_size) = mesh.get_group("dp"), dp_rank_and_size(mesh)  # ranks of one engine: one dp rank
    for m in [m for m in (model, critic, ref_model) if m is not None]:
        shard_model(m, mesh, param_dtype=compute if compute != dtype else None, **fit.shard_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    forward_kw = {"temperature": args.temperature, "share_prefixes": fit.share_prompts,  # trainer log-probs
                  "device": device}  # of a batch kept on the CPU: packed without waiting for the GPU
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=0.0)
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
    actor_root, critic_root = out_dir / "checkpoints", out_dir / "critic_checkpoints"
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(actor_root)) is not None:
        load_checkpoint(critic_root / ckpt.name, model=critic, optimizer=critic_opt)
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)  # second: its RNG states stay
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

    def values_of(batch, part) -> torch.Tensor:
        """V(response token t) = head(h_{t-1}): one packed forward of the critic, read one column left."""
        seqs, p = rollout_sequences(batch), batch.prompt_ids.shape[1]
        packed = ops.pack_sequences(seqs.input_ids[part], seqs.attention_mask[part])
        out = critic(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None],
                     cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens, use_cache=False,
                     max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
        return ops.unpack_values(out.logits[0, :, 0].float(), packed)[:, p - 1 : -1]

    sync()  # the engine starts from the model directory; a resumed trainer is ahead of it
    if step == 0 and args.val_prompts:
        log_metrics(log, 0, validation(0))

    while step < args.steps:
        step += 1
        timing, t_step = {}, time.perf_counter()
        with timed(timing, "gen"):  # ---- rollout: this dp rank's prompts, one response each ---------------
            picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=dp_rank,
                                           world_size=dp_size, seed=args.seed)
            seed = rollout_seed(seed=args.seed, step=step, dp_rank=dp_rank, dp_size=dp_size,
                                rows=args.prompts_per_rank)
            batch = generate(engine, [data[i][0] for i in picked], n=1, seed=seed, pad_token_id=pad_id,
                             temperature=args.temperature, max_tokens=args.max_response_len,
                             progress=rank == 0, logprobs=fit.rollout_logprobs)
            sleep_engine(engine, level=fit.sleep_level)  # frees its memory for the update; the sync wakes it
            host, batch = batch, batch.to(device)  # host: for the forwards (rlprims.models.rollout)
        mask = batch.response_mask
        with timed(timing, "reward"):
            scored = score(batch, [data[i][1] for i in picked])
            scores = scored.scores.to(device)
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        plans = step_micro_batches(lengths, max_tokens=fit.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)  # as many micro-batches on every rank
        every_part = [p for plan in plans for p in plan]

        with timed(timing, "old_log_prob"):  # ---- old log-probs, old values, reference log-probs ----------
            old_logprobs = batch_logprobs(model, host, every_part, **forward_kw)
            ref_logprobs = batch_logprobs(ref_model, host, every_part, **forward_kw) \
                if ref_model is not None else None
            old_values = torch.zeros_like(old_logprobs)
            with torch.no_grad():
                for part in every_part:
                    old_values[part] = values_of(batch, part)

        with timed(timing, "adv"):  # ---- token rewards (score − β·KL) → GAE, whitened over dp ranks
            rewards, kl_metrics = ops.last_token_rewards(scores, mask), {}
            if ref_model is not None:
                kl = ops.kl_k1(old_logprobs, ref_logprobs)
                shaped = ops.kl_in_reward(rewards, kl, mask, kl_coef=args.kl_coef)
                rewards, kl_metrics = shaped.rewards, shaped.metrics
            gae = dist_gae_advantages(rewards, old_values, mask, gamma=args.gamma, lam=args.lam, group=dp)
            advantages, returns = gae.advantages, gae.returns

        def critic_loss(part):  # its share of the mini-batch's value loss (norms below) and metrics
            m = mask[part]
            values = values_of(batch, part)
            vf = ops.value_loss(values, old_values[part], returns[part], m, clip_range=args.vf_clip)
            loss = ops.aggregate_token_mean(vf.loss, m, num_tokens=norms.num_tokens)
            share = m.sum().item() / norms.num_tokens.item()  # of the mini-batch's token means
            vpred, clipfrac = ops.masked_mean(values.detach(), m), vf.metrics["vf_clipfrac"]
            return loss, {"critic/vf_loss": loss.item(), "critic/vf_clipfrac": clipfrac.item() * share,
                          "critic/vpred_mean": vpred.item() * share}

        def actor_loss(part):  # its share of the mini-batch's policy loss (norms below) and metrics
            logprobs, entropy = rows_logprobs_and_entropy(model, host, part, **forward_kw)
            m = mask[part]
            pg = ops.ppo_clip_loss(logprobs, old_logprobs[part], advantages[part], m, clip_low=args.clip_low,
                                   clip_high=args.clip_high, clip_dual=args.clip_dual or None)
            pg_loss = ops.aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
            ent = ops.aggregate_token_mean(entropy if args.entropy_coeff else entropy.detach(), m,
                                           num_tokens=norms.num_tokens)
            share = m.sum().item() / norms.num_tokens.item()
            stats = {"actor/pg_loss": pg_loss.item(), "actor/entropy": ent.item()}
            return pg_loss - args.entropy_coeff * ent, stats | {f"actor/{k}": v.item() * share
                                                                for k, v in pg.metrics.items()}

        stats, grad_norms = defaultdict(float), defaultdict(list)  # this rank's shares of the step's means
        updates = args.epochs * len(plans)
        for name, net, opt, loss_fn, base_lr in (("critic", critic, critic_opt, critic_loss, args.critic_lr),
                                                 ("actor", model, optimizer, actor_loss, args.lr)):
            if name == "actor" and step <= args.critic_warmup:
                continue  # warm-up: the policy and its engine stay put
            with timed(timing, f"update_{name}"):  # ---- epochs x mini-batches, an optimizer step each ----
                for group in opt.param_groups:
                    group["lr"] = base_lr * lr_factor(step - 1)
                for plan in (p for _ in range(args.epochs) for p in plans):
                    norms = step_loss_normalizers([mask[part] for part in plan])
                    parts = progress(gather_once(net, plan, enabled=fit.gather_once), total=len(plan),
                                     desc=f"step {step} {name}", rank=rank)
                    norm, sums = optimizer_step(net, opt, parts, loss_fn, max_grad_norm=args.max_grad_norm,
                                                step=step)
                    grad_norms[name].append(norm)
                    for k, v in sums.items():
                        stats[k] += v / updates
        with timed(timing, "update_weights"):
            sync()  # the engine slept through the update (on GPUs): the sync wakes it, new weights or not

        # ---- log (over the whole step: every dp rank's rows), validate, checkpoint -----------------------
        corr = {} if not fit.rollout_logprobs else ops.rollout_correction_metrics(  # engine vs trainer
            *(dist_cat_rows(t, group=dp) for t in (old_logprobs, batch.rollout_logprobs, mask)))
        timing["timing_s/step"] = time.perf_counter() - t_step
        counts = {k: scored.metrics[k] for k in ("reward/timeouts", "reward/errors")}  # failed reward calls
        counts["perf/total_num_tokens"] = sum(lengths)
        local = timing | {k: v.item() for k, v in kl_metrics.items()}
        explained = 1.0 - (dist_masked_var(returns - old_values, mask, group=dp)
                           / (dist_masked_var(returns, mask, group=dp) + 1e-5)).item()
        metrics = {
            **dist_batch_metrics(scores, rewards.sum(-1), advantages, mask, batch.response_lengths,
                                 max_response_len=args.max_response_len, group=dp),
            **dist_mean_max_min({"critic/returns": (returns, mask), "critic/values": (old_values, mask)},
                                group=dp),
            **all_reduce_scalars(stats, mean=False, device=device),  # shares of world-wide normalizers
            **all_reduce_scalars(counts, mean=False, device=device, group=dp),  # over every dp rank
            **all_reduce_scalars(local, mean=True, device=device),
            **{k: v.item() for k, v in corr.items()},
            "critic/vf_explained_var": explained, "critic/lr": critic_opt.param_groups[0]["lr"],
            **{f"{k}/grad_norm": sum(v) / len(v) for k, v in grad_norms.items()},
        }
        if "actor" in grad_norms:
            metrics["actor/lr"] = optimizer.param_groups[0]["lr"]
        metrics |= perf_metrics(metrics, world_size=world, device=device)
        if args.val_prompts and is_due(step, every=args.val_every, last=args.steps):
            metrics.update(validation(step))
        log_metrics(log, step, metrics)
        if is_due(step, every=args.save_every, last=args.steps):
            save_checkpoint(critic_root, step, model=critic, optimizer=critic_opt, extra_state={},
                            keep_last=args.keep_checkpoints)
            save_checkpoint(actor_root, step, model=model, optimizer=optimizer,
                            extra_state={"step": step, "sampler": sampler.to_dict()},
                            keep_last=args.keep_checkpoints)

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    export_hf(critic, out_dir / "critic_hf", tokenizer=tokenizer)
    scorer.close()
    close_run_log(log)
    unlock_run_dir(run_lock)
    engine = None  # vLLM's teardown needs the process group: free the engine first
    gc.collect()
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
