"""GRPO with tools: multi-turn rollouts in which the model calls tools, inside each training process.

GRPO (Shao et al. 2024, arXiv:2402.03300) on whole tool-using trajectories, as verl's agent loop and
ReTool (arXiv:2504.11536) train them. `generate_multiturn`: each round, the live trajectories generate
their next turn in one engine call; `<tool_call>` JSON in a turn runs in time-limited worker processes;
results are appended as token ids; a turn without a call ends the trajectory. The reward scores the last
turn; the loss covers model tokens only (tool output is attended to, never trained on).

Launch (defaults: the embedded SmolLM2-135M-Instruct, 3-digit products with a calculator tool):
  python recipes/grpo_tools.py                                  # one process
  torchrun --nproc-per-node 2 recipes/grpo_tools.py             # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/grpo_tools.py --model DIR --train-files train.parquet \\
      --val-files test.parquet --tools mypkg.tools:search,mypkg.tools:python     # a GPU node
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/grpo_tools.py -- --model DIR ...
Rows name their tools in extra_info ("tools": [names], or verl's "tools_kwargs"); `--tools` gives the
functions. Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from the paper / verl:
- The reward scores only the last model turn (verl's default scores the decoded response, tool output
  included, which rewards a trajectory that stops right after the tool printed the answer).
- Token-mean loss over the model tokens of the whole step (all micro-batches, all ranks); no KL term.
- With one mini-batch and one epoch (the default) old_logprobs = logprobs.detach(): no extra forward.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import AutoTokenizer

from rlprims import ops
from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import (SamplerState, multiplication_rows, next_indices, read_verl_parquet, sampler_init,
                          tool_prompt_ids)
from rlprims.launch import RunArgs, fit_to_device, init, parse_args, seed_all, shutdown
from rlprims.metrics import (close_run_log, lock_run_dir, log_generations, log_metrics, open_run_log,
                             perf_metrics, progress, unlock_run_dir)
from rlprims.models.fused import load_model
from rlprims.models.packed import response_logprobs_and_entropy
from rlprims.parallel import (all_reduce_scalars, build_mesh, dist_batch_metrics, dp_rank_and_size,
                              engine_weights, gather_once, optimizer_step, rollout_seed, shard_model,
                              step_loss_normalizers, step_micro_batches)
from rlprims.rewards import check_reward_sources, compute_score, load_reward_fn, reward_pool, score_responses
from rlprims.rollout import (MultiTurnBatch, create_engine, decode_prompts, default_model_path,
                             final_turn_texts, generate, generate_multiturn, load_tools, minimal_tool_prompt,
                             multiturn_sequences, sleep_engine, template_has_tools, template_tool_prompt,
                             tool_pool, tool_use_metrics, tool_use_sums, trajectory_texts, update_weights)
from rlprims.schedules import constant_lr_factor, cosine_lr_factor, is_due
from rlprims.timing import timed
from rlprims.validation import validation_metrics

# How tools reach the prompt: the chat template's own tool section, or the documented minimal format
# (docs/agentic.md) for templates without one (SmolLM2). Empty --tool-prompt picks by the template.
TOOL_PROMPTS = {"template": template_tool_prompt, "minimal": minimal_tool_prompt}
LR_SCHEDULES = {"constant": constant_lr_factor, "cosine": cosine_lr_factor}  # --lr-schedule
CURVES = (("reward", ("critic/score/mean",)), ("tool-call rate", ("tool/call_rate",)),  # curves.png
          ("response length", ("response_length/mean",)), ("entropy", ("actor/entropy",)))


@dataclass
class Args(RunArgs):
    """GRPO-with-tools' flags; the shared ones (model, data, optimizer, engine, ...) are RunArgs'."""

    out_dir: str = "runs/grpo_tools"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 6
    """Rollout + update steps."""
    group_size: int = 8
    """Trajectories per prompt (GRPO's G)."""
    demos: int = 1
    """Embedded task only: solved examples (tool call, result, answer) before each question, 0-4."""
    tools: str = "rlprims.rollout:calculator"
    """Tool functions, "module:function,...": typed, with an Args docstring (their JSON schema)."""
    tool_prompt: str = ""
    """"template" (the chat template's tools= section), "minimal", or empty = by the template."""
    max_prompt_len: int = 320
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts), with a count."""
    max_response_len: int = 128
    """All response tokens of a trajectory, model turns and tool results (verl's response_length)."""
    max_turn_len: int = 48
    """Tokens of one model turn."""
    max_turns: int = 3
    """Model turns per trajectory; a call in the last one is not run. 1 = no tool is ever run."""
    tool_timeout_s: float = 5.0
    """Time limit of one tool call; past it the call is killed and the model reads an error."""
    tool_output_chars: int = 256
    """Tool output (prints and return value) is cut to this many characters."""
    tool_workers: int = 2
    """Tool worker processes per rank."""
    temperature: float = 0.7
    """Sampling temperature; the trainer's log-probs use the same one (0.7: see docs/agentic.md)."""
    lr: float = 2e-5
    """AdamW learning rate of the policy (the peak of the schedule)."""
    clip_high: float = 0.28
    """PPO clip ε_high (DAPO's clip-higher)."""
    max_tokens_per_micro_batch: int = 512
    """Token budget of one forward/backward; 0 = fit. 512 keeps the 135M model's update near 1.5 GB."""
    val_every: int = 3
    """Validate every this many steps, before the first and after the last (0: only those two)."""
    val_prompts: int = 128
    """Held-out prompts per validation (multi-turn, greedy): ±0.04 standard error at most, ~50 s on CPU."""

    def __post_init__(self):  # the counts and limits are checked by generate_multiturn and tool_pool
        if self.tool_prompt not in ("", *TOOL_PROMPTS):
            raise ValueError(f"--tool-prompt {self.tool_prompt!r}: must be empty, 'template' or 'minimal'")


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, tool workers, engine, sharded trainer, data, resume ---------------------------
    ctx = init(seed=args.seed)
    run_lock = lock_run_dir(args.out_dir)  # a second run into the same out_dir fails here, naming this one
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    pool = tool_pool(load_tools(args.tools), timeout_s=args.tool_timeout_s,  # workers start in the background
                     max_output_chars=args.tool_output_chars, workers=args.tool_workers)
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=args.prompts_per_rank * args.group_size)  # device defaults
    max_model_len = args.max_prompt_len + args.max_response_len
    engine = create_engine(model_dir, max_model_len=max_model_len, dtype=str(compute).removeprefix("torch."),
                           tensor_parallel_size=args.tp, seed=args.seed,
                           **fit.engine_kwargs)  # KV cache, compile, sleep, max_num_seqs
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger)  # packed attention
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    dp, (dp_rank, dp_size) = mesh.get_group("dp"), dp_rank_and_size(mesh)  # ranks of one engine: one dp rank
    shard_model(model, mesh, param_dtype=compute if compute != dtype else None, **fit.shard_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lr_factor = partial(LR_SCHEDULES[args.lr_schedule], warmup_steps=int(args.warmup_ratio * args.steps),
                        total_steps=args.steps, min_lr_ratio=args.min_lr_ratio)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else compute_score

    render = TOOL_PROMPTS[args.tool_prompt or ("template" if template_has_tools(tokenizer) else "minimal")]
    rows = (read_verl_parquet(args.train_files) if args.train_files
            else multiplication_rows(4096, seed=0, demos=args.demos))
    val_rows = (read_verl_parquet(args.val_files) if args.val_files
                else multiplication_rows(args.val_prompts, seed=1, demos=args.demos, split="test"))
    data = tool_prompt_ids(tokenizer, rows, pool.schemas, render=render, max_len=args.max_prompt_len)
    val = tool_prompt_ids(tokenizer, val_rows[: args.val_prompts], pool.schemas, render=render,
                          max_len=args.max_prompt_len)
    check_reward_sources(reward_fn, [r["data_source"] for r in rows + val_rows])
    scorer = reward_pool(reward_fn, timeout_s=args.reward_timeout_s)  # worker processes, calls time-limited
    out_dir = Path(args.out_dir)
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step,
                       wandb_project=args.wandb_project or None, tensorboard=args.tensorboard)
    if rank == 0:
        print(f"{len(data)} of {len(rows)} prompts fit {args.max_prompt_len} tokens; start at step {step}")

    def sync() -> None:  # streams the full weights, bucket by bucket, into this rank's engine, in place
        update_weights(engine, engine_weights(model, dtype=compute, bucket_bytes=args.sync_bucket_mb << 20))

    def rollout(prompts, *, n: int, temperature: float, seed: int | None) -> MultiTurnBatch:
        sample = partial(generate, engine, temperature=temperature, pad_token_id=pad_id,
                         logprobs=fit.rollout_logprobs and temperature > 0)  # greedy validation: none
        mt = generate_multiturn(sample, [ids for ids, _ in prompts], n=n, tokenizer=tokenizer, pool=pool,
                                max_turns=args.max_turns, max_response_tokens=args.max_response_len,
                                max_model_len=max_model_len, max_turn_tokens=args.max_turn_len, seed=seed,
                                pad_token_id=pad_id, group=dp)  # engines step together: rounds too
        on_device = type(mt.rollout)(*(t.to(device) for t in mt.rollout))
        return MultiTurnBatch(on_device, *(t.to(device) for t in mt[1:]))

    def score(mt: MultiTurnBatch, batch_rows):  # -> RewardResult of the last turns' answers
        return score_responses(final_turn_texts(tokenizer, mt), batch_rows, scorer)

    def validation(step: int) -> dict[str, float]:  # every rank joins; the ranks of one engine share prompts
        mine = val[dp_rank::dp_size]
        seed = rollout_seed(seed=args.seed + step, step=0, dp_rank=dp_rank, dp_size=dp_size,
                            rows=-(-len(val) // dp_size) * args.val_n * args.max_turns)
        mt = rollout(mine, n=args.val_n, temperature=args.val_temperature, seed=seed)
        scores = score(mt, [r for _, r in mine for _ in range(args.val_n)]).scores
        log_generations(log, step, decode_prompts(tokenizer, mt.rollout)[:4],  # a few: generations.jsonl
                        trajectory_texts(tokenizer, mt)[:4], scores[:4])  # with the tool calls and results
        metrics = validation_metrics(scores, [r["data_source"] for _, r in mine], n=args.val_n, group=dp)
        tool_use = all_reduce_scalars(tool_use_sums(mt), mean=False, device=device, group=dp)
        return metrics | tool_use_metrics(tool_use, prefix="val-aux/")

    sync()  # the engine starts from the model directory; a resumed trainer is ahead of it
    if step == 0 and args.val_prompts:
        log_metrics(log, 0, validation(0))

    while step < args.steps:
        step += 1
        timing, t_step = {}, time.perf_counter()
        with timed(timing, "gen"):  # ---- rollout: this dp rank's prompts, group_size trajectories each ----
            picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=dp_rank,
                                           world_size=dp_size, seed=args.seed)
            seed = rollout_seed(seed=args.seed, step=step, dp_rank=dp_rank, dp_size=dp_size,  # a block a turn
                                rows=args.prompts_per_rank * args.group_size * args.max_turns)
            mt = rollout([data[i] for i in picked], n=args.group_size, temperature=args.temperature,
                         seed=seed)
            sleep_engine(engine, level=fit.sleep_level)  # frees its memory for the update; the sync wakes it
        batch, mask = mt.rollout, mt.rollout.response_mask  # groups contiguous; mask: the model's tokens only
        with timed(timing, "reward"):  # ---- the last turn's answer, scores standardized within each group --
            scored = score(mt, [data[i][1] for i in picked for _ in range(args.group_size)])
            scores = scored.scores.to(device)
            advantages = ops.grpo_advantages(scores, mask, group_size=args.group_size)

        # ---- packed micro-batches of ≤ max_tokens, as many on every rank (FSDP2 gathers in each pass) ----
        P, seqs = batch.prompt_ids.shape[1], multiturn_sequences(mt)  # attends to every turn, [B, P + R]
        seqs = type(seqs)(*(t.cpu() for t in seqs))  # on the host: micro-batches packed without GPU waits
        lengths = seqs.attention_mask.sum(1).tolist()
        plans = step_micro_batches(lengths, max_tokens=fit.max_tokens_per_micro_batch,
                                   mini_batches=args.mini_batches)
        on_policy = args.mini_batches == args.epochs == 1

        def logprobs_and_entropy(part):  # the trainer's forward over the rows' prompt and all their turns
            idx = torch.tensor(part, dtype=torch.long)
            out = response_logprobs_and_entropy(model, *(t[idx] for t in seqs), temperature=args.temperature,
                                                share_prefixes=fit.share_prompts, device=device)
            return out.logprobs[:, P:], out.entropy[:, P:]

        with timed(timing, "old_log_prob"), torch.no_grad():  # ---- π_old, only when several updates -----
            old_logprobs = torch.zeros_like(batch.rollout_logprobs)
            for part in ([] if on_policy else [p for plan in plans for p in plan]):
                old_logprobs[part] = logprobs_and_entropy(part)[0]

        def micro_batch_loss(part):  # its share of the mini-batch's token-mean loss (norms below), metrics
            logprobs, entropy = logprobs_and_entropy(part)
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

        with timed(timing, "update_actor"):  # ---- epochs x mini-batches, an optimizer step each ----------
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(step - 1)
            stats, grad_norms, updates = {}, [], args.epochs * len(plans)
            trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
            for plan in (p for _ in range(args.epochs) for p in plans):
                norms = step_loss_normalizers([mask[part] for part in plan])
                parts = progress(gather_once(model, plan, enabled=fit.gather_once), total=len(plan),
                                 desc=f"step {step} update", rank=rank)
                norm, sums = optimizer_step(model, optimizer, parts, micro_batch_loss,
                                            max_grad_norm=args.max_grad_norm)
                grad_norms.append(norm)
                stats = {k: stats.get(k, 0.0) + v / updates for k, v in sums.items()}
        with timed(timing, "update_weights"):
            sync()

        # ---- log (over every dp rank's trajectories: each engine once), validate, checkpoint --------------
        behaviour = trainer_logprobs if on_policy else old_logprobs  # log π_old of the sampled tokens
        corr = {} if not fit.rollout_logprobs else ops.rollout_correction_metrics(  # engine vs trainer
            behaviour, batch.rollout_logprobs, mask)
        timing["timing_s/step"] = time.perf_counter() - t_step
        counts = tool_use_sums(mt) | {k: scored.metrics[k] for k in ("reward/timeouts", "reward/errors")}
        counts |= {"perf/total_num_tokens": sum(lengths)}
        counts = all_reduce_scalars(counts, mean=False, device=device, group=dp)
        metrics = {
            **dist_batch_metrics(scores, scores, advantages, mask, mt.sequence_mask.sum(1),  # all tokens
                                 max_response_len=args.max_response_len, group=dp),
            **tool_use_metrics(counts), **{k: counts[k] for k in ("reward/timeouts", "reward/errors")},
            **all_reduce_scalars(stats, mean=False, device=device),  # shares of world-wide normalizers
            **all_reduce_scalars(timing | {k: v.item() for k, v in corr.items()} | {
                "response_length/model_tokens_mean": batch.response_lengths.float().mean().item()},
                mean=True, device=device),
            "perf/total_num_tokens": counts["perf/total_num_tokens"],
            "actor/lr": optimizer.param_groups[0]["lr"], "actor/grad_norm": sum(grad_norms) / len(grad_norms),
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
    pool.close()
    scorer.close()
    close_run_log(log, curves=CURVES)
    unlock_run_dir(run_lock)
    engine = None  # vLLM's teardown needs the process group: free the engine first
    gc.collect()
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
