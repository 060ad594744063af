"""GRPO with tools: multi-turn rollouts in which the model calls tools, inside each training process.

GRPO (Shao et al. 2024, arXiv:2402.03300) on whole tool-using trajectories, as verl's agent loop and
ReTool (arXiv:2504.11536) train them. `generate_multiturn`: each round, the live trajectories generate
their next turn in one engine call; `<tool_call>` JSON in a turn runs in time-limited worker processes;
results are appended as token ids; a turn without a call ends the trajectory. The reward scores the last
turn; the loss covers model tokens only (tool output is attended to, never trained on).

Launch (defaults: the embedded SmolLM2-135M-Instruct, 3-digit products with a calculator tool):
  python recipes/grpo_tools.py                                  # one process
  torchrun --nproc-per-node 2 recipes/grpo_tools.py             # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/grpo_tools.py --model DIR --train-files train.parquet \
      --val-files test.parquet --tools mypkg.tools:search,mypkg.tools:python --compute-dtype bfloat16
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/grpo_tools.py -- --model DIR ...
Rows name their tools in extra_info ("tools": [names], or verl's "tools_kwargs"); `--tools` gives
the functions. Every Args field is a flag (`--help`). A run resumes from the newest checkpoint.

Deliberate departures from the paper / verl:
- On-policy: one optimizer step per rollout batch (old_logprobs = logprobs.detach()); no KL term.
- Token-mean loss over the model tokens of the whole step (all micro-batches, all ranks).
- The reward scores only the last model turn (verl's default scores the decoded response, tool
  output included, which rewards a trajectory that stops right after the tool printed the answer).
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import (SamplerState, multiplication_rows, next_indices, read_verl_parquet, sampler_init,
                          tool_prompt_ids)
from rlprims.launch import init, parse_args, seed_all, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, progress
from rlprims.models.packed import register_packed_attention, response_logprobs_and_entropy
from rlprims.ops import (aggregate_token_mean, grpo_advantages, masked_mean, ppo_clip_loss,
                         rollout_correction_metrics)
from rlprims.parallel import (all_reduce_scalars, build_mesh, dp_rank_and_size, engine_weights, rollout_seed,
                              shard_model, step_loss_normalizers, step_micro_batches)
from rlprims.rewards import check_reward_sources, compute_score, load_reward_fn, reward_pool, score_responses
from rlprims.rollout import (FINISH_LENGTH, MultiTurnBatch, create_engine, default_model_path,
                             final_turn_texts, generate, generate_multiturn, load_tools, minimal_tool_prompt,
                             multiturn_sequences, template_has_tools, template_tool_prompt, tool_pool,
                             tool_use_metrics, tool_use_sums, update_weights)

# How tools reach the prompt: the chat template's own tool section, or the documented minimal format
# (docs/agentic.md) for templates without one. Empty --tool-prompt picks by the template.
TOOL_PROMPTS = {"template": template_tool_prompt, "minimal": minimal_tool_prompt}


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet, rows naming their tools in extra_info; empty = the embedded task (seed 0)."""
    val_files: str = ""
    """verl-schema parquet scored greedily; empty = the embedded task (seed 1)."""
    demos: int = 2
    """Embedded task only: solved examples (tool call, result, answer) before each question, 0-4."""
    tools: str = "rlprims.rollout:calculator"
    """Tool functions, "module:function,...": typed, with an Args docstring (their JSON schema)."""
    tool_prompt: str = ""
    """"template" (the chat template's tools= section), "minimal", or empty = by the template."""
    reward_fn: str = ""
    """verl-style compute_score as "module:function" or "file.py:function"; empty = rlprims' own."""
    reward_timeout_s: float = 10.0
    """Time limit of one reward call (it runs in a worker process); a call past it scores 0."""
    out_dir: str = "runs/grpo_tools"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 20
    """Rollout + update steps."""
    prompts_per_rank: int = 2
    """Prompts each rank samples per step; a step's batch is world_size x prompts_per_rank groups."""
    group_size: int = 8
    """Trajectories per prompt (GRPO's G)."""
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
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    clip_low: float = 0.2
    """PPO clip ε_low."""
    clip_high: float = 0.28
    """PPO clip ε_high (DAPO's clip-higher)."""
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
    """Held-out prompts run greedily with tools (0 = no validation)."""
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

    def __post_init__(self):  # the counts and limits are checked by generate_multiturn and tool_pool
        if self.tool_prompt not in ("", *TOOL_PROMPTS):
            raise ValueError(f"--tool-prompt {self.tool_prompt!r}: must be empty, 'template' or 'minimal'")


