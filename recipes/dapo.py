"""DAPO: GRPO with clip-higher, dynamic sampling, token-level loss and overlong reward shaping.

Yu et al. 2025, arXiv:2503.14476. Each step every data-parallel rank generates rounds of
`gen_prompts_per_rank` prompts x `group_size` responses, drops the groups whose scores are all equal
(`nonzero_variance_group_mask`: their group-relative advantages are 0) and generates more until it holds
`prompts_per_rank` varied groups, for at most `max_gen_rounds` rounds; the ranks agree on the number of
rounds through an all-reduce. Rewards = score + `overlong_penalty`; advantages as GRPO; the clipped
surrogate with ε_low = 0.2, ε_high = 0.28, token-mean over each optimizer step; no KL, no reference model.

Launch (defaults: the embedded SmolLM2-135M-Instruct and arithmetic task; no downloads):
  python recipes/dapo.py                                        # one process
  torchrun --nproc-per-node 2 recipes/dapo.py                   # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/dapo.py --model DIR --train-files train.parquet \\
      --val-files test.parquet --tp 2 --compile-engine true        # a GPU node: 4 engines of 2 GPUs
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/dapo.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Departures from the paper / verl: each rank fills its own share of the batch (no exchange of samples
between ranks; verl fills one global batch on its driver) and drops kept groups beyond it; after
`max_gen_rounds` a rank still short trains on what it has, padding its batch with dropped groups that
are masked out of the loss (verl raises an error instead); the filter looks at the task score, the
advantages at score + overlong penalty (verl's DAPO example filters on "acc"); the token-mean normalizer
is the whole optimizer step's (all micro-batches, all ranks).
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
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
    """DAPO's flags; the shared ones (model, data, optimizer, engine, validation, ...) are RunArgs'."""

    out_dir: str = "runs/dapo"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    prompts_per_rank: int = 2
    """Groups with varied scores each data-parallel rank trains on per step (verl's train_batch_size / dp)."""
    gen_prompts_per_rank: int = 2
    """Prompts each data-parallel rank samples per generation round (verl's gen_batch_size / dp)."""
    max_gen_rounds: int = 4
    """Generation rounds per step at most (verl's max_num_gen_batches); all ranks run the same number."""
    group_size: int = 8
    """Responses per prompt."""
    overlong_buffer_len: int = 16
    """Soft overlong punishment over the last this many tokens before max_response_len (0 = off)."""
    overlong_penalty_factor: float = 1.0
    """Penalty at max_response_len (the paper's 1)."""
    clip_high: float = 0.28
    """PPO clip ε_high (clip-higher)."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch and epoch (verl: train_batch_size / ppo_mini_batch_size)."""

    def __post_init__(self) -> None:
        if self.gen_prompts_per_rank * self.max_gen_rounds < self.prompts_per_rank:
            raise ValueError("--gen-prompts-per-rank x --max-gen-rounds must be >= --prompts-per-rank (else "
                             "ranks' batches could differ in size)")


def cat_groups(groups):
    """Rows of several rollout batches as one: prompts left-padded, responses right-padded to the widest."""
    widths = [max(batch[i].shape[1] for batch, _ in groups) for i in (0, 2)]  # prompt, response

    def field(i):
        parts = [batch[i][rows] for batch, rows in groups]
        if parts[0].dim() == 1:
            return torch.cat(parts)
        pad = [(widths[0] - t.shape[1], 0) if i < 2 else (0, widths[1] - t.shape[1]) for t in parts]
        return torch.cat([F.pad(t, p) for t, p in zip(parts, pad)])
    return type(groups[0][0])(*(field(i) for i in range(len(groups[0][0]))))


LR_SCHEDULES = {"constant": constant_lr_factor, "cosine": cosine_lr_factor}  # --lr-schedule


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded trainer, data, resume ------------------------------------------
    ctx = init(seed=args.seed)
    run_lock = lock_run_dir(args.out_dir)  # a second run into the same out_dir fails here, naming this one
    rank, world, device, G = ctx.rank, ctx.world_size, ctx.device, args.group_size
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=args.gen_prompts_per_rank * G)  # device defaults
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), tensor_parallel_size=args.tp,
                           seed=args.seed, **fit.engine_kwargs)  # KV cache, compile, sleep, max_num_seqs
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger)  # packed attention
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    dp, (dp_rank, dp_size) = mesh.get_group("dp"), dp_rank_and_size(mesh)  # ranks of one engine: one dp rank
    shard_model(model, mesh, param_dtype=compute if compute != dtype else None, **fit.shard_kwargs)
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
        with timed(timing, "gen"):  # ---- dynamic sampling: rounds until prompts_per_rank varied groups ----
            kept, dropped, rounds, varied, short = [], [], 0, 0, True  # groups: ((batch, rows), scores)
            failed = dict.fromkeys(("reward/timeouts", "reward/errors"), 0.0)
            while short and rounds < args.max_gen_rounds:
                picked, sampler = next_indices(sampler, len(data), batch_size=args.gen_prompts_per_rank,
                                               rank=dp_rank, world_size=dp_size, seed=args.seed)
                seed = rollout_seed(seed=args.seed, step=step, dp_rank=dp_rank, dp_size=dp_size, round=rounds,
                                    rows=args.gen_prompts_per_rank * G, rounds=args.max_gen_rounds)
                rounds += 1
                batch = generate(engine, [data[i][0] for i in picked], n=G, seed=seed, pad_token_id=pad_id,
                                 temperature=args.temperature, max_tokens=args.max_response_len,
                                 progress=rank == 0, logprobs=fit.rollout_logprobs)
                batch = batch.to(device)
                scored = score(batch, [data[i][1] for i in picked for _ in range(G)])
                failed = {k: v + scored.metrics[k] for k, v in failed.items()}
                scores = scored.scores.to(device)
                keep = ops.nonzero_variance_group_mask(scores, group_size=G)[::G].tolist()
                varied += sum(keep)
                for g, k in enumerate(keep):
                    group = ((batch, slice(g * G, (g + 1) * G)), scores[g * G : (g + 1) * G])
                    (kept if k and len(kept) < args.prompts_per_rank else dropped).append(group)
                short = all_reduce_scalars({"short": len(kept) < args.prompts_per_rank}, mean=False,
                                           device=device)["short"] > 0  # every rank runs the same rounds
            sleep_engine(engine, level=fit.sleep_level)  # frees its memory for the update; the sync wakes it
        # a rank still short pads with dropped groups that the loss ignores (same shapes, no gradient)
        groups = kept + dropped[: args.prompts_per_rank - len(kept)]
        batch, scores = cat_groups([g for g, _ in groups]), torch.cat([s for _, s in groups])
        host = batch.to("cpu")  # for the forwards: packed without waiting for the GPU
        kept_rows = torch.arange(len(groups) * G, device=device) < len(kept) * G
        mask, loss_mask = batch.response_mask, batch.response_mask & kept_rows[:, None]
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        plans = step_micro_batches(lengths, max_tokens=fit.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)  # as many micro-batches on every rank
        on_policy = args.mini_batches == args.epochs == 1

        with timed(timing, "old_log_prob"):  # ---- π_old (no grad), unless the ratio is 1 anyway --------
            every_part, old_logprobs = [p for plan in plans for p in plan], None
            if not on_policy:
                old_logprobs = batch_logprobs(model, host, every_part, **forward_kw)

        with timed(timing, "adv"):  # ---- rewards: score + overlong shaping; group-relative advantages -----
            penalty = ops.overlong_penalty(batch.response_lengths, max_response_length=args.max_response_len,
                                           overlong_buffer_len=args.overlong_buffer_len,
                                           penalty_factor=args.overlong_penalty_factor)
            rewards = scores + (penalty if args.overlong_buffer_len else 0.0)
            advantages = ops.grpo_advantages(rewards, mask, group_size=G)

        def micro_batch_loss(part):  # its share of the mini-batch's loss (norms below) and metrics
            logprobs, entropy = rows_logprobs_and_entropy(model, host, part, **forward_kw)
            trainer_logprobs[part] = logprobs.detach()
            m, old = loss_mask[part], logprobs.detach() if on_policy else old_logprobs[part]
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
                norms = step_loss_normalizers([loss_mask[part] for part in plan])
                if norms.num_tokens.item() == 0:  # no kept group in this mini-batch on any rank
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
        corr = {} if not fit.rollout_logprobs else ops.rollout_correction_metrics(  # engine vs trainer
            *(dist_cat_rows(t, group=dp) for t in (behaviour, batch.rollout_logprobs, loss_mask)))
        timing["timing_s/step"] = time.perf_counter() - t_step
        counts = failed | {"perf/total_num_tokens": sum(lengths), "train/num_kept_groups": len(kept),
                           "train/varied_groups": varied}
        metrics = {
            **dist_batch_metrics(scores, rewards, advantages, loss_mask, batch.response_lengths, kept_rows,
                                 max_response_len=args.max_response_len, group=dp),
            **all_reduce_scalars(stats, mean=False, device=device),  # shares of world-wide normalizers
            **all_reduce_scalars(counts, mean=False, device=device, group=dp),  # over every dp rank
            **all_reduce_scalars(timing, mean=True, device=device),
            "train/num_gen_batches": rounds,
            **{k: v.item() for k, v in corr.items()},
            "actor/lr": optimizer.param_groups[0]["lr"],
            "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        }
        metrics |= perf_metrics(metrics, world_size=world, device=device)
        generated = rounds * args.gen_prompts_per_rank * dp_size  # groups, all dp ranks
        metrics["train/varied_group_ratio"] = metrics.pop("train/varied_groups") / generated
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