@record  # under torchrun, a failing rank's traceback is shown in the job summary
def main(args: Args) -> None:
    # ---- setup: ranks, tool workers, engine, sharded trainer, data, resume ---------------------------
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    pool = tool_pool(load_tools(args.tools), timeout_s=args.tool_timeout_s,  # workers start in the background
                     max_output_chars=args.tool_output_chars, workers=args.tool_workers)
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = args.model or default_model_path()
    max_model_len = args.max_prompt_len + args.max_response_len
    engine = create_engine(model_dir, max_model_len=max_model_len, dtype=str(compute).removeprefix("torch."),
                           tensor_parallel_size=args.tp, enforce_eager=not args.compile_engine,
                           seed=args.seed, kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30))
    seed_all(args.seed)  # vLLM reseeds the global RNGs when it starts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=register_packed_attention()).to(device)
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    dp, (dp_rank, dp_size) = mesh.get_group("dp"), dp_rank_and_size(mesh)  # one engine's ranks: one dp rank
    shard_model(model, mesh, param_dtype=compute if compute != dtype else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
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

    def sync() -> float:  # streams the full weights, bucket by bucket, into this rank's engine
        t0 = time.perf_counter()
        update_weights(engine, engine_weights(model, dtype=compute, bucket_bytes=args.sync_bucket_mb << 20))
        return time.perf_counter() - t0

    def rollout(prompts, n: int, temperature: float, seed: int | None) -> MultiTurnBatch:
        sample = functools.partial(generate, engine, temperature=temperature, pad_token_id=pad_id)
        mt = generate_multiturn(sample, [ids for ids, _ in prompts], n=n, tokenizer=tokenizer, pool=pool,
                                max_turns=args.max_turns, max_response_tokens=args.max_response_len,
                                max_model_len=max_model_len, max_turn_tokens=args.max_turn_len, seed=seed,
                                pad_token_id=pad_id)
        rollout_on_device = type(mt.rollout)(*(t.to(device) for t in mt.rollout))
        return MultiTurnBatch(rollout_on_device, *(t.to(device) for t in mt[1:]))

    def score(mt: MultiTurnBatch, batch_rows):  # -> RewardResult of the last turns' answers
        return score_responses(final_turn_texts(tokenizer, mt), batch_rows, scorer)

    def validate() -> dict[str, float]:
        """Greedy multi-turn accuracy and tool use on the held-out prompts, split across the engines."""
        mine = val[dp_rank::dp_size]
        mt = rollout(mine, 1, 0.0, None)
        local = {"right": score(mt, [r for _, r in mine]).scores.sum().item(), **tool_use_sums(mt)}
        total = all_reduce_scalars(local, mean=False, device=device, group=dp)  # each engine once
        acc = total["right"] / max(total["trajectories"], 1.0)
        tool_use = tool_use_metrics(total, prefix="val-aux/")
        return {f"val-core/{val[0][1]['data_source']}/acc/mean@1": acc, **tool_use}

    sync()  # the engine starts from the model directory; a resumed trainer is ahead of it
    if step == 0 and args.val_prompts:
        log_metrics(log, 0, validate())

    while step < args.steps:
        step += 1
        t_step = time.perf_counter()
        # ---- rollout: this dp rank's prompts, group_size multi-turn trajectories each, groups contiguous --
        picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=dp_rank,
                                       world_size=dp_size, seed=args.seed)
        calls = args.prompts_per_rank * args.group_size * args.max_turns  # seeds: one block of rows per turn
        seed = rollout_seed(seed=args.seed, step=step, dp_rank=dp_rank, dp_size=dp_size, rows=calls)
        mt = rollout([data[i] for i in picked], args.group_size, args.temperature, seed)
        batch, mask = mt.rollout, mt.rollout.response_mask  # the model's tokens; tool results are holes
        t_gen = time.perf_counter() - t_step

        # ---- reward (the last turn's answer) and advantages: scores standardized within each group -------
        scored = score(mt, [data[i][1] for i in picked for _ in range(args.group_size)])
        scores = scored.scores.to(device)
        advantages = grpo_advantages(scores, mask, group_size=args.group_size)

        # ---- packed micro-batches of ≤ max_tokens, as many on every rank (FSDP2 gathers in each pass) ----
        P, seqs = batch.prompt_ids.shape[1], multiturn_sequences(mt)  # attends to all turns, [B, P + R]
        lengths = seqs.attention_mask.sum(1).tolist()
        (plan,) = step_micro_batches(lengths, max_tokens=args.max_tokens_per_micro_batch, mini_batches=1)

        # ---- update: clipped surrogate (on-policy: ratio 1), step-wide token-mean over model tokens ------
        t0 = time.perf_counter()
        stats = {"actor/pg_loss": 0.0, "actor/entropy": 0.0, "perf/total_num_tokens": float(sum(lengths))}
        trainer_logprobs = torch.zeros_like(batch.rollout_logprobs)
        norms = step_loss_normalizers([mask[part] for part in plan])
        for part in progress(plan, desc=f"step {step} update", rank=rank):
            idx = torch.tensor(part, dtype=torch.long, device=device)
            out = response_logprobs_and_entropy(model, *(t[idx] for t in seqs), temperature=args.temperature)
            logprobs, entropy, m = out.logprobs[:, P:], out.entropy[:, P:], mask[part]
            pg = ppo_clip_loss(logprobs, logprobs.detach(), advantages[part], m, clip_low=args.clip_low,
                               clip_high=args.clip_high)
            loss = aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
            loss.backward()
            stats["actor/pg_loss"] += loss.item()
            ent = aggregate_token_mean(entropy.detach(), m, num_tokens=norms.num_tokens)
            stats["actor/entropy"] += ent.item()
            trainer_logprobs[part] = logprobs.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0
        t_sync = sync()  # ---- push the new weights into this rank's engine, in place -------------------

        # ---- log (tool use, rewards and sums over the dp ranks: each engine once), validate, checkpoint ----
        lens = mt.sequence_mask.sum(1).float()  # all response tokens: model turns and tool results
        corr = rollout_correction_metrics(trainer_logprobs, batch.rollout_logprobs, mask)
        local = {
            **{f"critic/score/{f}": getattr(scores, f)().item() for f in ("mean", "max", "min")},
            **{f"response_length/{f}": getattr(lens, f)().item() for f in ("mean", "max", "min")},
            "response_length/clip_ratio": (batch.finish_reasons == FINISH_LENGTH).float().mean().item(),
            "response_length/model_tokens_mean": batch.response_lengths.float().mean().item(),
            "critic/advantages/mean": masked_mean(advantages, mask).item(), "actor/lr": args.lr,
            "actor/grad_norm": grad_norm.full_tensor().item(), **{k: v.item() for k, v in corr.items()},
            "timing_s/gen": t_gen, "timing_s/update_actor": t_update, "timing_s/sync": t_sync,
            "timing_s/step": time.perf_counter() - t_step,
        }
        counts = tool_use_sums(mt) | {k: scored.metrics[k] for k in ("reward/timeouts", "reward/errors")}
        counts = all_reduce_scalars(counts, mean=False, device=device, group=dp)
        metrics = {**all_reduce_scalars(local, mean=True, device=device), **tool_use_metrics(counts),
                   **all_reduce_scalars(stats, mean=False, device=device),
                   "reward/timeouts": counts["reward/timeouts"], "reward/errors": counts["reward/errors"]}
        metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / metrics["timing_s/step"] / world
        if args.val_prompts and (step == args.steps or (args.val_every and step % args.val_every == 0)):
            metrics.update(validate())
        log_metrics(log, step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(out_dir / "checkpoints", step, model=model, optimizer=optimizer,
                            extra_state={"step": step, "sampler": sampler.to_dict()}, keep_last=2)

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    close_run_log(log)
    pool.close()
    scorer.close()
    engine = None  # vLLM's teardown needs the process group: free the engine first
    gc.collect()
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
